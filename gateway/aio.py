"""Small asyncio helpers: per-key locks, and honouring a swallowed cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


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
