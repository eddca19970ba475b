"""The agent REST API over real HTTP: claims, ownership rules, validation, paging, spec."""

from __future__ import annotations

import asyncio
import re
from datetime import datetime
from typing import Any

import pytest
from aiohttp.web_urldispatcher import PrefixedSubAppResource
from bson import ObjectId
from openapi_spec_validator import validate

from gateway.desk.api import DeskApi
from gateway.keys import PIPELINE, ROUTING
from gateway.model import InboundMessage, OwnerState, Party, Role
from tests.conftest import Gateway, Visitor


async def call(
    gateway: Gateway, method: str, path: str, headers: dict[str, str], **kwargs: Any
) -> tuple[int, Any]:
    """One request to /api/v1; (status, JSON body)."""
    url = gateway.url + "/api/v1" + path
    async with gateway.http.request(method, url, headers=headers, **kwargs) as response:
        assert response.content_type == "application/json", await response.text()
        return response.status, await response.json()


async def bot_conversation(gateway: Gateway, visitor_id: str) -> str:
    conversation = await gateway.app[PIPELINE].open_conversation("webchat", visitor_id, visitor_id)
    return conversation.id


async def queued_conversations(gateway: Gateway, count: int) -> list[str]:
    """New web chat conversations the bot handed off, oldest handoff first."""
    ids = []
    for n in range(count):
        conversation_id = await bot_conversation(gateway, f"v_queued{n}")
        assert await gateway.app[ROUTING].handoff(conversation_id, "test: needs a human")
        ids.append(conversation_id)
    await gateway.settle()
    return ids


async def customer_says(gateway: Gateway, thread_key: str, visitor_id: str, text: str) -> None:
    """A web chat message straight into the pipeline (as the connector hands it over)."""
    await gateway.app[PIPELINE].ingest(
        InboundMessage(
            channel="webchat", external_id=f"{visitor_id}:{ObjectId()}", thread_key=thread_key,
            sender=Party(role=Role.CUSTOMER, id=visitor_id), sender_external_id=visitor_id,
            text=text,
        )
    )


async def event_names(gateway: Gateway, conversation_id: str) -> list[str]:
    items, _ = await gateway.store.history(conversation_id, limit=200)
    return [i.name for i in reversed(items) if i.name]


async def test_concurrent_claims_have_exactly_one_winner(gateway: Gateway) -> None:
    alice_id, alice = await gateway.agent("Alice")
    bob_id, bob = await gateway.agent("Bob")
    ids = await queued_conversations(gateway, 10)
    for n, conversation_id in enumerate(ids):
        order = [alice, bob] if n % 2 else [bob, alice]
        results = await asyncio.gather(
            *(call(gateway, "POST", f"/conversations/{conversation_id}/claim", h) for h in order)
        )
        (won_status, won), (lost_status, lost) = sorted(results, key=lambda r: r[0])
        assert (won_status, lost_status) == (200, 409)
        assert won["owner"] == "agent" and won["assignee_id"] in (alice_id, bob_id)
        assert lost["error"] == "conflict" and lost["owner"] == "agent"
        winner = "Alice" if won["assignee_id"] == alice_id else "Bob"
        assert lost["message"] == f"{winner} has this conversation already"
        stored = await gateway.store.get_conversation(conversation_id)
        assert stored is not None
        assert (stored.owner, stored.assignee_id) == (OwnerState.AGENT, won["assignee_id"])
    await gateway.settle()
    for conversation_id in ids:
        assert await event_names(gateway, conversation_id) == ["handoff", "assigned"]


async def test_only_the_assignee_may_act_and_unknown_ids_are_404(gateway: Gateway) -> None:
    alice_id, alice = await gateway.agent("Alice")
    _, bob = await gateway.agent("Bob")
    [conversation_id] = await queued_conversations(gateway, 1)
    path = f"/conversations/{conversation_id}"
    assert (await call(gateway, "POST", path + "/claim", alice))[0] == 200
    await gateway.settle()
    seq = (await call(gateway, "GET", path, alice))[1]["last_seq"]

    # a 409 says, for people, who has it and what can be done
    for action, body, message in [
            ("/messages", {"text": "let me"}, "Alice has this conversation; only they can "
                                              "answer it"),
            ("/resolve", None, "Alice has this conversation; only they can resolve it"),
            ("/handback", None, "Alice has this conversation; only they can hand it back"),
            ("/claim", None, "Alice has this conversation already")]:
        status, error = await call(gateway, "POST", path + action, bob, json=body)
        assert (status, error["error"], error["owner"]) == (409, "conflict", "agent"), action
        assert error["message"] == message
    again = await call(gateway, "POST", path + "/claim", alice)  # idempotent for the owner
    assert again[0] == 200 and again[1]["assignee_id"] == alice_id
    await gateway.settle()
    now = (await call(gateway, "GET", path, alice))[1]
    assert (now["owner"], now["assignee_id"], now["last_seq"]) == ("agent", alice_id, seq)

    unknown = f"/conversations/{ObjectId()}"
    for method, action in [("GET", ""), ("GET", "/messages"), ("POST", "/claim"),
                           ("POST", "/messages"), ("POST", "/resolve"), ("POST", "/handback")]:
        status, error = await call(gateway, method, unknown + action, alice, json={"text": "hi"})
        assert (status, error["error"]) == (404, "not_found"), (method, action)
        assert set(error) == {"error", "message"}  # no "owner": null

    bots = f"/conversations/{await bot_conversation(gateway, 'v_bot')}"
    for action, body in [("/claim", None), ("/messages", {"text": "hi"}), ("/resolve", None),
                         ("/handback", None)]:
        status, error = await call(gateway, "POST", bots + action, alice, json=body)
        assert (status, error["owner"]) == (409, "bot"), action
        assert error["message"].startswith("the bot is answering this conversation; it "
                                           "reaches the queue when the customer asks"), action

    # queued: claim first; resolved: it opens again when the customer writes
    waiting = await bot_conversation(gateway, "v_waiting")
    assert await gateway.app[ROUTING].handoff(waiting, "test: needs a human")
    status, error = await call(gateway, "POST", f"/conversations/{waiting}/messages", bob,
                               json={"text": "hi"})
    assert (status, error["owner"]) == (409, "queued")
    assert error["message"] == ("this conversation is waiting in the queue: claim it before "
                                "you answer it")
    assert (await call(gateway, "POST", path + "/resolve", alice))[0] == 200
    for action in ("/claim", "/resolve", "/messages"):
        status, error = await call(gateway, "POST", path + action, alice, json={"text": "hi"})
        assert (status, error["owner"]) == (409, "resolved"), action
        assert error["message"].startswith("this conversation is resolved; it opens again "
                                           "when the customer writes"), action


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"text": ""}, "text"),
        ({"text": "  \n "}, "text"),
        ({}, "text"),
        ({"text": 5}, "text"),
        ({"text": "x" * 4001}, "text"),
        ({"text": "hi", "priority": "high"}, "priority"),
        (["hi"], "body"),
        ("null", "body"),
        ("not json", "JSON"),
        ("", "JSON"),
    ],
    ids=["empty", "blank", "missing", "number", "too-long", "extra-field", "array", "null",
         "not-json", "no-body"],
)
async def test_reply_body_is_validated(gateway: Gateway, body: Any, names: str) -> None:
    _, alice = await gateway.agent("Alice")
    [conversation_id] = await queued_conversations(gateway, 1)
    path = f"/conversations/{conversation_id}"
    await call(gateway, "POST", path + "/claim", alice)
    await gateway.settle()
    seq = (await call(gateway, "GET", path, alice))[1]["last_seq"]
    if isinstance(body, str):  # raw bytes, declared as JSON
        headers = {**alice, "Content-Type": "application/json"}
        sent = await call(gateway, "POST", path + "/messages", headers, data=body)
    else:
        sent = await call(gateway, "POST", path + "/messages", alice, json=body)
    status, error = sent
    assert (status, error["error"]) == (400, "bad_request")
    assert names in error["message"]
    assert (await call(gateway, "GET", path, alice))[1]["last_seq"] == seq  # nothing stored

    status, item = await call(gateway, "POST", path + "/messages", alice,
                              json={"text": "  Hello, Alice here.  "})
    assert status == 201
    assert (item["seq"], item["sender"]["role"]) == (seq + 1, "agent")
    assert item["text"] == "Hello, Alice here."  # trimmed, like web chat texts


async def test_list_filters(gateway: Gateway) -> None:
    _, alice = await gateway.agent("Alice")
    _, bob = await gateway.agent("Bob")
    first, second, alices, bobs = await queued_conversations(gateway, 4)
    bots = await bot_conversation(gateway, "v_bot")
    await call(gateway, "POST", f"/conversations/{alices}/claim", alice)
    await call(gateway, "POST", f"/conversations/{bobs}/claim", bob)

    async def listed(query: str, headers: dict[str, str] = alice) -> list[str]:
        status, body = await call(gateway, "GET", "/conversations" + query, headers)
        assert status == 200, body
        return [c["id"] for c in body["items"]]

    assert await listed("") == [first, second]  # the queue, oldest handoff first
    assert await listed("?owner=queued") == [first, second]
    assert set(await listed("?owner=agent")) == {alices, bobs}
    assert await listed("?owner=agent&mine=true") == [alices]
    assert await listed("?owner=agent&mine=1", bob) == [bobs]
    assert await listed("?owner=bot") == [bots]
    assert set(await listed("?owner=bot,queued")) == {bots, first, second}
    assert await listed("?owner=resolved") == []
    assert await listed("?limit=1") == [first]
    assert await listed("?limit=200") == [first, second]
    queued = (await call(gateway, "GET", "/conversations", alice))[1]["items"][0]
    assert (queued["owner"], queued["assignee_id"]) == ("queued", None)
    assert queued["handoff"]["reason"] == "test: needs a human"
    assert queued["contact"]["identities"][0]["external_id"] == "v_queued0"

    for query, names in [("?owner=nobody", "owner"), ("?owner=", "owner"),
                         ("?owner=queued,nobody", "owner"), ("?limit=0", "limit"),
                         ("?limit=201", "limit"), ("?limit=ten", "limit"), ("?limit=1.5", "limit")]:
        status, error = await call(gateway, "GET", "/conversations" + query, alice)
        assert (status, error["error"]) == (400, "bad_request"), query
        assert names in error["message"], query


async def test_history_pages_newest_first_with_every_seq_once(gateway: Gateway) -> None:
    _, alice = await gateway.agent("Alice")
    [conversation_id] = await queued_conversations(gateway, 1)  # seq 1: the handoff event
    for n in range(2, 121):
        await customer_says(gateway, "v_queued0", "v_queued0", f"message {n}")
    await gateway.settle()  # queued: the bot stays silent, so exactly 120 items
    path = f"/conversations/{conversation_id}/messages"

    seqs: list[int] = []
    pages, query = 0, "?limit=50"
    while True:
        status, page = await call(gateway, "GET", path + query, alice)
        assert status == 200
        pages += 1
        seqs += [item["seq"] for item in page["items"]]
        if not page["has_more"]:
            assert page["next_before"] is None
            break
        assert page["next_before"] == page["items"][-1]["seq"]
        query = f"?limit=50&before={page['next_before']}"
    assert pages == 3
    assert seqs == list(range(120, 0, -1))
    newest = (await call(gateway, "GET", path + "?limit=1", alice))[1]
    assert newest["items"][0]["text"] == "message 120" and newest["has_more"] is True
    oldest = (await call(gateway, "GET", path + "?before=2", alice))[1]
    assert [i["name"] for i in oldest["items"]] == ["handoff"] and oldest["has_more"] is False
    assert (await call(gateway, "GET", path + "?before=1", alice))[1]["items"] == []
    for query, names in [("?limit=0", "limit"), ("?limit=201", "limit"), ("?before=0", "before"),
                         ("?before=x", "before"), (f"?before={10**20}", "before")]:
        status, error = await call(gateway, "GET", path + query, alice)
        assert status == 400 and names in error["message"], query


async def test_contact_timeline_spans_conversations_newest_first(
    gateway: Gateway, visitor: Visitor
) -> None:
    _, alice = await gateway.agent("Alice")
    visitor_id = (await visitor.connect())["welcome"]["visitor_id"]
    await visitor.say("hello")
    await gateway.settle()
    # the same person, in a second conversation (another thread), then back in the first
    await customer_says(gateway, "second-thread", visitor_id, "shipping costs")
    await gateway.settle()
    await visitor.say("opening hours")
    await gateway.settle()
    first = await gateway.store.find_conversation("webchat", visitor_id)
    second = await gateway.store.find_conversation("webchat", "second-thread")
    assert first is not None and second is not None
    assert first.contact_id == second.contact_id and first.id != second.id

    status, page = await call(gateway, "GET", f"/contacts/{first.contact_id}/timeline?limit=200",
                              alice)
    assert status == 200 and page["has_more"] is False
    items = page["items"]
    first_top, second_top = (await gateway.store.top_seq(first.id),
                             await gateway.store.top_seq(second.id))
    assert [i["contact_seq"] for i in items] == list(range(first_top + second_top, 0, -1))
    stamps = [datetime.fromisoformat(i["created_at"]) for i in items]
    assert stamps == sorted(stamps, reverse=True)
    both = [*(await gateway.store.history(first.id, limit=200))[0],
            *(await gateway.store.history(second.id, limit=200))[0]]
    assert {i["id"] for i in items} == {i.id for i in both}
    assert [i["conversation_id"] for i in items].count(second.id) == second_top
    assert "Monday to Friday" in items[0]["text"]  # the newest: the answer in the first one
    shipping = next(i for i in items if i["text"] == "shipping costs")
    assert shipping["conversation_id"] == second.id

    paged: list[str] = []  # small pages give the same list
    query = "?limit=3"
    while True:
        page = (await call(gateway, "GET", f"/contacts/{first.contact_id}/timeline" + query,
                           alice))[1]
        paged += [i["id"] for i in page["items"]]
        if not page["has_more"]:
            break
        query = f"?limit=3&cursor={page['next_cursor']}"
    assert paged == [i["id"] for i in items]

    status, contact = await call(gateway, "GET", f"/contacts/{first.contact_id}", alice)
    assert status == 200
    assert [(i["channel"], i["external_id"]) for i in contact["identities"]] == [
        ("webchat", visitor_id)]
    for path in (f"/contacts/{ObjectId()}", f"/contacts/{ObjectId()}/timeline"):
        assert (await call(gateway, "GET", path, alice))[0] == 404


async def test_openapi_describes_exactly_the_routes(gateway: Gateway) -> None:
    async with gateway.http.get(gateway.url + "/api/openapi.json") as response:
        assert response.status == 200
        spec = await response.json()
    validate(spec)
    [api] = [r for r in gateway.app.router.resources()
             if isinstance(r, PrefixedSubAppResource) and r.canonical == "/api"]
    routed = {(route.method, route.resource.canonical) for route in api
              if route.method != "HEAD" and route.resource is not None}
    documented = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    assert routed == documented
    assert len(documented) == len(DeskApi().endpoints())  # every endpoint, once
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if op.get("security") != []:
                assert "401" in op["responses"], (method, path)
    # the docs page: Swagger UI over that spec (rendered in tests/test_api_docs_browser.py),
    # its files served here, from the swagger-ui-py package, nothing else
    async with gateway.http.get(gateway.url + "/api/docs") as response:
        assert response.status == 200 and response.content_type == "text/html"
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]
        page = await response.text()
    assets = re.findall(r'(?:src|href)="(docs/assets/[^"]+)"', page)
    assert sorted(assets) == ["docs/assets/docs.js", "docs/assets/favicon-32x32.png",
                              "docs/assets/swagger-ui-bundle.js", "docs/assets/swagger-ui.css"]
    for asset in assets:
        async with gateway.http.get(f"{gateway.url}/api/{asset}") as response:
            assert response.status == 200, asset
            kind = {"js": "text/javascript", "css": "text/css", "png": "image/png"}
            assert response.content_type == kind[asset.rsplit(".", 1)[1]]
            assert len(await response.read()) > 100
    async with gateway.http.get(gateway.url + "/api/docs/assets/..%2Fcore.py") as response:
        assert response.status == 404 and (await response.json())["error"] == "not_found"


async def test_resolved_then_the_customer_writes_again_the_bot_answers(
    gateway: Gateway, visitor: Visitor
) -> None:
    _, alice = await gateway.agent("Alice")
    visitor_id = (await visitor.connect())["welcome"]["visitor_id"]
    await visitor.say("talk to a human")
    await visitor.until(lambda i: i.get("name") == "handoff")
    await gateway.settle()
    conversation = await gateway.store.find_conversation("webchat", visitor_id)
    assert conversation is not None
    path = f"/conversations/{conversation.id}"
    assert (await call(gateway, "POST", path + "/claim", alice))[0] == 200
    status, resolved = await call(gateway, "POST", path + "/resolve", alice)
    assert (status, resolved["owner"]) == (200, "resolved")
    await visitor.until(lambda i: i.get("name") == "resolved")
    status, error = await call(gateway, "POST", path + "/messages", alice, json={"text": "hi"})
    assert (status, error["owner"]) == (409, "resolved")
    assert (await call(gateway, "GET", "/conversations?owner=resolved", alice))[1]["items"]

    await visitor.say("what are your opening hours?")
    reopened = await visitor.until(lambda i: i["type"] == "event")
    assert reopened["name"] == "reopened"
    answer = await visitor.until(lambda i: i.get("role") == "bot")
    assert "Monday to Friday" in answer["text"]
    await gateway.settle()
    now = (await call(gateway, "GET", path, alice))[1]
    assert (now["owner"], now["assignee_id"], now["handoff"]) == ("bot", None, None)
    status, error = await call(gateway, "POST", path + "/claim", alice)
    assert (status, error["owner"]) == (409, "bot")


async def test_an_agent_name_with_control_characters_is_refused(gateway: Gateway) -> None:
    with pytest.raises(ValueError, match="control characters"):
        await gateway.agent("Alice\r\nBcc: evil@example.com")
    assert await gateway.store.agents.count_documents({}) == 0
