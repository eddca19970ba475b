"""Slack files both ways: customers' files downloaded into the attachment store (only from
Slack's hosts, with the bot token), agents' files uploaded into the DM or thread, each
uploaded once whatever fails.

Same setup as tests/test_slack.py: the whole gateway on a real port, the local Slack of
tests/fakes/slack_api.py behind OMNIGATE_SLACK_API_URL reached by the real slack_sdk
client, events signed as Slack signs them, agents on the real agent API.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.files import FETCHES
from gateway.keys import FETCHER, PIPELINE
from gateway.model import utcnow
from gateway.settings import Settings
from tests.conftest import Gateway
from tests.fakes.slack_api import (
    BOT_TOKEN,
    SIGNING_SECRET,
    FakeSlack,
    SlackSender,
    dm,
    mention,
    new_ts,
)
from tests.test_attachments import PDF, png

ADA = "U0000ADA"
DM = "D0000USER1"
SUPPORT = "C0000SUPPORT"


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    fake = await FakeSlack().start()
    fake.add_user(ADA, "Ada Lovelace", display_name="ada")
    yield fake
    await fake.close()


@pytest.fixture
def settings(settings: Settings, slack: FakeSlack) -> Settings:
    return settings.model_copy(update={
        "slack_bot_token": BOT_TOKEN, "slack_signing_secret": SIGNING_SECRET,
        "slack_api_url": slack.api_url,
    })


@pytest.fixture
def sender(gateway: Gateway) -> SlackSender:
    return SlackSender(gateway.http, gateway.url)


class Trap:
    """A web server that is not Slack: it records every request that reaches it."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> Trap:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self.handle)
        self.runner = web.AppRunner(app, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, request.headers.get("Authorization")))
        return web.Response(body=png(), content_type="image/png")

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def trap() -> AsyncIterator[Trap]:
    server = await Trap().start()
    yield server
    await server.close()


async def inbound(gateway: Gateway) -> list[dict[str, Any]]:
    cursor = gateway.store.messages.find({"channel": "slack", "direction": "in"})
    return await cursor.sort([("created_at", 1), ("seq", 1)]).to_list()


async def fetched(gateway: Gateway, item_id: str, timeout: float = 15.0) -> dict[str, Any]:
    """The item once none of its files is pending; the fetcher's backoff is skipped (its
    due jobs are run now, as often as needed)."""
    jobs, fetcher = gateway.store.db[FETCHES], gateway.app[FETCHER]
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        item = await gateway.store.messages.find_one({"_id": item_id})
        assert item is not None
        if all(a["state"] != "pending" for a in item["attachments"]):
            return item
        assert asyncio.get_running_loop().time() < deadline, item["attachments"]
        await jobs.update_many({}, {"$set": {"due_at": utcnow()}})
        await fetcher.run_due()
        await asyncio.sleep(0.05)


async def read_attachment(gateway: Gateway, attachment_id: str,
                          headers: dict[str, str]) -> tuple[int, bytes]:
    url = f"{gateway.url}/api/v1/attachments/{attachment_id}"
    async with gateway.http.get(url, headers=headers) as response:
        return response.status, await response.read()


def summary(item: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [(a["name"], a["content_type"], a["state"]) for a in item["attachments"]]


# ---------------------------------------------------------------------- in


async def test_a_customers_png_and_pdf_reach_the_agent_byte_for_byte(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender
) -> None:
    photo = png(16, 16)
    # what Slack says about the files is not trusted: the types come from the bytes
    picture = slack.add_download("photo.jpg", photo, "image/jpeg")
    invoice = slack.add_download("invoice", PDF, "application/octet-stream")
    event = dm(ADA, "my order arrived broken", subtype="file_share", files=[picture, invoice])
    assert (await sender.event(event))[0] == 200
    [item] = await inbound(gateway)
    assert item["text"] == "my order arrived broken"
    assert item["channel_data"]["files"] == [picture["id"], invoice["id"]]
    # (fetched in the background: the next test sees the moment before, alone)
    item = await fetched(gateway, item["_id"])
    assert summary(item) == [("photo.jpg", "image/png", "stored"),
                             ("invoice", "application/pdf", "stored")]
    assert not slack.calls_of("files.info")  # the event had every detail
    assert [a["size"] for a in item["attachments"]] == [len(photo), len(PDF)]
    # downloaded from url_private_download, with the bot token, each once
    assert sorted(d.params["path"] for d in slack.downloads) == sorted(
        f"/files-pri/T0001-{f['id']}/download/{f['name']}" for f in (picture, invoice))
    assert {d.token for d in slack.downloads} == {BOT_TOKEN}

    _, alice = await gateway.agent("Alice")
    for attachment, data in zip(item["attachments"], (photo, PDF), strict=True):
        assert await read_attachment(gateway, attachment["id"], alice) == (200, data)
    # a file without any text is a message too
    assert (await sender.event(dm(ADA, "", subtype="file_share", files=[invoice])))[0] == 200
    last = await fetched(gateway, (await inbound(gateway))[-1]["_id"])
    assert last["text"] is None and summary(last) == [("invoice", "application/pdf", "stored")]
    assert await read_attachment(gateway, last["attachments"][0]["id"], alice) == (200, PDF)


async def test_a_check_file_info_stub_is_completed_with_files_info_when_fetched(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender
) -> None:
    # the fetcher is paused, so what happens before Slack has its 200 can be seen alone
    fetcher = gateway.app[FETCHER]
    await fetcher.stop()
    gateway.app[PIPELINE].fetch_now = None
    scan = slack.add_download("scan.pdf", PDF, "application/pdf")
    stub = {"id": scan["id"], "mode": "file_access", "file_access": "check_file_info",
            "created": scan["created"], "user": ADA}
    event = dm(ADA, "see attached", subtype="file_share", files=[stub])
    assert (await sender.event(event))[0] == 200
    [item] = await inbound(gateway)
    assert item["text"] == "see attached"
    assert summary(item) == [("file-1", "application/octet-stream", "pending")]
    assert not slack.calls_of("files.info") and not slack.downloads

    assert await fetcher.run_due() == 1
    [info] = slack.calls_of("files.info")
    assert info.params["file"] == scan["id"] and info.token == BOT_TOKEN
    [download] = slack.downloads
    assert download.params["path"].endswith(f"{scan['id']}/download/scan.pdf")
    item = await fetched(gateway, item["_id"])
    # (the stub has no name; the fetch returns bytes only, so the stored name is generic)
    assert summary(item) == [("file-1", "application/pdf", "stored")]
    _, alice = await gateway.agent("Alice")
    assert await read_attachment(gateway, item["attachments"][0]["id"], alice) == (200, PDF)


async def test_a_download_url_on_another_host_is_refused_and_the_message_kept(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender, trap: Trap
) -> None:
    elsewhere = f"http://127.0.0.1:{trap.port}/files-pri/T0001-F0000TRAP/a.png"
    foreign = {**slack.add_download("a.png", png(), "image/png"),
               "url_private": elsewhere, "url_private_download": elsewhere}
    evil = {"id": "F0000EVIL", "name": "b.pdf", "mimetype": "application/pdf", "size": 10,
            "url_private": "https://files.slack.com.evil.example/b.pdf"}
    gdoc = {"id": "F0000GDOC", "name": "Plan", "mimetype": "application/vnd.google-apps.doc",
            "mode": "external", "is_external": True, "external_type": "gdrive",
            "url_private": "https://docs.google.com/document/d/1x/edit"}
    event = dm(ADA, "three files", subtype="file_share", files=[foreign, evil, gdoc])
    assert (await sender.event(event))[0] == 200
    [item] = await inbound(gateway)
    item = await fetched(gateway, item["_id"])
    assert item["text"] == "three files"
    assert [(a["name"], a["state"], a["id"]) for a in item["attachments"]] == [
        ("a.png", "failed", None), ("b.pdf", "failed", None), ("Plan", "failed", None)]
    first, second, third = (a["error"] for a in item["attachments"])
    assert first == (f"could not fetch: refusing to send the bot token to "
                     f"http://127.0.0.1:{trap.port}: not one of Slack's file hosts")
    assert "https://files.slack.com.evil.example" in second
    assert third == ("could not fetch: an external file (gdrive), not stored in Slack: "
                     "https://docs.google.com/document/d/1x/edit")
    assert trap.requests == [] and slack.downloads == []  # nothing was sent anywhere
    assert await gateway.store.db[FETCHES].count_documents({}) == 0  # given up at once


async def test_slack_download_errors_retried_or_failed_and_a_sign_in_page_is_no_file(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender
) -> None:
    photo = png(4, 4)
    # Slack's side fails twice (503, then 429): tried again, then the file is kept
    slack.fail("download", status=503)
    slack.fail("download", status=429)
    flaky = slack.add_download("flaky.png", photo, "image/png")
    assert (await sender.event(dm(ADA, "one", subtype="file_share", files=[flaky])))[0] == 200
    [item] = await inbound(gateway)
    item = await fetched(gateway, item["_id"])
    assert summary(item) == [("flaky.png", "image/png", "stored")]
    assert [d.status for d in slack.downloads] == [503, 429, 200]

    # a file deleted since (404) and a sign-in page instead of the file: failed at once
    gone = slack.add_download("gone.pdf", PDF, "application/pdf")
    del slack.blobs[gone["id"]]
    page = slack.add_download("page.pdf", PDF, "application/pdf", login_page=True)
    event = dm(ADA, "two", subtype="file_share", files=[gone, page])
    assert (await sender.event(event))[0] == 200
    second = await fetched(gateway, (await inbound(gateway))[-1]["_id"])
    assert [(a["name"], a["state"], a["error"]) for a in second["attachments"]] == [
        ("gone.pdf", "failed", "could not fetch: download: HTTP 404 (not found)"),
        ("page.pdf", "failed", "could not fetch: Slack answered with a web page, not the "
                               "file (a sign-in page: does the bot token have files:read?)")]
    assert len(slack.downloads) == 5  # each of the two asked once
    assert await gateway.store.db["attachments"].count_documents({}) == 1


# --------------------------------------------------------------------- out


async def claimed(gateway: Gateway, sender: SlackSender, where: str
                  ) -> tuple[str, dict[str, str], str, str | None]:
    """A Slack conversation handed to Alice: (conversation id, her headers, channel,
    thread_ts)."""
    if where == "dm":
        await sender.event(dm(ADA, "I want to talk to a human please", channel=DM))
        channel, thread_ts = DM, None
    else:
        thread_ts = new_ts()
        await sender.event(mention(ADA, "I want to talk to a human", ts=thread_ts))
        channel = SUPPORT
    await gateway.settle()
    [conversation] = await gateway.store.conversations.find({"channel": "slack"}).to_list()
    _, alice = await gateway.agent("Alice")
    api = f"{gateway.url}/api/v1/conversations/{conversation['_id']}"
    assert (await gateway.http.post(api + "/claim", headers=alice)).status == 200
    await gateway.settle()
    return conversation["_id"], alice, channel, thread_ts


async def reply_with_files(gateway: Gateway, conversation_id: str, headers: dict[str, str],
                           text: str | None, *files: tuple[str, bytes]) -> dict[str, Any]:
    form = aiohttp.FormData()
    if text is not None:
        form.add_field("text", text)
    for name, data in files:
        form.add_field("file", data, filename=name)
    url = f"{gateway.url}/api/v1/conversations/{conversation_id}/messages"
    async with gateway.http.post(url, data=form, headers=headers) as response:
        body = await response.json()
        assert response.status == 201, body
        return dict(body)


@pytest.mark.parametrize("where", ["dm", "thread"])
async def test_an_agents_png_and_pdf_arrive_in_the_dm_or_thread_with_the_text(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender, where: str
) -> None:
    conversation_id, alice, channel, thread_ts = await claimed(gateway, sender, where)
    photo = png(7, 5)
    posts_before = len(slack.posts(channel))
    sent = await reply_with_files(gateway, conversation_id, alice,
                                  "Here is the label & the invoice",
                                  ("label.png", photo), ("invoice.pdf", PDF))
    await gateway.settle()
    [share] = slack.shares
    assert (share.channel, share.thread_ts) == (channel, thread_ts)
    # a file share shows the app's name, so the agent's name leads the text
    assert share.initial_comment == "*Alice:* Here is the label &amp; the invoice"
    assert [(f.name, f.title, f.data) for f in share.files] == [
        ("label.png", "label.png", photo), ("invoice.pdf", "invoice.pdf", PDF)]
    asked = [(c.params["filename"], c.params["length"])
             for c in slack.calls_of("files.getUploadURLExternal")]
    assert asked == [("label.png", str(len(photo))), ("invoice.pdf", str(len(PDF)))]
    assert [u.posts for u in slack.uploads.values()] == [1, 1]
    # the text is the files' comment, not a message of its own
    assert len(slack.posts(channel)) == posts_before + 1
    assert not [c for c in slack.calls_of("chat.postMessage") if "label" in c.params["text"]]
    item = await gateway.store.messages.find_one({"_id": sent["id"]})
    assert item is not None
    assert item["delivery"]["status"] == "delivered"
    assert item["delivery"]["external_id"] == share.files[0].id

    # files without text: shared without a comment; a text reply is posted as before
    await reply_with_files(gateway, conversation_id, alice, None, ("more.pdf", PDF))
    await gateway.http.post(f"{gateway.url}/api/v1/conversations/{conversation_id}/messages",
                            headers=alice, json={"text": "Anything else?"})
    await gateway.settle()
    assert [(s.initial_comment, [f.data for f in s.files]) for s in slack.shares] == [
        (share.initial_comment, [photo, PDF]), (None, [PDF])]
    text = next(m for m in slack.posts(channel) if m.text == "Anything else?")
    assert (text.thread_ts, text.params["username"]) == (thread_ts, "Alice")


@pytest.mark.parametrize("failure", ["complete-refused", "complete-answer-lost",
                                     "upload-refused"])
async def test_a_failed_upload_is_retried_without_uploading_a_file_twice(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender, failure: str
) -> None:
    conversation_id, alice, channel, _ = await claimed(gateway, sender, "dm")
    posts_before = len(slack.posts(channel))
    if failure == "complete-refused":  # Slack's side failed: nothing was shared
        slack.fail("files.completeUploadExternal", error="internal_error")
    elif failure == "complete-answer-lost":  # shared, but the answer never arrived
        slack.fail("files.completeUploadExternal", drop=True)
    else:  # the second file's bytes were refused (500): only that one is sent again
        slack.fail("upload", status=500, after=1)
    photo = png(3, 3)
    long_text = "\n".join(["Tom & Jerry <tm> " * 58] * 3)  # escaped: two parts
    sent = await reply_with_files(gateway, conversation_id, alice, long_text,
                                  ("label.png", photo), ("invoice.pdf", PDF))
    await gateway.settle(timeout=15)
    item = await gateway.store.messages.find_one({"_id": sent["id"]})
    assert item is not None
    assert (item["delivery"]["status"], item["delivery"]["attempts"]) == ("delivered", 2)
    [share] = slack.shares  # shared once
    assert [f.data for f in share.files] == [photo, PDF]
    assert share.initial_comment is not None and share.initial_comment.endswith("&lt;tm&gt;")
    # the text's first part was posted once, before the files, and not again
    [first_part] = slack.posts(channel)[posts_before:-1]
    assert first_part.text is not None and first_part.text.startswith("*Alice:* Tom &amp;")
    # every file's bytes reached Slack exactly once
    ids = list(slack.uploads)  # in the order they were asked for
    delivered = [u for u in slack.uploads.values() if u.data is not None]
    assert sorted(u.filename for u in delivered) == ["invoice.pdf", "label.png"]
    assert all(u.posts == 1 for u in delivered)
    uploads = [c for c in slack.calls if c.method == "upload"]
    completes = slack.calls_of("files.completeUploadExternal")
    if failure == "upload-refused":
        assert [(c.params["file_id"], c.status) for c in uploads] == [
            (delivered[0].file_id, 200), (ids[1], 500), (delivered[1].file_id, 200)]
        assert len(completes) == 1
    else:
        assert [c.status for c in uploads] == [200, 200]
        assert len(slack.calls_of("files.getUploadURLExternal")) == 2
        # refused: completed again with the same files; lost: files.info said it was done
        assert len(completes) == (2 if failure == "complete-refused" else 1)
        assert len(slack.calls_of("files.info")) == 1


async def test_without_files_write_the_reply_fails_at_once_and_visibly(
    gateway: Gateway, slack: FakeSlack, sender: SlackSender
) -> None:
    conversation_id, alice, _, _ = await claimed(gateway, sender, "dm")
    slack.fail("files.getUploadURLExternal", error="missing_scope")
    sent = await reply_with_files(gateway, conversation_id, alice, "the label",
                                  ("label.png", png()))
    await gateway.settle()
    item = await gateway.store.messages.find_one({"_id": sent["id"]})
    assert item is not None
    assert (item["delivery"]["status"], item["delivery"]["attempts"]) == ("failed", 1)
    assert item["delivery"]["last_error"] == "slack: missing_scope"
    assert slack.shares == [] and not [c for c in slack.calls if c.method == "upload"]
    identity = await gateway.store.identities.find_one({"_id": f"slack:{ADA}"})
    assert identity is not None and identity["reachable"] is True  # the token, not Ada
