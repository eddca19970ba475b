"""The agent console (gateway/desk/console/) in headless Chromium, against a real gateway.

An agent signs in, sees a web chat visitor's handoff arrive live, claims it, reads the
history, replies (the visitor's widget, a second page, shows it), writes a private note
(the visitor never sees it), and resolves (the visitor gets the CSAT question); a script
typed by the visitor stays text. Screenshots: $OMNIGATE_TEST_ARTIFACTS (tests/artifacts/).
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
from playwright.sync_api import Page, expect

from gateway.keys import STORE
from gateway.model import OwnerState
from gateway.store.canned import CannedStore
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
from tests.test_browser import (
    MSG,
    NO_PROXY,
    ThreadedGateway,
    message,
    open_chat,
    say,
    wait_for,
)

pytestmark = pytest.mark.browser

XSS = '<img src=x onerror="window.__xss=1;alert(1)">'


def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with NO_PROXY.open(urllib.request.Request(url), timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_console_files_and_headers(console_gateway: ThreadedGateway) -> None:
    status, headers, body = fetch(console_gateway.url + "/console/")
    assert status == 200 and b'data-c="login-form"' in body
    assert headers["Content-Type"].startswith("text/html")
    csp = headers["Content-Security-Policy"]
    for directive in ("default-src 'self'", "script-src 'self'", "style-src 'self'",
                      "frame-ancestors 'none'"):
        assert directive in csp, csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert b"<script>" not in body and b"style=" not in body and b"onclick" not in body
    assert b'href="analytics.html"' in body  # the analytics page's nav link

    status, headers, body = fetch(console_gateway.url + "/console/console.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert b"innerHTML" not in body  # everything is set with textContent
    status, headers, _ = fetch(console_gateway.url + "/console/console.css")
    assert status == 200 and headers["Content-Type"].startswith("text/css")
    for name in ("__init__.py", "missing.js", "..%2Fapp.py", "%2E%2E%2Fauth.py", "INDEX.HTML"):
        assert fetch(console_gateway.url + "/console/" + name)[0] == 404, name
    status, headers, _ = fetch(console_gateway.url + "/console")
    assert status == 200 and headers["Content-Type"].startswith("text/html")  # redirected


def test_wrong_password_shows_an_error(
    console_gateway: ThreadedGateway, new_page: Callable[[], Page]
) -> None:
    _, email = add_agent(console_gateway, "Alice")
    desk = Desk(new_page(), console_gateway)
    watch = Watch(desk.page)
    desk.open()
    desk.sign_in(email, "not the password at all")
    expect(desk.c("login-error")).to_have_text("wrong email or password")
    expect(desk.c("app")).to_be_hidden()
    assert not [c for c in desk.page.context.cookies() if c["value"]]  # no session

    desk.sign_in(email)  # the right one now
    expect(desk.c("app")).to_be_visible()
    expect(desk.c("me")).to_have_text("Alice (agent)")
    expect(desk.c("live")).to_have_attribute("data-state", "live")
    desk.c("sign-out").click()
    expect(desk.c("login")).to_be_visible()
    desk.page.reload()  # the session really ended
    expect(desk.c("login")).to_be_visible()
    expect(desk.c("app")).to_be_hidden()
    watch.check()


def test_an_agent_works_a_web_chat_handoff_in_the_console(
    console_gateway: ThreadedGateway, new_page: Callable[[], Page]
) -> None:
    gw = console_gateway
    _, email = add_agent(gw, "Alice")
    desk = Desk(new_page(), gw)
    watch = Watch(desk.page)
    desk.signed_in(email)
    desk.presence("away")  # no automatic assignment: the conversation waits in the queue
    expect(desk.row("queue")).to_have_count(0)

    visitor = new_page()
    visitor_watch = Watch(visitor)
    open_chat(visitor, gw)
    say(visitor, "hello")
    expect(message(visitor, "bot", "Omnigate demo bot")).to_be_visible()
    say(visitor, "talk to a human")
    expect(visitor.locator(f'{MSG}[data-event="handoff"]')).to_be_visible()

    # live: the console was never reloaded, the socket brought it
    row = desk.row("queue")
    expect(row).to_have_count(1)
    expect(row.locator('[data-channel="webchat"]')).to_have_text("Web")
    expect(row.locator('[data-c="priority"]')).to_have_text("normal")
    expect(row.locator('[data-c="waiting"]')).to_contain_text("waiting")
    expect(row.locator('[data-c="sla"]')).to_have_attribute("data-state", "running")
    expect(desk.c("queue-count")).to_have_text("1")
    screenshot(desk.page, "console-queue.png")

    row.click()
    expect(desk.c("conversation")).to_be_visible()
    expect(desk.c("conv-owner")).to_have_attribute("data-owner", "queued")
    expect(desk.c("items")).to_have_attribute("data-loaded", "true")
    # the history: the visitor's words, the bot's answers, the handoff
    expect(desk.items(role="customer").filter(has_text="talk to a human")).to_have_count(1)
    expect(desk.items(role="customer").filter(has_text="hello")).to_have_count(1)
    expect(desk.items(role="bot").first).to_be_visible()
    expect(desk.items(event="handoff")).to_have_count(1)

    desk.c("claim").click()
    expect(desk.c("conv-owner")).to_have_attribute("data-owner", "agent")
    expect(desk.c("conv-owner")).to_have_text("assigned to you")
    expect(desk.row("queue")).to_have_count(0)
    expect(desk.row("mine")).to_have_count(1)
    expect(desk.page.locator('[data-c="toast"]', has_text="Assigned to you")).to_be_visible()
    expect(visitor.locator(f'{MSG}[data-event="assigned"]')).to_contain_text("Alice")

    # a reply reaches the visitor's widget
    desk.write("Hi, Alice here. How can I help?")
    expect(desk.items(role="agent").filter(has_text="Alice here")).to_have_count(1)
    reply = message(visitor, "agent", "Hi, Alice here. How can I help?")
    expect(reply).to_have_count(1)

    # a private note: marked in the console, never shown to the visitor
    desk.write("Customer sounded upset: internal only", note=True)
    note = desk.items(private="true")
    expect(note).to_have_count(1)
    expect(note.locator('[data-c="private-tag"]')).to_have_text("Private note")
    desk.write("One moment, I am checking.")
    expect(message(visitor, "agent", "One moment, I am checking.")).to_have_count(1)
    expect(visitor.locator(MSG, has_text="internal only")).to_have_count(0)
    assert "internal only" not in visitor.locator("#omnigate-webchat").inner_text()

    # the visitor writes while the conversation is closed in the console: a notification
    desk.c("close-conv").click()
    expect(desk.c("conversation")).to_be_hidden()
    say(visitor, XSS)
    expect(desk.page).to_have_title("(1) Omnigate console")
    expect(desk.row("mine").locator('[data-c="unread"]')).to_have_text("1")
    toast = desk.page.locator('[data-c="toast"]', has_text="src=x onerror")
    expect(toast).to_be_visible()

    # the payload is text in the console: no element made, no script run
    desk.row("mine").click()
    expect(desk.page).to_have_title("Omnigate console")
    payload = desk.items(role="customer").filter(has_text="onerror")
    expect(payload).to_have_count(1)
    expect(payload.locator('[data-c="text"]')).to_have_text(XSS)
    assert desk.page.locator("img").count() == 0
    assert desk.page.evaluate("window.__xss") is None
    screenshot(desk.page, "console-conversation.png")

    # resolve with CSAT on: the visitor is asked
    desk.c("resolve").click()
    expect(desk.c("conv-owner")).to_have_attribute("data-owner", "resolved")
    expect(desk.row("mine")).to_have_count(0)
    expect(visitor.locator(MSG, has_text="How satisfied")).to_have_count(1)
    expect(visitor.locator('[data-og="button"]')).to_have_count(5)
    watch.check()
    visitor_watch.check()


RAW_SOCKET = """async (token) => {
  const ws = new WebSocket((location.protocol === "https:" ? "wss:" : "ws:") + "//" +
                           location.host + "/webchat/ws");
  window.__raw = { ws, frames: [], acks: new Set() };
  ws.addEventListener("message", (e) => {
    const f = JSON.parse(e.data);
    window.__raw.frames.push(f);
    if (f.type === "ack") window.__raw.acks.add(f.client_id);
  });
  await new Promise((ok) => ws.addEventListener("open", ok));
  ws.send(JSON.stringify({ type: "hello", token }));
  await new Promise((ok) => {
    const check = () => window.__raw.frames.some((f) => f.type === "synced") ? ok()
      : setTimeout(check, 20);
    check();
  });
}"""
SEND_MANY = """async (n) => {
  // as the widget does: a message refused as rate_limited is sent again after retry_after
  const limited = (id) => window.__raw.frames.find(
    (f) => f.type === "error" && f.code === "rate_limited" && f.client_id === id && !f.seen);
  for (let i = 1; i <= n; i++) {
    const id = "line-" + i;
    window.__raw.ws.send(JSON.stringify({ type: "message", client_id: id, text: "line " + i }));
    await new Promise((ok) => {
      const check = () => {
        const refused = limited(id);
        if (refused) {
          refused.seen = true;
          setTimeout(() => {
            window.__raw.ws.send(JSON.stringify(
              { type: "message", client_id: id, text: "line " + i }));
            check();
          }, 1000 * refused.retry_after);
        } else if (window.__raw.acks.has(id)) ok();
        else setTimeout(check, 10);
      };
      check();
    });
  }
}"""


def test_console_tools_profile_canned_typing_paging_transfer_handback(
    console_gateway: ThreadedGateway, new_page: Callable[[], Page]
) -> None:
    gw = console_gateway
    assert gw.app is not None
    store = gw.app[STORE]
    alice_id, alice_email = add_agent(gw, "Alice")
    _, bob_email = add_agent(gw, "Bob", teams=("billing",))
    gw.call(CannedStore(store).create(  # the console loads them at sign-in
        "order", "Order status", "Hi {contact.name}, order {contact.order_id}: on its way. "
        "{contact.phone} {agent.name}", alice_id))
    alice, bob = Desk(new_page(), gw), Desk(new_page(), gw)
    watch = Watch(alice.page)
    alice.signed_in(alice_email)
    alice.presence("away")
    bob.signed_in(bob_email)
    bob.presence("away")

    visitor = new_page()
    open_chat(visitor, gw)
    say(visitor, "talk to a human")
    expect(alice.row("queue")).to_have_count(1)
    queued = gw.call(store.list_conversations([OwnerState.QUEUED]))
    assert len(queued) == 1
    conversation, contact_id = queued[0], queued[0].contact_id
    # what the bot collected (an entry with its expiry), and a plain value
    expires = "2031-05-04T03:02:01+00:00"
    gw.call(store.contacts.update_one({"_id": contact_id}, {"$set": {
        "name": "Carla",
        "profile.order_id": "A-1001",
        "profile.email": {"value": "carla@example.com", "set_at": "2026-01-01T00:00:00+00:00",
                          "expires_at": expires},
    }}))

    alice.row("queue").click()
    alice.c("claim").click()
    expect(alice.c("conv-owner")).to_have_text("assigned to you")
    expect(alice.c("conv-title")).to_have_text("Carla")
    expect(alice.c("contact-name")).to_have_text("Carla")
    email = alice.page.locator('[data-c="profile-value"][data-key="email"]')
    expect(email).to_contain_text("carla@example.com")
    expect(email.locator('[data-c="profile-expires"]')).to_contain_text("expires")
    expect(alice.page.locator('[data-c="profile-value"][data-key="order_id"]')).to_have_text(
        "A-1001")
    expect(alice.c("identities").locator('[data-channel="webchat"]')).to_have_count(1)
    expect(alice.c("reply-channel").locator("option")).to_have_count(1)
    expect(alice.c("reply-channel")).to_have_value("webchat")

    # a second web chat socket of the visitor (its token), to see typing frames both ways
    token = visitor.evaluate("localStorage.getItem('omnigate.token')")
    visitor.evaluate(RAW_SOCKET, token)

    # canned response: placeholders filled by the server, the missing one pointed at
    alice.c("canned").select_option(label="/order Order status")
    expect(alice.c("reply")).to_have_value("Hi Carla, order A-1001: on its way.  Alice")
    expect(alice.c("canned-missing")).to_contain_text("{contact.phone}")

    # typing, both ways (the visitor's side over a raw web chat socket with its token)
    alice.c("reply").press("End")
    alice.c("reply").type("!")
    wait_for(lambda: visitor.evaluate(
        "window.__raw.frames.some(f => f.type === 'typing' && f.on && f.name === 'Alice')"),
        15, "the visitor is told that Alice is typing")
    visitor.evaluate("window.__raw.ws.send(JSON.stringify({type: 'typing', on: true}))")
    expect(alice.c("typing")).to_have_text("Carla is typing…")
    alice.c("reply").fill("")

    # paging: the newest 50 first, older ones when scrolled to the top
    visitor.evaluate(SEND_MANY, 55)
    alice.c("close-conv").click()
    alice.row("mine").click()
    expect(alice.c("items")).to_have_attribute("data-loaded", "true")
    expect(alice.items(role="customer").filter(has_text="line 55")).to_have_count(1)
    expect(alice.items()).to_have_count(50)
    expect(alice.c("items")).to_have_attribute("data-has-more", "true")
    expect(alice.items(role="customer").filter(has_text="talk to a human")).to_have_count(0)
    alice.c("timeline").evaluate("el => { el.scrollTop = 0; }")
    expect(alice.items(role="customer").filter(has_text="talk to a human")).to_have_count(1)
    expect(alice.items(role="customer").filter(has_text="line 1")).to_have_count(11)  # 1, 10-19
    expect(alice.c("items")).to_have_attribute("data-has-more", "false")
    ids = alice.items().evaluate_all("els => els.map(e => e.dataset.id)")
    assert len(ids) == len(set(ids)) > 50
    seqs = alice.items().evaluate_all("els => els.map(e => Number(e.dataset.seq))")
    assert seqs == sorted(seqs) and seqs[0] == 1  # oldest on top, nothing skipped
    assert seqs == list(range(1, len(seqs) + 1))

    # transfer to a team: Bob (billing, online now) gets it
    bob.presence("online")
    alice.page.locator('[data-c="transfer"] summary').click()
    alice.c("transfer-team").fill("billing")
    alice.page.locator('[data-c="transfer-form"] button[type="submit"]').click()
    expect(alice.row("mine")).to_have_count(0)
    expect(bob.row("mine")).to_have_count(1)
    expect(bob.page.locator('[data-c="toast"]', has_text="Assigned to you: Carla")).to_be_visible()

    # hand back to the bot
    bob.row("mine").click()
    expect(bob.c("conv-owner")).to_have_text("assigned to you")
    bob.c("handback").click()
    expect(bob.c("conv-owner")).to_have_attribute("data-owner", "bot")
    expect(bob.row("mine")).to_have_count(0)
    stored = gw.call(store.get_conversation(conversation.id))
    assert stored is not None and stored.owner is OwnerState.BOT
    watch.check()
