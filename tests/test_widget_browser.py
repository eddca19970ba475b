"""The web chat widget's typing indicator, private-note skips, email-code linking and
"Continue on Telegram" button, in headless Chromium against a real gateway: the agent is
a console socket (aiohttp client), the email codes arrive at a real SMTP server (the
aiosmtpd sink of tests/test_email_link.py), Telegram is the fake Bot API of
tests/test_telegram.py.

The gateway runs in its own thread (tests/test_browser.py's ``ThreadedGateway``), as
pytest-playwright's fixtures are synchronous; Playwright lives for this module only.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from playwright.sync_api import Page, expect

from connectors.webchat import WebchatConnector
from gateway.identity import LINK_ANSWERS
from gateway.keys import CONNECTORS, STORE
from gateway.settings import Settings
from gateway.store import Store
from gateway.store.contacts import LinkState
from tests.conftest import free_port
from tests.console_rig import ARTIFACTS
from tests.fakes.telegram_api import FakeTelegram, People
from tests.mailservers import SmtpSink, email_settings, start_sink, stop_sink, text_part
from tests.test_browser import (  # noqa: F401 - fixtures, collected from this module
    MSG,
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
    wait_for,
)

pytestmark = pytest.mark.browser

INPUT = '[data-og="input"]'
TYPING = '[data-og="typing"]'
TELEGRAM = '[data-og="telegram"]'
ADA = "ada@customer.test"
TOKEN = "123456:TEST-token_abc"
SECRET = "s3cret_Secret-42"


# ------------------------------------------------------------------ gateways


def base_settings(mongo_uri: str, tmp_path: Path) -> Settings:
    return Settings(mongodb_uri=mongo_uri, mongodb_db=f"t_{uuid.uuid4().hex[:16]}",
                    data_dir=tmp_path / "data", outbox_sweep_seconds=0.2)


class MailGateway(ThreadedGateway):
    """The gateway with email on: SMTP out to a sink running in the gateway's loop."""

    sink: SmtpSink

    async def _start(self) -> None:
        self.sink = await start_sink()
        self.settings = email_settings(self.settings, None, None, self.sink,
                                       listen=free_port())
        await super()._start()

    async def _stop(self) -> None:
        try:
            await super()._stop()
        finally:
            await stop_sink(self.sink)

    def codes(self) -> list[str]:
        """The codes of the verification mails that arrived, in order."""
        found = []
        for received in list(self.sink.sink.messages):
            if "verification code" in str(received.message["Subject"]):
                assert received.message["To"].addresses[0].addr_spec == ADA
                code = re.search(r"\b(\d{6})\b", text_part(received.message))
                assert code is not None
                found.append(code.group(1))
        return found


class TelegramGateway(ThreadedGateway):
    """The gateway with Telegram on (webhook mode) against the fake Bot API."""

    fake: FakeTelegram

    async def _start(self) -> None:
        self.fake = FakeTelegram(token=TOKEN)
        await self.fake.start()
        self.settings = self.settings.model_copy(update={
            "telegram_token": TOKEN, "telegram_mode": "webhook",
            "telegram_webhook_secret": SECRET,
            "telegram_webhook_url": "https://gw.example/webhooks/telegram",
            "telegram_api_url": self.fake.url})
        await super()._start()

    async def _stop(self) -> None:
        try:
            await super()._stop()
        finally:
            await self.fake.close()

    async def deliver(self, update: dict[str, Any]) -> int:
        async with aiohttp.ClientSession() as http:
            status, _ = await self.fake.deliver(http, self.url + "/webhooks/telegram",
                                                update, SECRET)
        return status


@pytest.fixture
def live_gateway(mongo_uri: str, tmp_path: Path) -> Iterator[ThreadedGateway]:
    gw = ThreadedGateway(base_settings(mongo_uri, tmp_path))
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def mail_gateway(mongo_uri: str, tmp_path: Path) -> Iterator[MailGateway]:
    gw = MailGateway(base_settings(mongo_uri, tmp_path))
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def telegram_gateway(mongo_uri: str, tmp_path: Path) -> Iterator[TelegramGateway]:
    gw = TelegramGateway(base_settings(mongo_uri, tmp_path))
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()


def store_of(gw: ThreadedGateway) -> Store:
    assert gw.app is not None
    return gw.app[STORE]


def only_conversation(gw: ThreadedGateway) -> dict[str, Any]:
    doc = gw.call(store_of(gw).conversations.find_one({"channel": "webchat"}))
    assert doc is not None
    return dict(doc)


def identity_owner(gw: ThreadedGateway, identity: str) -> str | None:
    doc = gw.call(store_of(gw).identities.find_one({"_id": identity}))
    return None if doc is None else str(doc["contact_id"])


# ------------------------------------------------------------------ an agent's console


class AgentSocket:
    """An agent's console socket (docs/console-protocol.md), read in the gateway's loop."""

    def __init__(self, gw: ThreadedGateway, headers: dict[str, str]) -> None:
        self.gw = gw
        self.frames: list[dict[str, Any]] = []
        self.http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.reader: asyncio.Task[None] | None = None
        gw.call(self._open(headers))

    async def _open(self, headers: dict[str, str]) -> None:
        self.http = aiohttp.ClientSession()
        self.ws = await self.http.ws_connect(self.gw.url + "/api/v1/live", headers=headers)
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                self.frames.append(msg.json())

    def send(self, frame: dict[str, Any]) -> None:
        assert self.ws is not None
        self.gw.call(self.ws.send_json(frame))

    def until(self, predicate: Callable[[dict[str, Any]], bool], what: str,
              after: int = 0) -> dict[str, Any]:
        """The first frame from index ``after`` on that matches."""
        def found() -> dict[str, Any] | None:
            return next((f for f in list(self.frames)[after:] if predicate(f)), None)

        frame = wait_for(found, 15, what)
        assert frame is not None
        return frame

    def close(self) -> None:
        self.gw.call(self._close())

    async def _close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            await self.reader
        if self.http is not None:
            await self.http.close()


@pytest.fixture
def agent_sockets() -> Iterator[list[AgentSocket]]:
    opened: list[AgentSocket] = []
    yield opened
    for socket in opened:
        socket.close()


# ------------------------------------------------------------------ tests


def test_typing_both_ways_and_a_private_note_is_skipped(
    live_gateway: ThreadedGateway, page: Page, agent_sockets: list[AgentSocket]
) -> None:
    gw = live_gateway
    problems = Problems(page)
    alice_auth = gw.add_agent("Alice")
    alice = AgentSocket(gw, alice_auth)
    agent_sockets.append(alice)
    alice.until(lambda f: f["type"] == "ready", "the console socket is ready")
    open_chat(page, gw)
    say(page, "talk to a human")
    assigned = alice.until(lambda f: f["type"] == "notification" and f["kind"] == "assigned",
                           "the conversation is assigned to Alice (online)")
    cid = assigned["conversation"]["id"]
    alice.send({"type": "subscribe", "conversation_id": cid, "ref": "s"})
    alice.until(lambda f: f["type"] == "subscribed", "subscribed")
    # no Telegram on this gateway: the welcome frame said so; the widget never asks
    expect(page.locator(TELEGRAM)).to_be_hidden()
    expect(page.locator(TELEGRAM)).not_to_have_attribute("data-offer", "asked")

    # the visitor types: the agent's console hears it; clearing the box stops it
    mark = len(alice.frames)
    page.locator(INPUT).press_sequentially("where is my", delay=20)
    on = alice.until(lambda f: f["type"] == "typing" and f["on"] is True, "typing on", mark)
    assert (on["conversation_id"], on["role"]) == (cid, "customer")
    mark = len(alice.frames)
    page.locator(INPUT).fill("")
    off = alice.until(lambda f: f["type"] == "typing", "typing off", mark)
    assert (off["role"], off["on"]) == ("customer", False)

    # the agent types: the widget shows it, and hides it when they stop
    indicator = page.locator(TYPING)
    expect(indicator).to_be_hidden()
    alice.send({"type": "typing", "conversation_id": cid, "on": True})
    expect(indicator).to_have_text("Alice is typing…", timeout=WAIT)
    expect(indicator).to_be_visible()
    expect(indicator).to_have_attribute("aria-live", "polite")
    alice.send({"type": "typing", "conversation_id": cid, "on": False})
    expect(indicator).to_be_hidden(timeout=WAIT)

    # typing again, then a private note (the visitor gets a content-free skip) and the
    # reply: the note never shows, the reply does and ends the indicator
    alice.send({"type": "typing", "conversation_id": cid, "on": True})
    expect(indicator).to_be_visible(timeout=WAIT)
    status, note = gw.api("POST", f"/conversations/{cid}/notes", alice_auth,
                          {"text": "VIP customer: refund without asking"})
    assert status == 201, note
    status, reply = gw.api("POST", f"/conversations/{cid}/messages", alice_auth,
                           {"text": "Hi, Alice here. How can I help?"})
    assert status == 201, reply
    shown = message(page, "agent", "Hi, Alice here. How can I help?")
    expect(shown).to_have_count(1, timeout=WAIT)
    expect(indicator).to_be_hidden()
    assert note["seq"] + 1 == reply["seq"]
    expect(shown).to_have_attribute("data-seq", str(reply["seq"]))
    expect(page.locator(f'{MSG}[data-seq="{note["seq"]}"]')).to_have_count(0)
    assert "VIP" not in " ".join(page.locator(MSG).all_inner_texts())

    # after the skip the conversation goes on in order, and a reload shows it once
    say(page, "thanks")
    expect(message(page, "customer", "thanks")).to_have_attribute(
        "data-seq", str(reply["seq"] + 1), timeout=WAIT)
    page.reload()
    expect(page.locator('[data-og="status"]')).to_have_attribute("data-state", "online",
                                                                   timeout=WAIT)
    expect(message(page, "customer", "thanks")).to_have_count(1, timeout=WAIT)
    assert "VIP" not in " ".join(page.locator(MSG).all_inner_texts())
    problems.check()


def test_email_linking_by_a_mailed_code(mail_gateway: MailGateway, page: Page) -> None:
    gw = mail_gateway
    problems = Problems(page)
    open_chat(page, gw)
    say(page, "hello")
    expect(message(page, "bot", "Omnigate demo bot")).to_be_visible(timeout=WAIT)

    toggle = page.get_by_role("button", name="Link your email")
    expect(toggle).to_have_attribute("aria-expanded", "false")
    toggle.click()
    expect(toggle).to_have_attribute("aria-expanded", "true")
    address = page.get_by_role("textbox", name="Your email address")
    expect(address).to_be_focused()
    address.fill(ADA)
    page.get_by_role("button", name="Send code").click()
    expect(page.locator('[data-og="email-sent-to"]')).to_contain_text(
        f"We mailed a code to {ADA}.", timeout=WAIT)
    code_box = page.get_by_role("textbox", name="Code from the mail")
    expect(code_box).to_be_focused()
    code = wait_for(gw.codes, 15, "the verification mail at the SMTP sink")[0]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "widget-email-code.png"))

    # a wrong code: the server's answer is shown, nothing is linked
    code_box.fill(f"{(int(code) + 1) % 10**6:06d}")
    page.get_by_role("button", name="Verify").click()
    note = page.locator('[data-og="email-msg"]')
    expect(note).to_have_text("That code is not right. 4 tries left.", timeout=WAIT)
    expect(note).to_have_attribute("data-kind", "error")
    assert identity_owner(gw, f"email:{ADA}") is None

    # the right one (typed as people do, with a space): linked to this visitor's contact
    code_box.fill(f"{code[:3]} {code[3:]}")
    page.get_by_role("button", name="Verify").click()
    expect(note).to_contain_text(f"Your email address {ADA} is verified", timeout=WAIT)
    expect(note).to_have_attribute("data-kind", "ok")
    expect(code_box).to_be_hidden()
    expect(page.locator('[data-og="email-toggle"]')).to_have_text("Email linked")
    contact = only_conversation(gw)["contact_id"]
    assert identity_owner(gw, f"email:{ADA}") == contact
    problems.check()


def test_linking_is_offered_only_for_the_channels_the_gateway_runs(
        live_gateway: ThreadedGateway, page: Page) -> None:
    # this gateway runs neither email nor Telegram: the welcome frame lists no channel to
    # link, so the widget offers neither (the server's refusal is tested in
    # tests/test_email_link.py)
    problems = Problems(page)
    open_chat(page, live_gateway)
    say(page, "hello")
    expect(message(page, "bot", "What can I help you with?")).to_be_visible(timeout=WAIT)
    expect(page.locator('[data-og="email-toggle"]')).to_be_hidden()
    expect(page.locator(TELEGRAM)).to_be_hidden()
    problems.check()


def test_continue_on_telegram_button(telegram_gateway: TelegramGateway, page: Page) -> None:
    gw = telegram_gateway
    problems = Problems(page)
    open_chat(page, gw)
    button = page.locator(TELEGRAM)
    expect(button).to_be_hidden()  # a new visitor without a conversation: nothing asked yet
    say(page, "hello")
    expect(button).to_be_visible(timeout=WAIT)
    expect(button).to_have_text("Continue on Telegram")
    href = button.get_attribute("href")
    assert href is not None and href.startswith("https://t.me/omnigate_test_bot?start=")
    assert button.get_attribute("target") == "_blank"
    assert button.get_attribute("rel") == "noopener noreferrer"

    # the link is real: whoever opens it and presses Start is this visitor's contact
    payload = parse_qs(urlsplit(href).query)["start"][0]
    people = People(gw.fake)
    update = people.message(people.user(4242, "Ada"), text=f"/start {payload}")
    assert gw.call(gw.deliver(update)) == 200
    contact = only_conversation(gw)["contact_id"]
    wait_for(lambda: identity_owner(gw, "telegram:4242") == contact, 15,
             "the Telegram user is linked to the visitor's contact")
    problems.check()


def test_a_telegram_customer_continues_in_the_web_chat_by_its_button(
        telegram_gateway: TelegramGateway, page: Page) -> None:
    """Telegram's /continue answer has a link button into the web chat; the page opened
    by it shows the conversation so far, and what is written there goes on in it."""
    gw = telegram_gateway
    assert gw.app is not None
    webchat = gw.app[CONNECTORS]["webchat"]
    assert isinstance(webchat, WebchatConnector)
    webchat.config = replace(webchat.config, page_url=gw.url + "/")
    people = People(gw.fake)
    ann = people.user(4343, "Ann")
    assert gw.call(gw.deliver(people.message(ann, text="My parcel is late"))) == 200
    assert gw.call(gw.deliver(people.message(ann, text="/continue"))) == 200
    offer = wait_for(lambda: next((c for c in gw.fake.of("sendMessage")
                                   if c.params["text"].startswith("You can continue")), None),
                     15, "the /continue answer")
    [[button]] = offer.params["reply_markup"]["inline_keyboard"]
    assert button["text"] == "Continue in the web chat"
    assert button["url"].startswith(gw.url + "/#omnigate-link=link_")

    problems = Problems(page)
    page.goto(button["url"])
    expect(page.locator('[data-og="status"]')).to_have_attribute("data-state", "online",
                                                                   timeout=WAIT)
    expect(page.locator('[data-og="linked"]')).to_have_text(
        LINK_ANSWERS[LinkState.LINKED], timeout=WAIT)
    assert page.evaluate("location.hash") == ""  # single use: out of the address bar
    # the conversation so far, Telegram's part too
    expect(message(page, "customer", "My parcel is late")).to_be_visible(timeout=WAIT)
    say(page, "Any news?")
    telegram_conversation = gw.call(store_of(gw).conversations.find_one(
        {"channel": "telegram"}))
    assert telegram_conversation is not None
    wait_for(lambda: gw.call(store_of(gw).messages.find_one(
        {"conversation_id": telegram_conversation["_id"], "channel": "webchat",
         "text": "Any news?"})), 15, "the web chat message in the Telegram conversation")
    # a reload resumes the same chat (no link any more)
    page.reload()
    expect(message(page, "customer", "Any news?")).to_be_visible(timeout=WAIT)
    expect(page.locator('[data-og="linked"]')).to_be_hidden()

    # the web chat's own /continue: a link button back to Telegram
    say(page, "/continue")
    link = page.locator('a[data-og="link-button"]')
    expect(link).to_have_text("Continue on Telegram", timeout=WAIT)
    href = link.get_attribute("href")
    assert href is not None and href.startswith("https://t.me/omnigate_test_bot?start=link_")
    assert link.get_attribute("rel") == "noopener noreferrer"
    problems.check()


@pytest.fixture
def limited_gateway(mongo_uri: str, tmp_path: Path) -> Iterator[ThreadedGateway]:
    """Two messages at once per visitor, then one every 10 s."""
    gw = ThreadedGateway(base_settings(mongo_uri, tmp_path).model_copy(update={
        "webchat_messages_per_minute": 6, "webchat_message_burst": 2}))
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()


def watch_rate_limits(page: Page) -> tuple[list[dict[str, Any]], list[int]]:
    """The ``rate_limited`` frames the page's sockets receive, and one entry per socket
    closed (filled as Playwright delivers events)."""
    refused: list[dict[str, Any]] = []
    closes: list[int] = []

    def on_socket(ws: Any) -> None:
        def received(payload: str | bytes) -> None:
            if isinstance(payload, str) and '"rate_limited"' in payload:
                refused.append(json.loads(payload))
        ws.on("framereceived", received)
        ws.on("close", lambda _ws: closes.append(1))

    page.on("websocket", on_socket)
    return refused, closes


def test_a_rate_limited_message_is_sent_again_after_retry_after(
    limited_gateway: ThreadedGateway, page: Page
) -> None:
    gw = limited_gateway
    problems = Problems(page)
    refused, _ = watch_rate_limits(page)
    open_chat(page, gw)
    texts = ["hello", "opening hours", "shipping costs"]
    for text in texts:
        say(page, text)
    # the third was refused (not stored): the widget keeps it as pending, then sends it
    # again by itself after retry_after, and it is stored and answered
    for _ in range(300):  # Playwright delivers events only while it is called: poll it
        if refused:
            break
        page.wait_for_timeout(100)
    assert refused, "a rate_limited error within 30 s"
    assert refused[0]["client_id"] and refused[0]["retry_after"] > 0
    for text in texts:
        expect(message(page, "customer", text)).to_have_count(1, timeout=60_000)
    expect(page.locator(f"{MSG}[data-pending]")).to_have_count(0, timeout=60_000)
    expect(page.locator(f"{MSG}[data-failed]")).to_have_count(0)
    stored = gw.call(store_of(gw).messages.count_documents(
        {"channel": "webchat", "direction": "in"}))
    assert stored == 3
    expect(message(page, "bot", "ship")).not_to_have_count(0, timeout=WAIT)
    problems.check()


CONNECTS = 20  # new chats per minute per address: one more every 3 s


@pytest.fixture
def connect_limited_gateway(mongo_uri: str, tmp_path: Path) -> Iterator[ThreadedGateway]:
    gw = ThreadedGateway(base_settings(mongo_uri, tmp_path).model_copy(update={
        "webchat_connects_per_minute": CONNECTS}))
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()


async def _use_up_new_chats(url: str) -> list[str]:
    """Open new chats from this address until the gateway refuses one; the frame types
    of the refused one."""
    async with aiohttp.ClientSession() as http:
        for _ in range(CONNECTS + 1):
            async with http.ws_connect(url + "/webchat/ws") as ws:
                await ws.send_json({"type": "hello", "token": None, "watermark": None})
                frames = []
                async for msg in ws:
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        break
                    frames.append(json.loads(msg.data))
                    if frames[-1]["type"] in ("synced", "error"):
                        break
                if frames and frames[-1]["type"] == "error":
                    await ws.receive()  # the close that follows
                    assert ws.close_code == 4429, ws.close_code
                    return [f"{f['type']}:{f.get('code')}" for f in frames]
    raise AssertionError("no hello was refused")


def test_a_widget_refused_at_hello_connects_again_after_retry_after(
    connect_limited_gateway: ThreadedGateway, page: Page
) -> None:
    """Too many new chats from one address: the widget's hello gets ``rate_limited`` and
    close 4429; it waits ``retry_after`` and connects by itself, and the chat works."""
    gw = connect_limited_gateway
    problems = Problems(page)
    assert gw.call(_use_up_new_chats(gw.url)) == ["error:rate_limited"]
    refused, closes = watch_rate_limits(page)
    page.goto(gw.url + "/")
    for _ in range(100):  # Playwright delivers events only while it is called: poll it
        if refused:
            break
        page.wait_for_timeout(100)
    assert refused and refused[0]["retry_after"] > 0, "the widget's hello was refused"
    expect(page.locator('[data-og="status"]')).to_have_attribute(
        "data-state", "online", timeout=30_000)
    assert closes, "the refused socket was closed"
    say(page, "opening hours")
    expect(message(page, "bot", "Monday")).not_to_have_count(0, timeout=WAIT)
    problems.check()
