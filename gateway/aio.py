"""Small asyncio helpers: per-key locks, and honouring a swallowed cancellation."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

from pymongo.errors import PyMongoError

log = logging.getLogger(__name__)


class KeyedLocks:
    """``async with locks.hold(key):`` serialises work on one key inside this process."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


def raise_if_cancelled() -> None:
    """Honour a cancellation the driver swallowed.

    On Python 3.11, ``asyncio.wait_for`` (used by pymongo's server selection) can swallow a
    cancellation; the operation then fails later with an ordinary PyMongoError. A retry
    loop that catches it would run on after being cancelled, and shutdown would hang.
    Call this in such ``except`` blocks.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def cancel_and_wait(task: asyncio.Task[Any], *, every: float = 0.5) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling again every ``every``
    seconds: a cancellation the driver swallowed (see ``raise_if_cancelled``) would
    otherwise leave a stop waiting for the driver's whole server-selection timeout."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=every)
    if not task.cancelled():
        task.exception()  # retrieved: a failure was logged where it happened


class Background:
    """Background tasks with their references kept, a periodic sweep, and a graceful stop."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def every(self, seconds: float, sweep: Callable[[bool], Awaitable[None]]) -> None:
        """Run ``sweep(first)`` now and then every ``seconds``; store errors are logged."""

        async def forever() -> None:
            first = True
            while True:
                try:
                    await sweep(first)
                    first = False
                except PyMongoError as exc:
                    raise_if_cancelled()
                    log.warning("%s sweep failed: %s", self.name, exc)
                await asyncio.sleep(seconds)

        self._sweeper = asyncio.create_task(forever(), name=f"{self.name}-sweeper")

    async def stop(self, grace: float = 5.0) -> None:
        """Stop sweeping; give running tasks ``grace`` seconds, then cancel them."""
        if self._sweeper is not None:
            await cancel_and_wait(self._sweeper)
        if self.tasks:
            _, pending = await asyncio.wait(set(self.tasks), timeout=grace)
            await asyncio.gather(*(cancel_and_wait(task) for task in pending))
