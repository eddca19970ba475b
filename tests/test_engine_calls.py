"""The flow engine's calls out, through the whole gateway: custom rasa-sdk actions
(tests.actions_testing, in-process) and ``http`` steps against a local server; and the
shipped order-status flow with the shipped action, in-process and on a real rasa-sdk
action server, giving the same replies."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

import pytest

from flows.engine import ACTION_FAILED_TEXT, HTTP_FAILED_TEXT
from gateway.keys import AGENTS, PIPELINE, ROUTING
from gateway.model import OwnerState
from gateway.settings import DEFAULT_FLOWS_DIR, Settings
from gateway.store.turn_records import current as current_turn_state
from tests.conftest import Gateway, running_gateway
from tests.engine_rig import Customer, Said, Shop, copy_flows, engine_settings
from tests.rasa_server import ActionServer, action_server


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
async def ana(gateway: Gateway) -> Customer:
    customer = Customer(gateway)
    await customer.send("hi")
    return customer


# --------------------------------------------------------------------- actions


async def test_an_action_result_is_applied_to_the_slots(ana: Customer) -> None:
    replies = await ana.press("flow:action_ok")
    assert [r.text for r in replies] == ["The action saw order 12345."]
    seen = (await ana.slots())["seen"]
    assert seen["order_number"] == "12345"  # the tracker carried the slots
    assert seen["sender_id"] == (await ana.conversation()).contact_id
    assert seen["text"] == "flow:action_ok"  # and the latest message
    assert "user" in seen["events"] and "bot" in seen["events"]
    assert "scribbled" not in await ana.slots()


async def test_an_action_sees_the_earlier_turns_and_the_memory_stays_small(
    gateway: Gateway, ana: Customer,
) -> None:
    assert await ana.texts("blorp")  # a turn without an action: logged all the same
    await ana.press("flow:action_ok")
    seen = (await ana.slots())["seen"]
    assert seen["said"] == ["hi", "blorp", "flow:action_ok"]
    conversation = await ana.conversation()
    state = await current_turn_state(gateway.store, conversation.id)
    assert state is not None and "events" not in state.bot_state
    # each turn's entries ride on its first reply, in the turn's record, written once
    # with the turn: no statement of their own, and never shown (not in the API's items)
    carried = await gateway.store.messages.find(
        {"conversation_id": conversation.id, "turn": {"$exists": True}}).to_list()
    assert len(carried) == 3 and all(d["turn"]["events"] for d in carried)
    assert [d["turn"]["seq"] < d["seq"] for d in carried] == [True] * 3
    assert not await gateway.store.db["bot_events"].count_documents({})
    [shown] = [i for i in (await gateway.store.history(conversation.id))[0]
               if i.id == carried[0]["_id"]]
    assert shown.turn is not None and "turn" not in shown.model_dump()


async def test_a_cleared_memory_starts_the_event_log_afresh(
    gateway: Gateway, ana: Customer,
) -> None:
    assert await ana.texts("blorp")
    conversation = await ana.conversation()
    routing, agents = gateway.app[ROUTING], gateway.app[AGENTS]
    alice, _ = await agents.add("Alice")
    assert await routing.handoff(conversation.id, "asked for a person")
    await routing.claim(conversation.id, alice)
    await routing.handback(conversation.id, alice)  # the bot's memory is cleared
    await ana.send("hello again")
    await ana.press("flow:action_ok")
    assert (await ana.slots())["seen"]["said"] == ["hello again", "flow:action_ok"]


async def test_an_event_log_stored_by_an_older_version_is_moved_out_of_the_memory(
    gateway: Gateway, ana: Customer,
) -> None:
    conversation = await ana.conversation()
    old = {"event": "user", "timestamp": 1.0, "text": "from before", "parse_data": {}}
    # as an older version left it: everything in the turn state, no turn records
    now = await current_turn_state(gateway.store, conversation.id)
    assert now is not None
    await gateway.store.turn_state.update_one({"_id": conversation.id}, {"$set": {
        "bot_state": {**now.bot_state, "events": [old]},
        "processed_seq": now.processed_seq}})
    await gateway.store.messages.update_many({"conversation_id": conversation.id},
                                             {"$unset": {"turn": ""}})
    gateway.app[PIPELINE]._held.clear()  # as after the upgrade's restart: read it again
    await ana.press("flow:action_ok")
    assert (await ana.slots())["seen"]["said"][-2:] == ["from before", "flow:action_ok"]
    state = await current_turn_state(gateway.store, conversation.id)
    assert state is not None and "events" not in state.bot_state
    await ana.press("flow:action_ok")  # read back from the event log now
    assert (await ana.slots())["seen"]["said"][-3:] == [
        "from before", "flow:action_ok", "flow:action_ok"]


@pytest.mark.parametrize(("flow", "after"), [
    ("action_fails", "After the failure."),  # the action raises
    ("action_slow", "After the timeout."),  # it sleeps far past its 1 s timeout
])
async def test_a_failing_action_is_polite_and_the_flow_goes_on(
    ana: Customer, flow: str, after: str,
) -> None:
    replies = await ana.press(f"flow:{flow}")
    assert [r.text for r in replies] == [ACTION_FAILED_TEXT, after]
    assert (await ana.state())["flow"] is None
    assert await ana.owner() is OwnerState.BOT
    # never stuck: the next message is answered as usual
    assert await ana.texts("where is my order 12345") == ["Checking order 12345."]


# ------------------------------------------------------------------------ http


async def test_http_saves_json_paths_into_slots(ana: Customer, shop: Shop) -> None:
    replies = await ana.press("flow:http_ok")
    assert [r.text for r in replies] == ["Order 12345 is shipped: Shoe, 59.9."]
    assert [(r["method"], r["raw_path"]) for r in shop.requests] == [("GET", "/orders/12345")]
    slots = await ana.slots()
    assert (slots["order_state"], slots["first_item"], slots["total"]) == ("shipped", "Shoe",
                                                                          59.9)


async def test_http_post_sends_a_templated_body_and_headers(ana: Customer, shop: Shop) -> None:
    replies = await ana.press("flow:http_post")
    assert [r.text for r in replies] == ["Echoed Ana 42 Ana."]
    [request] = shop.requests
    assert request["body"] == {"who": "Ana", "age": 42, "note": "age 42"}
    assert request["headers"]["X-Customer"] == "Ana"


async def test_an_http_error_runs_on_error(ana: Customer, shop: Shop) -> None:
    replies = await ana.press("flow:http_error")
    assert [r.text for r in replies] == ["Lookup failed."]
    assert len(shop.requests) == 1
    conversation = await ana.conversation()
    assert conversation.owner is OwnerState.QUEUED
    assert conversation.handoff is not None
    assert (conversation.handoff.reason, conversation.handoff.skill) == ("order lookup failed",
                                                                         "orders")
    assert "order_state" not in await ana.slots()


async def test_an_http_timeout_runs_on_error_and_goes_on(ana: Customer, shop: Shop) -> None:
    replies = await ana.press("flow:http_slow")
    assert [r.text for r in replies] == ["Too slow.", "After the slow call."]
    assert [r["raw_path"] for r in shop.requests] == ["/slow"]  # it was called, then dropped
    assert await ana.owner() is OwnerState.BOT


async def test_an_http_error_without_on_error_is_polite(ana: Customer) -> None:
    replies = await ana.press("flow:http_no_handler")
    assert [r.text for r in replies] == [HTTP_FAILED_TEXT, "Went on."]


async def test_url_values_are_url_encoded(ana: Customer, shop: Shop) -> None:
    assert await ana.texts(value="flow:http_encoded") == ["Search for?"]
    nasty = "a/b c?&x=1#top"
    assert await ana.texts(nasty) == ["Searched."]
    [request] = shop.requests
    # (the client may normalise equivalent escapes, e.g. %26 to & in a path: same meaning)
    path, query = request["raw_path"].split("?", 1)
    assert path.startswith("/search/") and "/" not in path.removeprefix("/search/")
    assert unquote(path.removeprefix("/search/")) == nasty  # one path segment, whole
    assert parse_qs(query) == {"q": [nasty]}  # one query parameter, whole (# included)
    slots = await ana.slots()
    assert slots["order_state"] == nasty


# ------------------------------------ the shipped order-status flow, both modes


@pytest.fixture(scope="module")
def example_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ActionServer]:
    with action_server("examples.actions", tmp_path_factory.mktemp("rasa")) as server:
        yield server


async def order_status_transcript(settings: Settings) -> list[Any]:
    """Three order questions on the shipped flows; what the bot said and did."""
    async with running_gateway(settings) as gateway:
        shipped, processing, unknown = (Customer(gateway, name=None) for _ in range(3))
        transcript: list[Any] = []
        transcript.append(await shipped.send("where is my order 10045?"))
        transcript.append(await processing.send("hi"))
        transcript.append(await processing.press("flow:order_status", "Order status"))
        transcript.append(await processing.send("it's #10046"))
        transcript.append(await unknown.send("has my order shipped? it is 99999"))
        conversation = await unknown.conversation()
        assert conversation.handoff is not None
        transcript.append((conversation.owner, conversation.handoff.skill,
                           conversation.handoff.priority))
        return transcript


async def test_the_order_status_flow_gives_the_same_replies_in_both_modes(
    settings: Settings, example_server: ActionServer,
) -> None:
    base = settings.model_copy(update={"flows_dir": DEFAULT_FLOWS_DIR,
                                       "flows_hot_reload": False, "actions_package": None})
    local = await order_status_transcript(
        base.model_copy(update={"actions_package": "examples.actions"}))
    remote = await order_status_transcript(
        base.model_copy(update={"mongodb_db": base.mongodb_db + "_r",
                                "action_server_url": example_server.url}))
    assert local == remote
    texts = [[s.text for s in turn] for turn in local[:-1]]
    assert texts[0] == ["Good news: order 10045 has shipped. "
                        "Expected delivery: Thursday, 3 December."]
    assert texts[2] == ["What's your order number? It's in your confirmation email "
                        "(5 to 8 digits)."]
    assert texts[3] == ["Order 10046 is being prepared. It should ship within 5 working days."]
    assert texts[4] == ["I couldn't find order 99999.",
                        "A colleague from the orders team will look into it for you."]
    assert local[-1] == (OwnerState.QUEUED, "orders", "high")
    assert local[0][-1].buttons and local[3][-1].buttons  # a finished flow offers the menu
    assert isinstance(local[0][0], Said)
