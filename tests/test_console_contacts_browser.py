"""The contacts page of the agent console (issue 11, item 4, the console side), in headless
Chromium against a real gateway: an agent opens a customer from a conversation, edits
their name, email, phone and notes (a 400 says why in words), sees their timeline on
every channel, merges another contact into them and undoes it, each with a second click
instead of a dialog. Messages go in through the pipeline, as a connector's do."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from gateway.identity import Identity
from gateway.keys import OUTBOX, PIPELINE, ROUTING, STORE
from gateway.model import AgentRole
from gateway.store.audit import Actor, AuditLog
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
from tests.test_browser import ThreadedGateway
from tests.test_search import message

pytestmark = pytest.mark.browser


def customer(gw: ThreadedGateway, who: str, text: str, *, channel: str = "webchat",
             name: str | None = None, queued: bool = True) -> tuple[str, str]:
    """A customer's message through the pipeline (the conversation handed to the queue
    first, so the bot stays out of it); returns (conversation id, contact id)."""
    assert gw.app is not None
    pipeline = gw.app[PIPELINE]
    conversation = gw.call(pipeline.open_conversation(channel, who, who, name))
    if queued:
        assert gw.call(gw.app[ROUTING].handoff(conversation.id, "test: needs a human"))
    result = gw.call(pipeline.ingest(message(who, text, channel=channel, name=name)))
    assert result.conversation.id == conversation.id
    return conversation.id, result.conversation.contact_id


def contact(gw: ThreadedGateway, contact_id: str) -> Any:
    assert gw.app is not None
    found = gw.call(gw.app[STORE].get_contact(contact_id))
    assert found is not None
    return found


def merged_into(gw: ThreadedGateway, contact_id: str) -> str | None:
    assert gw.app is not None
    doc = gw.call(gw.app[STORE].contacts.find_one({"_id": contact_id}))
    assert doc is not None
    return doc.get("merged_into")


def agent(gw: ThreadedGateway, name: str, role: AgentRole = AgentRole.AGENT) -> str:
    assert gw.app is not None
    agent_id, email = add_agent(gw, name, role=role)
    gw.call(gw.app[ROUTING].set_capacity(agent_id, 0))
    return email


def allow(watch: Watch, status: int) -> None:
    """The refused request Chromium logs (the page shows why): the only error allowed."""
    assert watch.errors, "the refused request was not made"
    assert all(f"status of {status}" in e for e in watch.errors), watch.errors
    watch.errors.clear()


def test_an_agent_edits_a_contact_sees_every_channel_and_merges_and_undoes(
    console_gateway: ThreadedGateway, new_page: Callable[[], Page]
) -> None:
    gw = console_gateway
    assert gw.app is not None
    email = agent(gw, "Alice")
    conv, jo = customer(gw, "v_jo", "My parcel is late", name="Jo")
    _, jo_tg = customer(gw, "77001", "Any news on the parcel?", channel="telegram",
                        name="Jo T", queued=False)
    _, kim = customer(gw, "v_kim", "Hello from Kim", name="Kim")
    # Jo wrote on Telegram too: one contact with two channels
    identity = Identity(gw.app[STORE], gw.app[OUTBOX])
    gw.call(identity.merge(jo, jo_tg, None))

    desk = Desk(new_page(), gw)
    watch = Watch(desk.page)
    desk.signed_in(email)
    desk.page.locator(f'[data-c="queue"] [data-c="conv-item"][data-id="{conv}"]').click()
    expect(desk.c("conversation")).to_be_visible()
    expect(desk.c("contact-link")).to_have_text("Jo")

    # the contact's name in the conversation view opens the contacts page
    desk.c("contact-link").click()
    expect(desk.page).to_have_url(gw.url + "/console/contacts.html#" + jo)
    expect(desk.c("contact-title")).to_have_text("Jo")
    expect(desk.c("identities").locator('[data-c="identity"]')).to_have_count(2)
    timeline = desk.page.locator('[data-c="contact-timeline"] [data-c="timeline-item"]')
    customer_items = timeline.and_(desk.page.locator('[data-role="customer"]'))
    expect(customer_items.locator('[data-c="timeline-text"]')).to_have_text(
        ["Any news on the parcel?", "My parcel is late"])  # newest first, both channels
    expect(customer_items.nth(0).locator('[data-channel="telegram"]')).to_be_visible()
    expect(customer_items.nth(1).locator('[data-channel="webchat"]')).to_be_visible()
    assert conv in {customer_items.nth(1).get_attribute("data-conversation")}

    # edit: a wrong phone is refused in words, nothing is saved
    desk.c("f-phone").fill("call me maybe")
    desk.c("save").click()
    expect(desk.c("save-error")).to_be_visible()
    expect(desk.c("save-error")).to_have_text(
        "The phone number does not look right: 4 to 30 digits, spaces and + ( ) - . / only.")
    assert contact(gw, jo).name == "Jo"

    desk.c("f-name").fill("Jo Müller")
    desk.c("f-email").fill("JO@Example.com")
    desk.c("f-phone").fill("+49 30 1234567")
    desk.c("f-notes").fill("Prefers email.\nVIP since 2024.")
    desk.c("save").click()
    expect(desk.c("save-status")).to_have_text("Saved.")
    expect(desk.c("save-error")).to_be_hidden()
    expect(desk.c("contact-title")).to_have_text("Jo Müller")
    expect(desk.c("f-email")).to_have_value("jo@example.com")  # as the server keeps it
    saved = contact(gw, jo)
    assert saved.name == "Jo Müller"
    assert saved.profile["email"]["value"] == "jo@example.com"
    assert saved.profile["phone"]["value"] == "+49 30 1234567"
    assert saved.profile["notes"]["value"] == "Prefers email.\nVIP since 2024."

    # an emptied field clears it
    desk.c("f-phone").fill("")
    desk.c("save").click()
    expect(desk.c("save-status")).to_have_text("Saved.")
    assert "phone" not in contact(gw, jo).profile
    assert contact(gw, jo).profile["notes"]["value"] == "Prefers email.\nVIP since 2024."

    # the search box finds contacts by what was saved
    desk.c("contact-q").fill("jo@example")
    desk.c("contact-q").press("Enter")
    rows = desk.page.locator('[data-c="contact-results"] [data-c="contact-row"]')
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-id", jo)

    # merge Kim into Jo: the first click only asks; notes being typed stay
    desk.c("f-notes").fill("Typing, not saved")
    desk.c("merge-q").fill("Kim")
    desk.c("merge-q").press("Enter")
    candidate = desk.page.locator(f'[data-c="merge-candidate"][data-id="{kim}"]')
    expect(candidate).to_have_count(1)
    go = candidate.locator('[data-c="merge-go"]')
    go.click()
    expect(go).to_have_attribute("data-armed", "true")
    expect(go).to_contain_text("sure")
    assert merged_into(gw, kim) is None
    go.click()
    merges = desk.page.locator('[data-c="merges"] [data-c="merge"]')
    expect(merges).to_have_count(2)  # Kim's now, and the Telegram one from before
    expect(merges.first.locator('[data-c="merge-name"]')).to_have_text("Kim")
    expect(desk.c("identities").locator('[data-c="identity"]')).to_have_count(3)
    expect(customer_items.locator('[data-c="timeline-text"]')).to_have_text(
        ["Hello from Kim", "Any news on the parcel?", "My parcel is late"])
    assert merged_into(gw, kim) == jo
    expect(desk.c("f-notes")).to_have_value("Typing, not saved")
    expect(desk.c("f-name")).to_have_value("Jo Müller")
    desk.c("f-notes").fill("Prefers email.\nVIP since 2024.")
    screenshot(desk.page, "console-contact.png")

    # undo it (a second click again)
    undo = merges.first.locator('[data-c="merge-undo"]')
    undo.click()
    expect(undo).to_have_attribute("data-armed", "true")
    undo.click()
    expect(merges.first).to_have_attribute("data-undone", "true")
    expect(merges.first.locator('[data-c="merge-undone"]')).to_be_visible()
    expect(desk.c("identities").locator('[data-c="identity"]')).to_have_count(2)
    expect(customer_items.locator('[data-c="timeline-text"]')).to_have_text(
        ["Any news on the parcel?", "My parcel is late"])
    assert merged_into(gw, kim) is None
    expect(desk.c("merge-error")).to_be_hidden()

    # an item's conversation opens in the console
    customer_items.nth(1).locator('[data-c="timeline-conversation"]').click()
    expect(desk.c("conversation")).to_be_visible()
    expect(desk.c("conv-title")).to_have_text("Jo Müller")
    expect(desk.c("items")).to_have_attribute("data-loaded", "true")
    expect(desk.items(role="customer", conversation=conv).locator('[data-c="text"]')).to_have_text(
        ["My parcel is late"])
    assert desk.page.url == gw.url + "/console/"  # a reload shows the lists
    allow(watch, 400)
    watch.check()


def test_an_undo_that_can_no_longer_be_exact_says_why(
    console_gateway: ThreadedGateway, new_page: Callable[[], Page]
) -> None:
    gw = console_gateway
    assert gw.app is not None
    email = agent(gw, "Alice")
    _, jo = customer(gw, "v_jo", "My parcel is late", name="Jo")
    _, kim = customer(gw, "v_kim", "Hello from Kim", name="Kim")

    desk = Desk(new_page(), gw)
    watch = Watch(desk.page)
    desk.signed_in(email)
    desk.page.goto(gw.url + "/console/contacts.html#" + jo)
    desk.c("merge-q").fill("Kim")
    desk.c("merge-q").press("Enter")
    go = desk.page.locator(f'[data-c="merge-candidate"][data-id="{kim}"] [data-c="merge-go"]')
    go.click()
    go.click()
    merges = desk.page.locator('[data-c="merges"] [data-c="merge"]')
    expect(merges).to_have_count(1)
    # Kim writes again after the merge: undo could no longer put things back exactly
    gw.call(gw.app[PIPELINE].ingest(message("v_kim", "Still there?", n=2, name="Kim")))
    undo = merges.first.locator('[data-c="merge-undo"]')
    undo.click()
    undo.click()
    expect(desk.c("merge-error")).to_be_visible()
    expect(desk.c("merge-error")).to_contain_text("since the merge")
    expect(merges.first).to_have_attribute("data-undone", "false")
    assert merged_into(gw, kim) == jo
    allow(watch, 409)
    watch.check()


def test_an_admin_reads_the_audit_log_filtered_and_paged(
    console_gateway: ThreadedGateway, new_page: Callable[[], Page]
) -> None:
    gw = console_gateway
    assert gw.app is not None
    admin = agent(gw, "Ada", AgentRole.ADMIN)
    alice_id, alice = add_agent(gw, "Alice")
    log = AuditLog(gw.app[STORE])
    for n in range(55):  # older than what the browser does below: more than a page
        gw.call(log.record("claim", who=Actor(id=alice_id, name="Alice"), target=f"conv{n:02}",
                           ip="10.0.0.7", details={"n": n}))
    _, jo = customer(gw, "v_jo", "Hi", name="Jo")

    desk = Desk(new_page(), gw)
    watch = Watch(desk.page)
    desk.open()
    desk.sign_in(admin, "not the password")
    expect(desk.c("login-error")).to_be_visible()
    desk.sign_in(admin)
    expect(desk.c("app")).to_be_visible()
    expect(desk.c("nav-audit")).to_be_visible()
    gw.call(log.record("update_contact", who=Actor(id=alice_id, name="Alice"), target=jo,
                       details={"name": "Jo Müller"}))
    desk.c("nav-audit").click()
    expect(desk.page).to_have_url(gw.url + "/console/audit.html")

    rows = desk.page.locator('[data-c="audit-rows"] [data-c="audit-row"]')
    expect(rows).to_have_count(50)  # one page
    expect(rows.locator('[data-c="audit-action"]').first).to_have_text("update_contact")
    expect(rows.first.locator('[data-c="audit-target"] a')).to_have_attribute(
        "href", "contacts.html#" + jo)
    expect(rows.first.locator('[data-c="audit-details"]')).to_have_text("name: Jo Müller")
    expect(rows.nth(1).locator('[data-c="audit-action"]')).to_have_text("sign_in")
    expect(rows.nth(1).locator('[data-c="audit-who"]')).to_have_text("Ada")
    expect(rows.nth(2).locator('[data-c="audit-action"]')).to_have_text("sign_in_failed")
    expect(rows.nth(2).locator('[data-c="audit-target"]')).to_have_text(admin)
    expect(rows.nth(3).locator('[data-c="audit-target"]')).to_have_text("conv54")
    desk.c("audit-more").click()
    expect(rows).to_have_count(58)  # the rest, older
    expect(rows.last.locator('[data-c="audit-target"]')).to_have_text("conv00")
    expect(desk.c("audit-more")).to_be_hidden()
    screenshot(desk.page, "console-audit.png")

    # filters: by action, by agent, by object (and they stay in the address)
    desk.c("a-action").fill("sign_in_failed")
    desk.c("a-action").press("Enter")
    expect(rows).to_have_count(1)
    expect(rows.first.locator('[data-c="audit-who"]')).to_have_text("—")
    assert "action=sign_in_failed" in desk.page.url
    desk.c("a-reset").click()
    expect(rows).to_have_count(50)
    desk.c("a-who").select_option(alice_id)
    expect(rows).to_have_count(50)
    expect(rows.locator('[data-c="audit-who"]')).to_have_text(["Alice"] * 50)
    desk.c("a-target").fill("conv07")
    desk.c("a-target").press("Enter")
    expect(rows).to_have_count(1)
    expect(rows.first.locator('[data-c="audit-details"]')).to_have_text("n: 7")
    desk.page.reload()  # the address keeps the filters
    expect(rows).to_have_count(1)
    expect(desk.c("a-who")).to_have_value(alice_id)
    watch.check()

    # an agent has no audit page
    other = Desk(new_page(), gw)
    other_watch = Watch(other.page)
    other.signed_in(alice)
    expect(other.c("nav-audit")).to_be_hidden()
    other.page.goto(gw.url + "/console/audit.html")
    expect(other.c("problem")).to_have_text("The audit log is for admins.")
    expect(other.c("page")).to_be_hidden()
    other_watch.check()


def test_the_timeline_pages_back_and_the_newest_contacts_are_listed(
    console_gateway: ThreadedGateway, new_page: Callable[[], Page]
) -> None:
    gw = console_gateway
    assert gw.app is not None
    email = agent(gw, "Alice")
    _, jo = customer(gw, "v_jo", "message 00", name="Jo")
    for n in range(1, 60):
        gw.call(gw.app[PIPELINE].ingest(message("v_jo", f"message {n:02}", n=n + 1, name="Jo")))
    customer(gw, "v_kim", "Hello", name="Kim")

    desk = Desk(new_page(), gw)
    watch = Watch(desk.page)
    desk.page.goto(gw.url + "/console/contacts.html")  # not signed in: says where to
    expect(desk.c("problem")).to_have_text("Not signed in. Open the console")
    expect(desk.c("page")).to_be_hidden()
    desk.c("problem").locator("a").click()
    expect(desk.c("login")).to_be_visible()
    desk.sign_in(email)
    expect(desk.c("app")).to_be_visible()
    desk.page.goto(gw.url + "/console/contacts.html")
    rows = desk.page.locator('[data-c="contact-results"] [data-c="contact-row"]')
    expect(rows.locator('[data-c="contact-row-name"]')).to_have_text(["Jo", "Kim"])
    expect(desk.c("contact-empty")).to_be_visible()
    rows.first.click()
    expect(desk.page).to_have_url(gw.url + "/console/contacts.html#" + jo)
    texts = desk.page.locator(
        '[data-c="contact-timeline"] [data-role="customer"] [data-c="timeline-text"]')
    items = desk.page.locator('[data-c="contact-timeline"] [data-c="timeline-item"]')
    expect(items).to_have_count(50)  # one page
    expect(texts.first).to_have_text("message 59")
    expect(desk.c("timeline-more")).to_be_visible()
    desk.c("timeline-more").click()
    expect(texts.last).to_have_text("message 00")
    expect(desk.c("timeline-more")).to_be_hidden()
    expect(texts).to_have_text([f"message {n:02}" for n in range(59, -1, -1)])  # once each
    watch.check()
