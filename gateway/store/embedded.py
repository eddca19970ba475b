"""The embedded default store: a SecantusDB server run as a supervised child process.

SecantusDB (GPL-2.0, optional extra ``omnigate[embedded]``) speaks the MongoDB wire
protocol. It is only ever *run* (``secantusd-py``), never imported, so the gateway stays
Apache-2.0. Its data lives in ``<data_dir>/db``; ``<data_dir>/store.json`` tells other
``omnigate`` processes (workers, ``omnigate agents add`` while ``serve`` runs) where it is.

Two locks (``flock``) on files in the data directory make one owner at a time:

- ``owner.lock`` is held by the one omnigate process that runs and supervises the server
  (``serve``, or the master of ``serve --workers N``). Every other process attaches to that
  server; an attached process takes ownership when the owner goes away.
- ``server.lock`` is held by the server process itself (it inherits the locked file), so
  it is free exactly when the last server for this directory has exited. A new owner waits
  for that before it starts a server: a gateway restarted right after a crash never
  attaches to the old server while it is still shutting down.

The owner restarts a server that dies (backoff 0.5 s doubling to 10 s) on the same port,
so every process's client reconnects by itself. With ``sync_on_commit`` every commit is
fsynced before it is acknowledged, so an acknowledged write survives a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
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
from gateway.store.orphan import dies_with_parent, pid_alive

log = logging.getLogger(__name__)

EXECUTABLE = "secantusd-py"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
OLD_SERVER_TERM = 6.0  # a previous owner's server still running after this: SIGTERM it
OLD_SERVER_KILL = 10.0  # ... and SIGKILL it after this (acknowledged commits are synced)
RESTART_FIRST, RESTART_MAX = 0.5, 10.0  # backoff between restarts of a dead server
STABLE = 30.0  # a server that ran this long before dying restarts after RESTART_FIRST again
WATCH_EVERY = 1.0  # how often an attached process checks whether the owner went away


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


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


async def _port_open(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive ``flock`` on ``path``, or None if another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _is_server(pid: int) -> bool:
    """True if ``pid`` runs the embedded server (not a process that reused its pid)."""
    try:
        return EXECUTABLE.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return not Path("/proc/self").exists()  # no /proc: trust the pid


def _port_of(uri: str) -> int:
    return int(uri.rsplit(":", 1)[1].split("/", 1)[0])


class EmbeddedStore:
    """Run and supervise (or attach to) the embedded server for one data directory."""

    def __init__(
        self,
        data_dir: Path,
        *,
        sync_on_commit: bool = True,
        host: str = "127.0.0.1",
        attach_timeout: float = START_TIMEOUT,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.sync_on_commit = sync_on_commit
        self.host = host
        self.attach_timeout = attach_timeout
        self.process: asyncio.subprocess.Process | None = None
        self.uri: str | None = None
        self.port: int | None = None
        self._info_file = self.data_dir / "store.json"
        self._owner_fd: int | None = None
        self._task: asyncio.Task[None] | None = None  # the supervisor, or the owner watch
        self._stopping = False
        self.stop_signals = 0  # SIGTERMs the last stop() sent
        self.restarts = 0  # servers started again after one died

    @property
    def owned(self) -> bool:
        """True if this process owns the data directory (runs and supervises the server)."""
        return self._owner_fd is not None

    # ------------------------------------------------------------------- start

    async def start(self) -> str:
        """Own the directory and start its server, or attach to the owner's server."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._stopping = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.attach_timeout
        while True:
            if self._take_ownership():
                try:
                    uri = await self._start_owned()
                except BaseException:
                    self._release()
                    raise
                self._task = asyncio.create_task(self._supervise(), name="embedded-store")
                return uri
            running = await self._running_server()
            if running is not None:
                log.info("using the embedded store %s (owned by another omnigate process)",
                         running)
                self.uri, self.port = running, _port_of(running)
                self._task = asyncio.create_task(self._watch_owner(), name="embedded-watch")
                return running
            if loop.time() > deadline:
                raise StoreError(
                    f"the embedded store in {self.data_dir} belongs to another omnigate "
                    f"process, which has not started it in {self.attach_timeout:.0f} s "
                    f"(see {self.data_dir / 'store.log'})"
                )
            await asyncio.sleep(0.2)

    def _take_ownership(self) -> bool:
        if self._owner_fd is None:
            self._owner_fd = _try_lock(self.data_dir / "owner.lock")
            if self._owner_fd is not None:
                os.ftruncate(self._owner_fd, 0)
                os.write(self._owner_fd, str(os.getpid()).encode())
        return self._owner_fd is not None

    def _release(self) -> None:
        fd, self._owner_fd = self._owner_fd, None
        if fd is not None:
            os.close(fd)  # closing the only fd of the locked file releases the lock

    async def _start_owned(self) -> str:
        """As the owner: wait for any earlier server to exit, then start one."""
        previous = self._read_info()
        await self._wait_for_old_server(previous[1] if previous else None)
        self._info_file.unlink(missing_ok=True)
        if self.port is None and previous is not None:
            self.port = _port_of(previous[0])  # attached processes know this one
        if self.port is None or self.port < 1024 or not _port_free(self.host, self.port):
            self.port = _free_port(self.host)
        return await self._spawn(self.port)

    async def _wait_for_old_server(self, info_pid: int | None) -> None:
        """Until the server an earlier owner started has exited (it may still be
        shutting down after its owner was killed): SIGTERM after OLD_SERVER_TERM,
        SIGKILL after OLD_SERVER_KILL (acknowledged commits are synced either way)."""
        lock_path = self.data_dir / "server.lock"
        legacy = not lock_path.exists()  # a server started before server.lock existed
        try:
            pid: int | None = info_pid if legacy else int(lock_path.read_text() or "x")
        except (OSError, ValueError):
            pid = None
        loop = asyncio.get_running_loop()
        started = loop.time()
        signalled: set[signal.Signals] = set()
        logged = False
        while True:
            if legacy:
                if pid is None or not pid_alive(pid) or not _is_server(pid):
                    return
            elif (fd := _try_lock(lock_path)) is not None:
                os.close(fd)
                return
            waited = loop.time() - started
            if not logged:
                log.info("waiting for the previous embedded store (pid %s) to exit", pid)
                logged = True
            for limit, sig in ((OLD_SERVER_TERM, signal.SIGTERM),
                               (OLD_SERVER_KILL, signal.SIGKILL)):
                if waited > limit and sig not in signalled and pid is not None:
                    log.warning("the previous embedded store (pid %d) is still running after "
                                "%.0f s; sending it %s", pid, waited, sig.name)
                    signalled.add(sig)
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, sig)
            if waited > OLD_SERVER_KILL + 5:
                raise StoreError(
                    f"an earlier embedded store still holds {lock_path} after {waited:.0f} s;"
                    f" stop it (pid {pid})")
            await asyncio.sleep(0.1)

    async def _spawn(self, port: int) -> str:
        """Start a server on ``port``; it holds server.lock for as long as it runs."""
        lock_fd = _try_lock(self.data_dir / "server.lock")
        if lock_fd is None:
            raise StoreError(f"another server still runs on {self.data_dir / 'db'}")
        args = [
            _find_executable(), "--host", self.host, "--port", str(port),
            "--storage-path", str(self.data_dir / "db"), "--log-level", "WARNING",
        ]
        if self.sync_on_commit:
            args.append("--sync-on-commit")
        log_path = self.data_dir / "store.log"
        try:
            with log_path.open("ab") as log_file:
                self.process = process = await asyncio.create_subprocess_exec(
                    *dies_with_parent(args),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    start_new_session=True,
                    pass_fds=(lock_fd,),  # the server holds the lock from here on
                )
            os.ftruncate(lock_fd, 0)
            os.write(lock_fd, str(process.pid).encode())
        finally:
            os.close(lock_fd)
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT
        while not await _port_open(self.host, port):
            if process.returncode is not None:
                self.process = None
                raise StoreError(
                    f"the embedded store exited with code {process.returncode} "
                    f"({self.log_tail(log_path)}); see {log_path} "
                    f"(is another server using {self.data_dir / 'db'} or port {port}?)"
                )
            if asyncio.get_running_loop().time() > deadline:
                await self._stop_process()
                raise StoreError(f"the embedded store did not start in {START_TIMEOUT:.0f} s")
            await asyncio.sleep(0.1)
        self.uri = f"mongodb://{self.host}:{port}/?directConnection=true&retryWrites=false"
        self._info_file.write_text(json.dumps({"uri": self.uri, "pid": process.pid}))
        log.info("embedded store started (pid %d) at %s, data in %s",
                 process.pid, self.uri, self.data_dir / "db")
        return self.uri

    @staticmethod
    def log_tail(log_path: Path) -> str:
        try:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        except OSError:
            tail = []
        return " / ".join(tail) or "unknown"

    def _read_info(self) -> tuple[str, int] | None:
        try:
            info = json.loads(self._info_file.read_text())
            return str(info["uri"]), int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    async def _running_server(self) -> str | None:
        info = self._read_info()
        if info is None:
            return None
        uri, pid = info
        if pid_alive(pid) and await _port_open(self.host, _port_of(uri)):
            return uri
        return None

    # ------------------------------------------------------------- supervision

    async def _supervise(self) -> None:
        """As the owner: restart the server whenever it dies, with backoff."""
        loop = asyncio.get_running_loop()
        delay = RESTART_FIRST
        log_path = self.data_dir / "store.log"
        while not self._stopping:
            process = self.process
            if process is None:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESTART_MAX)
                assert self.port is not None  # set when this process became the owner
                try:
                    await self._spawn(self.port)  # the same port: clients reconnect
                except StoreError as exc:
                    log.error("restarting the embedded store failed: %s", exc)
                    continue
                self.restarts += 1
                log.warning("embedded store restarted (restart %d)", self.restarts)
                continue
            started = loop.time()
            code = await process.wait()
            if self._stopping or self.process is not process:
                return
            self.process = None
            with contextlib.suppress(OSError):
                if (self._read_info() or ("", -1))[1] == process.pid:
                    self._info_file.unlink()
            if loop.time() - started >= STABLE:
                delay = RESTART_FIRST
            log.error("the embedded store (pid %d) died with code %s (%s); restarting it in "
                      "%.1f s; until then messages are refused with the channel's retry answer",
                      process.pid, code, self.log_tail(log_path), delay)

    async def _watch_owner(self) -> None:
        """As an attached process: take ownership if the owner goes away."""
        while not self._stopping:
            await asyncio.sleep(WATCH_EVERY)
            if not self._take_ownership():
                continue
            log.warning("the process that ran the embedded store went away; this process "
                        "(pid %d) runs it now", os.getpid())
            while not self._stopping:
                try:
                    await self._start_owned()
                    break
                except StoreError as exc:
                    log.error("starting the embedded store failed: %s; retrying", exc)
                    await asyncio.sleep(RESTART_MAX)
            await self._supervise()
            return

    # -------------------------------------------------------------------- stop

    async def stop(self) -> None:
        """Stop supervising; as the owner, stop the server too (SIGTERM, SIGKILL after a
        timeout) and release the directory."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.process is not None:
            self._info_file.unlink(missing_ok=True)
            await self._stop_process()
        self._release()

    async def _stop_process(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
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
