"""The Telegram connector's pure parts: splitting, rendering, mentions, deep links."""

from __future__ import annotations

from datetime import UTC, datetime

from aiogram.types import Message
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from connectors.telegram.inbound import (
    BotUser,
    addressed_to_bot,
    start_payload,
    utf16_len,
    without_bot_mentions,
)
from connectors.telegram.outbound import (
    MAX_CALLBACK_BYTES,
    needs_mapping,
    render,
    short_key,
    split_text,
)
from gateway.model import Activity, ActivityType, ConversationRef, Direction, Party, Role

ME = BotUser(id=42, username="Shop_Bot")
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def message(text: str, entities: list[dict] | None = None, **fields: object) -> Message:
    return Message.model_validate({
        "message_id": 1, "date": 0, "chat": {"id": -5, "type": "group"},
        "from": {"id": 7, "is_bot": False, "first_name": "A"}, "text": text,
        "entities": entities or [], **fields})


def item(text: str | None, role: Role = Role.BOT, name: str | None = None,
         kind: ActivityType = ActivityType.MESSAGE) -> Activity:
    return Activity(id="i", type=kind, conversation_id="c", contact_id="k", seq=1,
                    contact_seq=1, direction=Direction.OUTBOUND, channel="telegram",
                    conversation_ref=ConversationRef(channel="telegram", thread_key="1"),
                    sender=Party(role=role, name=name), timestamp=NOW, created_at=NOW,
                    text=text)


@hypothesis_settings(max_examples=300, deadline=None, database=None)
@given(text=st.text(st.characters(codec="utf-8"), max_size=3000)
       | st.text(alphabet="ab \n🙂", max_size=3000),
       limit=st.integers(2, 700))
def test_split_parts_fit_concatenate_and_are_stable(text: str, limit: int) -> None:
    parts = split_text(text, limit)
    assert "".join(parts) == text
    assert all(utf16_len(p) <= limit for p in parts)
    assert all(parts) or parts == [""]
    assert split_text(text, limit) == parts  # a retry resumes on the same parts


def test_split_prefers_line_ends_then_spaces() -> None:
    text = ("a" * 3000 + "\n") + ("b" * 2000 + " ") + "c" * 100
    assert split_text(text) == ["a" * 3000 + "\n", "b" * 2000 + " " + "c" * 100]
    words = ("word " * 2000).strip()
    assert all(p.endswith(" ") for p in split_text(words)[:-1])
    assert split_text("x" * 8193) == ["x" * 4096, "x" * 4096, "x"]
    emoji = "🙂" * 2049  # 4098 UTF-16 units: never cut inside one
    assert split_text(emoji) == ["🙂" * 2048, "🙂"]


def test_render_bot_agent_event() -> None:
    assert render(item("  hi  ")).text == "hi"
    agent = render(item("Hello", Role.AGENT, "Alice"))
    assert agent is not None and (agent.text, agent.bold_prefix) == ("Alice: Hello", 6)
    assert render(item("Hello", Role.AGENT)).text == "Agent: Hello"
    note = render(item("Alice joined the conversation.", Role.SYSTEM,
                       kind=ActivityType.EVENT))
    assert note is not None and note.italic
    assert render(item(None, Role.SYSTEM, kind=ActivityType.EVENT)) is None
    assert render(item("   ")) is None


def test_long_values_get_short_stable_keys() -> None:
    long = "x" * 65
    assert needs_mapping(long) and not needs_mapping("x" * 64)
    assert needs_mapping("og~short")  # could be mistaken for a key: mapped too
    assert short_key(long) == short_key(long) != short_key(long + "y")
    assert len(short_key("é" * 200).encode()) <= MAX_CALLBACK_BYTES


def test_mentions_count_utf16_units() -> None:
    text = "🙂 @shop_bot where is my order"  # the emoji is 2 UTF-16 units
    entities = [{"type": "mention", "offset": 3, "length": 9}]
    msg = message(text, entities)
    assert addressed_to_bot(msg, ME)
    assert without_bot_mentions(text, msg.entities or [], ME) == "🙂 where is my order"
    other = message("🙂 @shop_bot2 hi", [{"type": "mention", "offset": 3, "length": 10}])
    assert not addressed_to_bot(other, ME)
    named = message("hi", [{"type": "text_mention", "offset": 0, "length": 2,
                            "user": {"id": 42, "is_bot": True, "first_name": "Shop"}}])
    assert addressed_to_bot(named, ME)
    command = message("/help@shop_bot now", [{"type": "bot_command", "offset": 0,
                                              "length": 14}])
    assert addressed_to_bot(command, ME)
    assert without_bot_mentions(command.text or "", command.entities or [], ME) == "/help now"
    reply = message("thanks", reply_to_message={
        "message_id": 9, "date": 0, "chat": {"id": -5, "type": "group"},
        "from": {"id": 42, "is_bot": True, "first_name": "Shop"}, "text": "done"})
    assert addressed_to_bot(reply, ME)
    assert not addressed_to_bot(message("hello all"), ME)


def test_start_payloads() -> None:
    assert start_payload("/start") == (True, None)
    assert start_payload("/start  abc-1 ") == (True, "abc-1")
    assert start_payload("/start@shop_bot xyz") == (True, "xyz")
    assert start_payload("/started") == (False, None)
    assert start_payload("start abc") == (False, None)
    assert start_payload("/start " + "p" * 600)[1] == "p" * 512
