# Shared by scripts/run and scripts/test: a virtualenv in .venv with the given extras,
# reinstalled only when pyproject.toml changes.
set -eu
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${OMNIGATE_VENV:-$ROOT/.venv}"

find_python() {
    for candidate in python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "Omnigate needs Python 3.11 or newer (python3 --version says: $(python3 --version 2>&1))" >&2
    return 1
}

ensure_venv() {  # $1: extras, e.g. "embedded" or "dev"
    extras="$1"
    stamp="$VENV/.omnigate-$extras-$(cksum < "$ROOT/pyproject.toml" | cut -d' ' -f1)"
    if [ -f "$stamp" ]; then
        return 0
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        python="$(find_python)"
        "$python" -m venv "$VENV" || {
            echo "could not create a virtualenv; on Debian/Ubuntu: apt-get install python3-venv" >&2
            return 1
        }
    fi
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[$extras]"
    touch "$stamp"
}
