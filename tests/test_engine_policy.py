"""The flow engine's conversation policy, through the whole gateway: greeting and menu at
the start, global intents in the middle of a question, the fallback policy, the menu
ordered by the contact's history, and buttons over a real web chat socket."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.model import OwnerState
from gateway.settings import Settings
from tests.conftest import Gateway, Visitor
from tests.engine_rig import Customer, Said, Shop, copy_flows, engine_settings

MENU = [("Profile", "flow:profile_info"), ("Survey", "flow:survey"), ("Order", "flow:order")]
GREETING = [Said("Hello Ana! I am the test bot.", []), Said("Pick one:", MENU)]
MISS = Said("Sorry, I did not get that.", MENU)


@pytest.fixture
async def shop() -> AsyncIterator[Shop]:
    server = Shop()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
def settings(settings: Settings, tmp_path: Path, shop: Shop) -> Settings:
    return engine_settings(settings, copy_flows(tmp_path, shop))


# ------------------------------------------------------------------- the start


@pytest.mark.parametrize("first", ["hello", "blorp blorp"])
async def test_the_first_message_is_greeted_with_the_menu(gateway: Gateway, first: str) -> None:
    ana = Customer(gateway)
    assert await ana.send(first) == GREETING
    assert await ana.send(first) == (GREETING[1:] if first == "hello" else [MISS])


async def test_the_greeting_without_a_contact_name(gateway: Gateway) -> None:
    anonymous = Customer(gateway, name=None)
    replies = await anonymous.send("hello")
    assert replies[0] == Said("Hello ! I am the test bot.", [])  # an empty field, no crash


# ------------------------------------------------------- globals inside an ask


GLOBALS: list[tuple[str, list[Said], OwnerState]] = [
    ("talk to a human", [Said("Getting a human for you.", [])], OwnerState.QUEUED),
    ("start over", [Said("Starting over.", []), *GREETING], OwnerState.BOT),
    ("cancel", [Said("Cancelled.", MENU)], OwnerState.BOT),
    ("main menu", [Said("Here is the menu.", []), Said("Pick one:", MENU)], OwnerState.BOT),
]


async def test_global_intents_work_in_the_middle_of_a_question(gateway: Gateway) -> None:
    for text, expected, owner in GLOBALS:
        ana = Customer(gateway)
        await ana.send("hi")
        assert await ana.texts(value="flow:survey") == ["Your name?"]
        assert await ana.texts("Ana") == ["Your age?"]
        assert await ana.send(text) == expected, text
        conversation = await ana.conversation()
        assert conversation.owner is owner, text
        state = await ana.state()
        assert (state["flow"], state["ask"]) == (None, None), text
        if text == "talk to a human":
            assert conversation.handoff is not None
            assert (conversation.handoff.reason, conversation.handoff.skill) == (
                "customer asked for a human", "support")
            continue
        # restart forgets the conversation's slots; cancel and menu keep them
        assert ("name" in state["slots"]) is (text != "start over"), text
        # the question is no longer pending: a number is not an age now
        assert await ana.send("42") == [MISS], text


async def test_a_wrong_answer_that_asks_for_another_flow_starts_it(gateway: Gateway) -> None:
    ana = Customer(gateway)
    await ana.send("hi")
    await ana.press("flow:survey")
    assert await ana.texts("Ana") == ["Your age?"]
    # not an age, but clearly a question about an order (with its number)
    assert await ana.texts("where is my order 12345") == ["Checking order 12345."]
    state = await ana.state()
    assert (state["flow"], state["slots"]["name"]) == (None, "Ana")


# -------------------------------------------------------------------- fallback


async def test_misses_in_a_row_hand_off_and_a_good_answer_resets_the_count(
    gateway: Gateway,
) -> None:
    ana = Customer(gateway)
    await ana.send("hi")
    assert await ana.send("blorp") == [MISS]
    assert await ana.send("xyzzy") == [MISS]  # 2 of 3
    assert await ana.texts("where is my order 12345") == ["Checking order 12345."]
    assert (await ana.state())["misses"] == 0  # understood: the count starts again
    assert await ana.send("blorp") == [MISS]
    assert await ana.send("xyzzy") == [MISS]
    assert await ana.owner() is OwnerState.BOT
    assert await ana.texts("qwerty") == ["Let me get a human."]  # the third in a row
    conversation = await ana.conversation()
    assert conversation.owner is OwnerState.QUEUED
    assert conversation.handoff is not None
    assert (conversation.handoff.reason, conversation.handoff.skill,
            conversation.handoff.priority) == ("the bot did not understand Ana", "triage", "high")


async def test_a_valid_answer_resets_the_misses(gateway: Gateway) -> None:
    ana = Customer(gateway)
    await ana.send("hi")
    await ana.send("blorp")
    await ana.send("xyzzy")
    assert await ana.texts(value="flow:order") == ["Order number?"]
    assert await ana.texts("12345") == ["Checking order 12345."]
    assert await ana.send("blorp") == [MISS]
    assert await ana.send("xyzzy") == [MISS]
    assert await ana.owner() is OwnerState.BOT


# ---------------------------------------------------------- menu by history


async def test_the_menu_puts_what_this_contact_chose_before_first(gateway: Gateway) -> None:
    ana = Customer(gateway, id="v-ana-history", thread="first")
    assert await ana.send("hi") == GREETING
    await ana.press("flow:order", "Order")
    await ana.send("12345")
    await ana.press("flow:order", "Order")  # chosen twice in this conversation
    await ana.send("blorp")
    await ana.press("flow:survey", "Survey")  # once
    # the menu does not move in the middle of a conversation
    assert (await ana.send("main menu"))[-1] == Said("Pick one:", MENU)
    contact = await gateway.store.get_contact((await ana.conversation()).contact_id)
    assert contact is not None
    # counted once per conversation: a second choice of the same option writes nothing
    assert contact.profile["_menu_counts"] == {"order": 1, "survey": 1}

    # a second conversation of the same contact (another thread): the chosen ones first,
    # in the designer's order among equals
    again = Customer(gateway, id="v-ana-history", thread="second")
    replies = await again.send("hi")
    assert again.conversation_id != ana.conversation_id
    assert replies[-1] == Said("Pick one:", [MENU[1], MENU[2], MENU[0]])
    await again.press("flow:order", "Order")  # now in two conversations
    contact = await gateway.store.get_contact((await again.conversation()).contact_id)
    assert contact is not None and contact.profile["_menu_counts"] == {"order": 2, "survey": 1}

    # a third: most chosen first
    later = Customer(gateway, id="v-ana-history", thread="third")
    replies = await later.send("hi")
    assert replies[-1] == Said("Pick one:", [MENU[2], MENU[1], MENU[0]])
    # someone else still gets the designer's order
    assert (await Customer(gateway).send("hi"))[-1] == Said("Pick one:", MENU)


# ------------------------------------------------------------ over a web chat socket


def bot_message(item: dict[str, Any]) -> bool:
    return item["type"] == "message" and item["role"] == "bot"


async def test_buttons_over_the_web_chat_socket(visitor: Visitor) -> None:
    await visitor.connect()
    await visitor.say("hello")
    menu = await visitor.until(lambda i: bot_message(i) and bool(i["buttons"]))
    assert [(b["title"], b["value"]) for b in menu["buttons"]] == MENU
    await visitor.press(menu["buttons"][0])  # Profile: a say with buttons
    said = await visitor.until(bot_message)
    assert said["text"] == "Hi Ana, you are 42. Tier , contact ."
    survey = next(b for b in said["buttons"] if b["value"] == "flow:survey")
    await visitor.press(survey)  # name and age are known: not asked
    assert (await visitor.until(bot_message))["text"] == "Do you agree?"
    await visitor.say("yes")
    assert (await visitor.until(bot_message))["text"] == "Your email?"
    await visitor.say("ana@shop.example")
    colour = await visitor.until(bot_message)
    assert [b["value"] for b in colour["buttons"]] == ["red", "green", "blue"]
    await visitor.press(colour["buttons"][1])
    done = await visitor.until(bot_message)
    assert done["text"] == "Thanks Ana: 42, True, ana@shop.example, green."
