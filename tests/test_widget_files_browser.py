"""Files in the web chat widget, in headless Chromium against a real gateway: the
paperclip (the browser's file chooser), drag and drop, paste, previews that can be
removed, the upload with its text, images inline and other files as downloads, an
expired link renewed with a `file` frame, an over-limit file refused with the
gateway's message (nothing lost, nothing stored), and a 429 retried.

The bytes are compared end to end: what the visitor picked is what the agent API
serves, what the widget's image URL serves and what the widget's link downloads.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import FilePayload, Page, Response, WebSocket, expect

from gateway.keys import STORE
from gateway.settings import Settings
from gateway.store import Store
from tests.console_rig import ARTIFACTS
from tests.test_attachments import PDF, png
from tests.test_browser import (  # noqa: F401 - fixtures, collected from this module
    MSG,
    NO_PROXY,
    WAIT,
    Problems,
    ThreadedGateway,
    browser,
    browser_context_args,
    browser_type,
    browser_type_launch_args,
    launch_browser,
    message,
    open_chat,
    playwright,
    say,
)

pytestmark = pytest.mark.browser

LIMIT = 50_000  # OMNIGATE_MAX_ATTACHMENT_BYTES of these gateways
PHOTO = png(40, 30)
ATTACH = '[data-og="attach"]'
INPUT = '[data-og="input"]'
DRAFT = '[data-og="draft-file"]'
NOTE = '[data-og="composer-msg"]'
PANEL = '[data-og="panel"]'


# ------------------------------------------------------------------ gateways


def settings(mongo_uri: str, tmp_path: Path, **extra: Any) -> Settings:
    return Settings(mongodb_uri=mongo_uri, mongodb_db=f"t_{uuid.uuid4().hex[:16]}",
                    data_dir=tmp_path / "data", outbox_sweep_seconds=0.2,
                    max_attachment_bytes=LIMIT, **extra)


@pytest.fixture
def files_gateway(mongo_uri: str, tmp_path: Path) -> Iterator[ThreadedGateway]:
    gw = ThreadedGateway(settings(mongo_uri, tmp_path))
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def limited_gateway(mongo_uri: str, tmp_path: Path) -> Iterator[ThreadedGateway]:
    """One message per second per visitor, no burst: an upload right after a message
    is refused with 429 (the visitor's limit counts uploads too)."""
    gw = ThreadedGateway(settings(mongo_uri, tmp_path, webchat_messages_per_minute=60,
                                  webchat_message_burst=1))
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()


# ------------------------------------------------------------------ helpers


def store_of(gw: ThreadedGateway) -> Store:
    assert gw.app is not None
    return gw.app[STORE]


def get_bytes(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    with NO_PROXY.open(request, timeout=10) as response:
        return response.status, response.read()


def page_bytes(page: Page, url: str) -> bytes:
    """What ``url`` answers to the page itself (fetched by the page, as it loads it)."""
    numbers = page.evaluate(
        "async (u) => Array.from(new Uint8Array(await (await fetch(u)).arrayBuffer()))", url)
    return bytes(numbers)


def pick(page: Page, *files: tuple[str, str, bytes]) -> None:
    """Attach files with the paperclip: it opens the browser's file chooser."""
    with page.expect_file_chooser() as chooser:
        page.locator(ATTACH).click()
    assert chooser.value.is_multiple()
    payloads: list[FilePayload] = [{"name": n, "mimeType": t, "buffer": b} for n, t, b in files]
    chooser.value.set_files(payloads)


# Build real File objects in the page and hand them to the widget the way a browser
# does: a `drop` event on the chat panel, a `paste` event in the text box, each with a
# DataTransfer holding the files.
DISPATCH = """([kind, name, type, bytes]) => {
  const root = document.querySelector("#omnigate-webchat").shadowRoot;
  const data = new DataTransfer();
  data.items.add(new File([new Uint8Array(bytes)], name, { type }));
  const how = { bubbles: true, cancelable: true, composed: true };  // as the browser's own
  if (kind === "drop") {  // over the chat panel, then dropped (true: the widget took them)
    const panel = root.querySelector('[data-og="panel"]');
    const over = new DragEvent("dragover", { dataTransfer: data, ...how });
    const accepted = !panel.dispatchEvent(over);
    return accepted && !panel.dispatchEvent(new DragEvent("drop", { dataTransfer: data, ...how }));
  }
  const input = root.querySelector('[data-og="input"]');
  input.focus();
  return !input.dispatchEvent(new ClipboardEvent("paste", { clipboardData: data, ...how }));
}"""


def visitor_item(gw: ThreadedGateway, auth: dict[str, str], text: str | None
                 ) -> dict[str, Any]:
    """The visitor's message as the agent API shows it (found by its text)."""
    doc = gw.call(store_of(gw).conversations.find_one({"channel": "webchat"}))
    assert doc is not None
    status, page = gw.api("GET", f"/conversations/{doc['_id']}/messages", auth)
    assert status == 200
    found = [i for i in page["items"]
             if i["sender"]["role"] == "customer" and i["attachments"] and i["text"] == text]
    assert len(found) == 1, page["items"]
    return dict(found[0])


def api_file(gw: ThreadedGateway, auth: dict[str, str], attachment_id: str) -> bytes:
    status, body = get_bytes(f"{gw.url}/api/v1/attachments/{attachment_id}", auth)
    assert status == 200
    return body


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name))


# ------------------------------------------------------------------ tests


def test_a_picture_and_a_pdf_with_the_paperclip(
    files_gateway: ThreadedGateway, page: Page
) -> None:
    gw = files_gateway
    problems = Problems(page)
    sockets: list[WebSocket] = []

    def opened(ws: WebSocket) -> None:
        sockets.append(ws)

    page.on("websocket", opened)
    open_chat(page, gw)

    pick(page, ("photo.png", "image/png", PHOTO), ("invoice.pdf", "application/pdf", PDF))
    drafts = page.locator(DRAFT)
    expect(drafts).to_have_count(2)
    photo_chip = drafts.filter(has_text="photo.png")
    expect(photo_chip.locator('[data-og="thumb"]')).to_have_count(1)  # a preview of it
    expect(drafts.filter(has_text="invoice.pdf").locator('[data-og="thumb"]')).to_have_count(0)
    expect(drafts.filter(has_text="invoice.pdf")).to_contain_text(f"{len(PDF)} B")
    screenshot(page, "webchat-files-tray.png")

    page.locator(INPUT).fill("Here is the receipt")
    page.locator(INPUT).press("Enter")
    expect(drafts).to_have_count(0)
    expect(page.locator(INPUT)).to_have_value("")
    sent = message(page, "customer", "Here is the receipt")
    expect(sent).to_have_count(1)
    expect(sent).not_to_have_attribute("data-pending", "true")  # acked
    expect(sent).to_have_attribute("data-seq", "1")

    # the image inline, loaded from the gateway; the PDF a link with its name and size
    image = sent.locator('[data-og="image"]')
    expect(image).to_have_js_property("naturalWidth", 40)
    expect(image).to_have_attribute("alt", "photo.png")
    link = sent.locator('[data-og="attachment"][data-name="invoice.pdf"] [data-og="file-link"]')
    expect(link).to_contain_text("invoice.pdf")
    expect(link).to_contain_text(f"{len(PDF)} B")
    screenshot(page, "webchat-files-sent.png")

    # the agent API serves exactly what the visitor picked
    auth = gw.add_agent("Alice")
    item = visitor_item(gw, auth, "Here is the receipt")
    assert [(a["name"], a["content_type"], a["state"]) for a in item["attachments"]] == [
        ("photo.png", "image/png", "stored"), ("invoice.pdf", "application/pdf", "stored")]
    assert api_file(gw, auth, item["attachments"][0]["id"]) == PHOTO
    assert api_file(gw, auth, item["attachments"][1]["id"]) == PDF
    # ... and so does the widget's own image URL, and its download link
    assert page_bytes(page, image.get_attribute("src") or "") == PHOTO
    with page.expect_download() as download:
        link.click()
    assert download.value.suggested_filename == "invoice.pdf"
    assert Path(download.value.path()).read_bytes() == PDF

    # a link older than an hour: the click asks for a fresh one (a `file` frame) first
    asked: list[dict[str, Any]] = []
    for ws in sockets:
        ws.on("framesent", lambda payload: asked.append(json.loads(payload)))
    link.evaluate("a => { a.dataset.at = '0'; }")
    with page.expect_download() as download:
        link.click()
    assert Path(download.value.path()).read_bytes() == PDF
    assert {"type": "file", "id": item["attachments"][1]["id"]} in asked
    expect(link).not_to_have_attribute("data-at", "0")  # renewed

    # after a reload the history shows the files again
    page.reload()
    expect(page.locator('[data-og="status"]')).to_have_attribute("data-state", "online")
    again = message(page, "customer", "Here is the receipt")
    expect(again.locator('[data-og="image"]')).to_have_js_property("naturalWidth", 40)
    expect(again.locator('[data-og="file-link"]')).to_have_count(2)
    problems.check()


def test_drop_and_paste_add_files_and_a_preview_can_be_removed(
    files_gateway: ThreadedGateway, page: Page
) -> None:
    gw = files_gateway
    problems = Problems(page)
    open_chat(page, gw)
    say(page, "hello")  # a conversation exists already
    notes = b"order 1234: the parcel was open\n"

    assert page.evaluate(DISPATCH, ["drop", "parcel.png", "image/png", list(PHOTO)])
    assert page.evaluate(DISPATCH, ["paste", "notes.txt", "text/plain", list(notes)])
    assert page.evaluate(DISPATCH, ["paste", "wrong.pdf", "application/pdf", list(PDF)])
    drafts = page.locator(DRAFT)
    expect(drafts).to_have_count(3)
    expect(drafts.filter(has_text="parcel.png").locator('[data-og="thumb"]')).to_have_count(1)
    expect(page.locator(INPUT)).to_have_value("")  # a file pasted, no text

    # remove one with the keyboard: its button, then Enter
    remove = drafts.filter(has_text="wrong.pdf").locator('[data-og="remove-file"]')
    expect(remove).to_have_attribute("aria-label", "Remove wrong.pdf")
    remove.focus()
    remove.press("Enter")
    expect(drafts).to_have_count(2)
    expect(drafts.filter(has_text="wrong.pdf")).to_have_count(0)

    page.locator('[data-og="send"]').click()  # files alone, no text
    expect(drafts).to_have_count(0)
    sent = page.locator(f'{MSG}[data-role="customer"]').filter(
        has=page.locator('[data-og="attachment"]'))
    expect(sent).to_have_count(1)
    expect(sent).not_to_have_attribute("data-pending", "true")
    expect(sent.locator('[data-og="image"]')).to_have_js_property("naturalWidth", 40)
    expect(sent.locator('[data-og="attachment"][data-name="notes.txt"]')).to_contain_text(
        f"{len(notes)} B")
    expect(sent.locator('[data-og="attachment"]')).to_have_count(2)

    auth = gw.add_agent("Alice")
    item = visitor_item(gw, auth, None)
    assert [a["name"] for a in item["attachments"]] == ["parcel.png", "notes.txt"]
    assert api_file(gw, auth, item["attachments"][0]["id"]) == PHOTO
    assert api_file(gw, auth, item["attachments"][1]["id"]) == notes
    problems.check()


def test_an_over_limit_file_is_refused_with_the_gateways_message(
    files_gateway: ThreadedGateway, page: Page
) -> None:
    gw = files_gateway
    problems = Problems(page)
    statuses: list[int] = []
    page.on("response", lambda r: statuses.append(r.status) if "/webchat/upload" in r.url
            else None)
    open_chat(page, gw)
    big = b"%PDF-1.4\n" + bytes(LIMIT + 10_000)

    pick(page, ("scan.pdf", "application/pdf", big), ("photo.png", "image/png", PHOTO))
    page.locator(INPUT).fill("both pages of the contract")
    page.locator(INPUT).press("Enter")

    # the gateway's own words (they name the limit); the message is back in the composer
    note = page.locator(NOTE)
    expect(note).to_be_visible()
    expect(note).to_contain_text("scan.pdf is larger than")
    expect(note).to_have_attribute("role", "alert")
    expect(page.locator(INPUT)).to_have_value("both pages of the contract")
    expect(page.locator(DRAFT)).to_have_count(2)
    expect(page.locator(MSG)).to_have_count(0)  # not shown as sent
    assert statuses == [413]
    store = store_of(gw)
    assert gw.call(store.db["attachments"].count_documents({})) == 0
    assert gw.call(store.db["attachment_files.files"].count_documents({})) == 0
    assert gw.call(store.messages.count_documents({})) == 0
    screenshot(page, "webchat-files-too-large.png")

    # without the big one it goes
    page.locator(DRAFT).filter(has_text="scan.pdf").locator('[data-og="remove-file"]').click()
    page.locator('[data-og="send"]').click()
    sent = message(page, "customer", "both pages of the contract")
    expect(sent).to_have_count(1)
    expect(sent).not_to_have_attribute("data-pending", "true")
    expect(sent.locator('[data-og="image"]')).to_have_js_property("naturalWidth", 40)
    expect(note).to_be_hidden()
    assert statuses == [413, 200]
    assert gw.call(store.db["attachments"].count_documents({})) == 1
    # the 413 is the only thing the browser logged
    assert problems.errors == [
        "console: Failed to load resource: the server responded with a status of 413 "
        "(Request Entity Too Large)"]
    problems.errors.clear()
    problems.check()


def test_a_rate_limited_upload_is_sent_again_after_the_wait(
    limited_gateway: ThreadedGateway, page: Page
) -> None:
    gw = limited_gateway
    problems = Problems(page)
    answers: list[Response] = []
    page.on("response", lambda r: answers.append(r) if "/webchat/upload" in r.url else None)
    open_chat(page, gw)
    say(page, "first")  # takes the visitor's one message of this second
    expect(message(page, "customer", "first")).not_to_have_attribute("data-pending", "true")

    pick(page, ("photo.png", "image/png", PHOTO))
    page.locator(INPUT).fill("and a photo")
    page.locator(INPUT).press("Enter")
    sent = message(page, "customer", "and a photo")
    expect(sent).to_have_count(1)
    expect(sent).to_have_attribute("data-pending", "true")  # waits at least the second
    expect(sent.locator(".og-meta")).to_have_text("Sending…")
    # refused once (429, Retry-After), kept as "Sending…", then sent again
    expect(sent).not_to_have_attribute("data-pending", "true")
    expect(sent.locator('[data-og="image"]')).to_have_js_property("naturalWidth", 40)
    assert [r.status for r in answers] == [429, 200]
    assert answers[0].header_value("retry-after") == "1"
    expect(sent).to_have_count(1)
    auth = gw.add_agent("Alice")
    item = visitor_item(gw, auth, "and a photo")  # stored once
    assert api_file(gw, auth, item["attachments"][0]["id"]) == PHOTO
    # the 429 is the only thing the browser logged
    assert problems.errors == [
        "console: Failed to load resource: the server responded with a status of 429 "
        "(Too Many Requests)"]
    problems.errors.clear()
    problems.check()
