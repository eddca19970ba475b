"""The demo page at ``/``: the real widget, and what to try with it, said as this gateway
runs (the channels the chat can move to are those turned on; nothing is promised that is
off)."""

from __future__ import annotations

import html
from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).resolve().parent / "static"
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
CHANNELS_MARK = "<!-- channels -->"
# What the widget offers under the conversation for each channel it can link to
# (docs/webchat-protocol.md, the welcome's `links`), in the order said.
OFFERS = {
    "email": "link your email address (a code is mailed to you)",
    "telegram": "continue the same chat on Telegram",
    "slack": "continue it in a direct message in Slack",
}


class DemoPage:
    """The page, knowing the channels a visitor can link (set when web chat starts)."""

    def __init__(self) -> None:
        self.channels: frozenset[str] = frozenset()

    def channels_text(self) -> str:
        offers = [text for channel, text in OFFERS.items() if channel in self.channels]
        if not offers:
            return ("This gateway runs the web chat only; with email, Telegram or Slack set "
                    "up, the widget also offers to continue the chat there.")
        said = offers[0] if len(offers) == 1 else ", ".join(offers[:-1]) + " or " + offers[-1]
        return f"Under the conversation you can {said}."

    def render(self) -> bytes:
        page = (STATIC / "demo.html").read_text(encoding="utf-8")
        return page.replace(CHANNELS_MARK, html.escape(self.channels_text())).encode()


DEMO = web.AppKey("webchat_demo", DemoPage)


async def demo_page(request: web.Request) -> web.StreamResponse:
    page = request.config_dict.get(DEMO) or DemoPage()
    return web.Response(
        body=page.render(),
        content_type="text/html",
        charset="utf-8",
        headers={
            "Content-Security-Policy": PAGE_CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )
