"""The minimal FAQ bot (flows/faq.py) on the demo script, and the script loader's errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flows.bot import BotTurn, TurnContext
from flows.faq import FaqBot, ScriptError, load_script
from gateway.model import (
    Activity,
    Conversation,
    ConversationRef,
    Direction,
    Party,
    Role,
    utcnow,
)

DEMO = Path(__file__).resolve().parent.parent / "examples" / "flows"
HOURS = "We're open Monday to Friday"
SHIPPING = "Shipping is free over 50 EUR"


@pytest.fixture(scope="module")
def bot() -> FaqBot:
    return FaqBot.from_dir(DEMO)


class Chat:
    """One conversation with the bot: carries its memory from turn to turn, as the pipeline."""

    def __init__(self, bot: FaqBot) -> None:
        self.bot = bot
        self.state: dict[str, Any] = {}
        now = utcnow()
        self.conversation = Conversation(id="c1", channel="test", thread_key="t1",
                                         contact_id="k1", created_at=now, updated_at=now)
        self.seq = 0

    async def send(self, text: str | None = None, value: str | None = None) -> BotTurn:
        self.seq += 1
        now = utcnow()
        message = Activity(
            id=f"m{self.seq}", conversation_id="c1", contact_id="k1", seq=self.seq,
            contact_seq=self.seq, direction=Direction.INBOUND, channel="test",
            conversation_ref=ConversationRef(channel="test", thread_key="t1"),
            sender=Party(role=Role.CUSTOMER, id="u1"), timestamp=now, created_at=now,
            text=text, value=value)
        turn = await self.bot.respond(TurnContext(self.conversation, None, message,
                                                  dict(self.state)))
        self.state = turn.state
        return turn


@pytest.fixture
async def chat(bot: FaqBot) -> Chat:
    chat = Chat(bot)
    await chat.send("hello")
    return chat


def texts(turn: BotTurn) -> list[str]:
    return [r.text for r in turn.replies]


# -------------------------------------------------------------------- greeting


async def test_first_message_is_greeted_with_the_menu(bot: FaqBot) -> None:
    turn = await Chat(bot).send("hi")
    assert texts(turn) == [bot.script.greeting.text, bot.script.menu.text]
    assert turn.replies[0].buttons == []
    assert [b.value for b in turn.replies[1].buttons] == [
        "faq:hours", "faq:shipping", "faq:returns", "handoff"]
    assert turn.handoff is None
    assert turn.state == {"greeted": True, "misses": 0}


async def test_an_unclear_first_message_is_greeted_not_counted(bot: FaqBot) -> None:
    turn = await Chat(bot).send("blorp")
    assert texts(turn)[0] == bot.script.greeting.text
    assert turn.state["misses"] == 0


async def test_a_question_as_first_message_is_answered(bot: FaqBot) -> None:
    turn = await Chat(bot).send("what are your opening hours?")
    assert texts(turn)[0].startswith(HOURS)
    assert turn.state["greeted"] is True


async def test_greeting_again_shows_the_menu(chat: Chat) -> None:
    turn = await chat.send("good morning")
    assert texts(turn) == [chat.bot.script.greeting.text, chat.bot.script.menu.text]


async def test_state_is_not_mutated_in_place(bot: FaqBot) -> None:
    chat = Chat(bot)
    before = {"greeted": True, "misses": 1}
    chat.state = before
    await chat.send("blorp")
    assert before == {"greeted": True, "misses": 1}
    assert chat.state["misses"] == 0  # the handoff reset it


# --------------------------------------------------------------------- buttons


@pytest.mark.parametrize(("value", "answer"), [
    ("faq:hours", HOURS), ("faq:shipping", SHIPPING), ("faq:returns", "within 30 days")])
async def test_faq_buttons_answer(chat: Chat, value: str, answer: str) -> None:
    turn = await chat.send("pressed", value=value)
    assert len(turn.replies) == 1 and answer in turn.replies[0].text
    assert turn.replies[0].buttons == chat.bot.script.menu.buttons  # the menu comes along
    assert turn.handoff is None


async def test_handoff_button(chat: Chat) -> None:
    turn = await chat.send("Talk to a human", value="handoff")
    assert texts(turn) == [chat.bot.script.handoff.text]
    assert turn.handoff is not None and turn.handoff.reason == "customer asked for a human"


async def test_menu_button_shows_the_menu(chat: Chat) -> None:
    turn = await chat.send("Menu", value="menu")
    assert texts(turn)[-1] == chat.bot.script.menu.text
    assert turn.handoff is None


async def test_button_value_wins_over_text(chat: Chat) -> None:
    turn = await chat.send("talk to a human", value="faq:shipping")
    assert SHIPPING in turn.replies[0].text and turn.handoff is None


# -------------------------------------------------------------------- matching


@pytest.mark.parametrize(("text", "answer"), [
    ("what are your opening hours?", HOURS),
    ("When are you open on Sunday?", HOURS),
    ("how much does shipping cost", SHIPPING),
    ("Shipping costs?", SHIPPING),
    ("can I get a refund", "within 30 days"),
])
async def test_fuzzy_questions_match(chat: Chat, text: str, answer: str) -> None:
    turn = await chat.send(text)
    assert answer in turn.replies[0].text
    assert turn.handoff is None and turn.state["misses"] == 0


@pytest.mark.parametrize("text", ["talk to a human", "I want to talk to a human please",
                                  "Real person!"])
async def test_asking_for_a_human_hands_off(chat: Chat, text: str) -> None:
    turn = await chat.send(text)
    assert texts(turn) == [chat.bot.script.handoff.text]
    assert turn.handoff is not None
    assert turn.handoff.reason == chat.bot.script.handoff.reason == "customer asked for a human"


# -------------------------------------------------------------------- fallback


async def test_two_misses_in_a_row_hand_off(chat: Chat) -> None:
    script = chat.bot.script
    first = await chat.send("blorp")
    assert texts(first) == [script.fallback.text]
    assert first.replies[0].buttons == script.menu.buttons
    assert first.handoff is None and first.state["misses"] == 1
    second = await chat.send("the weather in paris")
    assert texts(second) == [script.fallback.handoff_text]
    assert second.handoff is not None
    assert second.handoff.reason == "the bot did not understand the customer twice"
    assert second.state["misses"] == 0


async def test_a_match_resets_the_misses(chat: Chat) -> None:
    assert (await chat.send("blorp")).state["misses"] == 1
    assert (await chat.send("shipping")).state["misses"] == 0
    again = await chat.send("asdf qwer")
    assert again.handoff is None and again.state["misses"] == 1
    final = await chat.send("my order never arrived")
    assert final.handoff is not None and final.handoff.reason.startswith("the bot did not")


# ---------------------------------------------------------------------- loader


def test_demo_script_loads() -> None:
    script = load_script(DEMO)
    assert script.bot_name == "Omnigate bot"
    assert [e.id for e in script.faq] == ["hours", "shipping", "returns"]
    assert script.fallback.max_misses == 2


def demo_text() -> str:
    return (DEMO / "demo.yaml").read_text(encoding="utf-8")


def test_later_files_extend_the_faq(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(demo_text())
    (tmp_path / "b.yaml").write_text(
        "faq:\n  - id: gifts\n    examples: [gift cards]\n    answer: Yes, we sell them.\n")
    script = load_script(tmp_path)
    assert [e.id for e in script.faq] == ["hours", "shipping", "returns", "gifts"]


def test_no_yaml_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("greeting: hi")
    with pytest.raises(ScriptError, match=r"no \*\.yaml bot script") as info:
        load_script(tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("content", ["- just\n- a list\n", "plain text\n", ""])
def test_not_a_mapping(tmp_path: Path, content: str) -> None:
    (tmp_path / "bot.yaml").write_text(content)
    with pytest.raises(ScriptError, match="expected a mapping") as info:
        load_script(tmp_path)
    assert str(tmp_path / "bot.yaml") in str(info.value)


def test_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "bot.yaml").write_text("greeting: {text: [unclosed\n")
    with pytest.raises(ScriptError) as info:
        load_script(tmp_path)
    assert str(info.value).startswith(str(tmp_path / "bot.yaml"))


def test_unknown_field_names_file_and_field(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(demo_text())
    (tmp_path / "b.yaml").write_text("greting:\n  text: typo\n")
    with pytest.raises(ScriptError) as info:
        load_script(tmp_path)
    message = str(info.value)
    assert f"{tmp_path / 'b.yaml'}: greting:" in message
    assert "Extra inputs are not permitted" in message


def test_unknown_nested_field_names_file_and_path(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(demo_text())
    (tmp_path / "b.yaml").write_text(
        "faq:\n  - id: gifts\n    examples: [gift cards]\n    answr: typo\n")
    with pytest.raises(ScriptError) as info:
        load_script(tmp_path)
    message = str(info.value)
    assert f"{tmp_path / 'b.yaml'}: faq.3.answr:" in message
    assert f"{tmp_path / 'b.yaml'}: faq.3.answer: Field required" in message


def test_menu_button_to_unknown_faq(tmp_path: Path) -> None:
    (tmp_path / "bot.yaml").write_text(demo_text().replace("faq:returns", "faq:refunds"))
    with pytest.raises(ScriptError) as info:
        load_script(tmp_path)
    message = str(info.value)
    assert message.startswith(str(tmp_path / "bot.yaml"))
    assert "'Returns'" in message and "'faq:refunds'" in message


def test_faq_must_be_a_list(tmp_path: Path) -> None:
    (tmp_path / "bot.yaml").write_text(demo_text() + "\n")
    (tmp_path / "more.yaml").write_text("faq: hours\n")
    with pytest.raises(ScriptError, match="faq: expected a list") as info:
        load_script(tmp_path)
    assert str(tmp_path / "more.yaml") in str(info.value)


def test_missing_section_is_named(tmp_path: Path) -> None:
    text = demo_text()
    (tmp_path / "bot.yaml").write_text(text[: text.index("\nfallback:")])
    with pytest.raises(ScriptError, match="fallback: Field required"):
        load_script(tmp_path)
