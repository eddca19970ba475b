# Shared by scripts/run and scripts/test: a virtualenv in .venv with the given extras,
# installed once, again only when pyproject.toml changes.
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

# One stamp for both commands: the pyproject.toml checksum it was made for, then the extras
# installed. The extras pyproject.toml includes in another count as installed with it
# (dev = test + linters; test includes the embedded store), so ./scripts/run after
# ./scripts/test installs nothing; ./scripts/test after ./scripts/run adds the test tools.
STAMP="$VENV/.omnigate-installed"

ensure_venv() {  # $1: extras, "embedded" (./scripts/run) or "dev" (./scripts/test)
    extras="$1"
    sum="$(cksum < "$ROOT/pyproject.toml" | cut -d' ' -f1)"
    installed=""
    if [ -f "$STAMP" ] && [ "$(sed -n 1p "$STAMP")" = "$sum" ]; then
        installed="$(sed -n 2p "$STAMP")"
    fi
    case " $installed " in
        *" $extras "*) return 0 ;;
    esac
    if [ ! -x "$VENV/bin/python" ]; then
        python="$(find_python)"
        "$python" -m venv "$VENV" || {
            echo "could not create a virtualenv; on Debian/Ubuntu: apt-get install python3-venv" >&2
            return 1
        }
    fi
    echo "installing Omnigate[$extras] into $VENV (once; again when pyproject.toml changes)" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[$extras]"
    case "$extras" in
        dev) installed="$installed dev test embedded" ;;
        test) installed="$installed test embedded" ;;
        *) installed="$installed $extras" ;;
    esac
    rm -f "$VENV"/.omnigate-embedded-* "$VENV"/.omnigate-dev-*  # the stamps of before
    # shellcheck disable=SC2086 # unquoted on purpose: one space between the names
    printf '%s\n%s\n' "$sum" "$(echo $installed)" > "$STAMP"
}
