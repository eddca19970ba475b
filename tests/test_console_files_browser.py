"""Files in the agent console, in headless Chromium against a real gateway: an agent
attaches files to a reply (the file chooser, drag and drop, paste), sees previews and
removes one, sends; the visitor's widget shows the picture (its bytes compared), the
store has the item; an over-limit file is refused with the gateway's message and the
draft kept; a customer's file that arrives later (fetched in the background from its
channel) turns from "receiving…" into the picture in place.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from playwright.sync_api import FilePayload, Page, expect

from connectors.base import Connector, ConnectorContext, DeliveryResult
from gateway.keys import CONNECTORS, FETCHER, FILES, PIPELINE, ROUTING, STORE
from gateway.model import (
    Activity,
    AttachmentState,
    Conversation,
    DeliveryStatus,
    InboundMessage,
    IncomingFile,
    Party,
    Role,
)
from gateway.settings import Settings
from tests.console_rig import (  # noqa: F401 - fixtures, collected from this module
    Desk,
    Watch,
    add_agent,
    browser,
    browser_type,
    browser_type_launch_args,
    console_gateway_fixture,
    launch_browser,
    new_page_fixture,
    playwright,
    screenshot,
)
from tests.test_attachments import PDF, png
from tests.test_browser import MSG, ThreadedGateway, message, open_chat, say

pytestmark = pytest.mark.browser

LIMIT = 50_000
LABEL = png(60, 40)
DAMAGE = png(30, 20)


@pytest.fixture
def small_files_gateway(mongo_uri: str, tmp_path: Path) -> Iterator[ThreadedGateway]:
    """The gateway with OMNIGATE_MAX_ATTACHMENT_BYTES at 50 000."""
    gw = ThreadedGateway(Settings(
        mongodb_uri=mongo_uri, mongodb_db=f"t_{uuid.uuid4().hex[:16]}",
        data_dir=tmp_path / "data", outbox_sweep_seconds=0.2, max_attachment_bytes=LIMIT))
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()


def page_bytes(page: Page, url: str) -> bytes:
    """What ``url`` answers to the page itself (its cookies, its origin)."""
    numbers = page.evaluate(
        "async (u) => Array.from(new Uint8Array(await (await fetch(u)).arrayBuffer()))", url)
    return bytes(numbers)


def attach(desk: Desk, *files: tuple[str, str, bytes]) -> None:
    """The attach button opens the browser's file chooser."""
    with desk.page.expect_file_chooser() as chooser:
        desk.c("attach").click()
    assert chooser.value.is_multiple()
    payloads: list[FilePayload] = [{"name": n, "mimeType": t, "buffer": b} for n, t, b in files]
    chooser.value.set_files(payloads)


# A real File handed to the console as the browser does: a `drop` on the conversation
# view or a `paste` in the reply box, with a DataTransfer holding it.
DISPATCH = """([kind, name, type, bytes]) => {
  const data = new DataTransfer();
  data.items.add(new File([new Uint8Array(bytes)], name, { type }));
  if (kind === "drop") {
    const view = document.querySelector('[data-c="conversation"]');
    const over = new DragEvent("dragover", { dataTransfer: data, bubbles: true, cancelable: true });
    const accepted = !view.dispatchEvent(over);
    const drop = new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true });
    return accepted && !view.dispatchEvent(drop);
  }
  const reply = document.querySelector('[data-c="reply"]');
  reply.focus();
  const how = { bubbles: true, cancelable: true };
  const paste = new ClipboardEvent("paste", { clipboardData: data, ...how });
  return !reply.dispatchEvent(paste);
}"""


def claimed_web_chat(gw: ThreadedGateway, desk: Desk, visitor: Page) -> None:
    """A visitor asks for a human; the agent opens the conversation and claims it."""
    open_chat(visitor, gw)
    say(visitor, "talk to a human")
    expect(visitor.locator(f'{MSG}[data-event="handoff"]')).to_be_visible()
    expect(desk.row("queue")).to_have_count(1)
    desk.row("queue").click()
    desk.c("claim").click()
    expect(desk.c("conv-owner")).to_have_text("assigned to you")


# ------------------------------------------------------------------ tests


def test_an_agent_sends_a_picture_and_the_visitor_sees_it(
    console_gateway: ThreadedGateway, new_page: Callable[[], Page]
) -> None:
    gw = console_gateway
    assert gw.app is not None
    _, email = add_agent(gw, "Alice")
    desk = Desk(new_page(), gw)
    watch = Watch(desk.page)
    desk.signed_in(email)
    desk.presence("away")
    visitor = new_page()
    visitor_watch = Watch(visitor)
    claimed_web_chat(gw, desk, visitor)

    # two files with the button, one by paste and one by drop: previews, then remove two
    attach(desk, ("label.png", "image/png", LABEL), ("invoice.pdf", "application/pdf", PDF))
    assert desk.page.evaluate(DISPATCH, ["paste", "pasted.png", "image/png", list(DAMAGE)])
    assert desk.page.evaluate(DISPATCH, ["drop", "notes.txt", "text/plain", list(b"notes\n")])
    drafts = desk.c("draft-file")
    expect(drafts).to_have_count(4)
    expect(desk.c("files")).to_be_visible()
    label = drafts.filter(has_text="label.png")
    expect(label.locator('[data-c="thumb"]')).to_have_count(1)  # an image: a preview
    expect(label).to_contain_text(f"{len(LABEL)} B")
    pdf = drafts.filter(has_text="invoice.pdf")
    expect(pdf.locator('[data-c="thumb"]')).to_have_count(0)
    expect(pdf).to_contain_text("PDF")
    expect(pdf).to_contain_text(f"{len(PDF)} B")
    screenshot(desk.page, "console-files-preview.png")
    pdf.locator('[data-c="remove-file"]').click()
    remove = drafts.filter(has_text="pasted.png").locator('[data-c="remove-file"]')
    expect(remove).to_have_attribute("aria-label", "Remove pasted.png")
    remove.focus()
    remove.press("Enter")  # by keyboard
    expect(drafts).to_have_count(2)
    expect(drafts.filter(has_text="notes.txt")).to_have_count(1)
    drafts.filter(has_text="notes.txt").locator('[data-c="remove-file"]').click()
    expect(drafts).to_have_count(1)

    desk.write("Here is your return label")
    expect(drafts).to_have_count(0)
    expect(desk.c("files")).to_be_hidden()
    sent = desk.items(role="agent").filter(has_text="Here is your return label")
    expect(sent).to_have_count(1)
    image = sent.locator('[data-c="attachment-image"]')
    expect(image).to_have_js_property("naturalWidth", 60)
    assert page_bytes(desk.page, image.get_attribute("src") or "") == LABEL
    link = sent.locator('[data-c="attachment-link"]')
    expect(link).to_have_text(f"label.png ({len(LABEL)} B)")
    with desk.page.expect_download() as download:
        link.click()
    assert Path(download.value.path()).read_bytes() == LABEL

    # the visitor's widget shows the picture, from its own link to the file
    reply = message(visitor, "agent", "Here is your return label")
    expect(reply).to_have_count(1)
    shown = reply.locator('[data-og="image"]')
    expect(shown).to_have_js_property("naturalWidth", 60)
    assert page_bytes(visitor, shown.get_attribute("src") or "") == LABEL
    screenshot(desk.page, "console-files-sent.png")

    # the store has the item, with the one file
    store = gw.app[STORE]
    conversation = gw.call(store.conversations.find_one({"channel": "webchat"}))
    assert conversation is not None
    items, _ = gw.call(store.history(conversation["_id"]))
    replies = [i for i in items if i.text == "Here is your return label"]
    assert len(replies) == 1
    (kept,) = replies[0].attachments
    assert (kept.name, kept.content_type, kept.state) == (
        "label.png", "image/png", AttachmentState.STORED)
    assert kept.id is not None
    record = gw.call(gw.app[FILES].get(kept.id))
    assert record is not None and gw.call(gw.app[FILES].read(record)) == LABEL
    watch.check()
    visitor_watch.check()


def test_an_over_limit_file_keeps_the_draft_and_shows_the_reason(
    small_files_gateway: ThreadedGateway, new_page: Callable[[], Page]
) -> None:
    gw = small_files_gateway
    assert gw.app is not None
    _, email = add_agent(gw, "Alice")
    desk = Desk(new_page(), gw)
    watch = Watch(desk.page)
    desk.signed_in(email)
    desk.presence("away")
    visitor = new_page()
    claimed_web_chat(gw, desk, visitor)
    store = gw.app[STORE]
    before = gw.call(store.messages.count_documents({}))

    attach(desk, ("scan.pdf", "application/pdf", b"%PDF-1.4\n" + bytes(LIMIT + 5000)),
           ("label.png", "image/png", LABEL))
    desk.c("reply").fill("The scan and the label")
    desk.c("reply").press("Enter")
    error = desk.c("conv-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text(f"Not sent: part 'file' is larger than {LIMIT} bytes")
    expect(desk.c("reply")).to_have_value("The scan and the label")  # nothing lost
    expect(desk.c("draft-file")).to_have_count(2)
    assert gw.call(store.db["attachments"].count_documents({})) == 0
    assert gw.call(store.messages.count_documents({})) == before

    # without the big one it goes
    desk.c("draft-file").filter(has_text="scan.pdf").locator('[data-c="remove-file"]').click()
    desk.c("reply").press("Enter")
    expect(desk.c("reply")).to_have_value("")
    expect(error).to_be_hidden()
    sent = desk.items(role="agent").filter(has_text="The scan and the label")
    expect(sent.locator('[data-c="attachment-image"]')).to_have_js_property("naturalWidth", 60)
    expect(message(visitor, "agent", "The scan and the label").locator(
        '[data-og="image"]')).to_have_js_property("naturalWidth", 60)
    assert gw.call(store.db["attachments"].count_documents({})) == 1
    # the 413 is the only thing the console logged
    assert watch.errors == [
        "console: Failed to load resource: the server responded with a status of 413 "
        "(Request Entity Too Large)"]
    watch.errors.clear()
    watch.check()


class Fetching(Connector):
    """A channel that hands files out by reference (as Telegram and Slack do); its
    ``fetch`` waits until the test lets it answer."""

    channel = "fetchy"

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.release = asyncio.Event()  # made and set in the gateway's loop
        self.asked: list[str] = []

    def setup(self, app: web.Application) -> None:
        pass

    async def start(self, context: ConnectorContext) -> None:
        pass

    async def send(self, conversation: Conversation, item: Activity) -> DeliveryResult:
        return DeliveryResult(DeliveryStatus.DELIVERED)

    async def fetch(self, ref: Mapping[str, Any]) -> bytes:
        self.asked.append(str(ref["blob"]))
        await self.release.wait()
        return self.blobs[str(ref["blob"])]


async def _fetching() -> Fetching:
    return Fetching({"damage": DAMAGE})


def test_a_file_that_arrives_later_replaces_the_item_in_place(
    console_gateway: ThreadedGateway, new_page: Callable[[], Page]
) -> None:
    gw = console_gateway
    assert gw.app is not None
    channel = gw.call(_fetching())
    gw.app[CONNECTORS]["fetchy"] = channel
    _, email = add_agent(gw, "Alice")
    desk = Desk(new_page(), gw)
    watch = Watch(desk.page)
    desk.signed_in(email)
    desk.presence("away")

    pipeline, routing = gw.app[PIPELINE], gw.app[ROUTING]
    conversation = gw.call(pipeline.open_conversation("fetchy", "u1", "u1", "Uma"))
    assert gw.call(routing.handoff(conversation.id, "damaged parcel"))
    expect(desk.row("queue")).to_have_count(1)
    desk.row("queue").click()
    expect(desk.c("items")).to_have_attribute("data-loaded", "true")

    # the customer's photo is announced: the item is stored with it pending
    result = gw.call(pipeline.ingest(InboundMessage(
        channel="fetchy", external_id="u1:1", thread_key="u1",
        sender=Party(role=Role.CUSTOMER, id="u1"), sender_external_id="u1",
        text="the parcel arrived like this", files=[IncomingFile(
            key="p1", name="damage.png", content_type="image/png", size=len(DAMAGE),
            ref={"blob": "damage"})])))
    item = desk.items(id=result.item.id)
    expect(item).to_have_count(1)
    photo = item.locator('[data-c="attachment"]')
    expect(photo).to_have_attribute("data-state", "pending")
    expect(photo.locator('[data-c="attachment-state"]')).to_have_text("receiving…")
    expect(photo.locator('[data-c="attachment-image"]')).to_have_count(0)
    position = desk.items().evaluate_all(
        "(els, id) => els.findIndex(e => e.dataset.id === id)", result.item.id)
    count = desk.items().count()

    # the channel answers: the same item comes again over the socket and replaces it
    gw.loop.call_soon_threadsafe(channel.release.set)
    gw.call(gw.app[FETCHER].run_due())  # in case the wake-up has not run it yet
    expect(photo).to_have_attribute("data-state", "stored")
    expect(photo.locator('[data-c="attachment-image"]')).to_have_js_property("naturalWidth", 30)
    expect(item).to_have_count(1)  # replaced, not appended
    expect(desk.items()).to_have_count(count)
    assert desk.items().evaluate_all(
        "(els, id) => els.findIndex(e => e.dataset.id === id)", result.item.id) == position
    expect(item.locator('[data-c="text"]')).to_have_text("the parcel arrived like this")
    src = photo.locator('[data-c="attachment-image"]').get_attribute("src") or ""
    assert page_bytes(desk.page, src) == DAMAGE
    assert channel.asked == ["damage"]
    stored = gw.call(gw.app[STORE].get_message(result.item.id))
    assert stored is not None and stored.attachments[0].state is AttachmentState.STORED
    screenshot(desk.page, "console-files-fetched.png")
    watch.check()
