"""Web chat files over real HTTP and sockets: the visitor's upload reaches the agent byte
for byte, the agent's file reaches the visitor by a signed link, and links open only the
visitor's own files."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
from yarl import URL

from connectors.webchat.files import FileLinks
from connectors.webchat.tokens import load_secret
from gateway.keys import AGENTS, FETCHER, FILES, PIPELINE, ROUTING
from gateway.model import Direction, InboundMessage, IncomingFile, Party, Role
from tests.conftest import Gateway, Visitor
from tests.test_attachments import PDF, png


def visitor_id(visitor: Visitor) -> str:
    """The visitor a signed token binds (``v1.<visitor id>.<mac>``)."""
    assert visitor.token is not None
    return visitor.token.split(".")[1]


async def upload(gateway: Gateway, token: str | None, *parts: tuple[str, Any, str | None],
                 headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    form = aiohttp.FormData()
    for name, value, filename in parts:
        form.add_field(name, value, filename=filename)
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    async with gateway.http.post(gateway.url + "/webchat/upload", data=form,
                                 headers=sent) as response:
        return response.status, await response.json()


async def fetch(gateway: Gateway, url: str) -> tuple[int, bytes, dict[str, str]]:
    async with gateway.http.get(URL(gateway.url + url, encoded=True)) as response:
        return response.status, await response.read(), dict(response.headers)


async def test_a_visitor_uploads_files_and_the_agent_gets_them_unchanged(
    gateway: Gateway,
) -> None:
    visitor = Visitor(gateway)
    await visitor.connect()
    assert visitor.token is not None
    photo = png(12, 9)
    status, ack = await upload(gateway, visitor.token, ("client_id", "up1", None),
                               ("text", "my receipt and the form", None),
                               ("file", photo, "receipt.png"), ("file", PDF, "form.pdf"))
    assert status == 200, ack
    assert (ack["type"], ack["client_id"], ack["duplicate"]) == ("ack", "up1", False)
    item = await visitor.until(lambda f: f.get("id") == ack["id"])
    assert item["text"] == "my receipt and the form"
    shown = item["attachments"]
    assert [(a["name"], a["content_type"], a["state"], a["inline"]) for a in shown] == [
        ("receipt.png", "image/png", "stored", True),
        ("form.pdf", "application/pdf", "stored", False)]
    # the visitor opens their files by the links in the frame
    for attachment, data in zip(shown, (photo, PDF), strict=True):
        status, body, headers = await fetch(gateway, attachment["url"])
        assert (status, body) == (200, data)
        assert headers["X-Content-Type-Options"] == "nosniff"
    # the agent reads the same bytes through the agent API
    _, auth = await gateway.agent("Alice")
    for attachment, data in zip(shown, (photo, PDF), strict=True):
        async with gateway.http.get(f"{gateway.url}/api/v1/attachments/{attachment['id']}",
                                    headers=auth) as response:
            assert (response.status, await response.read()) == (200, data)
    # the same upload again (the widget retried): one message, one copy of each file
    status, again = await upload(gateway, visitor.token, ("client_id", "up1", None),
                                 ("file", photo, "receipt.png"), ("file", PDF, "form.pdf"))
    assert status == 200 and again["duplicate"] and again["id"] == ack["id"]
    assert await gateway.store.db["attachments"].count_documents({}) == 2
    await visitor.close()


async def test_an_agents_file_reaches_the_visitor_by_a_link_that_opens_only_it(
    gateway: Gateway,
) -> None:
    visitor = Visitor(gateway)
    await visitor.connect()
    await visitor.say("I need the label")
    await gateway.settle()
    conversation = await gateway.store.find_conversation("webchat", visitor_id(visitor))
    assert conversation is not None
    routing = gateway.app[ROUTING]
    assert await routing.handoff(conversation.id, "needs a human")
    agent, _ = await gateway.app[AGENTS].add("Alice")
    await routing.claim(conversation.id, agent)
    label = png(30, 20)
    kept = await gateway.app[FILES].keep(
        "label1", label, name="label.png", conversation_id=conversation.id,
        contact_id=conversation.contact_id,
        sender=Party(role=Role.AGENT, id=agent.id, name=agent.name), channel="webchat",
        direction=Direction.OUTBOUND)
    await routing.reply(conversation.id, agent, "Here it is", attachments=[kept])
    frame = await visitor.until(lambda f: f.get("role") == "agent")
    [shown] = frame["attachments"]
    assert (shown["name"], shown["inline"]) == ("label.png", True)
    status, body, headers = await fetch(gateway, shown["url"])
    assert (status, body) == (200, label)
    assert headers["Content-Disposition"].startswith('inline; filename="label.png"')

    query = parse_qs(urlsplit(shown["url"]).query)
    path = urlsplit(shown["url"]).path
    forged = f"{path}?v={query['v'][0]}&exp={query['exp'][0]}&sig=AAAA{query['sig'][0][4:]}"
    assert (await fetch(gateway, forged))[0] == 403
    later = f"{path}?v={query['v'][0]}&exp={int(query['exp'][0]) + 1}&sig={query['sig'][0]}"
    assert (await fetch(gateway, later))[0] == 403  # the expiry is signed too
    # another visitor, even with a validly signed link of their own, opens nothing here
    other = Visitor(gateway)
    await other.connect()
    links = FileLinks(await load_secret(gateway.store))
    assert (await fetch(gateway, links.url("label1", visitor_id(other))))[0] == 404
    expired = FileLinks(await load_secret(gateway.store), clock=lambda: 0.0)
    assert (await fetch(gateway, expired.url("label1", visitor_id(visitor))))[0] == 403
    # a fresh link on asking, for the visitor's own file only
    assert visitor.ws is not None
    await visitor.ws.send_json({"type": "file", "id": "label1"})
    fresh = await visitor.next_frame("file")
    assert (await fetch(gateway, fresh["url"]))[1] == label
    assert other.ws is not None
    await other.ws.send_json({"type": "file", "id": "label1"})
    assert (await other.next_frame("error"))["code"] == "not_found"
    await visitor.close()
    await other.close()


async def test_bad_uploads_get_clear_answers_and_store_nothing(gateway: Gateway) -> None:
    visitor = Visitor(gateway)
    await visitor.connect()
    token = visitor.token
    photo = png()
    status, refused = await upload(gateway, None, ("client_id", "c1", None),
                                   ("file", photo, "a.png"))
    assert (status, refused["code"]) == (401, "invalid_token")
    status, refused = await upload(gateway, "v1.v_notavisitor.forged",
                                   ("client_id", "c1", None), ("file", photo, "a.png"))
    assert (status, refused["code"]) == (401, "invalid_token")
    status, refused = await upload(gateway, token, ("client_id", "bad id!", None),
                                   ("file", photo, "a.png"))
    assert (status, refused["code"]) == (400, "bad_frame")
    status, refused = await upload(gateway, token, ("client_id", "c2", None),
                                   ("text", "no file", None))
    assert (status, refused["code"]) == (400, "bad_frame")
    gateway.app[FILES].max_bytes = 4096
    status, refused = await upload(gateway, token, ("client_id", "c3", None),
                                   ("file", bytes(5000), "big.bin"))
    assert (status, refused["code"]) == (413, "file_too_large")
    status, refused = await upload(gateway, token, ("client_id", "c4", None),
                                   ("file", photo, "a.png"),
                                   headers={"Origin": "https://evil.example"})
    assert (status, refused["code"]) == (403, "origin_not_allowed")
    assert await gateway.store.db["attachments"].count_documents({}) == 0
    assert await gateway.store.messages.count_documents({}) == 0
    # a zero-byte file is a file: kept, empty, typed as unknown bytes
    status, ack = await upload(gateway, token, ("client_id", "c5", None),
                               ("file", b"", "empty.txt"))
    assert status == 200, ack
    item = await visitor.until(lambda f: f.get("id") == ack["id"])
    assert [(a["name"], a["size"], a["content_type"]) for a in item["attachments"]] == [
        ("empty.txt", 0, "application/octet-stream")]
    await visitor.close()


def _agent(agent: Any) -> Any:
    from gateway.model import Party, Role
    return Party(role=Role.AGENT, id=agent.id, name=agent.name)


def _out() -> Any:
    from gateway.model import Direction
    return Direction.OUTBOUND


async def test_a_file_that_ends_pending_is_shown_again_in_place(gateway: Gateway) -> None:
    """An item whose file the gateway fetches in the background is shown with the file
    pending, then again (the same id and seq) once the fetch ended: here it fails (the
    web chat itself fetches nothing), so the visitor sees why."""
    visitor = Visitor(gateway)
    await visitor.connect()
    await visitor.say("hello")
    who = visitor_id(visitor)
    result = await gateway.app[PIPELINE].ingest(InboundMessage(
        channel="webchat", external_id=f"{who}:byref", thread_key=who,
        sender=Party(role=Role.CUSTOMER, id=who), sender_external_id=who,
        text="from elsewhere", files=[IncomingFile(key="1", name="scan.pdf", ref={"x": 1})]))
    first = await visitor.until(lambda f: f.get("id") == result.item.id)
    assert [a["state"] for a in first["attachments"]] == ["pending"]
    await gateway.app[FETCHER].run_due()
    again = (await visitor.next_frame("update"))["item"]
    assert (again["id"], again["seq"]) == (first["id"], first["seq"])
    [failed] = again["attachments"]
    assert (failed["state"], failed["name"]) == ("failed", "scan.pdf")
    assert "cannot fetch" in failed["error"]
    await visitor.close()
