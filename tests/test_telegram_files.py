"""Telegram files both ways, end to end: the whole gateway on a real port, the real aiogram
client talking to the local fake Bot API (tests/fakes/telegram_api.py), the agent API.

In: a customer's photo, document, voice note and sticker are stored by reference when the
update arrives and downloaded in the background (getFile + the file), then served to
agents byte for byte. Out: an agent's files are uploaded as multipart, the text as the
caption, and a retry never uploads a file twice."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.files import FETCHES
from gateway.keys import FETCHER, FILES, PIPELINE, ROUTING
from gateway.model import Activity, AttachmentState, utcnow
from gateway.settings import Settings
from tests.conftest import Gateway
from tests.fakes.telegram_api import FakeTelegram, People
from tests.test_attachments import PDF, png

TOKEN = "123456:TEST-files_token"
SECRET = "files-secret"
HOOK = "/webhooks/telegram"
API = "/api/v1"


@pytest.fixture
async def telegram() -> AsyncIterator[FakeTelegram]:
    fake = FakeTelegram(token=TOKEN)
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
def settings(settings: Settings, telegram: FakeTelegram) -> Settings:
    return settings.model_copy(update={
        "telegram_token": TOKEN, "telegram_mode": "webhook",
        "telegram_webhook_secret": SECRET, "telegram_api_url": telegram.url})


@pytest.fixture
def people(telegram: FakeTelegram) -> People:
    return People(telegram)


# ------------------------------------------------------------------ real file bytes

JPEG = (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
        + bytes(range(256)) * 8 + b"\xff\xd9")
WEBP = b"RIFF" + struct.pack("<I", 4 + 8 + 10) + b"WEBPVP8 " + struct.pack("<I", 10) + bytes(10)


def _ogg_crc(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


def _ogg_page(payload: bytes, seq: int, flags: int) -> bytes:
    header = (b"OggS" + bytes([0, flags]) + struct.pack("<qII", 0, 0x0A11CE, seq)
              + b"\x00\x00\x00\x00" + bytes([1, len(payload)]))
    page = header + payload
    return page[:22] + struct.pack("<I", _ogg_crc(page)) + page[26:]


def ogg_opus() -> bytes:
    """An Ogg/Opus stream's header pages (what a Telegram voice note starts with)."""
    head = b"OpusHead" + bytes([1, 1]) + struct.pack("<HIhB", 312, 48000, 0, 0)
    tags = b"OpusTags" + struct.pack("<I", 4) + b"test" + struct.pack("<I", 0)
    return _ogg_page(head, 0, 2) + _ogg_page(tags, 1, 0)


# ------------------------------------------------------------------ helpers

async def post(gateway: Gateway, telegram: FakeTelegram, update: dict[str, Any]
               ) -> tuple[int, Any]:
    return await telegram.deliver(gateway.http, gateway.url + HOOK, update, SECRET)


async def stored_item(gateway: Gateway, update: dict[str, Any]) -> Activity:
    message = update["message"]
    item = await gateway.store.find_by_external_id(
        "telegram", f"{message['chat']['id']}:{message['message_id']}")
    assert item is not None
    return item


async def until(check: Any, timeout: float = 15.0) -> Any:
    """Wait until ``await check()`` is truthy; returns its value."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = await check()
        if found:
            return found
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def fetched(gateway: Gateway, update: dict[str, Any], *, hurry: bool = False
                  ) -> Activity:
    """The item once none of its files is pending any more. ``hurry``: the fetcher's
    backoff is skipped (its jobs are made due now and run)."""

    async def done() -> Activity | None:
        if hurry:
            await gateway.store.db[FETCHES].update_many({}, {"$set": {"due_at": utcnow()}})
            await gateway.app[FETCHER].run_due()
        item = await stored_item(gateway, update)
        pending = any(a.state is AttachmentState.PENDING for a in item.attachments)
        return None if pending else item

    item: Activity = await until(done)
    return item


async def download(gateway: Gateway, headers: dict[str, str], attachment_id: str
                   ) -> tuple[int, bytes, str]:
    async with gateway.http.get(f"{gateway.url}{API}/attachments/{attachment_id}",
                                headers=headers) as response:
        return response.status, await response.read(), response.headers["Content-Type"]


async def agent_on(gateway: Gateway, conversation_id: str, name: str = "Alice"
                   ) -> dict[str, str]:
    """An agent who holds the conversation (handed off, claimed through the API)."""
    _, auth = await gateway.agent(name)
    assert await gateway.app[ROUTING].handoff(conversation_id, "needs a human")
    async with gateway.http.post(f"{gateway.url}{API}/conversations/{conversation_id}/claim",
                                 headers=auth) as response:
        assert response.status == 200, await response.text()
    return auth


async def reply(gateway: Gateway, auth: dict[str, str], conversation_id: str,
                text: str | None, *files: tuple[bytes, str]) -> dict[str, Any]:
    """An agent's multipart reply through the agent API."""
    form = aiohttp.FormData()
    if text is not None:
        form.add_field("text", text)
    for data, name in files:
        form.add_field("file", data, filename=name)
    async with gateway.http.post(
        f"{gateway.url}{API}/conversations/{conversation_id}/messages", data=form,
        headers=auth,
    ) as response:
        body: dict[str, Any] = await response.json()
        assert response.status == 201, body
        return body


async def delivered(gateway: Gateway, item_id: str) -> Activity:
    async def check() -> Activity | None:
        item = await gateway.store.get_message(item_id)
        assert item is not None and item.delivery is not None
        status = item.delivery.status.value
        assert status != "failed", item.delivery.last_error
        return item if status == "delivered" else None

    item: Activity = await until(check)
    return item


# ------------------------------------------------------------------ inbound

async def test_customer_files_reach_the_agent_byte_for_byte(
    gateway: Gateway, telegram: FakeTelegram, people: People
) -> None:
    ann = people.user(3001, "Ann")
    voice_bytes = ogg_opus()
    telegram.add_file("photo-small", content=b"\xff\xd8\xff small, never fetched",
                      path="photos/small.jpg")
    telegram.add_file("photo-big", content=JPEG, path="photos/big.jpg")
    telegram.add_file("doc-1", content=PDF, path="documents/file_2.pdf")
    telegram.add_file("voice-1", content=voice_bytes, path="voice/file_3.oga")
    telegram.add_file("sticker-1", content=WEBP, path="stickers/file_4.webp")
    photo = people.message(ann, caption="my parcel, broken", photo=[
        {"file_id": "photo-small", "file_unique_id": "ps", "width": 90, "height": 60,
         "file_size": 30},
        {"file_id": "photo-big", "file_unique_id": "pb", "width": 1280, "height": 853,
         "file_size": len(JPEG)}])
    document = people.message(ann, document={
        "file_id": "doc-1", "file_unique_id": "d1", "file_name": "invoice.pdf",
        "mime_type": "application/pdf", "file_size": len(PDF)})
    voice = people.message(ann, voice={"file_id": "voice-1", "file_unique_id": "v1",
                                       "duration": 3, "mime_type": "audio/ogg",
                                       "file_size": len(voice_bytes)})
    sticker = people.message(ann, sticker={
        "file_id": "sticker-1", "file_unique_id": "s1", "type": "regular", "width": 512,
        "height": 512, "is_animated": False, "is_video": False, "emoji": "👍"})
    updates = (photo, document, voice, sticker)
    for update in updates:
        status, body = await post(gateway, telegram, update)
        assert (status, body["outcome"]) == (200, "stored")
    # a redelivery is a duplicate: its files are not listed or fetched again
    assert (await post(gateway, telegram, document))[1]["outcome"] == "duplicate"
    items = [await fetched(gateway, update) for update in updates]
    assert items[0].text == "my parcel, broken"  # the caption is the message's text
    assert all(len(item.attachments) == 1 for item in items)
    expected = [("photo.jpg", JPEG, "image/jpeg"), ("invoice.pdf", PDF, "application/pdf"),
                ("voice.ogg", voice_bytes, "audio/ogg"),
                ("sticker.webp", WEBP, "image/webp")]
    _, alice = await gateway.agent("Alice")
    conversation_id = items[0].conversation_id
    async with gateway.http.get(f"{gateway.url}{API}/conversations/{conversation_id}"
                                "/messages", headers=alice) as response:
        listing = await response.text()
        shown = {i["id"]: i for i in (await response.json())["items"]}
    for item, (name, data, content_type) in zip(items, expected, strict=True):
        [attachment] = shown[item.id]["attachments"]  # what the agent API lists
        assert (attachment["state"], attachment["name"], attachment["content_type"],
                attachment["size"]) == ("stored", name, content_type, len(data))
        assert await download(gateway, alice, attachment["id"]) == (200, data, content_type)
    # only the largest photo size was fetched, each file once
    assert sorted(c.params["file_id"] for c in telegram.of("getFile", ok=None)) == [
        "doc-1", "photo-big", "sticker-1", "voice-1"]
    assert sorted(telegram.downloads) == [
        "documents/file_2.pdf", "photos/big.jpg", "stickers/file_4.webp", "voice/file_3.oga"]
    # the bot token never leaves the gateway: not in the store, not in the agent API
    for collection in ("messages", "attachments", FETCHES):
        async for doc in gateway.store.db[collection].find({}):
            assert TOKEN not in str(doc)
    assert TOKEN not in listing
    # a shared location is no file: a geo: URI, as before
    location = people.message(ann, location={"latitude": 52.52, "longitude": 13.405})
    assert (await post(gateway, telegram, location))[1]["outcome"] == "stored"
    [geo] = (await stored_item(gateway, location)).attachments
    assert (geo.content_type, geo.url, geo.state) == ("application/geo+uri",
                                                      "geo:52.52,13.405", None)
    # the fake serves files only with the bot's token
    async with gateway.http.get(f"{telegram.url}/file/bot{TOKEN}x/photos/big.jpg") as wrong:
        assert wrong.status == 404


async def test_a_file_over_the_limit_is_too_large_and_the_customer_is_told(
    gateway: Gateway, telegram: FakeTelegram, people: People
) -> None:
    update = people.message(people.user(3002), caption="the video", document={
        "file_id": "doc-huge", "file_unique_id": "dh", "file_name": "unboxing.mkv",
        "mime_type": "video/x-matroska", "file_size": 21 * 1024 * 1024})
    assert (await post(gateway, telegram, update))[1]["outcome"] == "stored"
    item = await stored_item(gateway, update)
    [attachment] = item.attachments
    assert (attachment.state, attachment.id, attachment.name, attachment.size) == (
        AttachmentState.TOO_LARGE, None, "unboxing.mkv", 21 * 1024 * 1024)
    assert item.text == "the video"
    notice = await telegram.wait_for(
        lambda: [t for t in telegram.texts(3002) if "could not receive unboxing.mkv" in t])
    assert "20 MB" in notice[0]
    await gateway.settle()
    assert not telegram.of("getFile", ok=None)  # never asked for


async def test_a_file_only_getfile_says_is_over_the_limit_is_too_large_too(
    gateway: Gateway, telegram: FakeTelegram, people: People
) -> None:
    gateway.app[FILES].max_bytes = 1024 * 1024
    telegram.add_file("doc-2mb", 2 * 1024 * 1024)
    update = people.message(people.user(3005), document={  # the update gives no size
        "file_id": "doc-2mb", "file_unique_id": "d2m", "file_name": "scan.tiff"})
    assert (await post(gateway, telegram, update))[1]["outcome"] == "stored"
    item = await fetched(gateway, update)
    [attachment] = item.attachments
    assert (attachment.state, attachment.id, attachment.name) == (
        AttachmentState.TOO_LARGE, None, "scan.tiff")
    assert attachment.error == "2097152 bytes, over the 1048576-byte limit"
    notice = await telegram.wait_for(
        lambda: [t for t in telegram.texts(3005) if "could not receive scan.tiff" in t])
    assert "at most 1 MB" in notice[0]
    assert not telegram.downloads  # its size was known before downloading it
    # a file bigger than Telegram said: the download stops at the limit
    telegram.add_file("doc-liar", 100, content=bytes(2 * 1024 * 1024))
    liar = people.message(people.user(3005), document={
        "file_id": "doc-liar", "file_unique_id": "dl", "file_name": "small.bin",
        "file_size": 100})
    assert (await post(gateway, telegram, liar))[1]["outcome"] == "stored"
    [attachment] = (await fetched(gateway, liar)).attachments
    assert (attachment.state, attachment.id) == (AttachmentState.TOO_LARGE, None)
    assert attachment.error is not None
    assert attachment.error.endswith("bytes, over the 1048576-byte limit")
    assert await gateway.store.db["attachments"].count_documents({}) == 0


async def test_lookup_and_download_failures_are_retried_then_the_file_is_stored(
    gateway: Gateway, telegram: FakeTelegram, people: People
) -> None:
    telegram.add_file("doc-2", content=PDF, path="documents/retried.pdf")
    telegram.fail("getFile", 502, "Bad Gateway", times=2)
    telegram.fail("download", 503, "Service Unavailable", times=1)
    update = people.message(people.user(3003), caption="receipt attached", document={
        "file_id": "doc-2", "file_unique_id": "d2", "file_name": "receipt.pdf",
        "file_size": len(PDF)})
    # the webhook does not depend on the Bot API: stored while getFile fails
    assert (await post(gateway, telegram, update))[1]["outcome"] == "stored"
    item = await fetched(gateway, update, hurry=True)
    [attachment] = item.attachments
    assert (attachment.state, attachment.content_type, attachment.name) == (
        AttachmentState.STORED, "application/pdf", "receipt.pdf")
    _, alice = await gateway.agent("Alice")
    assert attachment.id is not None
    assert await download(gateway, alice, attachment.id) == (200, PDF, "application/pdf")
    assert [c.status for c in telegram.of("getFile", ok=None)] == [502, 502, 200, 200]
    assert telegram.downloads == ["documents/retried.pdf"]
    assert await gateway.store.db[FETCHES].count_documents({}) == 0


async def test_files_telegram_will_not_hand_out_fail_visibly_and_the_message_stays(
    gateway: Gateway, telegram: FakeTelegram, people: People
) -> None:
    telegram.add_file("doc-big", 30 * 1024 * 1024)  # its update does not say how big
    ann = people.user(3004)
    unknown = people.message(ann, caption="here is the contract", document={
        "file_id": "doc-gone", "file_unique_id": "dg", "file_name": "contract.pdf",
        "mime_type": "application/pdf", "file_size": 2048})
    too_big = people.message(ann, document={"file_id": "doc-big", "file_unique_id": "db"})
    for update in (unknown, too_big):
        assert (await post(gateway, telegram, update))[1]["outcome"] == "stored"
    first = await fetched(gateway, unknown, hurry=True)
    second = await fetched(gateway, too_big, hurry=True)
    assert first.text == "here is the contract"
    [gone] = first.attachments
    assert (gone.state, gone.id, gone.name, gone.size, gone.content_type) == (
        AttachmentState.FAILED, None, "contract.pdf", 2048, "application/pdf")
    assert gone.error == "could not fetch: Telegram: Bad Request: invalid file_id"
    # Telegram will not hand out a file over its download limit: too large, as one
    # whose update said so, and the customer is told
    [big] = second.attachments
    assert (big.state, big.name) == (AttachmentState.TOO_LARGE, "document")
    assert big.error is not None and "limit" in big.error
    told = await telegram.wait_for(lambda: [t for t in telegram.texts(3004)
                                             if "could not receive document" in t])
    assert len(told) == 1
    # permanent: asked once each, never downloaded; agents see it in the history
    assert sorted(c.params["file_id"] for c in telegram.of("getFile", ok=None)) == [
        "doc-big", "doc-gone"]
    assert not telegram.downloads
    _, alice = await gateway.agent("Alice")
    async with gateway.http.get(f"{gateway.url}{API}/conversations/{first.conversation_id}"
                                "/messages", headers=alice) as response:
        shown = {i["id"]: i for i in (await response.json())["items"]}
    assert shown[first.id]["text"] == "here is the contract"
    assert shown[first.id]["attachments"][0]["state"] == "failed"
    assert "invalid file_id" in shown[first.id]["attachments"][0]["error"]


# ------------------------------------------------------------------ outbound

async def test_an_agents_photo_and_pdf_reach_the_chat_byte_for_byte(
    gateway: Gateway, telegram: FakeTelegram
) -> None:
    conversation = await gateway.app[PIPELINE].open_conversation("telegram", "3101", "3101")
    alice = await agent_on(gateway, conversation.id)
    photo = png(16, 9)
    sent = await reply(gateway, alice, conversation.id, "Here is the label and the invoice",
                       (photo, "label.png"), (PDF, "invoice.pdf"))
    item = await delivered(gateway, sent["id"])
    first, second = telegram.sent_files(3101)
    assert (first.method, first.filename, first.content) == ("sendPhoto", "label.png", photo)
    assert first.caption == "Alice: Here is the label and the invoice"
    assert first.caption_entities == [{"type": "bold", "offset": 0, "length": 6}]
    assert (second.method, second.filename, second.content, second.caption) == (
        "sendDocument", "invoice.pdf", PDF, None)
    # the text went as the caption, not as a message of its own
    assert not [t for t in telegram.texts(3101) if "Here is the label" in t]
    assert item.delivery is not None
    assert item.delivery.external_id == f"3101:{second.message['message_id']}"


async def test_long_texts_go_first_voice_notes_as_voice_and_refusals_as_documents(
    gateway: Gateway, telegram: FakeTelegram
) -> None:
    conversation = await gateway.app[PIPELINE].open_conversation("telegram", "3102", "3102")
    alice = await agent_on(gateway, conversation.id)
    voice, text = ogg_opus(), "Please listen to this. " * 60  # over the 1024 caption limit
    sent = await reply(gateway, alice, conversation.id, text, (voice, "note.ogg"))
    await delivered(gateway, sent["id"])
    assert telegram.texts(3102)[-1] == "Alice: " + text.strip()
    [note] = telegram.sent_files(3102)
    assert (note.method, note.content, note.caption) == ("sendVoice", voice, None)
    # a file alone is captioned with the agent's name; what Telegram refuses as a photo
    # (too tall) or as a voice note (the user forbids them) goes as a document
    telegram.no_voice.add(3102)
    tall = png(1, 10_000)
    sent = await reply(gateway, alice, conversation.id, None, (tall, "scan.png"),
                       (voice, "again.ogg"))
    await delivered(gateway, sent["id"])
    scan, again = telegram.sent_files(3102)[1:]
    assert (scan.method, scan.content, scan.caption) == ("sendDocument", tall, "Alice")
    assert (again.method, again.content, again.filename) == ("sendDocument", voice,
                                                             "again.ogg")
    refused = [c.result for c in telegram.calls if c.status == 400]
    assert refused == ["Bad Request: PHOTO_INVALID_DIMENSIONS",
                       "Bad Request: VOICE_MESSAGES_FORBIDDEN"]


async def test_a_failure_after_the_first_file_is_retried_without_uploading_it_again(
    gateway: Gateway, telegram: FakeTelegram
) -> None:
    conversation = await gateway.app[PIPELINE].open_conversation("telegram", "3103", "3103")
    alice = await agent_on(gateway, conversation.id)
    telegram.fail("sendDocument", 500, "Internal Server Error", times=1)
    photo = png(4, 4)
    sent = await reply(gateway, alice, conversation.id, "two files",
                       (photo, "one.png"), (PDF, "two.pdf"))
    item = await delivered(gateway, sent["id"])
    assert [(u.method, u.content) for u in telegram.sent_files(3103)] == [
        ("sendPhoto", photo), ("sendDocument", PDF)]
    assert len(telegram.of("sendPhoto", ok=None)) == 1  # never uploaded again
    assert [c.status for c in telegram.of("sendDocument", ok=None)] == [500, 200]
    assert item.delivery is not None
    assert (item.delivery.attempts, item.delivery.parts_sent) == (2, 1)
