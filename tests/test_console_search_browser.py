"""Search and labels in the agent console (issue 11, items 2 and 3), in headless Chromium
against a real gateway: an agent finds a past message by its words (as they type) and
opens its conversation; filters narrow the hits; labels show as coloured chips, are set
from the conversation view and reach a second agent's console live; the queue filters by
a label; an admin manages the labels. Messages go in through the pipeline, as a
connector's do, and the indexer writes their words about a second later."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import date, timedelta

import pytest
from playwright.sync_api import Locator, Page, Route, expect

from gateway.keys import PIPELINE, ROUTING, STORE
from gateway.model import AgentRole
from gateway.store.labels import Label, Labels
from gateway.store.search import SearchTerms
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
from tests.test_browser import ThreadedGateway, wait_for
from tests.test_search import message

pytestmark = pytest.mark.browser

SEARCH = re.compile(r"/api/v1/search/conversations\?")
XSS = '<img src=x onerror="window.__xss=1"> invoice'


def seed(gw: ThreadedGateway, who: str, text: str, *, channel: str = "webchat",
         name: str | None = None, queued: bool = True) -> str:
    """A customer's message through the pipeline, in a conversation handed to the queue
    first (so the bot does not answer it); returns the conversation id once the indexer
    has the message's words."""
    assert gw.app is not None
    pipeline = gw.app[PIPELINE]
    conversation = gw.call(pipeline.open_conversation(channel, who, who, name))
    if queued:
        assert gw.call(gw.app[ROUTING].handoff(conversation.id, "test: needs a human"))
    result = gw.call(pipeline.ingest(message(who, text, channel=channel, name=name)))
    assert result.conversation.id == conversation.id
    terms = SearchTerms(gw.app[STORE]).coll
    wait_for(lambda: gw.call(terms.find_one({"_id": result.item.id})), 10,
             f"the words of {text!r} indexed")
    return conversation.id


def label(gw: ThreadedGateway, name: str, color: str) -> Label:
    assert gw.app is not None
    return gw.call(Labels(gw.app[STORE]).create(name, color))


def set_labels(gw: ThreadedGateway, conversation_id: str, *labels: Label) -> None:
    """As another gateway process would: straight into the store."""
    assert gw.app is not None
    assert gw.call(Labels(gw.app[STORE]).set_on(conversation_id, [la.id for la in labels]))


def agent(gw: ThreadedGateway, name: str, role: AgentRole = AgentRole.AGENT) -> str:
    """An agent who gets nothing assigned automatically (capacity 0); returns the email."""
    assert gw.app is not None
    agent_id, email = add_agent(gw, name, role=role)
    gw.call(gw.app[ROUTING].set_capacity(agent_id, 0))
    return email


def hits(desk: Desk) -> Locator:
    return desk.page.locator('[data-c="search-results"] [data-c="search-hit"]')


def test_an_agent_finds_a_past_message_as_they_type_and_opens_it(
    console_gateway: ThreadedGateway, new_page: Callable[[], Page]
) -> None:
    gw = console_gateway
    email = agent(gw, "Alice")
    broken = seed(gw, "v_jo", "My parcel arrived broken, I want a refund", name="Jo Müller")
    late = seed(gw, "77001", "Where is my PARCEL? Order 10045", channel="telegram",
                name="Kim")
    creme = seed(gw, "v_cr", "La crème brûlée était froide", name="Zoé")
    script = seed(gw, "v_x", XSS, name="Mallory")
    seed(gw, "v_other", "hello there", name="Other")

    desk = Desk(new_page(), gw)
    watch = Watch(desk.page)
    searches: list[str] = []
    desk.page.on("request", lambda r: searches.append(r.url) if SEARCH.search(r.url) else None)
    desk.signed_in(email)
    expect(desk.row("queue")).to_have_count(5)

    # typed a key at a time: one search once typing pauses (300 ms), not one per key
    desk.c("search-q").press_sequentially("parcel", delay=60)
    expect(hits(desk)).to_have_count(2)
    assert 1 <= len(searches) <= 2, searches  # 6 without the pause (2: a slow key)
    assert "q=parcel" in searches[-1]
    expect(desk.c("lists")).to_be_hidden()  # the hits in their place
    expect(desk.c("search-status")).to_have_text("2 conversations")
    # newest first: contact, channel, state and the message with the words marked
    expect(hits(desk).nth(0)).to_have_attribute("data-id", late)
    expect(hits(desk).nth(1)).to_have_attribute("data-id", broken)
    first = hits(desk).nth(0)
    expect(first.locator('[data-c="hit-name"]')).to_have_text("Kim")
    expect(first.locator('[data-channel="telegram"]')).to_be_visible()
    expect(first.locator('[data-c="hit-state"]')).to_have_text("queued")
    expect(first.locator('[data-c="snippet"]')).to_have_text("Where is my PARCEL? Order 10045")
    expect(first.locator("mark")).to_have_text("PARCEL")  # as written, whatever the case
    expect(hits(desk).nth(1).locator("mark")).to_have_text("parcel")
    expect(desk.c("search-partial")).to_be_hidden()

    # more words: all in one message; the last one is a prefix while it is typed
    desk.c("search-q").press_sequentially(" bro", delay=60)
    expect(hits(desk)).to_have_count(1)
    expect(hits(desk).first).to_have_attribute("data-id", broken)
    expect(hits(desk).first.locator("mark")).to_have_text(["parcel", "broken"])

    # case and accents do not matter, and the marks cover the words as written
    desk.c("search-q").fill("CREME bru")
    expect(hits(desk)).to_have_count(1)
    expect(hits(desk).first).to_have_attribute("data-id", creme)
    expect(hits(desk).first.locator("mark")).to_have_text(["crème", "brûlée"])

    # a customer's markup is text in a snippet too; Enter searches at once
    count = len(searches)
    desk.c("search-q").fill("invoice")
    desk.c("search-q").press("Enter")
    expect(hits(desk)).to_have_count(1)
    expect(hits(desk).first).to_have_attribute("data-id", script)
    expect(hits(desk).first.locator('[data-c="snippet"]')).to_have_text(XSS)
    expect(hits(desk).first.locator("mark")).to_have_text("invoice")
    assert desk.page.locator('[data-c="search-results"] img').count() == 0
    assert desk.page.evaluate("window.__xss") is None
    assert len(searches) == count + 1  # Enter's search; the typed one was not sent apart

    desk.c("search-q").fill("nothing like this")
    expect(desk.c("search-status")).to_have_text("No conversations found.")
    expect(hits(desk)).to_have_count(0)

    # a hit opens the conversation, the hits stay for the next one
    desk.c("search-q").fill("parcel")
    expect(hits(desk)).to_have_count(2)
    screenshot(desk.page, "console-search.png")
    hits(desk).nth(1).click()
    expect(desk.c("conversation")).to_be_visible()
    expect(desk.c("conv-title")).to_have_text("Jo Müller")
    expect(desk.c("items")).to_have_attribute("data-loaded", "true")
    expect(desk.items(role="customer").locator('[data-c="text"]')).to_have_text(
        ["My parcel arrived broken, I want a refund"])
    expect(hits(desk).nth(1)).to_have_class(re.compile(r"\bc-row-open\b"))
    hits(desk).nth(0).click()
    expect(desk.c("conv-title")).to_have_text("Kim")

    # Escape clears the search: the lists again
    desk.c("search-q").press("Escape")
    expect(desk.c("search-q")).to_have_value("")
    expect(desk.c("search-box")).to_be_hidden()
    expect(desk.row("queue")).to_have_count(5)
    watch.check()


def test_filters_narrow_the_hits_and_a_partial_answer_says_so(
    console_gateway: ThreadedGateway, new_page: Callable[[], Page]
) -> None:
    gw = console_gateway
    email = agent(gw, "Alice")
    vip = label(gw, "VIP", "#fde047")
    web = seed(gw, "v_jo", "My parcel arrived broken", name="Jo")
    tg = seed(gw, "77001", "Where is my parcel?", channel="telegram", name="Kim")
    bot = seed(gw, "v_bot", "parcel tracking please", name="Bo", queued=False)
    set_labels(gw, web, vip)

    desk = Desk(new_page(), gw)
    watch = Watch(desk.page)
    desk.signed_in(email)
    desk.c("search-q").fill("parcel")
    desk.c("search-q").press("Enter")
    expect(hits(desk)).to_have_count(3)

    desk.c("search-filters").locator("summary").click()
    desk.c("search-channel").select_option("telegram")
    expect(hits(desk)).to_have_count(1)
    expect(hits(desk).first).to_have_attribute("data-id", tg)
    expect(desk.c("search-filter-count")).to_have_text("1")
    desk.c("search-channel").select_option("")
    desk.c("search-owner").select_option("bot")
    expect(hits(desk)).to_have_count(1)
    expect(hits(desk).first).to_have_attribute("data-id", bot)
    expect(hits(desk).first.locator('[data-c="hit-state"]')).to_have_text("bot")
    desk.c("search-owner").select_option("")
    desk.c("search-label").select_option(label="VIP")
    expect(hits(desk)).to_have_count(1)
    expect(hits(desk).first).to_have_attribute("data-id", web)
    expect(hits(desk).first.locator('[data-c="label-chip"]')).to_have_text("VIP")

    # a date range: the agent's own days; tomorrow on has nothing yet
    desk.c("search-label").select_option("")
    expect(hits(desk)).to_have_count(3)
    set_labels(gw, tg, vip)  # the hits shown follow live changes too
    tg_hit = hits(desk).and_(desk.page.locator(f'[data-id="{tg}"]'))
    expect(tg_hit.locator('[data-c="label-chip"]')).to_have_text("VIP")
    tomorrow = date.today() + timedelta(days=1)
    desk.c("search-since").fill(tomorrow.isoformat())
    expect(desk.c("search-status")).to_have_text("No conversations found.")
    desk.c("search-since").fill(date.today().isoformat())
    desk.c("search-until").fill(date.today().isoformat())
    expect(hits(desk)).to_have_count(3)
    desk.c("search-since").fill(tomorrow.isoformat())
    expect(desk.c("search-status")).to_have_text("The To date is before the From date.")
    expect(desk.c("search-status")).to_have_attribute("data-state", "error")

    # filters alone (no words) list conversations too
    desk.c("search-reset").click()
    expect(desk.c("search-filter-count")).to_be_hidden()
    desk.c("search-q").fill("")
    desk.c("search-channel").select_option("telegram")
    expect(hits(desk)).to_have_count(1)
    expect(hits(desk).first).to_have_attribute("data-id", tg)
    expect(hits(desk).first.locator('[data-c="snippet"]')).to_have_count(0)

    # the server stopped early: said, with the hits it has
    def partial(route: Route) -> None:
        answer = route.fetch()
        body = answer.json()
        body["partial"] = True
        route.fulfill(response=answer, body=json.dumps(body))

    desk.page.route(SEARCH, partial)
    desk.c("search-q").fill("parcel")
    desk.c("search-q").press("Enter")
    expect(desk.c("search-partial")).to_be_visible()
    expect(desk.c("search-partial")).to_contain_text("partial: older matches may exist")
    expect(hits(desk)).to_have_count(1)
    desk.page.unroute(SEARCH)
    desk.c("search-channel").select_option("")
    expect(hits(desk)).to_have_count(3)
    expect(desk.c("search-partial")).to_be_hidden()
    watch.check()


def test_labels_are_set_in_the_conversation_and_reach_another_console_live(
    console_gateway: ThreadedGateway, new_page: Callable[[], Page]
) -> None:
    gw = console_gateway
    alice_email, bob_email = agent(gw, "Alice"), agent(gw, "Bob")
    vip = label(gw, "VIP", "#fde047")  # light: black text
    label(gw, "Refund", "#1d4ed8")  # dark: white text
    conversation = seed(gw, "v_jo", "My parcel arrived broken", name="Jo")

    alice, bob = Desk(new_page(), gw), Desk(new_page(), gw)
    alice_watch, bob_watch = Watch(alice.page), Watch(bob.page)
    alice.signed_in(alice_email)
    bob.signed_in(bob_email)
    for desk in (alice, bob):
        expect(desk.row("queue")).to_have_count(1)
        expect(desk.row("queue").locator('[data-c="label-chip"]')).to_have_count(0)

    alice.row("queue").click()
    expect(alice.c("conv-title")).to_have_text("Jo")
    expect(alice.c("conv-labels").locator('[data-c="label-chip"]')).to_have_count(0)
    alice.c("label-picker-toggle").click()
    options = alice.page.locator('[data-c="label-option"]')
    expect(options).to_have_count(2)
    alice.page.get_by_role("checkbox", name="VIP").check()

    # the chip, in her view and her queue, readable on its colour
    chip = alice.c("conv-labels").locator('[data-c="label-chip"]')
    expect(chip).to_have_text(["VIP"])
    expect(chip).to_have_css("background-color", "rgb(253, 224, 71)")
    expect(chip).to_have_css("color", "rgb(0, 0, 0)")
    expect(alice.row("queue").locator('[data-c="label-chip"]')).to_have_text(["VIP"])
    assert [la["name"] for la in stored_labels(gw, conversation)] == ["VIP"]

    # Bob's console, never reloaded: the socket brought it
    expect(bob.row("queue").locator('[data-c="label-chip"]')).to_have_text(["VIP"])
    bob.row("queue").click()
    expect(bob.c("conv-labels").locator('[data-c="label-chip"]')).to_have_text(["VIP"])

    # a second label: white text on the dark one, the chips by name
    alice.page.get_by_role("checkbox", name="Refund").check()
    expect(alice.c("conv-labels").locator('[data-c="label-chip"]')).to_have_text(
        ["Refund", "VIP"])
    expect(bob.c("conv-labels").locator('[data-c="label-chip"]')).to_have_text(["Refund", "VIP"])
    refund_chip = bob.c("conv-labels").locator('[data-c="label-chip"]', has_text="Refund")
    expect(refund_chip).to_have_css("color", "rgb(255, 255, 255)")
    screenshot(alice.page, "console-labels.png")

    # taken off: gone from both
    alice.page.get_by_role("checkbox", name="VIP").uncheck()
    expect(alice.c("conv-labels").locator('[data-c="label-chip"]')).to_have_text(["Refund"])
    expect(bob.c("conv-labels").locator('[data-c="label-chip"]')).to_have_text(["Refund"])
    bob_vip = bob.page.locator(f'[data-c="label-option"][data-label="{vip.id}"]')
    expect(bob_vip).not_to_be_checked()  # his picker (closed) follows too

    # set elsewhere (another process, straight in the store), with a label made after
    # the consoles loaded theirs: both show it by its name and colour
    late = label(gw, "Callback", "#16a34a")
    set_labels(gw, conversation, vip, late)
    for desk in (alice, bob):
        expect(desk.c("conv-labels").locator('[data-c="label-chip"]')).to_have_text(
            ["Callback", "VIP"])
        expect(desk.row("queue").locator('[data-c="label-chip"]')).to_have_text(
            ["Callback", "VIP"])
    expect(alice.page.get_by_role("checkbox", name="Callback")).to_be_checked()
    alice_watch.check()
    bob_watch.check()


def stored_labels(gw: ThreadedGateway, conversation_id: str) -> list[dict[str, str]]:
    assert gw.app is not None
    store = gw.app[STORE]
    conversation = gw.call(store.get_conversation(conversation_id))
    assert conversation is not None
    every = {la.id: la for la in gw.call(Labels(store).all())}
    return [{"id": i, "name": every[i].name} for i in conversation.labels]


def test_the_queue_filters_by_a_label(
    console_gateway: ThreadedGateway, new_page: Callable[[], Page]
) -> None:
    gw = console_gateway
    email = agent(gw, "Alice")
    vip, refund = label(gw, "VIP", "#fde047"), label(gw, "Refund", "#1d4ed8")
    first = seed(gw, "v_1", "hello one", name="One")
    second = seed(gw, "v_2", "hello two", name="Two")
    third = seed(gw, "v_3", "hello three", name="Three")
    set_labels(gw, first, vip)
    set_labels(gw, second, refund)

    desk = Desk(new_page(), gw)
    watch = Watch(desk.page)
    filtered: list[str] = []
    desk.page.on("request", lambda r: filtered.append(r.url)
                 if "owner=queued" in r.url and "label=" in r.url else None)
    desk.signed_in(email)
    expect(desk.row("queue")).to_have_count(3)
    desk.c("queue-label").select_option(label="VIP")
    expect(desk.row("queue")).to_have_count(1)
    expect(desk.row("queue").first).to_have_attribute("data-id", first)
    expect(desk.c("queue-count")).to_have_text("1")
    assert filtered and f"label={vip.id}" in filtered[-1]  # asked of the server

    # live: labelled elsewhere, it joins; the label taken off, it leaves
    set_labels(gw, third, vip)
    expect(desk.row("queue")).to_have_count(2)
    set_labels(gw, first)
    expect(desk.row("queue")).to_have_count(1)
    expect(desk.row("queue").first).to_have_attribute("data-id", third)
    set_labels(gw, third, refund)
    expect(desk.row("queue")).to_have_count(0)
    expect(desk.page.locator('[data-c="queue"] .c-none')).to_have_text(
        "Nobody with the label VIP is waiting.")

    desk.c("queue-label").select_option(label="Refund")
    expect(desk.row("queue")).to_have_count(2)
    desk.c("queue-label").select_option("")
    expect(desk.row("queue")).to_have_count(3)
    expect(desk.c("queue-count")).to_have_text("3")
    watch.check()


def test_an_admin_manages_the_labels(
    console_gateway: ThreadedGateway, new_page: Callable[[], Page]
) -> None:
    gw = console_gateway
    assert gw.app is not None
    admin_email = agent(gw, "Ada", AgentRole.ADMIN)
    agent_email = agent(gw, "Alice")
    conversation = seed(gw, "v_jo", "hello", name="Jo")

    # an agent has no such section
    alice = Desk(new_page(), gw)
    alice_watch = Watch(alice.page)
    alice.signed_in(agent_email)
    expect(alice.c("manage-labels")).to_be_hidden()

    ada = Desk(new_page(), gw)
    watch = Watch(ada.page)
    ada.signed_in(admin_email)
    ada.c("manage-labels").locator("summary").click()
    ada.c("label-new-name").fill("Urgent")
    ada.c("label-new-color").fill("#dc2626")
    ada.c("label-new-name").press("Enter")
    rows = ada.page.locator('[data-c="manage-label"]')
    expect(rows).to_have_count(1)
    expect(rows.first.locator('[data-c="label-chip"]')).to_have_text("Urgent")
    expect(rows.first.locator('[data-c="label-chip"]')).to_have_css(
        "background-color", "rgb(220, 38, 38)")
    labels = gw.call(Labels(gw.app[STORE]).all())
    assert [(la.name, la.color) for la in labels] == [("Urgent", "#dc2626")]

    ada.c("label-new-name").fill("urgent")  # a taken name, whatever the case
    ada.c("label-add").click()
    expect(ada.c("manage-error")).to_contain_text("exists already")
    expect(rows).to_have_count(1)

    # renamed and recoloured; an agent's console picks it up
    set_labels(gw, conversation, labels[0])
    expect(alice.row("queue").locator('[data-c="label-chip"]')).to_have_text("Urgent")
    rows.first.locator('[data-c="label-name"]').fill("Callback")
    rows.first.locator('[data-c="label-color"]').fill("#16a34a")
    rows.first.locator('[data-c="label-save"]').click()
    expect(rows.first.locator('[data-c="label-chip"]')).to_have_text("Callback")
    assert [(la.name, la.color) for la in gw.call(Labels(gw.app[STORE]).all())] == [
        ("Callback", "#16a34a")]

    # deleted (a second click confirms): off the conversation, in Alice's queue too
    delete = rows.first.locator('[data-c="label-delete"]')
    delete.click()
    expect(delete).to_have_text("Delete: sure?")
    assert len(gw.call(Labels(gw.app[STORE]).all())) == 1
    delete.click()
    expect(rows).to_have_count(0)
    assert gw.call(Labels(gw.app[STORE]).all()) == []
    expect(alice.row("queue").locator('[data-c="label-chip"]')).to_have_count(0)
    # the 409 of the taken name, logged by Chromium as every failed request is
    assert len(watch.errors) == 1 and "status of 409" in watch.errors[0], watch.errors
    watch.errors.clear()
    watch.check()
    alice_watch.check()
