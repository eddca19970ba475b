"""Real ``omnigate serve`` subprocesses on one store, for the multi-process tests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import aiohttp

from gateway.settings import Settings
from gateway.store.orphan import dies_with_parent
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


class ServeProcess:
    """One gateway subprocess on its own port, on the store of ``settings`` (None: its
    own embedded store in ``tmp/<data>``, default ``tmp/<name>``); ``env`` adds to (or
    overrides) its settings, ``args`` to its command line. Nothing is inherited from the
    test's own ``OMNIGATE_*`` or ``PROMETHEUS_MULTIPROC_DIR``."""

    def __init__(self, settings: Settings | None, tmp: Path, name: str,
                 env: Mapping[str, str] | None = None, *, args: tuple[str, ...] = (),
                 port: int | None = None, data: str | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = tmp / (data or name)
        full = {k: v for k, v in os.environ.items()
                if not k.startswith("OMNIGATE_") and k != "PROMETHEUS_MULTIPROC_DIR"}
        if settings is not None:
            assert settings.mongodb_uri is not None
            full.update(OMNIGATE_MONGODB_URI=settings.mongodb_uri,
                        OMNIGATE_MONGODB_DB=settings.mongodb_db)
        full.update(
            OMNIGATE_DATA_DIR=str(self.data_dir),
            OMNIGATE_FLOWS_HOT_RELOAD="false",
            OMNIGATE_LOG_LEVEL="WARNING",
        )
        full.update(env or {})
        self.log_path = tmp / f"{name}.log"
        self.log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            dies_with_parent([sys.executable, "-m", "gateway", "serve", "--port",
                              str(self.port), *args]),
            env=full, cwd=ROOT, stdout=self.log, stderr=self.log, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid  # the shim execs the gateway: the same pid

    def text(self) -> str:
        """The end of its log."""
        return self.log_path.read_text(errors="replace")[-4000:]

    async def ready(self, http: aiohttp.ClientSession, timeout: float = 60.0) -> None:
        """Wait until ``/readyz`` answers 200 (fails if the process exits first)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            assert self.process.poll() is None, (
                f"{self.name} exited with {self.process.returncode}: {self.text()}")
            try:
                async with http.get(self.url + "/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"{self.name} on {self.port} not ready: {self.text()}")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> int:
        """SIGTERM (SIGKILL after 20 s); returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode
