"""``omnigate serve --workers N``: N gateway processes on one port, one store.

The master process does no request work. It owns the embedded store (when no
OMNIGATE_MONGODB_URI is set: gateway/store/embedded.py, which every worker then attaches
to), starts N workers (``omnigate serve --worker``, each binding the port with
``SO_REUSEPORT`` so the kernel spreads connections over them), restarts a worker that dies
(backoff 0.5 s doubling to 10 s), and on SIGTERM/SIGINT stops them all, then the store.

The workers are ordinary gateways: everything they share goes through the store (the
change feed carries live delivery between them, leases keep pollers to one of them). For
``/metrics`` they share one prometheus-client multiprocess directory, so any worker's
scrape adds up all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from gateway.metrics import MULTIPROC_ENV
from gateway.settings import Settings
from gateway.store.embedded import EmbeddedStore
from gateway.store.orphan import dies_with_parent

log = logging.getLogger(__name__)

RESTART_FIRST, RESTART_MAX = 0.5, 10.0
STABLE = 30.0  # a worker that ran this long before dying restarts after RESTART_FIRST
STOP_GRACE = 25.0  # a worker's own shutdown takes up to ~10 s (run_app's timeout)


def worker_command(settings: Settings) -> list[str]:
    """The command line of one worker: the master's own settings, made explicit."""
    args = [sys.executable, "-m", "gateway", "serve", "--worker",
            "--host", settings.host, "--port", str(settings.port),
            "--data-dir", str(settings.data_dir)]
    if settings.mongodb_uri is not None:
        args += ["--mongodb-uri", settings.mongodb_uri]
    return args


class Worker:
    """One worker process, restarted when it dies until ``stop``."""

    def __init__(self, number: int, args: list[str], env: dict[str, str],
                 metrics_dir: str) -> None:
        self.number = number
        self.args = args
        self.env = env
        self.metrics_dir = metrics_dir
        self.process: asyncio.subprocess.Process | None = None
        self.stopping = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = RESTART_FIRST
        while not self.stopping:
            self.process = process = await asyncio.create_subprocess_exec(
                *dies_with_parent(self.args), env=self.env, stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True)  # a terminal's Ctrl-C reaches the master only
            log.info("worker %d started (pid %d)", self.number, process.pid)
            started = loop.time()
            code = await process.wait()
            mark_process_dead(process.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
            if self.stopping:
                return
            if loop.time() - started >= STABLE:
                delay = RESTART_FIRST
            log.error("worker %d (pid %d) exited with code %s; starting it again in %.1f s",
                      self.number, process.pid, code, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX)

    async def stop(self) -> None:
        self.stopping = True
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE)
        except TimeoutError:
            log.warning("worker %d (pid %d) did not stop in %.0f s; killing it",
                        self.number, process.pid, STOP_GRACE)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


def _metrics_dir() -> tuple[str, bool]:
    """The multiprocess directory the workers share, emptied; True if made here."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):  # prometheus-client: wipe it between runs
            stale.unlink()
        return str(path), False
    return tempfile.mkdtemp(prefix="omnigate-metrics-"), True


async def run_master(settings: Settings) -> int:
    """Run ``settings.workers`` workers until SIGTERM/SIGINT; returns the exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    embedded: EmbeddedStore | None = None
    if settings.mongodb_uri is None:
        embedded = EmbeddedStore(settings.data_dir, sync_on_commit=settings.embedded_sync_on_commit)
        await embedded.start()  # before the workers, which attach to it
    metrics_dir, made = _metrics_dir()
    env = dict(os.environ, **{MULTIPROC_ENV: metrics_dir,
                              "OMNIGATE_WORKERS": str(settings.workers)})
    args = worker_command(settings)
    workers = [Worker(n, args, env, metrics_dir) for n in range(1, settings.workers + 1)]
    runs = [asyncio.create_task(w.run(), name=f"worker-{w.number}") for w in workers]
    log.info("master (pid %d): %d workers on %s:%d", os.getpid(), settings.workers,
             settings.host, settings.port)
    try:
        await stop.wait()
        log.info("stopping %d workers", len(workers))
    finally:
        await asyncio.gather(*(w.stop() for w in workers))
        for run in runs:
            run.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        if embedded is not None:
            await embedded.stop()
        if made:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("Omnigate stopped")
    return 0


def serve_workers(settings: Settings) -> int:
    return asyncio.run(run_master(settings))
