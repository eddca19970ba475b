"""scripts/_venv.sh, the install step of ./scripts/run and ./scripts/test: one stamp for
both, so whichever ran first, the other installs only what it lacks (a fake Python in a
throwaway venv records the pip calls)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/../pip-calls"
"""


def venv(tmp_path: Path) -> Path:
    path = tmp_path / "venv"
    (path / "bin").mkdir(parents=True)
    python = path / "bin" / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return path


def ensure(path: Path, extras: str) -> list[str]:
    """Run ``ensure_venv extras`` as scripts/run does; returns the new pip installs."""
    calls = path / "pip-calls"
    before = calls.read_text().splitlines() if calls.exists() else []
    # $0 is the calling script, as when scripts/run sources _venv.sh (ROOT comes from it)
    subprocess.run(["sh", "-c", f'. "{ROOT}/scripts/_venv.sh" && ensure_venv {extras}',
                    str(ROOT / "scripts" / "run")],
                   env={**os.environ, "OMNIGATE_VENV": str(path)}, check=True,
                   capture_output=True, timeout=30)
    after = calls.read_text().splitlines() if calls.exists() else []
    return [call for call in after[len(before):] if "-e" in call.split()]


def test_run_after_test_installs_nothing(tmp_path: Path) -> None:
    path = venv(tmp_path)
    assert ensure(path, "dev") == [f"-m pip install --quiet -e {ROOT}[dev]"]
    assert ensure(path, "embedded") == []  # dev includes the embedded store
    assert ensure(path, "dev") == []
    assert [p.name for p in path.glob(".omnigate-*")] == [".omnigate-installed"]


def test_test_after_run_adds_the_test_tools_once(tmp_path: Path) -> None:
    path = venv(tmp_path)
    (path / ".omnigate-embedded-123").touch()  # a stamp of the old scheme: cleaned up
    assert ensure(path, "embedded") == [f"-m pip install --quiet -e {ROOT}[embedded]"]
    assert ensure(path, "embedded") == []
    assert ensure(path, "dev") == [f"-m pip install --quiet -e {ROOT}[dev]"]
    assert ensure(path, "embedded") == [] and ensure(path, "dev") == []
    assert [p.name for p in path.glob(".omnigate-*")] == [".omnigate-installed"]


def test_a_changed_pyproject_installs_again(tmp_path: Path) -> None:
    path = venv(tmp_path)
    assert len(ensure(path, "dev")) == 1
    stamp = path / ".omnigate-installed"
    sum_line, extras = stamp.read_text().splitlines()
    stamp.write_text(f"{int(sum_line) + 1}\n{extras}\n")  # made for another pyproject.toml
    assert ensure(path, "embedded") == [f"-m pip install --quiet -e {ROOT}[embedded]"]
    assert len(ensure(path, "dev")) == 1  # the dev tools may be stale too
