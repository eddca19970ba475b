"""A real rasa-sdk action server for the tests: ``python -m rasa_sdk --actions PACKAGE``.

Started from the repository root (so ``examples.actions`` and ``tests.actions_testing``
import as they would for a user), bound to 127.0.0.1 (``SANIC_HOST``), in its own process
group (Sanic runs a worker process beside the main one). Ready when ``GET /health``
answers. Stopped with SIGTERM to the group, then SIGKILL; a signal in the first moments
after it becomes healthy can hang it (shared/notes/test-services.md), so it is never
signalled sooner than ``SETTLE_SECONDS`` after that.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.store.orphan import dies_with_parent
from tests.conftest import free_port, need

REPO = Path(__file__).resolve().parent.parent
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
START_SECONDS = 60.0
SETTLE_SECONDS = 1.0


class ActionServer:
    def __init__(self, package: str, log_dir: Path) -> None:
        self.package = package
        self.port = free_port()
        self.log_path = log_dir / f"rasa-{package}-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.healthy_at: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def healthy(self) -> bool:
        try:
            with NO_PROXY.open(self.url + "/health", timeout=1) as resp:
                return resp.status == 200 and json.loads(resp.read()) == {"status": "ok"}
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def start(self) -> None:
        env = {**os.environ, "SANIC_HOST": "127.0.0.1"}
        env.pop("PYTHONPATH", None)  # the package must import from the working directory
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(  # dies with pytest: no orphan if it is killed
                dies_with_parent([sys.executable, "-m", "rasa_sdk", "--actions", self.package,
                                  "--port", str(self.port)]),
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the action server exited with {self.process.returncode}:"
                                   f"\n{self.log_tail()}")
            if self.healthy():
                self.healthy_at = time.monotonic()
                return
            time.sleep(0.1)
        raise RuntimeError(f"the action server was not healthy after {START_SECONDS:g} s:"
                           f"\n{self.log_tail()}")

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        if self.healthy_at is not None:  # the documented hang: never signal it too early
            time.sleep(max(0.0, self.healthy_at + SETTLE_SECONDS - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


@contextlib.contextmanager
def action_server(package: str, log_dir: Path) -> Iterator[ActionServer]:
    """A running server for ``package``; fails the test (never skips) if it cannot start,
    unless rasa-sdk itself is missing (skipped with the install command, failed in CI)."""
    if importlib.util.find_spec("rasa_sdk") is None:
        need("rasa-sdk", "pip install 'rasa-sdk>=3.13' (a dependency of omnigate)")
    server: ActionServer | None = None
    errors: list[str] = []
    for _ in range(2):  # a second try only for a port taken between free_port() and bind
        server = ActionServer(package, log_dir)
        try:
            server.start()
            break
        except RuntimeError as exc:
            errors.append(str(exc))
            server.stop()
            server = None
    if server is None:
        pytest.fail("could not start the rasa-sdk action server:\n" + "\n---\n".join(errors))
    try:
        yield server
    finally:
        server.stop()
