"""The flow engine, step by step, through the whole gateway: the real pipeline and store,
the test flows in tests/fixtures/flows/engine/all. Each flow is started by pressing its
``flow:<name>`` button, so every test starts exactly where it means to."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from flows.engine import ASK_FAILED_TEXT, CANCELLED_TEXT, LOOP_TEXT
from gateway.model import OwnerState
from gateway.settings import Settings
from tests.conftest import Gateway
from tests.engine_rig import Customer, Said, Shop, copy_flows, engine_settings

MENU = [("Profile", "flow:profile_info"), ("Survey", "flow:survey"), ("Order", "flow:order")]


@pytest.fixture
async def shop() -> AsyncIterator[Shop]:
    server = Shop()
    await server.start()
    yield server
    await server.close()


@pytest.fixture
def settings(settings: Settings, tmp_path: Path, shop: Shop) -> Settings:
    return engine_settings(settings, copy_flows(tmp_path, shop))


@pytest.fixture
def ana(gateway: Gateway) -> Customer:
    return Customer(gateway)


# ----------------------------------------------------------------------- say, set


async def test_say_fills_slots_profile_and_contact_and_shows_buttons(
    gateway: Gateway, ana: Customer,
) -> None:
    await ana.send("hi")  # creates the contact
    contact = (await ana.conversation()).contact_id
    await gateway.store.update_profile(contact, {"tier": "gold"})

    replies = await ana.press("flow:profile_info", "Profile")
    assert replies == [Said("Hi Ana, you are 42. Tier gold, contact Ana.",
                            [("Yes Ana", "yes"), ("Survey", "flow:survey")])]
    assert await ana.slots() == {"name": "Ana", "age": 42}  # set: a number stays a number
    assert (await ana.state())["flow"] is None  # the flow ran to its end

    # a button that starts a flow: the slots set before are not asked again
    assert await ana.texts(value="flow:survey") == ["Do you agree?"]


async def test_a_flow_that_ends_offers_the_menu_on_its_last_message(ana: Customer) -> None:
    await ana.send("hi")
    replies = await ana.press("flow:resolve_quiet")  # say, then resolve: no menu
    assert replies == [Said("All done.", [])]
    again = Customer(ana.gateway)
    await again.send("hi")
    replies = await again.press("flow:order")
    assert replies == [Said("Order number?", [])]
    replies = await again.send("12345")
    assert replies == [Said("Checking order 12345.", MENU)]


# ------------------------------------------------------------------------- ask


async def test_ask_validates_each_slot_type_and_reprompts(ana: Customer) -> None:
    await ana.send("hi")
    assert await ana.texts(value="flow:survey") == ["Your name?"]
    assert await ana.texts("B") == ["Name must be 2 to 20 characters."]  # min_length
    assert await ana.texts("Ana") == ["Your age?"]
    assert await ana.texts("17") == ["An age from 18 to 120, please."]  # min
    assert await ana.texts("I am 42 years old") == ["Do you agree?"]
    assert await ana.texts("maybe") == ["Do you agree?"]  # no reprompt: the question again
    assert await ana.texts("yes please") == ["Your email?"]
    assert await ana.texts("not an email") == ["Your email?"]
    colour = await ana.send("it is ana@shop.example")
    assert colour == [Said("Favourite colour?",  # a choice slot: its choices as quick replies
                           [("red", "red"), ("green", "green"), ("blue", "blue")])]
    assert await ana.texts("purple") == ["Favourite colour?"]
    done = await ana.send("crimson")  # an entity synonym of red
    assert done == [Said("Thanks Ana: 42, True, ana@shop.example, red.", MENU)]
    assert await ana.slots() == {"name": "Ana", "age": 42, "agree": True,
                                 "email": "ana@shop.example", "color": "red"}


async def test_a_quick_reply_press_answers_with_its_value(ana: Customer) -> None:
    await ana.send("hi")
    await ana.press("flow:branching")
    replies = await ana.press("green", "Green!")  # the title is not a choice: the value is
    assert [r.text for r in replies] == ["Green.", "Not red.", "Done with green."]
    assert (await ana.slots())["color"] == "green"


async def test_a_slot_filled_from_the_first_message_is_not_asked(ana: Customer) -> None:
    replies = await ana.send("where is my order 12345")
    assert replies == [Said("Checking order 12345.", MENU)]  # no greeting, no question
    assert (await ana.slots())["order_number"] == "12345"


async def test_force_asks_even_when_the_slot_has_a_value(ana: Customer) -> None:
    await ana.send("hi")
    assert await ana.texts(value="flow:force_ask") == ["Name again, Ana?"]
    assert await ana.texts("Bea") == ["Now Bea."]


async def test_a_pattern_keeps_the_matching_part(ana: Customer) -> None:
    await ana.send("hi")
    assert await ana.texts(value="flow:fail_step") == ["Code?"]
    replies = await ana.send("my code is ABC-12 thanks")
    assert [r.text for r in replies] == ["Code ABC-12 ok."]
    assert await ana.owner() is OwnerState.RESOLVED


async def test_too_many_wrong_answers_hand_off(gateway: Gateway, ana: Customer) -> None:
    await ana.send("hi")
    assert await ana.texts(value="flow:fail_handoff") == ["Code?"]
    assert await ana.texts("nope") == ["Like ABC-12."]
    assert await ana.texts("still nope") == [ASK_FAILED_TEXT]
    conversation = await ana.conversation()
    assert conversation.owner is OwnerState.QUEUED
    assert conversation.handoff is not None
    assert conversation.handoff.reason == "the customer could not answer the question for code"
    assert await ana.texts("ABC-12") == []  # a human owns it now: the bot is silent


async def test_too_many_wrong_answers_cancel(ana: Customer) -> None:
    await ana.send("hi")
    await ana.press("flow:fail_cancel")
    assert await ana.texts("nope") == ["Code?"]
    assert await ana.send("nope") == [Said(CANCELLED_TEXT, MENU)]
    state = await ana.state()
    assert (state["flow"], state["ask"]) == (None, None)
    assert await ana.owner() is OwnerState.BOT
    assert await ana.texts("ABC-12") == ["Sorry, I did not get that."]  # no longer an answer


async def test_too_many_wrong_answers_go_to_a_step(ana: Customer) -> None:
    await ana.send("hi")
    await ana.press("flow:fail_step")
    replies = await ana.send("nope")
    assert replies == [Said("No code then.", MENU)]  # the resolve before it is skipped
    assert await ana.owner() is OwnerState.BOT


async def test_too_many_wrong_answers_go_to_a_flow(ana: Customer) -> None:
    await ana.send("hi")
    await ana.press("flow:fail_flow")
    replies = await ana.send("nope")
    assert [r.text for r in replies] == ["Hi Ana, you are 42. Tier , contact Ana."]
    assert (await ana.state())["flow"] is None


# ------------------------------------------------------------------- if, goto


@pytest.mark.parametrize(("answer", "said"), [
    ("red", ["Red it is.", "Done with red."]),  # then: goto done skips "Not red."
    ("green", ["Green.", "Not red.", "Done with green."]),  # nested if, then out of both
    ("blue", ["Blue.", "Your name?"]),  # goto another flow
])
async def test_if_then_else_and_goto(ana: Customer, answer: str, said: list[str]) -> None:
    await ana.send("hi")
    assert await ana.texts(value="flow:branching") == ["Colour?"]
    assert await ana.texts(answer) == said
    state = await ana.state()
    assert state["flow"] == ("survey" if answer == "blue" else None)


async def test_a_goto_loop_hands_off_instead_of_hanging(ana: Customer) -> None:
    await ana.send("hi")
    replies = await ana.press("flow:looping")
    assert [r.text for r in replies] == [LOOP_TEXT]
    conversation = await ana.conversation()
    assert conversation.owner is OwnerState.QUEUED
    assert conversation.handoff is not None
    assert conversation.handoff.reason == "the flow looping looped"


async def test_a_talking_loop_says_each_thing_once_then_hands_off(ana: Customer) -> None:
    await ana.send("hi")
    replies = await ana.press("flow:talking_loop")
    # (the engine used to send "Spinning." 49 times before handing off)
    assert [r.text for r in replies] == ["Before the loop.", "Spinning.", LOOP_TEXT]
    assert await ana.owner() is OwnerState.QUEUED


async def test_set_reads_text_in_the_slot_type(ana: Customer) -> None:
    await ana.send("hi")
    replies = await ana.press("flow:typed_set")
    # (the engine used to keep "42" a string in a number slot: age >= 18 failed)
    assert [r.text for r in replies] == ["Adult 42, agreed."]
    assert await ana.slots() == {"x": "42", "age": 42, "agree": True}


# ------------------------------------------------------------- handoff, resolve


async def test_handoff_step_reaches_the_agents_queue(gateway: Gateway, ana: Customer) -> None:
    await ana.send("hi")
    replies = await ana.press("flow:handoff_step")
    assert [r.text for r in replies] == ["Passing you to billing about 12345."]
    _, alice = await gateway.agent("Alice")
    async with gateway.http.get(gateway.url + "/api/v1/conversations", headers=alice) as r:
        assert r.status == 200
        queue = (await r.json())["items"]
    assert [c["id"] for c in queue] == [ana.conversation_id]
    handoff = queue[0]["handoff"]
    assert (handoff["reason"], handoff["skill"], handoff["team"], handoff["priority"]) == (
        "refund for order 12345", "billing", "finance", "urgent")
    assert await ana.texts("hello?") == []  # the bot stays out of it


async def test_resolve_says_goodbye_and_closes(ana: Customer) -> None:
    await ana.send("hi")
    replies = await ana.press("flow:resolve_bye")
    assert replies == [Said("Goodbye Ana!", [])]
    assert await ana.owner() is OwnerState.RESOLVED
    # writing again reopens it to the bot, which starts afresh (greeting and menu)
    again = await ana.send("blorp")
    assert again == [Said("Hello Ana! I am the test bot.", []), Said("Pick one:", MENU)]
    assert await ana.owner() is OwnerState.BOT
