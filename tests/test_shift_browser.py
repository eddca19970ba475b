"""Issue 5's "done when", as one shift in headless Chromium against a real gateway.

Two agents sign in to the console (Alice: skill billing, Bob: skill orders), two customers
write: Carla in the web chat widget of the demo page, Dan on Telegram (the fake Bot API of
tests/fakes/telegram_api.py; updates posted to the gateway's webhook as Telegram does).
Each handoff is routed by skill to the right agent's "my conversations". Alice answers
Carla in the widget; Carla presses "Continue on Telegram", starts the bot from her phone
(a third Telegram user) and goes on there: the same conversation, with Alice, in one
timeline with the web chat; Alice's reply goes to Telegram. Bob helps Dan and resolves,
Alice resolves; both answer the CSAT question on Telegram. An admin opens the analytics
page for today: the shift's figures. Screenshots: $OMNIGATE_TEST_ARTIFACTS
(default tests/artifacts/).
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from gateway.keys import AGENTS
from gateway.model import AgentRole
from gateway.settings import Settings
from tests.console_rig import (  # noqa: F401 - fixtures, collected from this module
    PASSWORD,
    Desk,
    Watch,
    browser,
    browser_type,
    browser_type_launch_args,
    launch_browser,
    new_page_fixture,
    playwright,
    screenshot,
)
from tests.fakes.telegram_api import People
from tests.test_analytics_browser import TOTAL, card, cell, groups, reason
from tests.test_browser import MSG, Problems, message, open_chat, say, wait_for
from tests.test_identity import CONNECTED
from tests.test_widget_browser import TELEGRAM, TelegramGateway

pytestmark = pytest.mark.browser

EXAMPLE_FLOWS = Path(__file__).resolve().parent.parent / "examples" / "flows"
# The shift's addition to the example bot: billing questions go to a colleague with the
# billing skill. (Order questions the bot cannot answer already go to skill "orders".)
BILLING_FLOW = """\
intents:
  billing:
    examples: ["I was charged twice", "I was charged twice for my subscription",
               "my invoice is wrong", "question about my invoice", "billing problem",
               "double charge on my card"]

flows:
  billing:
    description: Billing questions go straight to a colleague with the billing skill.
    when: {intent: billing}
    steps:
      - handoff:
          reason: "billing question"
          skill: billing
          say: "I'm bringing in a colleague from billing. They'll see this conversation."
"""
BILLING_REASON = "billing question"
ORDERS_REASON = "order status: could not check order 99999"
CARLA_PHONE, DAN = 5001, 5002  # Telegram user ids
CSAT_QUESTION = "How satisfied are you"
THANKS = "Thank you for your feedback!"


@pytest.fixture
def shift_gateway(mongo_uri: str, tmp_path: Path) -> Iterator[TelegramGateway]:
    """The whole gateway: web chat, Telegram (webhook, fake Bot API), the example flows
    plus the billing flow, the example actions, CSAT on."""
    flows = tmp_path / "flows"
    shutil.copytree(EXAMPLE_FLOWS, flows)
    (flows / "billing.yaml").write_text(BILLING_FLOW, encoding="utf-8")
    settings = Settings(
        mongodb_uri=mongo_uri, mongodb_db=f"t_{uuid.uuid4().hex[:16]}",
        data_dir=tmp_path / "data", outbox_sweep_seconds=0.2, csat=True,
        flows_dir=flows, actions_package="examples.actions",
    )
    gw = TelegramGateway(settings)
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()


def add_agent(gw: TelegramGateway, name: str, *, role: AgentRole = AgentRole.AGENT,
              skills: tuple[str, ...] = ()) -> str:
    """An agent who signs in with a password; returns the email."""
    assert gw.app is not None
    email = f"{name.lower()}@desk.test"
    gw.call(gw.app[AGENTS].add(name, email, role=role, skills=skills, capacity=2,
                               password=PASSWORD))
    return email


class Phone:
    """Someone on Telegram: updates posted to the gateway's webhook, what the bot sent
    read from the fake Bot API."""

    def __init__(self, gw: TelegramGateway, user_id: int, name: str) -> None:
        self.gw, self.id = gw, user_id
        self.people = People(gw.fake)
        self.user = self.people.user(user_id, name)

    def texts(self) -> list[str]:
        return self.gw.fake.texts(self.id)

    def post(self, update: dict[str, Any]) -> None:
        assert self.gw.call(self.gw.deliver(update)) == 200

    def say(self, text: str) -> None:
        self.post(self.people.message(self.user, text=text))

    def until(self, prefix: str) -> str:
        """Wait for a message to this chat starting with ``prefix``; returns it."""
        found = wait_for(lambda: [t for t in self.texts() if t.startswith(prefix)], 15,
                         f"Telegram chat {self.id} gets {prefix!r}")
        return found[-1]

    def press(self, prefix: str, value: str) -> None:
        """Press ``value`` under the newest message to this chat starting with ``prefix``."""
        [*_, sent] = [c for c in self.gw.fake.of("sendMessage")
                      if c.params["chat_id"] == self.id and c.params["text"].startswith(prefix)]
        self.post(self.people.press(self.user, sent.result, value))


def test_two_agents_two_customers_a_channel_switch_and_the_days_figures(
    shift_gateway: TelegramGateway, new_page: Callable[[], Page]
) -> None:
    gw = shift_gateway
    alice_email = add_agent(gw, "Alice", skills=("billing",))
    bob_email = add_agent(gw, "Bob", skills=("orders",))
    root_email = add_agent(gw, "Root", role=AgentRole.ADMIN)

    # the shift starts: both agents sign in (online)
    alice, bob = Desk(new_page(), gw), Desk(new_page(), gw)
    alice_watch, bob_watch = Watch(alice.page), Watch(bob.page)
    alice.signed_in(alice_email)
    bob.signed_in(bob_email)

    # ------------------------------------------------ 1. handoffs routed by skill
    carla = new_page()
    carla_problems = Problems(carla)
    open_chat(carla, gw)
    say(carla, "I was charged twice for my subscription")
    expect(message(carla, "bot", "colleague from billing")).to_be_visible()
    expect(carla.locator(f'{MSG}[data-event="handoff"]')).to_be_visible()
    expect(carla.locator(f'{MSG}[data-event="assigned"]')).to_contain_text("Alice")
    expect(alice.row("mine")).to_have_count(1)
    expect(alice.row("mine").locator('[data-channel="webchat"]')).to_have_text("Web")
    expect(alice.row("mine")).to_contain_text(BILLING_REASON)

    dan = Phone(gw, DAN, "Dan")
    dan.say("where is my order 99999")
    dan.until("I couldn't find order 99999.")
    dan.until("A colleague from the orders team will look into it for you.")
    expect(bob.row("mine")).to_have_count(1)
    expect(bob.row("mine").locator('[data-channel="telegram"]')).to_have_text("TG")
    expect(bob.row("mine")).to_contain_text(ORDERS_REASON)
    expect(bob.row("mine").locator('[data-c="priority"]')).to_have_text("high")
    # and not the other way round: nobody waits, each has only their own
    expect(alice.row("mine")).to_have_count(1)
    expect(alice.row("mine")).not_to_contain_text(ORDERS_REASON)
    expect(bob.row("mine")).not_to_contain_text(BILLING_REASON)
    for desk in (alice, bob):
        expect(desk.row("queue")).to_have_count(0)
        expect(desk.c("mine-count")).to_have_text("1")

    # ------------------------------------------------ 2. Alice answers in the widget
    alice.row("mine").click()
    expect(alice.c("items")).to_have_attribute("data-loaded", "true")
    expect(alice.c("conv-owner")).to_have_text("assigned to you")
    expect(alice.items(role="customer", channel="webchat").filter(
        has_text="charged twice")).to_have_count(1)
    expect(alice.items(event="handoff")).to_have_count(1)
    alice.write("Hi, Alice from billing here. I can see two charges; let me check.")
    expect(message(carla, "agent", "Alice from billing here")).to_have_count(1)
    say(carla, "Thanks! I have to leave my desk, though.")
    expect(alice.items(role="customer", channel="webchat").filter(
        has_text="leave my desk")).to_have_count(1)

    # ------------------------------------------------ 3. Carla goes on on Telegram
    button = carla.locator(TELEGRAM)
    expect(button).to_be_visible()
    expect(button).to_have_text("Continue on Telegram")
    carla.context.route("https://t.me/**", lambda route: route.fulfill(
        status=200, content_type="text/html", body="<title>Telegram</title>"))
    with carla.expect_popup() as opened:
        button.click()
    telegram_page = opened.value
    link = telegram_page.url
    assert link.startswith("https://t.me/omnigate_test_bot?start=link_"), link
    payload = link.split("start=", 1)[1]
    telegram_page.close()

    phone = Phone(gw, CARLA_PHONE, "Carla")
    phone.say(f"/start {payload}")  # what Telegram sends when she presses Start
    phone.until(CONNECTED)
    phone.say("On my phone now. The second charge is 19.99 EUR on 3 May.")

    # Alice sees it in the open conversation, with a Telegram badge, below the web chat
    on_telegram = alice.items(role="customer", channel="telegram").filter(
        has_text="second charge is 19.99 EUR")
    expect(on_telegram).to_have_count(1)
    expect(on_telegram.locator('[data-channel="telegram"]')).to_have_text("TG")
    expect(on_telegram.locator('[data-channel="telegram"]')).to_have_attribute(
        "title", "Telegram")
    expect(alice.row("mine")).to_have_count(1)  # the same conversation, still Alice's
    expect(alice.row("mine").locator('[data-channel="telegram"]')).to_have_text("TG")
    items = alice.items()
    conversations = set(items.evaluate_all("els => els.map(e => e.dataset.conversation)"))
    assert len(conversations) == 1, conversations  # one conversation
    timeline = items.evaluate_all(
        "els => els.map(e => [Number(e.dataset.seq), e.dataset.channel, e.dataset.role,"
        " e.querySelector('[data-c=text]')?.textContent || e.dataset.event || ''])")
    seqs = [seq for seq, *_ in timeline]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), timeline
    said = [(channel, text) for _, channel, role, text in timeline if role == "customer"]
    assert said[0] == ("webchat", "I was charged twice for my subscription"), said
    assert said[-1] == (
        "telegram", "On my phone now. The second charge is 19.99 EUR on 3 May."), said
    assert ("webchat", "Thanks! I have to leave my desk, though.") in said
    # the reply box now offers Telegram, where she wrote last
    expect(alice.c("reply-channel")).to_have_value("telegram")
    expect(alice.c("identities").locator('[data-channel="telegram"]')).to_have_count(1)
    screenshot(alice.page, "shift-alice-channel-switch.png")

    # Alice's reply goes to Telegram, not to the web chat
    refund = "I've refunded the 19.99 EUR charge; you'll see it within 3 days."
    alice.write(refund)
    expect(alice.items(role="agent", channel="telegram").filter(has_text="refunded")
           ).to_have_count(1)
    assert phone.until(f"Alice: {refund}") == f"Alice: {refund}"
    phone.say("Great, thank you!")
    expect(alice.items(role="customer", channel="telegram").filter(
        has_text="Great, thank you!")).to_have_count(1)
    alice.write("You're welcome, Carla! Anything else?")  # still where she wrote last
    phone.until("Alice: You're welcome, Carla!")
    expect(alice.items(role="agent", channel="telegram")).to_have_count(2)
    expect(message(carla, "agent", "refunded")).to_have_count(0)
    expect(message(carla, "agent", "You're welcome")).to_have_count(0)
    assert not [t for t in dan.texts() if "refunded" in t]

    # ------------------------------------------------ 4. Bob helps Dan; both resolve
    bob.row("mine").click()
    expect(bob.c("items")).to_have_attribute("data-loaded", "true")
    expect(bob.items(role="customer", channel="telegram").filter(
        has_text="where is my order 99999")).to_have_count(1)
    bob.write("Hi Dan, Bob here. Order 99999 was placed under your other address: "
              "it ships tomorrow.")
    dan.until("Bob: Hi Dan, Bob here.")
    bob.c("resolve").click()
    expect(bob.c("conv-owner")).to_have_attribute("data-owner", "resolved")
    expect(bob.row("mine")).to_have_count(0)
    dan.until(CSAT_QUESTION)
    dan.press(CSAT_QUESTION, "csat:5")
    dan.until(THANKS)

    alice.c("resolve").click()
    expect(alice.c("conv-owner")).to_have_attribute("data-owner", "resolved")
    expect(alice.row("mine")).to_have_count(0)
    phone.until(CSAT_QUESTION)  # asked where she wrote last
    phone.press(CSAT_QUESTION, "csat:4")
    phone.until(THANKS)
    expect(carla.locator(MSG, has_text=CSAT_QUESTION)).to_have_count(0)
    for watch in (alice_watch, bob_watch):
        watch.check()
    carla_problems.check()

    # ------------------------------------------------ 5. the day's figures
    admin = Desk(new_page(), gw)
    admin_watch = Watch(admin.page)
    admin.signed_in(root_email)
    admin.c("nav-analytics").click()
    page = admin.page
    expect(page).to_have_title("Omnigate: analytics")
    expect(page.locator('[data-an="who"]')).to_have_text("Root (admin)")
    page.get_by_role("button", name="Today").click()
    expect(page.get_by_role("button", name="Today")).to_have_attribute("aria-pressed", "true")
    assert "preset=today" in page.url
    expect(card(page, "started")).to_have_text("2")
    expect(card(page, "ended")).to_have_text("2")
    expect(card(page, "handed_off")).to_have_text("2")
    expect(card(page, "containment")).to_have_text("0%")
    expect(card(page, "sla_breaches")).to_have_text("0")
    expect(card(page, "csat")).to_have_text("4.5")
    # per channel: Carla's conversation began in the web chat, Dan's on Telegram
    assert groups(page, "volume") == [TOTAL, "telegram", "webchat"]
    for channel in ("telegram", "webchat"):
        expect(cell(page, "volume", channel, "started")).to_have_text("1")
        expect(cell(page, "volume", channel, "ended")).to_have_text("1")
        expect(cell(page, "volume", channel, "handed_off")).to_have_text("1")
        expect(cell(page, "volume", channel, "bot_contained")).to_have_text("0")
    # the reasons
    expect(reason(page, TOTAL, BILLING_REASON)).to_have_text("1")
    expect(reason(page, TOTAL, ORDERS_REASON)).to_have_text("1")
    expect(reason(page, "webchat", BILLING_REASON)).to_have_text("1")
    expect(reason(page, "telegram", ORDERS_REASON)).to_have_text("1")
    # first response and resolution times: both conversations have them
    expect(cell(page, "times", TOTAL, "first_response_count")).to_have_text("2")
    expect(cell(page, "times", TOTAL, "resolution_count")).to_have_text("2")
    seconds = re.compile(r"^\d+ s$|^\d+ min( \d+ s)?$")
    for group in (TOTAL, "telegram", "webchat"):
        for fig in ("first_response_median", "resolution_median"):
            expect(cell(page, "times", group, fig)).to_have_text(seconds)
    # SLA (the default targets, none missed) and CSAT (5 from Dan, 4 from Carla)
    expect(cell(page, "sla", TOTAL, "with_sla")).to_have_text("2")
    expect(cell(page, "sla", TOTAL, "first_response_breaches")).to_have_text("0")
    expect(cell(page, "csat", TOTAL, "asked")).to_have_text("2")
    expect(cell(page, "csat", TOTAL, "answered")).to_have_text("2")
    expect(cell(page, "csat", "telegram", "average")).to_have_text("5.0")
    expect(cell(page, "csat", "webchat", "average")).to_have_text("4.0")
    expect(cell(page, "csat", TOTAL, "d4")).to_have_text("1")
    expect(cell(page, "csat", TOTAL, "d5")).to_have_text("1")
    screenshot(page, "shift-analytics.png")

    # the same figures as the REST API's, to the second
    response = page.request.get(gw.url + "/api/v1/analytics?" + page.evaluate(
        "new URLSearchParams({from: new Date(new Date().setHours(0, 0, 0, 0)).toISOString(),"
        " to: new Date(Date.now() + 120000).toISOString()}).toString()"))
    assert response.status == 200, response.text()
    api = json.loads(response.text())["total"]["times"]
    for fig, which in (("first_response_median", "first_response"),
                       ("resolution_median", "resolution")):
        raw = cell(page, "times", TOTAL, fig).get_attribute("data-raw")
        assert raw is not None and float(raw) == pytest.approx(api[which]["median_seconds"])

    # per topic: the flow that handed off
    page.locator('[data-an="by"]').select_option("topic")
    expect(cell(page, "volume", "billing", "ended")).to_have_text("1")
    expect(cell(page, "volume", "order_status", "ended")).to_have_text("1")
    assert groups(page, "volume") == [TOTAL, "billing", "order_status"]
    admin_watch.check()

