"""Hot reload: a changed flow file is live without a restart, a broken one is rejected (and
logged with file:line:column) while the old version answers, conversations in a flow finish
on the version they started with, and under traffic no message is lost or answered by a
half-loaded flow.

The registry alone (flows/registry.py), then the whole gateway on a real port with
``flows_hot_reload`` on, driven by web chat visitors over real sockets.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from flows.registry import FlowLoadError, FlowRegistry, content_version
from gateway.app import BOT
from gateway.keys import OUTBOX
from gateway.model import Activity, Direction
from gateway.settings import Settings
from gateway.store.mongo import from_doc
from tests.conftest import Gateway, Visitor

# Every say carries the version's marker: a reply set that mixes markers, or lacks one of
# the two ping answers, came from a half-loaded flow.
MARKER = re.compile(r"^(V\d+|BROKEN\d*) ")


def flows_text(marker: str, *, thanks: str = "name", intro: bool = False) -> str:
    """One version of the test bot. ``thanks`` is the field the survey's last say uses (a
    wrong one is a validation error); ``intro`` adds a step before the survey's question."""
    intro_step = f'      - say: "{marker} welcome to the survey"\n' if intro else ""
    return f"""\
version: 1
bot_name: Reload bot
greeting: "{marker} hello"
intents:
  ping:
    examples: ["ping", "ping please", "send a ping"]
  survey:
    examples: ["survey", "take the survey", "start the survey"]
slots:
  name:
    type: text
flows:
  ping:
    when: {{intent: ping}}
    steps:
      - say: "{marker} one"
      - say: "{marker} two"
  survey:
    when: {{intent: survey}}
    steps:
{intro_step}      - ask: name
        say: "{marker} what is your name?"
      - say: "{marker} thanks {{{thanks}}}"
"""


def write(directory: Path, text: str, name: str = "bot.yaml") -> str:
    """Write one file; returns the directory's content version."""
    (directory / name).write_text(text)
    return content_version(directory)


async def wait_until(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)
    return value


@pytest.fixture
def flows_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "flows"
    directory.mkdir()
    write(directory, flows_text("V1"))
    return directory


# --------------------------------------------------------------------- registry


async def test_versions_are_content_hashes(flows_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(flows_dir, copy)
    first = FlowRegistry(flows_dir).current().version
    assert first == content_version(flows_dir) == FlowRegistry(copy).current().version
    assert re.fullmatch(r"[0-9a-f]{16}", first)
    changed = write(copy, flows_text("V2"))
    assert changed != first
    assert write(copy, flows_text("V1")) == first  # the same bytes, the same version
    (copy / "bot.yaml").rename(copy / "main.yaml")
    assert content_version(copy) != first  # file names count too


async def test_old_versions_are_kept_lru_bounded(flows_dir: Path) -> None:
    registry = FlowRegistry(flows_dir, keep=2)
    v1 = registry.current().version
    v2 = write(flows_dir, flows_text("V2"))
    assert await registry.reload() is True
    assert await registry.reload() is False  # nothing changed: no new version
    v3 = write(flows_dir, flows_text("V3"))
    assert await registry.reload() is True
    assert registry.versions == [v2, v3] and registry.current().version == v3
    assert registry.get(v1) is None  # dropped: least recently used
    assert registry.get("0123456789abcdef") is None and registry.get("") is None
    got = registry.get(v2)
    assert got is not None and got.version == v2
    assert "V2 one" in str(got.domain.flows["ping"].steps[0])
    assert registry.versions == [v3, v2]  # v2 was used: v3 goes next
    v4 = write(flows_dir, flows_text("V4"))
    assert await registry.reload() is True
    assert registry.versions == [v2, v4] and registry.get(v3) is None
    assert registry.reloads == 3 and registry.rejected == 0


async def test_a_broken_directory_does_not_load(flows_dir: Path) -> None:
    write(flows_dir, flows_text("V1", thanks="nmae"))
    with pytest.raises(FlowLoadError) as caught:
        FlowRegistry(flows_dir)
    assert caught.value.problems == [
        f"{flows_dir / 'bot.yaml'}:{bad_line(flows_text('V1', thanks='nmae'))}: unknown slot "
        "'nmae' in template 'V1 thanks {nmae}' (hint: did you mean name?)"]


def bad_line(text: str) -> str:
    """``line:column`` of the template with the unknown field (its opening quote)."""
    for number, line in enumerate(text.splitlines(), 1):
        if "{nmae}" in line:
            return f"{number}:{line.index(chr(34)) + 1}"
    raise AssertionError("no bad template")


async def test_the_watcher_reloads_and_stops_cleanly(flows_dir: Path) -> None:
    registry = FlowRegistry(flows_dir, debounce_ms=20)
    await registry.start()
    task = registry._task
    assert task is not None and not task.done()
    await registry.start()  # a second start is a no-op
    assert registry._task is task
    v2 = write(flows_dir, flows_text("V2"))
    await wait_until(lambda: registry.current().version == v2, "V2 live")
    await asyncio.wait_for(registry.stop(), 10)
    assert registry._task is None
    assert task.done() and not task.cancelled() and task.exception() is None  # it ended
    await registry.stop()  # stopping twice is fine
    # started again, it sees what changed while it was stopped
    v3 = write(flows_dir, flows_text("V3"))
    assert registry.current().version == v2
    await registry.start()
    try:
        await wait_until(lambda: registry.current().version == v3, "V3 live")
    finally:
        await registry.stop()


async def test_a_watcher_that_cannot_start_can_be_started_again(flows_dir: Path) -> None:
    registry = FlowRegistry(flows_dir)
    moved = flows_dir.with_name("elsewhere")
    flows_dir.rename(moved)
    with pytest.raises(FileNotFoundError):
        await registry.start()
    await registry.stop()  # nothing runs: nothing to stop, nothing raised
    moved.rename(flows_dir)
    await registry.start()
    try:
        v2 = write(flows_dir, flows_text("V2"))
        await wait_until(lambda: registry.current().version == v2, "V2 live")
    finally:
        await registry.stop()


async def test_a_replaced_directory_is_watched_again(
    flows_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A deploy that swaps the directory (a new release unpacked, ``git checkout``): the
    watcher follows the directory at that path, not the one that was there at start."""
    registry = FlowRegistry(flows_dir, debounce_ms=20)
    await registry.start()
    try:
        release = flows_dir.with_name("release-2")
        release.mkdir()
        write(release, flows_text("V2"))
        shutil.rmtree(flows_dir)
        release.rename(flows_dir)
        v2 = content_version(flows_dir)
        await wait_until(lambda: registry.current().version == v2, "the new directory live")
        v3 = write(flows_dir, flows_text("V3"))  # and its files are watched
        await wait_until(lambda: registry.current().version == v3, "a change in it live")
    finally:
        await registry.stop()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and
                "reloading" in r.getMessage()]


# ---------------------------------------------------------------------- gateway


@pytest.fixture
def settings(settings: Settings, flows_dir: Path) -> Settings:
    # The traffic test's visitors send as fast as they are answered: on a fast machine
    # past the per-visitor message limit (600 a minute), which is not what it tests.
    return settings.model_copy(update={"flows_dir": flows_dir, "flows_hot_reload": True,
                                       "webchat_messages_per_minute": 0})


@pytest.fixture
def registry(gateway: Gateway) -> FlowRegistry:
    return gateway.app[BOT].flows


@pytest.fixture
async def visitors(gateway: Gateway) -> AsyncIterator[Callable[[], Awaitable[Visitor]]]:
    made: list[Visitor] = []

    async def new() -> Visitor:
        visitor = Visitor(gateway)
        await visitor.connect()
        made.append(visitor)
        return visitor

    yield new
    for visitor in made:
        await visitor.close()


def is_bot(item: dict[str, Any]) -> bool:
    return bool(item["type"] == "message" and item["role"] == "bot")


async def bot_texts(visitor: Visitor, count: int) -> list[str]:
    """The visitor's bot messages, once there are ``count`` (``say`` may already have
    received some while it waited for its ack)."""
    while len(texts := [i["text"] for i in visitor.items if is_bot(i)]) < count:
        await visitor.recv()
    return texts


async def ask(visitor: Visitor, text: str, replies: int = 1) -> list[str]:
    """Say ``text``; the texts of the next ``replies`` bot messages."""
    before = len([i for i in visitor.items if is_bot(i)])
    await visitor.say(text)
    return (await bot_texts(visitor, before + replies))[before:]


async def ping(visitor: Visitor) -> str:
    """One ping; its two answers must come from one complete version: returns its marker."""
    one, two = await ask(visitor, "ping", 2)
    marker = one.removesuffix(" one")
    assert (one, two) == (f"{marker} one", f"{marker} two"), (one, two)
    return marker


async def test_a_changed_file_is_live_without_a_restart(
    gateway: Gateway, registry: FlowRegistry, visitors: Callable[[], Awaitable[Visitor]],
    flows_dir: Path,
) -> None:
    visitor = await visitors()
    assert await ping(visitor) == "V1"
    started = time.monotonic()
    v2 = write(flows_dir, flows_text("V2"))
    deadline = started + 5.0
    while (marker := await ping(visitor)) != "V2":  # the gateway keeps answering meanwhile
        assert marker == "V1"
        assert time.monotonic() < deadline, "V2 was not live within 5 s"
    print(f"\nhot reload: a changed file answered after {time.monotonic() - started:.3f} s")
    assert registry.current().version == v2 and registry.reloads == 1


async def test_a_broken_file_is_rejected_and_the_old_version_answers(
    gateway: Gateway, registry: FlowRegistry, visitors: Callable[[], Awaitable[Visitor]],
    flows_dir: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "flows.registry")
    visitor = await visitors()
    v1 = registry.current().version
    broken = flows_text("BROKEN", thanks="nmae")
    write(flows_dir, broken)
    await wait_until(lambda: registry.rejected, "the broken file rejected")
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.name == "flows.registry"
    location = f"{flows_dir / 'bot.yaml'}:{bad_line(broken)}: unknown slot 'nmae'"
    assert location in record.getMessage()
    assert f"version {v1} stays live" in record.getMessage()
    assert registry.last_errors and registry.last_errors[0].startswith(location)
    assert registry.current().version == v1
    assert await ping(visitor) == "V1"
    # fixed: live
    v2 = write(flows_dir, flows_text("V2"))
    await wait_until(lambda: registry.current().version == v2, "the fix live")
    assert await ping(visitor) == "V2"
    assert registry.last_errors == [] and registry.rejected == 1


async def test_a_flow_in_progress_finishes_on_its_version(
    gateway: Gateway, registry: FlowRegistry, visitors: Callable[[], Awaitable[Visitor]],
    flows_dir: Path,
) -> None:
    ann = await visitors()
    assert await ask(ann, "take the survey") == ["V1 what is your name?"]
    # V2 has a step before the question: positions differ between the versions
    v2 = write(flows_dir, flows_text("V2", intro=True))
    await wait_until(lambda: registry.current().version == v2, "V2 live")
    bob = await visitors()
    assert await ask(bob, "take the survey", 2) == [
        "V2 welcome to the survey", "V2 what is your name?"]
    assert await ask(ann, "Ann") == ["V1 thanks Ann"]  # started on V1, finished on V1
    assert await ask(bob, "Bob") == ["V2 thanks Bob"]
    # Ann's next flow starts on the current version (her name is known: not asked again)
    assert await ask(ann, "take the survey", 2) == ["V2 welcome to the survey",
                                                    "V2 thanks Ann"]
    assert await ping(ann) == "V2"


async def test_a_file_emptied_while_being_rewritten_is_not_made_live(
    gateway: Gateway, registry: FlowRegistry, visitors: Callable[[], Awaitable[Visitor]],
    flows_dir: Path,
) -> None:
    """Editors that write in place truncate the file first: an empty file is valid YAML
    (no flows at all), but it is a file being written, not a version."""
    visitor = await visitors()
    v1 = registry.current().version
    seen = registry.reloads + registry.rejected
    with (flows_dir / "bot.yaml").open("w") as file:
        file.flush()  # truncated: empty until the editor writes the rest
        await wait_until(lambda: registry.reloads + registry.rejected > seen,
                         "the registry looked at the empty file")
        assert registry.current().version == v1
        assert await ping(visitor) == "V1"
        file.write(flows_text("V2"))
    v2 = content_version(flows_dir)
    await wait_until(lambda: registry.current().version == v2, "V2 live")
    assert await ping(visitor) == "V2"


async def partial_write(directory: Path, text: str, registry: FlowRegistry) -> None:
    """Write ``text`` in two chunks, cut inside a quoted string, with a flush between; the
    registry sees the first half (and rejects it) before the rest is written."""
    cut = text.index(" two\"") + 2
    rejected = registry.rejected
    with (directory / "bot.yaml").open("w") as file:
        file.write(text[:cut])
        file.flush()
        await wait_until(lambda: registry.rejected > rejected and any(
            "YAML: found unexpected end of stream" in e for e in registry.last_errors),
            "the half file rejected")
        file.write(text[cut:])


async def test_hot_reload_under_traffic_loses_nothing_and_mixes_no_versions(
    gateway: Gateway, registry: FlowRegistry, visitors: Callable[[], Awaitable[Visitor]],
    flows_dir: Path,
) -> None:
    crowd = [await visitors() for _ in range(4)]
    writing = True
    seen: list[set[str]] = [set() for _ in crowd]
    sent = [0 for _ in crowd]

    async def chat(n: int) -> None:
        """Two pings at a time (the second waits in the pipeline), then their answers."""
        visitor = crowd[n]
        while writing or sent[n] < 4:
            for _ in range(2):
                await visitor.say("ping")
            sent[n] += 2
            texts = await bot_texts(visitor, 2 * sent[n])
            texts = texts[-4:]
            for one, two in (texts[:2], texts[2:]):
                marker = one.removesuffix(" one")
                assert (one, two) == (f"{marker} one", f"{marker} two"), texts
                seen[n].add(marker)

    def answered(marker: str) -> bool:
        return any(marker in s for s in seen)

    async def rewrite() -> list[str]:
        nonlocal writing
        live = ["V1"]
        try:
            for n in range(2, 14):
                marker = f"V{n}"
                text = flows_text(marker, intro=n % 2 == 0)
                if n % 4 == 0:  # a broken version first: rejected, the old one answers
                    rejected = registry.rejected
                    write(flows_dir, flows_text(f"BROKEN{n}", thanks="nmae"))
                    await until_rejected(registry, rejected)
                if n % 3 == 0:
                    await partial_write(flows_dir, text, registry)
                    version = content_version(flows_dir)
                else:
                    version = write(flows_dir, text)
                await until_live(registry, version)
                live.append(marker)
                # let the traffic meet this version before the next change
                await wait_until(lambda: answered(live[-1]), f"{live[-1]} answered")
        finally:
            writing = False
        return live

    async with asyncio.TaskGroup() as group:  # one failing cancels the others
        writer = group.create_task(rewrite())
        for n in range(len(crowd)):
            group.create_task(chat(n))
    live = writer.result()
    await gateway.settle()

    assert registry.reloads == len(live) - 1
    versions_seen = set().union(*seen)
    assert versions_seen <= set(live), versions_seen - set(live)  # never BROKEN
    assert all(seen)  # every visitor was answered
    assert set(live[1:]) <= versions_seen  # every version answered traffic
    print(f"\nunder traffic: {sum(sent)} messages, {len(live)} versions live, "
          f"{len(versions_seen)} of them answered, {registry.rejected} changes rejected")
    # the store: every inbound message has exactly its two replies, from one version
    inbound = [from_doc(Activity, d) async for d in gateway.store.messages.find(
        {"direction": Direction.INBOUND.value})]
    assert len(inbound) == sum(sent)
    replies: dict[str, list[tuple[int, str]]] = {}
    await gateway.app[OUTBOX].marks.flush()
    delivered = {d["_id"]: d["delivered_seq"] async for d in gateway.store.turn_state.find(
        {}, {"delivered_seq": 1})}
    async for doc in gateway.store.messages.find({"direction": Direction.OUTBOUND.value}):
        item = from_doc(Activity, doc)
        assert item.reply_to_id is not None and item.delivery is not None
        # web chat: read by the sockets from the store; their conversation's mark says
        # the live socket got it
        assert item.delivery.status.value == "stored"
        assert delivered[item.conversation_id] >= item.seq
        replies.setdefault(item.reply_to_id, []).append((item.seq, item.text or ""))
    assert set(replies) == {item.id for item in inbound}
    for item in inbound:
        texts = [text for _, text in sorted(replies[item.id])]
        marker = texts[0].removesuffix(" one")
        assert texts == [f"{marker} one", f"{marker} two"] and marker in live, texts
    # every visitor got exactly its replies, in order
    for n, visitor in enumerate(crowd):
        assert len([i for i in visitor.items if is_bot(i)]) == 2 * sent[n]
    # and the last version answers everyone now
    for visitor in crowd:
        assert await ping(visitor) == live[-1]


async def until_rejected(registry: FlowRegistry, before: int) -> None:
    await wait_until(lambda: registry.rejected > before, "the change rejected")


async def until_live(registry: FlowRegistry, version: str) -> None:
    await wait_until(lambda: registry.current().version == version, f"{version} live")

