"""The demo page at / says what this gateway runs: the channels the chat can move to are
those turned on (no email linking promised with email off), and the sample orders the
shipped example flows know."""

from __future__ import annotations

import re

from connectors.webchat.demo import DemoPage
from examples.actions.orders import ORDERS
from tests.conftest import Gateway


def text_of(page: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", page))


async def test_the_demo_page_promises_only_what_runs(gateway: Gateway) -> None:
    async with gateway.http.get(gateway.url + "/") as response:
        assert response.status == 200
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]
        page = await response.text()
    text = text_of(page)
    assert "link your email" not in text and "on Telegram" not in text
    assert "This gateway runs the web chat only" in text
    # the orders the example shop knows, as examples/actions/orders.py has them
    shown = set(re.findall(r"<code>(\d{5})</code>", page))
    assert shown == set(ORDERS) == {"10045", "10046"}
    assert "10045 (shipped)" in text and ORDERS["10045"]["status"] == "shipped"
    assert "10046 (being prepared)" in text and ORDERS["10046"]["status"] == "processing"


def test_the_channels_sentence_names_each_channel_that_is_on() -> None:
    page = DemoPage()
    page.channels = frozenset({"email"})
    assert page.channels_text() == ("Under the conversation you can link your email address "
                                    "(a code is mailed to you).")
    page.channels = frozenset({"email", "telegram", "slack"})
    assert page.channels_text() == (
        "Under the conversation you can link your email address (a code is mailed to you), "
        "continue the same chat on Telegram or continue it in a direct message in Slack.")
    page.channels = frozenset({"telegram"})
    rendered = page.render().decode()
    assert "continue the same chat on Telegram." in rendered
    assert "link your email" not in rendered and "<!-- channels -->" not in rendered
