"""What a custom action returns, applied by the engine, through the whole gateway (the real
pipeline and store): responses of every kind, ConversationPaused, FollowupAction (to an
action, to a flow, and a chain that never ends), Restarted, AllSlotsReset, undeclared and
profile slots, and returns that are not what rasa-sdk expects. The actions are
tests/actions_testing/effects.py, run in-process, and the richest case on a real rasa-sdk
action server too, giving the same transcript. The flows: tests/fixtures/flows/engine/
effects. Each flow is started by pressing its ``flow:<name>`` button.

What the engine does, asserted here:
* responses: text and buttons as they are (a button's value is its payload); a
  ``json_message``/``custom`` payload with a ``text`` is that text, one without is skipped;
  ``image``/``attachment`` are a line with the URL; a named response (``response=
  "utter_x"``) is skipped and logged, since flows have no named responses (use a ``say``).
* ConversationPaused: handed off (queued), reason "the custom action <name> handed the
  conversation to a human"; what the action said and set before it still counts.
* FollowupAction: an action runs next in the same turn, a flow starts; a chain of more than
  ``MAX_FOLLOWUPS`` followups is stopped (logged) and the flow goes on.
* Restarted: the conversation's slots and the active flow are forgotten (the flow does not
  go on; the action's message offers the menu). The contact's profile is kept.
* AllSlotsReset: the conversation's slots are forgotten, the SlotSets after it applied.
  Profile slots live on the contact (the omnichannel memory) and are not reset.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from flows.actions import InProcessActions
from flows.bot import BotTurn, TurnContext
from flows.dsl import Domain
from flows.engine import ACTION_FAILED_TEXT, MAX_FOLLOWUPS, FlowEngine
from flows.nlu import build_understander
from flows.registry import LoadedFlows
from flows.steps import intent_payload
from gateway.model import (
    Activity,
    Contact,
    Conversation,
    ConversationRef,
    Direction,
    OwnerState,
    Party,
    Role,
    utcnow,
)
from gateway.settings import Settings
from tests.actions_testing.effects import SHOE_IMAGE, SIZE_CHART
from tests.conftest import Gateway, running_gateway
from tests.engine_rig import TESTING_ACTIONS, Customer, Said, engine_settings
from tests.rasa_server import ActionServer, action_server

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "flows" / "engine" / "effects"
MENU = [("Shoes", "flow:shoes"), ("Returns", "flow:returns_info")]
PAUSED_REASON = "the custom action action_pause handed the conversation to a human"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return engine_settings(settings, FIXTURE)


@pytest.fixture
async def ana(gateway: Gateway) -> Customer:
    customer = Customer(gateway)
    assert await customer.send("hi") == [Said("Hello! I am the effects bot.", []),
                                         Said("Pick one:", MENU)]
    return customer


@pytest.fixture
def engine_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="flows.engine")
    return caplog


def logged(caplog: pytest.LogCaptureFixture, *parts: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "flows.engine" and all(p in r.getMessage() for p in parts)]


# ---------------------------------------------------- responses and followups


SHOES_OFFER = [
    Said("We have this shoe in two sizes.", []),
    Said("Which size?", [("Small", "small"), ("Large", "large")]),
    Said("Free returns within 30 days.", []),  # json_message with a text
    Said(f"Image: {SHOE_IMAGE}", []),
    Said(f"Attachment: {SIZE_CHART}", []),
    Said("Run 1, note offered.", []),  # the followup action ran, after the SlotSet
    Said("Your size?", []),  # the flow went on to its ask
]


async def shoes_transcript(customer: Customer) -> list[Any]:
    """Start the shoes flow, answer with the action's own button; what the bot said, and
    the conversation's slots and state at the end."""
    transcript: list[Any] = [await customer.press("flow:shoes", "Shoes")]
    transcript.append(await customer.press("large", "Large"))  # the action's button
    state = await customer.state()
    transcript.append((state["slots"], state["flow"], state["ask"], await customer.owner()))
    return transcript


def check_shoes(transcript: list[Any]) -> None:
    offer, answered, end = transcript
    assert offer == SHOES_OFFER
    assert answered == [Said("Size large, note offered, count 1.", MENU)]
    assert end == ({"note": "offered", "count": 1, "size": "large"}, None, None,
                   OwnerState.BOT)


async def test_responses_of_every_kind_and_a_followup_action(
    ana: Customer, engine_log: pytest.LogCaptureFixture,
) -> None:
    check_shoes(await shoes_transcript(ana))
    # what could not be shown is logged, not said
    [skipped] = logged(engine_log, "action_offer_sizes", "not applied")
    assert "response 'utter_size_help'" in skipped
    assert "custom payload without text" in skipped


async def test_a_followup_flow_starts_in_the_same_turn(ana: Customer) -> None:
    assert await ana.press("flow:to_flow") == [
        Said("Let me show you our returns.", []),
        Said("Returns are free, note from the action.", MENU),  # and ran to its end
    ]
    state = await ana.state()
    assert (state["flow"], state["slots"]) == (None, {"note": "from the action"})


async def test_a_followup_chain_is_cut_and_the_flow_goes_on(
    ana: Customer, engine_log: pytest.LogCaptureFixture,
) -> None:
    runs = 1 + MAX_FOLLOWUPS  # the action, then each followup it asked for
    assert await ana.press("flow:forever") == [Said(f"After the chain: {runs} runs.", MENU)]
    assert (await ana.slots())["count"] == runs
    assert logged(engine_log, "action_chain_forever", f"more than {MAX_FOLLOWUPS} followups")
    assert await ana.owner() is OwnerState.BOT


BY_INTENT = [Said("Which size, or shall I get a person?", [
    ("Small", '/inform{"size": "small"}'), ("Yes, a person", "/human")]), Said("Your size?", [])]


async def test_a_rasa_intent_payload_button_carries_its_entities(ana: Customer) -> None:
    """``/intent{"entity": "value"}``, as Rasa bots write buttons: the intent and entities
    are taken as they are (the entity fills the question's slot), not the payload's text."""
    assert await ana.press("flow:by_intent") == BY_INTENT
    assert await ana.press('/inform{"size": "small"}', "Small") == [Said("Size small.", MENU)]
    state = await ana.state()
    assert state["slots"] == {"size": "small"}
    user = [e for e in await ana.events() if e["event"] == "user"][-1]
    assert user["parse_data"]["intent"]["name"] == "inform"  # what the next action sees
    assert user["parse_data"]["entities"][0]["value"] == "small"


async def test_a_rasa_intent_payload_button_is_that_intent(ana: Customer) -> None:
    assert await ana.press("flow:by_intent") == BY_INTENT
    assert await ana.press("/human", "Yes, a person") == []  # the global intent: a handoff
    conversation = await ana.conversation()
    assert conversation.owner is OwnerState.QUEUED
    assert conversation.handoff is not None
    assert conversation.handoff.reason == "customer asked for a human"
    assert (await ana.state())["slots"] == {}  # not taken as the size


@pytest.mark.parametrize(("value", "intent", "entities"), [
    ("/human", "human", []),
    ('/inform{"size": "small", "count": 2, "x": null}', "inform",
     [("size", "small"), ("count", "2")]),
    ("/inform{not json}", None, None),  # an ordinary value then
    ('/inform["small"]', None, None),
    ("flow:shoes", None, None),
    ("small", None, None),
    ("/a/b", None, None),
])
def test_rasa_intent_payloads(value: str, intent: str | None,
                              entities: list[tuple[str, str]] | None) -> None:
    found = intent_payload(value)
    if intent is None:
        assert found is None
        return
    assert found is not None
    assert (found.intent, found.confidence) == (intent, 1.0)
    assert [(e.entity, e.value) for e in found.entities] == entities


# ------------------------------------------------------------------- handoff


async def test_conversation_paused_hands_off(gateway: Gateway, ana: Customer) -> None:
    assert await ana.press("flow:paused") == [Said("This needs a person.", [])]
    conversation = await ana.conversation()
    assert conversation.owner is OwnerState.QUEUED
    assert conversation.handoff is not None
    assert (conversation.handoff.reason, conversation.handoff.priority) == (PAUSED_REASON,
                                                                           "normal")
    state = await ana.state()
    assert state["slots"] == {"note": "paused"}  # set before the pause
    assert state["flow"] is None

    # the desk sees it in the queue, with the reason
    _, headers = await gateway.agent("Bea")
    async with gateway.http.get(gateway.url + "/api/v1/conversations", headers=headers) as r:
        assert r.status == 200
        queue = (await r.json())["items"]
    assert [(c["id"], c["handoff"]["reason"]) for c in queue] == [(conversation.id,
                                                                   PAUSED_REASON)]
    assert await ana.send("hello?") == []  # a human owns it now: the bot stays silent


# ------------------------------------------------------------------- slots


async def test_restarted_forgets_the_slots_and_ends_the_flow(gateway: Gateway,
                                                             ana: Customer) -> None:
    contact = (await ana.conversation()).contact_id
    await gateway.store.update_profile(contact, {"tier": "gold"})
    assert await ana.press("flow:restart") == [Said("Starting afresh.", MENU)]
    state = await ana.state()
    assert (state["slots"], state["flow"], state["pos"]) == ({}, None, None)
    # what an action gets next: rasa-sdk's applied_events() starts after the restart
    assert "restart" in [e["event"] for e in await ana.events()][-3:]
    assert await ana.owner() is OwnerState.BOT
    found = await gateway.store.get_contact(contact)
    assert found is not None and found.profile["tier"] == "gold"  # the contact is kept
    # and the conversation goes on as usual
    assert await ana.send("hi") == [Said("Pick one:", MENU)]


async def test_all_slots_reset_then_later_slot_sets(gateway: Gateway, ana: Customer) -> None:
    contact = (await ana.conversation()).contact_id
    assert await ana.press("flow:odd_slots")  # saves the profile slot email
    assert await ana.press("flow:reset") == [Said("Now note , size , colour after.", MENU)]
    state = await ana.state()
    assert state["slots"] == {"colour": "after"}
    # the tracker the next action gets shows the reset, as Rasa's would
    events = [(e["event"], e.get("name")) for e in await ana.events()]
    assert events[-3:-1] == [("reset_slots", None), ("slot", "colour")]
    found = await gateway.store.get_contact(contact)
    assert found is not None and found.profile["email"]["value"] == "ana@shop.example"


async def test_undeclared_slot_is_ignored_and_a_profile_slot_goes_on_the_contact(
    gateway: Gateway, ana: Customer, engine_log: pytest.LogCaptureFixture,
) -> None:
    assert await ana.press("flow:odd_slots") == [
        Said("Went on with note set, email ana@shop.example.", MENU)]
    assert logged(engine_log, "action action_set_odd_slots", "undeclared slot 'not_declared'")
    assert await ana.slots() == {"note": "set"}  # email is not a conversation slot
    found = await gateway.store.get_contact((await ana.conversation()).contact_id)
    assert found is not None
    assert found.profile["email"]["value"] == "ana@shop.example"
    assert "not_declared" not in found.profile


# ------------------------------------------------------------------- garbage


async def test_an_action_returning_a_number_fails_politely(ana: Customer) -> None:
    assert await ana.press("flow:returns_number") == [Said(ACTION_FAILED_TEXT, []),
                                                     Said("After the number.", MENU)]
    assert await ana.owner() is OwnerState.BOT


async def test_junk_among_the_events_is_dropped_the_rest_applied(ana: Customer) -> None:
    assert await ana.press("flow:returns_junk") == [Said("After the junk: kept.", MENU)]
    assert await ana.slots() == {"colour": "kept"}


# --------------------------------------------- both modes: the same transcript


@pytest.fixture(scope="module")
def effects_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ActionServer]:
    with action_server("tests.actions_testing", tmp_path_factory.mktemp("rasa")) as server:
        yield server


async def test_an_action_server_gives_the_same_transcript(
    settings: Settings, effects_server: ActionServer,
) -> None:
    remote_settings = settings.model_copy(update={
        "actions_package": None, "action_server_url": effects_server.url,
        "mongodb_db": settings.mongodb_db + "_r"})
    transcripts: list[list[Any]] = []
    for each in (settings, remote_settings):
        async with running_gateway(each) as gateway:
            customer = Customer(gateway)
            await customer.send("hi")
            shoes = await shoes_transcript(customer)
            other = Customer(gateway)  # (no size yet: the question is asked)
            await other.send("hi")
            by_intent = [await other.press("flow:by_intent"),
                         await other.press('/inform{"size": "small"}', "Small")]
            paused = await customer.press("flow:paused")
            conversation = await customer.conversation()
            assert conversation.handoff is not None
            transcripts.append([shoes, by_intent, paused, conversation.owner,
                                conversation.handoff.reason])
    local, remote = transcripts
    check_shoes(local[0])
    assert local[1:] == [[BY_INTENT, [Said("Size small.", MENU)]],
                         [Said("This needs a person.", [])], OwnerState.QUEUED, PAUSED_REASON]
    assert remote == local


# ------------------------------------- an action server that answers garbage


class GarbageServer:
    """A /webhook that answers each action with something rasa-sdk would never send."""

    ANSWERS: dict[str, Any] = {
        "action_returns_number": {"events": "not a list"},
        "action_returns_junk": {
            "events": [{"name": "colour", "value": "no event key"},
                       {"event": "slot", "name": "colour", "value": "kept"}],
            "responses": [{"nothing": "to show"}]},
    }

    def __init__(self) -> None:
        self.calls: list[str] = []
        app = web.Application()
        app.router.add_post("/webhook", self.webhook)
        self.server = TestServer(app, host="127.0.0.1")

    async def webhook(self, request: web.Request) -> web.Response:
        action = (await request.json())["next_action"]
        self.calls.append(action)
        return web.json_response(self.ANSWERS.get(action, [1, 2]))


@pytest.fixture
async def garbage() -> AsyncIterator[GarbageServer]:
    server = GarbageServer()
    await server.server.start_server()
    yield server
    await server.server.close()


@pytest.mark.parametrize(("flow", "said", "slots"), [
    ("returns_number", [ACTION_FAILED_TEXT, "After the number."], {}),  # malformed events
    ("returns_junk", ["After the junk: kept."], {"colour": "kept"}),  # junk dropped
    ("returns_junk_remote_list", [ACTION_FAILED_TEXT, "Went on."], {}),  # not an object
])
async def test_garbage_from_an_action_server_is_polite(
    settings: Settings, garbage: GarbageServer, tmp_path: Path, flow: str,
    said: list[str], slots: dict[str, Any], engine_log: pytest.LogCaptureFixture,
) -> None:
    flows = tmp_path / "flows"
    flows.mkdir()
    for path in FIXTURE.glob("*.yaml"):
        (flows / path.name).write_text(path.read_text())
    (flows / "extra.yaml").write_text(
        "flows:\n  returns_junk_remote_list:\n    steps:\n"
        "      - action: action_unknown_here\n      - say: \"Went on.\"\n")
    remote = settings.model_copy(update={
        "flows_dir": flows, "actions_package": None,
        "action_server_url": str(garbage.server.make_url("/"))})
    async with running_gateway(remote) as gateway:
        customer = Customer(gateway)
        await customer.send("hi")
        replies = await customer.press(f"flow:{flow}")
        assert [r.text for r in replies] == said
        assert replies[-1].buttons == MENU
        assert await customer.slots() == slots
        assert await customer.owner() is OwnerState.BOT
    assert len(garbage.calls) == 1
    if flow == "returns_junk":
        [skipped] = logged(engine_log, "action_returns_junk", "not applied")
        assert "event None" in skipped and "nothing to show" in skipped
    else:
        assert logged(engine_log, "failed in conversation")


# --------------------------------------------------- offline: the version rule

# A conversation is pinned to the flows version its active flow started on. After a
# restart (or once the registry forgot it) that version may be gone: the engine goes on on
# the current version if the position and the pending question still exist there, else the
# flow is dropped (logged) and the message is taken as a fresh one.

V1_ORDER = [
    {"say": "Order help (v1)."},
    {"ask": "order_number", "say": "Order number? (v1)"},
    {"say": "Checking {order_number} (v1)."},
]
PINNED = {"version": "v1", "greeted": True, "flow": "order", "pos": [1],
          "ask": {"slot": "order_number", "attempts": 0}, "slots": {"note": "kept"},
          "menu": []}
MISS = "Sorry, I didn't get that."


def flows_version(version: str, flows: dict[str, list[dict[str, Any]]]) -> LoadedFlows:
    domain = Domain.model_validate({
        "slots": {"order_number": {"type": "text", "validate": {"pattern": "\\d{5}"}},
                  "note": {"type": "text"}, "colour": {"type": "text"}},
        "flows": {name: {"steps": steps} for name, steps in flows.items()},
    })
    return LoadedFlows(version, domain, build_understander(domain))


class Versions:
    """A FlowSource that still has the versions in ``kept``, and the current one."""

    def __init__(self, current: LoadedFlows, *kept: LoadedFlows) -> None:
        self.latest = current
        self.kept = {flows.version: flows for flows in (current, *kept)}

    def current(self) -> LoadedFlows:
        return self.latest

    def get(self, version: str) -> LoadedFlows | None:
        return self.kept.get(version)


async def offline_turn(engine: FlowEngine, state: dict[str, Any], text: str) -> BotTurn:
    """One customer message, as the pipeline hands it to the bot (no store)."""
    now = utcnow()
    conversation = Conversation(id="c1", channel="story", thread_key="t1",
                                contact_id="k1", created_at=now, updated_at=now)
    message = Activity(
        id="m1", conversation_id="c1", contact_id="k1", seq=1, contact_seq=1,
        direction=Direction.INBOUND, channel="story",
        conversation_ref=ConversationRef(channel="story", thread_key="t1"),
        sender=Party(role=Role.CUSTOMER, id="k1"), timestamp=now, created_at=now, text=text)
    contact = Contact(id="k1", created_at=now)
    return await engine.respond(TurnContext(conversation, contact, message, dict(state)))


async def test_a_pinned_version_still_known_is_used() -> None:
    v1 = flows_version("v1", {"order": V1_ORDER})
    v2 = flows_version("v2", {"order": [{"say": "Changed."}]})
    turn = await offline_turn(FlowEngine(Versions(v2, v1)), PINNED, "12345")
    assert [r.text for r in turn.replies] == ["Checking 12345 (v1)."]


async def test_a_gone_version_goes_on_where_the_position_still_exists(
    engine_log: pytest.LogCaptureFixture,
) -> None:
    v2 = flows_version("v2", {"order": [
        {"say": "Order help (v2)."},
        {"ask": "order_number", "say": "Order number? (v2)"},
        {"say": "Checking {order_number} (v2)."},
    ]})
    turn = await offline_turn(FlowEngine(Versions(v2)), PINNED, "12345")
    assert [r.text for r in turn.replies] == ["Checking 12345 (v2)."]
    assert turn.state["slots"] == {"note": "kept", "order_number": "12345"}
    assert not logged(engine_log, "is gone")


@pytest.mark.parametrize("steps", [
    [{"ask": "order_number", "say": "Number?"}, {"say": "Moved."}],  # a say is there now
    [{"say": "Hi."}, {"ask": "note", "say": "Note?"}],  # another question is there now
    [{"say": "Only one step now."}],  # the position is past the end
    None,  # the flow is gone
])
async def test_a_gone_version_starts_afresh_where_the_position_does_not_exist(
    steps: list[dict[str, Any]] | None, engine_log: pytest.LogCaptureFixture,
) -> None:
    v2 = flows_version("v2", {"order": steps} if steps else {"other": [{"say": "Other."}]})
    turn = await offline_turn(FlowEngine(Versions(v2)), PINNED, "12345")
    assert [r.text for r in turn.replies] == [MISS]  # not taken as an answer
    assert (turn.state["flow"], turn.state["ask"]) == (None, None)
    assert "order_number" not in turn.state["slots"]
    assert logged(engine_log, "version v1 of flow order is gone", "starts afresh")


@pytest.mark.parametrize("step", [{"action": "action_to_flow"}, {"goto": "returns_info"}])
async def test_a_flow_started_mid_flow_starts_on_the_current_version(
    step: dict[str, Any],
) -> None:
    """The order flow runs on to its end on v1; the flow it moves on to is a new flow,
    which starts on the current version (as a flow the customer starts would)."""
    v1 = flows_version("v1", {"order": [*V1_ORDER[:2], step],
                              "returns_info": [{"say": "Returns (v1)."}]})
    v2 = flows_version("v2", {"order": V1_ORDER,
                              "returns_info": [{"say": "Returns (v2), note {note}."}]})
    actions = InProcessActions(TESTING_ACTIONS)
    try:
        turn = await offline_turn(FlowEngine(Versions(v2, v1), actions), PINNED, "12345")
    finally:
        await actions.close()
    texts = [r.text for r in turn.replies]
    assert texts[-1].startswith("Returns (v2)"), texts


async def test_all_slots_reset_forgets_slots_a_new_version_no_longer_declares() -> None:
    v2 = flows_version("v2", {"order": [*V1_ORDER[:2], {"action": "action_reset_slots"},
                                        {"say": "Reset."}]})
    state = {**PINNED, "version": "v2", "slots": {"note": "kept", "dropped_in_v2": "old"}}
    actions = InProcessActions(TESTING_ACTIONS)
    try:
        turn = await offline_turn(FlowEngine(Versions(v2), actions), state, "12345")
    finally:
        await actions.close()
    assert [r.text for r in turn.replies] == ["Reset."]
    assert turn.state["slots"] == {"colour": "after"}
