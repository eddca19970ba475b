"""The console's rough edges (issue 11, item 10) in headless Chromium, against a real
gateway: signing in with a conversation waiting shows it as yours at once (the lists by
REST must not undo a frame that came while they loaded), and the reply box of a
conversation the agent cannot answer says why and offers what can be done."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from playwright.sync_api import Page, Route, expect

from gateway.keys import PIPELINE, ROUTING, STORE
from gateway.model import OwnerState
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

pytestmark = pytest.mark.browser

LISTS = re.compile(r"/api/v1/conversations\?owner=")


def waiting_conversation(gw: ThreadedGateway, key: str) -> str:
    """A web chat conversation the bot handed off: in the queue."""
    assert gw.app is not None
    pipeline, routing = gw.app[PIPELINE], gw.app[ROUTING]
    conversation = gw.call(pipeline.open_conversation("webchat", key, key))
    assert gw.call(routing.handoff(conversation.id, "test: needs a human"))
    return conversation.id


def owner_of(gw: ThreadedGateway, conversation_id: str) -> tuple[OwnerState, str | None]:
    assert gw.app is not None
    conversation = gw.call(gw.app[STORE].get_conversation(conversation_id))
    assert conversation is not None
    return conversation.owner, conversation.assignee_id


def test_signing_in_with_a_conversation_waiting_shows_it_as_yours_at_once(
    console_gateway: ThreadedGateway, new_page: Callable[[], Page]
) -> None:
    gw = console_gateway
    assert gw.app is not None
    alice_id, email = add_agent(gw, "Alice")
    gw.call(gw.app[ROUTING].set_capacity(alice_id, 0))  # nothing for her until below
    conversation_id = waiting_conversation(gw, "v_waiting")
    desk = Desk(new_page(), gw)
    watch = Watch(desk.page)

    # The first load of the lists answers from before the assignment, and arrives after
    # the socket's frame that says it is hers: as when a sign-in is assigned at once.
    held: list[tuple[Route, Any]] = []

    def hold_first_load(route: Route) -> None:
        if len(held) >= 2:
            route.continue_()
            return
        held.append((route, route.fetch()))  # the lists as they are now: in the queue
        if len(held) < 2:
            return
        gw.call(gw.app[ROUTING].set_capacity(alice_id, 3))  # online: assigned at once
        wait_for(lambda: owner_of(gw, conversation_id) == (OwnerState.AGENT, alice_id), 10,
                 "the assignment")
        expect(desk.page.locator('[data-c="toast"]', has_text="Assigned to you")
               ).to_be_visible()  # the socket's frames came first
        for waiting, answer in held:
            waiting.fulfill(response=answer)

    desk.page.route(LISTS, hold_first_load)
    desk.signed_in(email)
    expect(desk.page.locator('[data-c="toast"]', has_text="Assigned to you")).to_be_visible()
    time.sleep(0.5)  # the held lists are in by now
    expect(desk.row("mine")).to_have_count(1)
    expect(desk.row("queue")).to_have_count(0)
    expect(desk.c("queue-count")).to_have_text("0")
    assert len(held) == 2
    watch.check()


def test_the_reply_box_says_what_can_be_done(
    console_gateway: ThreadedGateway, new_page: Callable[[], Page]
) -> None:
    gw = console_gateway
    _, email = add_agent(gw, "Alice")
    desk = Desk(new_page(), gw)
    watch = Watch(desk.page)
    desk.signed_in(email)
    desk.presence("away")  # no automatic assignment
    waiting_conversation(gw, "v_states")
    state, action, reply = desk.c("composer-state"), desk.c("composer-action"), desk.c("reply")

    # queued: claim it, from the reply box too
    desk.row("queue").click()
    expect(desk.c("conv-owner")).to_have_attribute("data-owner", "queued")
    expect(state).to_have_attribute("data-state", "queued")
    expect(state).to_contain_text("Waiting in the queue: claim it to reply")
    expect(action).to_have_text("Claim")
    expect(desk.c("send")).to_be_disabled()
    action.click()
    expect(desk.c("conv-owner")).to_have_text("assigned to you")
    expect(state).to_be_hidden()
    expect(reply).to_have_attribute("placeholder", "Reply to the customer…")
    desk.write("Hi, Alice here.")

    # resolved: no claim (the API has none for it); it opens again when the customer
    # writes, and a note can still be added
    desk.c("resolve").click()
    expect(desk.c("conv-owner")).to_have_attribute("data-owner", "resolved")
    expect(state).to_have_attribute("data-state", "resolved")
    expect(state).to_contain_text("Resolved. It opens again when the customer writes")
    expect(state).to_contain_text("A private note can still be added.")
    expect(reply).to_have_attribute("placeholder",
                                    "Resolved: it opens again when the customer writes")
    expect(desk.c("claim")).to_be_hidden()
    expect(desk.c("send")).to_be_disabled()
    screenshot(desk.page, "console-resolved.png")
    expect(action).to_have_text("Write a private note")
    action.click()
    expect(desk.c("note-toggle")).to_be_checked()
    expect(reply).to_be_focused()
    expect(state).to_be_hidden()
    desk.write("Follow up on Monday", note=True)
    expect(desk.items(private="true")).to_have_count(1)
    watch.check()
