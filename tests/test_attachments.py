"""The attachment store and the agent API's files: kept once, typed by content, fetched in
the background, read only by who may read the conversation, sent with agents' replies."""

from __future__ import annotations

import asyncio
import hashlib
import struct
import zlib
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import aiohttp
from aiohttp import web
from bson import ObjectId

from connectors.base import Connector, ConnectorContext, DeliveryResult, FetchError
from gateway.fetcher import MAX_ATTEMPTS
from gateway.files import FETCHES, Files, detect
from gateway.keys import AGENTS, CONNECTORS, FETCHER, FILES, PIPELINE, ROUTING
from gateway.model import (
    Activity,
    AgentRole,
    AttachmentState,
    Conversation,
    DeliveryStatus,
    InboundMessage,
    IncomingFile,
    Party,
    Role,
    utcnow,
)
from gateway.store import Store
from gateway.store.files import BUCKET
from tests.conftest import Gateway


def png(width: int = 1, height: int = 1) -> bytes:
    """A real PNG image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


PDF = (b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n"
       b"2 0 obj\n<< /Type /Pages /Kids [] /Count 0 >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n"
       b"%%EOF\n")


def test_types_are_detected_from_the_bytes_not_the_name() -> None:
    assert detect(png()) == "image/png"
    assert detect(PDF) == "application/pdf"
    assert detect("Grüße, line two\n".encode()) == "text/plain"
    assert detect(b"\x00\x01\x02\x03binary") == "application/octet-stream"
    assert detect(b"") == "application/octet-stream"
    assert detect(b"<!DOCTYPE html><html><script>alert(1)</script></html>") == "text/html"


async def test_a_file_is_kept_once_with_its_digest(store: Store) -> None:
    files = Files(store)
    data = png(3, 2)
    kept = [await files.keep("a1", data, name="../../etc/photo.jpg", conversation_id="c1",
                             contact_id="k1", sender=Party(role=Role.CUSTOMER), channel="test",
                             direction=_in()) for _ in range(2)]
    assert kept[0] == kept[1]
    assert (kept[0].id, kept[0].name, kept[0].content_type, kept[0].state) == (
        "a1", "photo.jpg", "image/png", AttachmentState.STORED)  # the name lied: a PNG
    record = await files.get("a1")
    assert record is not None
    assert (record.size, record.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert await files.read(record) == data
    assert await store.db[f"{BUCKET}.files"].count_documents({}) == 1  # one copy
    # a copy whose record was never written (a process died in between) is swept, by
    # the window of upload times a sweep looks at
    before = utcnow()
    await files.store.bucket.upload_from_stream_with_id(
        ObjectId(), "orphan", b"x", metadata={"attachment_id": "a2"})
    assert await files.store.sweep_orphans(timedelta(0), since=utcnow()) == 0
    assert await files.store.sweep_orphans(timedelta(0), since=before) == 1
    assert await store.db[f"{BUCKET}.files"].count_documents({}) == 1
    assert await files.read(record) == data


def _in() -> Any:
    from gateway.model import Direction
    return Direction.INBOUND


def message(external_id: str, *files: IncomingFile, text: str | None = None,
            channel: str = "webchat", who: str = "v_files") -> InboundMessage:
    return InboundMessage(channel=channel, external_id=external_id, thread_key=who,
                          sender=Party(role=Role.CUSTOMER, id=who), sender_external_id=who,
                          text=text, files=list(files))


async def test_inbound_files_are_kept_before_the_message_and_the_over_large_refused(
    gateway: Gateway,
) -> None:
    files = gateway.app[FILES]
    files.max_bytes = 50_000
    photo, big = png(40, 40), b"%PDF-1.4\n" + bytes(60_000)
    result = await gateway.app[PIPELINE].ingest(message(
        "v_files:1", IncomingFile(key="1", name="photo.png", data=photo),
        IncomingFile(key="2", name="scan.pdf", data=big), text="here you go"))
    first, second = result.item.attachments
    assert (first.state, first.content_type, first.size) == (
        AttachmentState.STORED, "image/png", len(photo))
    assert first.id is not None
    record = await files.get(first.id)
    assert record is not None and await files.read(record) == photo
    assert record.conversation_id == result.conversation.id
    assert (second.state, second.id, second.name) == (AttachmentState.TOO_LARGE, None, "scan.pdf")
    # the customer is told on their channel which file was not received
    await gateway.settle()
    items, _ = await gateway.store.history(result.conversation.id)
    told = [i for i in items if i.dedupe_key == f"{result.item.id}:too-large"]
    assert len(told) == 1 and told[0].text is not None and "scan.pdf" in told[0].text
    # the same message again (a retry): the same attachment, nothing stored twice
    again = await gateway.app[PIPELINE].ingest(message(
        "v_files:1", IncomingFile(key="1", name="photo.png", data=photo),
        IncomingFile(key="2", name="scan.pdf", data=big), text="here you go"))
    assert again.duplicate and again.item.attachments[0].id == first.id
    assert await gateway.store.db["attachments"].count_documents({}) == 1


class Fetching(Connector):
    """A channel that hands files out by reference; ``fetch`` fails as told."""

    channel = "fetchy"

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.failures: dict[str, int] = {}  # name -> how many more times to fail
        self.calls: list[str] = []

    def setup(self, app: web.Application) -> None:
        pass

    async def start(self, context: ConnectorContext) -> None:
        pass

    async def send(self, conversation: Conversation, item: Activity) -> DeliveryResult:
        return DeliveryResult(DeliveryStatus.DELIVERED)

    async def fetch(self, ref: Mapping[str, Any]) -> bytes:
        name = str(ref["blob"])
        self.calls.append(name)
        if name == "gone":
            raise FetchError("the file was deleted", permanent=True)
        if self.failures.get(name, 0) > 0:
            self.failures[name] -= 1
            raise FetchError("timeout")
        return self.blobs[name]


async def until(check: Any, timeout: float = 15.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = await check()
        if found:
            return found
        assert asyncio.get_running_loop().time() < deadline, "not in time"
        await asyncio.sleep(0.05)


async def test_files_by_reference_are_fetched_retried_and_failed_visibly(
    gateway: Gateway,
) -> None:
    channel = Fetching()
    gateway.app[CONNECTORS]["fetchy"] = channel
    channel.blobs["doc"] = PDF
    channel.failures["doc"] = 2  # two timeouts, then it works
    result = await gateway.app[PIPELINE].ingest(message(
        "u1:1", IncomingFile(key="f1", name="doc.pdf", size=len(PDF), ref={"blob": "doc"}),
        IncomingFile(key="f2", name="old.png", size=10, ref={"blob": "gone"}),
        channel="fetchy", who="u1"))
    pending = result.item.attachments
    assert [a.state for a in pending] == [AttachmentState.PENDING] * 2
    fetcher = gateway.app[FETCHER]
    jobs = gateway.store.db[FETCHES]

    async def settled() -> Activity | None:
        await jobs.update_many({}, {"$set": {"due_at": utcnow()}})  # no backoff waits
        await fetcher.run_due()
        item = await gateway.store.get_message(result.item.id)
        assert item is not None
        return item if all(a.state is not AttachmentState.PENDING
                           for a in item.attachments) else None

    item = await until(settled)
    doc, old = item.attachments
    assert (doc.state, doc.content_type, doc.id) == (
        AttachmentState.STORED, "application/pdf", pending[0].id)
    record = await gateway.app[FILES].get(pending[0].id)
    assert record is not None and await gateway.app[FILES].read(record) == PDF
    assert channel.calls.count("doc") == 3 and channel.calls.count("gone") == 1
    assert old.state is AttachmentState.FAILED and old.id is None
    assert old.error == "could not fetch: the file was deleted" and old.name == "old.png"
    assert await jobs.count_documents({}) == 0
    # a file that always fails is given up after MAX_ATTEMPTS
    channel.failures["flaky"] = 100
    second = await gateway.app[PIPELINE].ingest(message(
        "u1:2", IncomingFile(key="f1", name="flaky.txt", ref={"blob": "flaky"}),
        channel="fetchy", who="u1"))

    async def given_up() -> Activity | None:
        await jobs.update_many({}, {"$set": {"due_at": utcnow()}})
        await fetcher.run_due()
        stored = await gateway.store.get_message(second.item.id)
        assert stored is not None
        return stored if stored.attachments[0].state is AttachmentState.FAILED else None

    assert (await until(given_up)).attachments[0].error == "could not fetch: timeout"
    assert channel.calls.count("flaky") == MAX_ATTEMPTS


async def get(gateway: Gateway, path: str, headers: dict[str, str]
              ) -> tuple[int, bytes, Mapping[str, str]]:
    async with gateway.http.get(gateway.url + "/api/v1" + path, headers=headers) as response:
        return response.status, await response.read(), response.headers


async def test_an_attachment_is_read_only_by_who_may_read_its_conversation(
    gateway: Gateway,
) -> None:
    agents = gateway.app[AGENTS]
    tokens = {}
    for name, role, teams in [("Ann", AgentRole.AGENT, ["billing"]),
                              ("Sam", AgentRole.AGENT, ["sales"]),
                              ("Gus", AgentRole.AGENT, []),
                              ("Ada", AgentRole.ADMIN, []),
                              ("Dee", AgentRole.DESIGNER, [])]:
        _, token = await agents.add(name, role=role, teams=teams)
        tokens[name] = {"Authorization": f"Bearer {token}"}
    photo = png(8, 8)
    result = await gateway.app[PIPELINE].ingest(message(
        "v_team:1", IncomingFile(key="1", name="receipt.png", data=photo),
        IncomingFile(key="2", name="notes.html",
                     data=b"<!DOCTYPE html><html><script>alert(1)</script></html>"),
        who="v_team"))
    assert await gateway.app[ROUTING].handoff(result.conversation.id, "refund", team="billing")
    image, page = (f"/attachments/{a.id}" for a in result.item.attachments)

    status, body, headers = await get(gateway, image, tokens["Ann"])
    assert (status, body) == (200, photo)
    assert headers["Content-Type"] == "image/png"
    assert headers["Content-Disposition"].startswith('inline; filename="receipt.png"')
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "sandbox" in headers["Content-Security-Policy"]
    status, _, headers = await get(gateway, image + "?download=true", tokens["Ann"])
    assert status == 200 and headers["Content-Disposition"].startswith("attachment;")
    status, body, headers = await get(gateway, page, tokens["Ann"])  # never inline
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert headers["Content-Disposition"].startswith('attachment; filename="notes.html"')
    for who in ("Ada", "Gus"):  # an admin; an agent of no team works the whole desk
        assert (await get(gateway, image, tokens[who]))[0] == 200, who
    assert (await get(gateway, image, tokens["Sam"]))[0] == 403  # another team's
    assert (await get(gateway, image, tokens["Dee"]))[0] == 403  # a designer
    assert (await get(gateway, image, {}))[0] == 401
    assert (await get(gateway, f"/attachments/{ObjectId()}", tokens["Ann"]))[0] == 404


async def test_an_agent_replies_with_files_as_multipart(gateway: Gateway) -> None:
    alice_id, alice = await gateway.agent("Alice")
    conversation = await gateway.app[PIPELINE].open_conversation("webchat", "v_mp", "v_mp")
    routing = gateway.app[ROUTING]
    assert await routing.handoff(conversation.id, "needs a human")
    path = f"/api/v1/conversations/{conversation.id}/messages"
    photo = png(5, 5)

    def form(*parts: tuple[str, bytes | str, str | None]) -> aiohttp.FormData:
        data = aiohttp.FormData()
        for name, value, filename in parts:
            data.add_field(name, value, filename=filename)
        return data

    async def post(data: Any, headers: dict[str, str] = alice) -> tuple[int, Any]:
        async with gateway.http.post(gateway.url + path, data=data, headers=headers) as r:
            return r.status, await r.json()

    # not the assignee yet: 409, and nothing is kept
    status, error = await post(form(("file", photo, "a.png")))
    assert (status, error["error"]) == (409, "conflict")
    assert await gateway.store.db["attachments"].count_documents({}) == 0
    await routing.claim(conversation.id, (await gateway.app[AGENTS].get(alice_id)))  # type: ignore[arg-type]
    status, item = await post(form(("text", "Here is the label and the invoice", None),
                                   ("file", photo, "label.png"), ("file", PDF, "invoice.pdf")))
    assert status == 201, item
    assert item["text"] == "Here is the label and the invoice"
    assert [(a["name"], a["content_type"], a["state"]) for a in item["attachments"]] == [
        ("label.png", "image/png", "stored"), ("invoice.pdf", "application/pdf", "stored")]
    for attachment, data in zip(item["attachments"], (photo, PDF), strict=True):
        status, body, _ = await get(gateway, f"/attachments/{attachment['id']}", alice)
        assert (status, body) == (200, data)
    status, item = await post(form(("file", PDF, "only.pdf")))  # a file without text
    assert status == 201 and item["text"] is None and len(item["attachments"]) == 1
    # JSON text replies work as before
    async with gateway.http.post(gateway.url + path, json={"text": "anything else?"},
                                 headers=alice) as response:
        assert response.status == 201
    # nothing to send, unknown parts, over the limit: clear errors, nothing kept
    kept = await gateway.store.db["attachments"].count_documents({})
    assert (await post(form(("text", "  ", None))))[0] == 400
    assert (await post(form(("photo", photo, "x.png"))))[0] == 400
    gateway.app[FILES].max_bytes = 1024
    status, error = await post(form(("file", bytes(2048), "big.bin")))
    assert (status, error["error"]) == (413, "too_large")
    assert await gateway.store.db["attachments"].count_documents({}) == kept
