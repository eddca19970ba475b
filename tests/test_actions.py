"""rasa-sdk custom actions, in-process (rasa-sdk's ActionExecutor) and on a real action
server (``python -m rasa_sdk --actions ...``): the same calls give the same outcomes,
failures are ActionErrors that name the action and the reason, and nothing hangs."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import TypeAdapter
from rasa_sdk.types import ActionCall as RasaActionCall
from rasa_sdk.types import DomainDict, TrackerState

from flows.actions import (
    BUTTONS_ONLY_TEXT,
    ActionEffects,
    InProcessActions,
    RemoteActions,
    build_payload,
    interpret,
    make_runner,
    parse_data,
    rasa_domain,
)
from flows.bot import Reply
from flows.dsl import Domain
from flows.engine import ACTION_FAILED_TEXT
from flows.ports import ActionCall, ActionError, ActionOutcome, EntityMatch, Understanding
from gateway.model import Button
from gateway.settings import Settings
from tests.conftest import Gateway, Visitor, free_port, running_gateway
from tests.rasa_server import ActionServer, action_server

EXAMPLES = "examples.actions"
TESTING = "tests.actions_testing"
EXAMPLE_ACTIONS = {"action_check_order", "action_create_return"}
TESTING_ACTIONS = {"action_raises", "action_sleeps", "action_blocks", "action_not_json",
                   "action_echo_tracker", "action_every_kind",
                   # effects.py (tests/test_engine_effects.py)
                   "action_offer_sizes", "action_count", "action_chain_forever",
                   "action_to_flow", "action_pause", "action_restart", "action_reset_slots",
                   "action_set_odd_slots", "action_returns_number", "action_returns_junk",
                   "action_offer_by_intent"}


# ------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def example_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ActionServer]:
    with action_server(EXAMPLES, tmp_path_factory.mktemp("rasa")) as server:
        yield server


@pytest.fixture(scope="module")
def testing_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ActionServer]:
    with action_server(TESTING, tmp_path_factory.mktemp("rasa")) as server:
        yield server


@pytest.fixture(scope="module")
def examples_local() -> Iterator[InProcessActions]:
    runner = InProcessActions(EXAMPLES)
    yield runner
    asyncio.run(runner.close())


@pytest.fixture(scope="module")
def testing_local() -> Iterator[InProcessActions]:
    runner = InProcessActions(TESTING)
    yield runner
    asyncio.run(runner.close())


@pytest.fixture
async def examples_remote(example_server: ActionServer) -> AsyncIterator[RemoteActions]:
    runner = RemoteActions(example_server.url)
    yield runner
    await runner.close()


@pytest.fixture
async def testing_remote(testing_server: ActionServer) -> AsyncIterator[RemoteActions]:
    runner = RemoteActions(testing_server.url + "/webhook")  # the full webhook URL works too
    yield runner
    await runner.close()


def call(action: str, slots: dict[str, Any] | None = None, **extra: Any) -> ActionCall:
    """A call as the engine makes it: a user said something, the flow calls an action."""
    understanding = Understanding(
        text="where is my order 10045?", intent="order_status", confidence=0.91,
        ranking=[("order_status", 0.91), ("returns", 0.05)],
        entities=[EntityMatch(entity="order_number", value="10045", start=18, end=23,
                              text="10045")])
    events = [
        {"event": "action", "name": "action_listen", "timestamp": 1700000000.0},
        {"event": "user", "text": understanding.text, "parse_data": parse_data(understanding),
         "input_channel": "webchat", "timestamp": 1700000001.0},
        {"event": "slot", "name": "order_number", "value": "10045", "timestamp": 1700000001.5},
        {"event": "action", "name": "flow_order_status", "timestamp": 1700000002.0},
    ]
    return ActionCall(
        action=action, sender_id="conv-1",
        slots={"order_number": "10045"} if slots is None else slots,
        latest_message=parse_data(understanding), events=events,
        domain=extra.get("domain", {"slots": {"order_number": {"type": "text"},
                                              "order_status": {"type": "text"}}}))


def timed_out(exc: BaseException) -> bool:
    return "timed out" in str(exc)


# ------------------------------------------------------------------- same outcomes


EXAMPLE_CALLS = [
    call("action_check_order", {"order_number": "10045"}),
    call("action_check_order", {"order_number": "#10046 "}),
    call("action_check_order", {"order_number": 10045.0}),  # a number slot
    call("action_check_order", {"order_number": "99999"}),
    call("action_check_order", {}),
    call("action_create_return", {"order_number": "10045", "return_reason": "too small",
                                  "email": "ana@shop.example"}),
    call("action_create_return", {"order_number": "10045"}),
]


@pytest.mark.parametrize("the_call", EXAMPLE_CALLS, ids=lambda c: f"{c.action}-{c.slots}")
async def test_both_modes_give_the_same_outcome(
    the_call: ActionCall, examples_local: InProcessActions, examples_remote: RemoteActions,
) -> None:
    local = await examples_local.run(the_call, 5)
    remote = await examples_remote.run(the_call, 5)
    assert local == remote
    assert local.events  # every example action sets something


async def test_check_order_states(examples_local: InProcessActions,
                                  examples_remote: RemoteActions) -> None:
    expected = {"10045": ("shipped", "Thursday, 3 December"),
                "10046": ("processing", "within 5 working days"),
                "4711": ("not_found", None)}
    for runner in (examples_local, examples_remote):
        for number, (status, eta) in expected.items():
            effects = interpret(await runner.run(call("action_check_order",
                                                      {"order_number": number}), 5))
            assert effects.slots == {"order_status": status, "order_eta": eta}
            assert effects.replies == []


async def test_create_return_is_deterministic_and_says_so(
    examples_local: InProcessActions, examples_remote: RemoteActions,
) -> None:
    slots = {"order_number": "10045", "return_reason": "too small", "email": "ana@shop.example"}
    first = interpret(await examples_local.run(call("action_create_return", slots), 5))
    again = interpret(await examples_remote.run(call("action_create_return", slots), 5))
    other = interpret(await examples_local.run(
        call("action_create_return", {**slots, "return_reason": "broken"}), 5))
    rid = first.slots["return_id"]
    assert rid.startswith("R-10045-") and len(rid) == len("R-10045-") + 4
    assert again.slots == {"return_id": rid}
    assert other.slots["return_id"] != rid
    assert first.replies == [Reply(text=f"Return {rid} is registered for order 10045. "
                                        "The return label is on its way to ana@shop.example.")]
    missing = interpret(await examples_remote.run(call("action_create_return", {}), 5))
    assert missing.slots == {"return_id": None}
    assert "order number" in missing.replies[0].text


async def test_every_kind_of_event_and_response_in_both_modes(
    testing_local: InProcessActions, testing_remote: RemoteActions,
) -> None:
    local = await testing_local.run(call("action_every_kind"), 5)
    remote = await testing_remote.run(call("action_every_kind"), 5)
    assert local == remote
    effects = interpret(remote, responses={"utter_known": [{"text": "A known response"}]})
    assert effects.slots == {"c": [4, "four"], "d": None}  # set after the reset, last wins
    assert effects.reset_slots
    assert effects.followup == "action_check_order"
    assert effects.pause
    assert effects.restart
    assert effects.replies == [
        Reply("Pick one", [Button(title="Yes", value="/affirm"),
                           Button(title="No", value="/deny")]),
        Reply("A custom hello"),
        Reply("A known response"),
        Reply("Image: https://shop.example/shoe.png"),
        Reply("Attachment: https://shop.example/label.pdf"),
        Reply("Shoe : size 42", [Button(title="Buy", value="buy")]),
        Reply(BUTTONS_ONLY_TEXT, [Button(title="Only a button", value="only")]),
    ]
    assert effects.ignored == [
        "event 'reminder'", "event 'bot'",
        "custom payload without text: ['blocks']",
        "response 'utter_unknown': not in the domain's responses",
    ]


async def test_the_tracker_an_action_sees(testing_local: InProcessActions,
                                          testing_remote: RemoteActions) -> None:
    the_call = call("action_echo_tracker")
    local = await testing_local.run(the_call, 5)
    remote = await testing_remote.run(the_call, 5)
    assert local == remote
    assert interpret(local).slots["seen"] == {
        "sender_id": "conv-1",
        "slots": {"order_number": "10045"},
        "order_number": "10045",
        "text": "where is my order 10045?",
        "intent": "order_status",
        "entities": ["10045"],
        "channel": "webchat",
        "events": ["action", "user", "slot", "action"],
        "said": ["where is my order 10045?"],
        "latest_action_name": "flow_order_status",
        "paused": False,
        "active_loop": None,
        "domain_slots": ["order_number", "order_status"],
    }
    assert the_call.slots == {"order_number": "10045"}  # the action scribbled on its copy


# ------------------------------------------------------------------------ failures


async def test_unknown_action(examples_local: InProcessActions,
                              examples_remote: RemoteActions) -> None:
    for runner in (examples_local, examples_remote):
        with pytest.raises(ActionError, match="'action_nope' is not registered"):
            await runner.run(call("action_nope"), 5)


async def test_an_action_that_raises(testing_local: InProcessActions,
                                     testing_remote: RemoteActions) -> None:
    for runner in (testing_local, testing_remote):
        with pytest.raises(ActionError) as caught:
            await runner.run(call("action_raises"), 5)
        assert "'action_raises'" in str(caught.value)
        assert "the order system is down" in str(caught.value)


async def test_an_action_that_returns_no_json(testing_local: InProcessActions,
                                              testing_remote: RemoteActions) -> None:
    with pytest.raises(ActionError, match="'action_not_json' returned something that is not"):
        await testing_local.run(call("action_not_json"), 5)
    with pytest.raises(ActionError, match="'action_not_json' failed on the action server"):
        await testing_remote.run(call("action_not_json"), 5)


@pytest.mark.parametrize("mode", ["in-process", "remote"])
async def test_an_action_that_sleeps_past_the_limit(
    mode: str, testing_local: InProcessActions, testing_server: ActionServer,
) -> None:
    runner = testing_local if mode == "in-process" else RemoteActions(testing_server.url)
    try:
        started = time.monotonic()
        with pytest.raises(ActionError, match=r"'action_sleeps' timed out after 0\.3 s"):
            await asyncio.wait_for(runner.run(call("action_sleeps"), 0.3), 5)
        assert time.monotonic() - started < 2
        # ...and the runner still works afterwards
        assert interpret(await runner.run(call("action_echo_tracker"), 5)).slots["seen"]
    finally:
        if isinstance(runner, RemoteActions):
            await runner.close()


@pytest.mark.parametrize("mode", ["in-process", "remote"])
async def test_a_blocking_sync_action_times_out(
    mode: str, testing_local: InProcessActions, testing_server: ActionServer,
) -> None:
    runner = testing_local if mode == "in-process" else RemoteActions(testing_server.url)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        started = time.monotonic()
        with pytest.raises(ActionError, match=r"'action_blocks' timed out after 0\.2 s"):
            await asyncio.wait_for(runner.run(call("action_blocks"), 0.2), 5)
        assert time.monotonic() - started < 0.9  # before the action's 1 s block ends
        assert ticks >= 5  # the gateway's event loop kept running meanwhile
    finally:
        task.cancel()
        if isinstance(runner, RemoteActions):
            await runner.close()


async def test_server_down_fails_fast() -> None:
    runner = RemoteActions(f"http://127.0.0.1:{free_port()}")
    try:
        started = time.monotonic()
        with pytest.raises(ActionError, match=r"'action_check_order'.*unreachable"):
            await asyncio.wait_for(runner.run(call("action_check_order"), 10), 5)
        assert time.monotonic() - started < 2
        assert await runner.fetch_registered() is None
    finally:
        await runner.close()


# ------------------------------------------------------------------- registration


async def test_registered(examples_local: InProcessActions, testing_local: InProcessActions,
                          examples_remote: RemoteActions) -> None:
    # Both packages are imported in this process; each runner keeps its own actions,
    # as a server started with --actions <package> would.
    assert examples_local.registered() == EXAMPLE_ACTIONS
    assert testing_local.registered() == TESTING_ACTIONS
    assert examples_remote.registered() is None  # not asked yet
    assert await examples_remote.fetch_registered() == EXAMPLE_ACTIONS
    assert examples_remote.registered() == EXAMPLE_ACTIONS


def test_a_missing_package_is_a_clear_error() -> None:
    with pytest.raises(ActionError, match=r"cannot import .*'no_such_actions_pkg'.*PYTHONPATH"):
        InProcessActions("no_such_actions_pkg")


def test_a_broken_module_is_a_clear_error_not_an_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    package = tmp_path / "broken_actions_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "bad.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ActionError, match=r"broken_actions_pkg.*no_such_dependency_xyz"):
        InProcessActions("broken_actions_pkg")


def test_the_package_is_found_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    package = tmp_path / "cwd_actions_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from rasa_sdk import Action\n"
        "from rasa_sdk.events import SlotSet\n"
        "class Here(Action):\n"
        "    def name(self):\n"
        "        return 'action_here'\n"
        "    async def run(self, dispatcher, tracker, domain):\n"
        "        return [SlotSet('here', True)]\n")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.chdir(tmp_path)
    runner = InProcessActions("cwd_actions_pkg")
    assert runner.registered() == {"action_here"}
    outcome = asyncio.run(runner.run(call("action_here"), 5))
    asyncio.run(runner.close())
    assert interpret(outcome).slots == {"here": True}


def test_make_runner() -> None:
    assert make_runner(None, None) is None
    assert isinstance(make_runner(EXAMPLES, None), InProcessActions)
    remote = make_runner(None, "http://127.0.0.1:5055")
    assert isinstance(remote, RemoteActions)
    assert remote.webhook_url == "http://127.0.0.1:5055/webhook"
    with pytest.raises(ValueError, match="not both"):
        make_runner(EXAMPLES, "http://127.0.0.1:5055")


# ------------------------------------------------------------ the wire, recorded


class Recorder:
    """A stand-in action server: records each request, answers what a test sets."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []
        self.status = 200
        self.body: bytes = b'{"events": [], "responses": []}'

    async def webhook(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, await request.json()))
        return web.Response(status=self.status, body=self.body,
                            content_type="application/json")


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[Recorder, str]]:
    rec = Recorder()
    app = web.Application()
    app.router.add_post("/webhook", rec.webhook)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield rec, str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@pytest.mark.parametrize("suffix", ["", "/", "/webhook", "/webhook/"])
async def test_the_request_on_the_wire(recorder: tuple[Recorder, str], suffix: str) -> None:
    rec, url = recorder
    async with aiohttp.ClientSession() as session:
        runner = RemoteActions(url + suffix, session=session)
        outcome = await runner.run(call("action_check_order"), 5)
        await runner.close()  # the caller's session stays open
        assert not session.closed
    assert outcome == ActionOutcome(events=[], responses=[])
    [(path, body)] = rec.requests
    assert path == "/webhook"
    assert body == build_payload(call("action_check_order"))


def test_the_payload_validates_against_rasa_sdk_types() -> None:
    payload = build_payload(call("action_check_order"))
    TypeAdapter(RasaActionCall).validate_python(payload)  # raises if it does not
    tracker = TypeAdapter(TrackerState).validate_python(payload["tracker"])
    assert tracker["latest_action_name"] == "flow_order_status"
    assert payload["tracker"]["latest_message"]["intent_ranking"][0] == {
        "name": "order_status", "confidence": 0.91}
    assert payload["next_action"] == "action_check_order"
    assert payload["version"].count(".") == 2
    # an empty domain is filled to what rasa-sdk's DomainDict requires
    bare = build_payload(call("action_check_order", domain={}))
    TypeAdapter(DomainDict).validate_python(bare["domain"])


def test_a_tracker_that_is_not_json_is_refused() -> None:
    with pytest.raises(ActionError, match="'action_check_order': the tracker is not JSON"):
        build_payload(call("action_check_order", {"order_number": {1, 2}}))


@pytest.mark.parametrize(("status", "body", "message"), [
    (449, b'{"error": "No domain"}', "wants the domain: No domain"),
    (400, b'{"error": "slot invalid"}', "rejected the call .*slot invalid"),
    (502, b"bad gateway", "answered HTTP 502: bad gateway"),
    (200, b"not json", "answered no JSON"),
    (200, b'{"events": {"event": "slot"}}', "malformed events"),
    (200, b'{"events": [], "responses": ["hi"]}', "malformed responses"),
    (200, b"[1, 2]", "answered list, not an object"),
])
async def test_error_answers(recorder: tuple[Recorder, str], status: int, body: bytes,
                             message: str) -> None:
    rec, url = recorder
    rec.status, rec.body = status, body
    runner = RemoteActions(url)
    try:
        with pytest.raises(ActionError, match="'action_check_order'.*" + message):
            await runner.run(call("action_check_order"), 5)
    finally:
        await runner.close()


# ------------------------------------------------------------------ interpret()


def test_interpret_each_event_kind() -> None:
    def effects(*events: dict[str, Any]) -> ActionEffects:
        return interpret(ActionOutcome(events=list(events), responses=[]))

    assert effects({"event": "slot", "name": "x", "value": 1},
                   {"event": "slot", "name": "x", "value": 2}).slots == {"x": 2}
    reset = effects({"event": "slot", "name": "x", "value": 1}, {"event": "reset_slots"},
                    {"event": "slot", "name": "y", "value": None})
    assert (reset.reset_slots, reset.slots) == (True, {"y": None})
    assert effects({"event": "followup", "name": "action_x"}).followup == "action_x"
    assert effects({"event": "pause"}).pause
    assert not effects({"event": "pause"}, {"event": "resume"}).pause
    assert effects({"event": "restart"}).restart
    nothing = effects({"event": "session_started"}, {"event": "slot", "value": 1},
                      {"event": "followup"})
    assert nothing == ActionEffects(ignored=["event 'session_started'", "event 'slot'",
                                             "event 'followup'"])


def test_interpret_responses() -> None:
    responses = [
        {"text": "Hello", "buttons": [{"title": "", "payload": "x"},  # no title: dropped
                                      {"title": "Menu"}]},  # no payload: the title
        {"text": None, "buttons": [], "custom": {"message": "From custom"}},
        {"text": "", "image": None},
        {"response": "utter_bye"},
    ]
    effects = interpret(ActionOutcome(events=[], responses=responses),
                        responses={"utter_bye": [{"text": "Bye!", "buttons": [
                            {"title": "Again", "payload": "/greet"}]}]})
    assert effects.replies == [
        Reply("Hello", [Button(title="Menu", value="Menu")]),
        Reply("From custom"),
        Reply("Bye!", [Button(title="Again", value="/greet")]),
    ]
    assert effects.ignored == ["response with nothing to show: ['image', 'text']"]


def test_rasa_domain() -> None:
    domain = Domain.model_validate({
        "intents": {"order_status": {"examples": ["where is my order"]}},
        "entities": {"order_number": {"pattern": r"\d{5}"}},
        "slots": {"order_number": {"type": "number"},
                  "size": {"type": "choice", "choices": ["S", "M"]}},
        "flows": {"orders": {"steps": [
            {"action": "action_check_order"},
            {"if": "order_status == 'shipped'", "then": [{"action": "action_track"}],
             "else": [{"action": "action_check_order"}]},
        ]}},
    })
    rasa = rasa_domain(domain)
    TypeAdapter(DomainDict).validate_python(rasa)
    assert rasa["actions"] == ["action_check_order", "action_track"]
    assert rasa["slots"]["order_number"]["type"] == "float"
    assert rasa["slots"]["size"] == {"type": "categorical", "values": ["S", "M"],
                                     "influence_conversation": False,
                                     "mappings": [{"type": "custom"}]}
    assert rasa["intents"] == [{"order_status": {"use_entities": True}}]
    assert rasa["entities"] == ["order_number"]


# ------------------------------------------------- through the whole gateway


@pytest.fixture(params=["in-process", "remote"])
async def actions_gateway(request: pytest.FixtureRequest, settings: Settings,
                          example_server: ActionServer) -> AsyncIterator[Gateway]:
    """The gateway on the shipped example flows, running the example actions one way."""
    update = ({"actions_package": EXAMPLES} if request.param == "in-process"
              else {"action_server_url": example_server.url})
    async with running_gateway(settings.model_copy(update=update)) as gw:
        yield gw


def bot_says(fragment: str) -> Any:
    return lambda i: i["type"] == "message" and i["role"] == "bot" and fragment in i["text"]


async def test_the_example_flows_call_the_example_actions(actions_gateway: Gateway) -> None:
    visitor = Visitor(actions_gateway)
    try:
        await visitor.connect()
        await visitor.say("where is my order 10045?")
        shipped = await visitor.until(bot_says("has shipped"))
        assert "Thursday, 3 December" in shipped["text"]
        await visitor.say("where is my order 10046?")
        await visitor.until(bot_says("is being prepared"))
    finally:
        await visitor.close()


async def test_a_dead_action_server_never_leaves_the_customer_stuck(
    settings: Settings,
) -> None:
    dead = settings.model_copy(update={"action_server_url": f"http://127.0.0.1:{free_port()}"})
    async with running_gateway(dead) as gw:
        visitor = Visitor(gw)
        try:
            await visitor.connect()
            started = time.monotonic()
            await visitor.say("where is my order 10045?")
            await visitor.until(bot_says(ACTION_FAILED_TEXT))
            handoff = await visitor.until(lambda i: i["type"] == "event")
            assert handoff["name"] == "handoff"
            assert time.monotonic() - started < 5  # refused at once, not after the timeout
        finally:
            await visitor.close()
