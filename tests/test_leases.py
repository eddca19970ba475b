"""Named leases (gateway/leases.py) on the real store: one holder at a time, expiry
takeover, release, the duplicate-key race of the first acquire, and ``Singleton``
stopping its work when a renewal fails."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
from pymongo.errors import PyMongoError

from gateway.leases import Busy, Held, Leases, Singleton, Work
from gateway.model import utcnow
from gateway.store import Store
from tests.conftest import free_port, need, secantus_executable, wait_for_port

NAME = "test:poller"


async def test_one_holder_at_a_time_and_renewal_by_the_holder(store: Store) -> None:
    one, two = Leases(store, "host-a:1:aa"), Leases(store, "host-b:2:bb")
    got = await one.acquire(NAME, ttl=30)
    assert isinstance(got, Held) and got.owner == "host-a:1:aa"
    assert got.fencing == 1 and not got.renewed
    other = await two.acquire(NAME, ttl=30)
    assert isinstance(other, Busy) and other.owner == "host-a:1:aa"
    assert other.until is not None and other.until > utcnow()
    again = await one.acquire(NAME, ttl=30)  # already mine: renewed, same fencing
    assert isinstance(again, Held) and again.renewed and again.fencing == 1
    assert not await two.renew(NAME) and not await two.release(NAME)
    assert await one.holder(NAME) == "host-a:1:aa"
    assert await store.db["leases"].count_documents({}) == 1


async def test_an_expired_lease_is_taken_over_with_a_higher_fencing_number(
    store: Store,
) -> None:
    one, two = Leases(store, "host-a:1:aa"), Leases(store, "host-b:2:bb")
    first = await one.acquire(NAME, ttl=0.3)
    assert isinstance(first, Held)
    await asyncio.sleep(0.5)
    assert await one.holder(NAME) is None  # expired
    taken = await two.acquire(NAME, ttl=30)
    assert isinstance(taken, Held) and taken.owner == "host-b:2:bb"
    assert taken.fencing == first.fencing + 1
    assert not await one.renew(NAME)  # the late previous holder finds out
    assert isinstance(await one.acquire(NAME), Busy)


async def test_release_frees_the_lease_at_once(store: Store) -> None:
    one, two = Leases(store, "host-a:1:aa"), Leases(store, "host-b:2:bb")
    assert isinstance(await one.acquire(NAME, ttl=30), Held)
    assert await one.release(NAME)
    assert await one.holder(NAME) is None
    taken = await two.acquire(NAME, ttl=30)
    assert isinstance(taken, Held) and taken.fencing == 2


async def test_a_dead_holder_on_this_machine_is_taken_over_at_once(store: Store) -> None:
    process = subprocess.Popen(["true"])
    process.wait()  # a pid that no longer runs
    dead = Leases(store, f"{socket.gethostname()}:{process.pid}:dead")
    assert isinstance(await dead.acquire(NAME, ttl=60), Held)
    taken = await Leases(store, "host-b:2:bb").acquire(NAME, ttl=30)
    assert isinstance(taken, Held) and taken.fencing == 2


async def test_concurrent_first_acquires_of_a_new_name_have_one_winner(store: Store) -> None:
    for round_ in range(5):
        name = f"{NAME}:{round_}"
        contenders = [Leases(store, f"host-{n}:{n}:x") for n in range(8)]
        results = await asyncio.gather(*(c.acquire(name, ttl=30) for c in contenders))
        winners = [r for r in results if isinstance(r, Held)]
        assert len(winners) == 1, results
        assert winners[0].fencing == 1
        losers = [r for r in results if isinstance(r, Busy)]
        assert len(losers) == 7
        assert {r.owner for r in losers} == {winners[0].owner}


class Recorder:
    """Work for ``Singleton``s: records how many run at once, and every run."""

    def __init__(self) -> None:
        self.running: list[str] = []
        self.most = 0
        self.runs: list[str] = []
        self.cancelled_at: list[datetime] = []

    def work(self, who: str) -> Work:
        async def run() -> None:
            self.running.append(who)
            self.runs.append(who)
            self.most = max(self.most, len(self.running))
            try:
                await asyncio.Event().wait()
            finally:
                self.cancelled_at.append(utcnow())
                self.running.remove(who)
        return run


async def until(check: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_singletons_run_the_work_once_and_hand_over_on_stop(store: Store) -> None:
    record = Recorder()
    runners = [Singleton(Leases(store, f"host-{n}:{n}:s"), NAME, record.work(f"p{n}"),
                         ttl=3.0, retry=0.2) for n in range(3)]
    for runner in runners:
        runner.start()
    try:
        await until(lambda: record.running)
        await asyncio.sleep(1.5)  # several renewals and retries
        assert record.most == 1 and len(record.runs) == 1
        first = next(r for r in runners if r.holding.is_set())
        await first.stop()  # releases: another one takes over within its retry
        await until(lambda: len(record.runs) == 2, timeout=10)
        assert record.most == 1 and record.runs[1] != record.runs[0]
        second = next(r for r in runners if r.holding.is_set())
        assert second.fencing == first.fencing + 1
    finally:
        for runner in runners:
            await runner.stop()
    assert not record.running
    assert await Leases(store, "x").holder(NAME) is None  # the last stop released it


async def test_work_stops_when_another_process_holds_the_lease(store: Store) -> None:
    record = Recorder()
    leases = Leases(store, "host-a:1:aa")
    runner = Singleton(leases, NAME, record.work("a"), ttl=1.5, retry=0.2)
    runner.start()
    try:
        await until(lambda: record.running)
        # Another process took the lease (e.g. this one was paused past its lease)
        await store.db["leases"].update_one({"_id": NAME},
                                            {"$set": {"owner": "host-b:2:bb"}})
        await until(lambda: not record.running, timeout=10)  # cancelled at the renewal
        assert not runner.holding.is_set()
        assert await leases.holder(NAME) == "host-b:2:bb"  # and not released by a
    finally:
        await runner.stop()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A store server of this test's own, which it can freeze (SIGSTOP)."""
    executable = secantus_executable()
    if executable is None:
        need("SecantusDB (secantusd-py)", "pip install --pre 'secantusdb'")
    assert executable is not None
    port = free_port()
    process = subprocess.Popen(
        [executable, "--host", "127.0.0.1", "--port", str(port), "--storage-path",
         str(tmp_path / "own")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process, 30)
        yield f"mongodb://127.0.0.1:{port}/?directConnection=true", process
    finally:
        process.send_signal(signal.SIGCONT)
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
async def own_store(own_server: tuple[str, subprocess.Popen[bytes]]) -> AsyncIterator[Store]:
    store = Store.connect(own_server[0], "leases_test", timeout_ms=2000)
    yield store
    with contextlib.suppress(Exception):
        await asyncio.wait_for(store.close(), 5)


async def test_work_stops_before_the_lease_ends_when_the_store_is_unreachable(
    own_server: tuple[str, subprocess.Popen[bytes]], own_store: Store,
) -> None:
    _, server = own_server
    record = Recorder()
    leases = Leases(own_store, "host-a:1:aa")
    runner = Singleton(leases, NAME, record.work("a"), ttl=3.0, retry=0.2)
    runner.start()
    try:
        await until(lambda: record.running)
        server.send_signal(signal.SIGSTOP)  # the store stops answering
        await until(lambda: not record.running, timeout=15)
        stopped_at = record.cancelled_at[-1]
        server.send_signal(signal.SIGCONT)
        doc = await own_store.db["leases"].find_one({"_id": NAME})
        assert doc is not None
        # never two holders: the work ended before anyone else could take the lease
        assert stopped_at < doc["until"], (stopped_at, doc)
        # ...and it starts again when the lease can be had again
        await until(lambda: record.running, timeout=15)
        assert len(record.runs) == 2
    finally:
        server.send_signal(signal.SIGCONT)
        await runner.stop()


async def test_a_frozen_store_fails_commands_after_the_socket_timeout(
    own_server: tuple[str, subprocess.Popen[bytes]],
) -> None:
    """A store that stops answering but keeps its connections open: a command fails
    after the socket timeout (30 s by default, 1 s here) instead of waiting for ever,
    and the same client works again once the store answers."""
    uri, server = own_server
    assert Store.connect(uri, "frozen").client.options.pool_options.socket_timeout == 30.0
    store = Store.connect(uri, "frozen", timeout_ms=2000, socket_timeout_ms=1000)
    try:
        await store.db["t"].insert_one({"_id": 1})
        server.send_signal(signal.SIGSTOP)
        started = asyncio.get_running_loop().time()
        with pytest.raises(PyMongoError):
            await asyncio.wait_for(store.db["t"].insert_one({"_id": 2}), 20)
        assert asyncio.get_running_loop().time() - started < 5
        server.send_signal(signal.SIGCONT)
        assert await store.db["t"].find_one({"_id": 1}) == {"_id": 1}
    finally:
        server.send_signal(signal.SIGCONT)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(store.close(), 5)
