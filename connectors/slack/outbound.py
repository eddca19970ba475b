"""What we send to Slack: stored items rendered as chat.postMessage calls, and how Slack's
errors map onto the outbox's retry rules."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState

from connectors.base import DeliveryError
from gateway.model import Activity, Button

MAX_SECTION = 3000  # characters of a section block's text (and so of one part we post)
MAX_BUTTON_TEXT = 75
BUTTONS_PER_BLOCK = 25
MAX_BUTTONS = 100
MAX_RETRY_AFTER = 3600.0
# Written into every message we post, so a retry can find what an earlier attempt posted.
METADATA_EVENT = "omnigate_item"
ACTION_PREFIX = "omnigate:"

# The token or the app is unusable: nothing will work until someone fixes it.
AUTH_ERRORS = frozenset({
    "invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired",
    "no_permission", "missing_scope", "org_login_required", "ekm_access_denied",
    "team_access_not_granted", "not_allowed_token_type",
})
# The customer cannot be reached where the conversation lives.
UNREACHABLE_ERRORS = frozenset({
    "channel_not_found", "is_archived", "not_in_channel", "user_not_found",
    "user_disabled", "cannot_dm_bot",
})
# Slack's side failed: try again later (and check first whether it posted anyway).
TRANSIENT_ERRORS = frozenset({
    "ratelimited", "rate_limited", "fatal_error", "internal_error", "request_timeout",
    "service_unavailable", "team_added_to_org",
})


@dataclass(frozen=True, slots=True)
class Part:
    """One chat.postMessage: its notification text and its blocks (if any)."""

    text: str
    blocks: list[dict[str, Any]] | None = None


def escape(text: str) -> str:
    """Slack's three control characters (the only escaping its mrkdwn needs)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def split_text(text: str, limit: int = MAX_SECTION) -> list[str]:
    """Escaped text in parts of at most ``limit`` characters, cut at a line or word break
    when there is one in the second half, and never inside an ``&…;`` entity."""
    parts: list[str] = []
    while len(text) > limit:
        cut = max(text.rfind("\n", limit // 2, limit), text.rfind(" ", limit // 2, limit))
        if cut <= 0:
            cut = limit
            entity = text.rfind("&", cut - 5, cut)
            if entity != -1 and ";" not in text[entity:cut]:
                cut = entity
        parts.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    if text.strip():
        parts.append(text)
    return [p for p in parts if p]


def _link(url: str, name: str | None) -> str | None:
    if not url.startswith(("https://", "http://")):
        return None
    safe = url.replace("|", "%7C").replace(">", "%3E").replace("<", "%3C")
    return f"<{safe}|{escape(name or url)}>"


def button_blocks(buttons: list[Button]) -> list[dict[str, Any]]:
    """Block Kit actions blocks; a press comes back with ``value`` as the choice."""
    elements: list[dict[str, Any]] = []
    for index, button in enumerate(buttons[:MAX_BUTTONS]):
        title = button.title
        if len(title) > MAX_BUTTON_TEXT:
            title = title[: MAX_BUTTON_TEXT - 1] + "…"
        element: dict[str, Any] = {
            "type": "button",
            "action_id": f"{ACTION_PREFIX}{index}",
            "text": {"type": "plain_text", "text": title, "emoji": True},
        }
        if button.url is None:
            element["value"] = button.value
        elif button.url.startswith(("https://", "http://")):
            element["url"] = button.url  # opens it; its press carries no value: ignored
        else:
            continue  # a mailto: link stays in the text
        elements.append(element)
    return [
        {"type": "actions", "block_id": f"{ACTION_PREFIX}buttons:{n}",
         "elements": elements[start : start + BUTTONS_PER_BLOCK]}
        for n, start in enumerate(range(0, len(elements), BUTTONS_PER_BLOCK))
    ]


def render_message(item: Activity, author: str | None = None) -> list[Part]:
    """A message as one or more posts; the buttons ride on the last one.

    ``author``: shown as a bold prefix (an agent's name, when Slack would not show it as
    the message's username).
    """
    text = escape(item.text or "")
    if author and text:
        text = f"*{escape(author)}:* {text}"
    links = [link for a in item.attachments if a.url and (link := _link(a.url, a.name))]
    body = "\n".join([text, *links]) if links else text
    chunks = split_text(body)
    if not item.buttons:
        return [Part(chunk) for chunk in chunks]
    actions = button_blocks(item.buttons)
    if not chunks:
        return [Part(escape(", ".join(b.title for b in item.buttons)), actions)]
    last = chunks[-1]
    section = {"type": "section", "text": {"type": "mrkdwn", "text": last}}
    return [*(Part(c) for c in chunks[:-1]), Part(last, [section, *actions])]


def render_event(item: Activity) -> list[Part]:
    """A conversation event (handoff, an agent joined, ...) as a small grey context line."""
    if not item.text:
        return []
    text = escape(item.text)[: MAX_SECTION - 2]
    context = {"type": "context", "elements": [{"type": "mrkdwn", "text": f"_{text}_"}]}
    return [Part(text, [context])]


def retry_after(headers: Mapping[str, Any] | None, default: float | None = 1.0) -> float | None:
    """The Retry-After header in seconds (capped), or ``default`` when absent or unreadable."""
    for name, value in (headers or {}).items():
        if name.lower() == "retry-after":
            raw = value[0] if isinstance(value, list) and value else value
            try:
                seconds = float(str(raw))
            except ValueError:
                return default
            return min(max(seconds, 0.0), MAX_RETRY_AFTER) if math.isfinite(seconds) else default
    return default


class ShortRateLimitRetry(AsyncRateLimitErrorRetryHandler):
    """slack_sdk's 429 handler, waiting in place only when Slack asks for a short wait.

    A 429 means Slack did not post the message, so repeating the request cannot post it
    twice. Longer waits go back to the outbox as ``retry_after``, so a delivery worker never
    sleeps for minutes while it holds its lease.
    """

    def __init__(self, max_wait: float, max_retry_count: int = 2) -> None:
        super().__init__(max_retry_count=max_retry_count)
        self.max_wait = max_wait

    async def _can_retry_async(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> bool:
        if response is None or response.status_code != 429:
            return False
        wait = retry_after(response.headers, default=None)
        # the parent sleeps int(Retry-After) + up to 1 s; it needs a whole number
        return wait is not None and wait <= self.max_wait and wait == int(wait)


@dataclass(frozen=True, slots=True)
class Failure:
    error: DeliveryError
    code: str
    unreachable: bool = False


def api_error_code(exc: SlackApiError) -> tuple[int, str]:
    """(HTTP status, Slack's error code) of a failed call, whatever its body was."""
    response = exc.response
    status = getattr(response, "status_code", None) or getattr(response, "status", 0) or 0
    data = getattr(response, "data", None)
    code = data.get("error") if isinstance(data, dict) else None
    return int(status), str(code or f"http_{status}")


def classify(exc: SlackApiError) -> Failure:
    """Permanent (never retried), transient, or rate limited (with Slack's Retry-After)."""
    status, code = api_error_code(exc)
    if status == 429 or code in ("ratelimited", "rate_limited"):
        headers = getattr(exc.response, "headers", None)
        wait = retry_after(headers if isinstance(headers, Mapping) else None)
        return Failure(DeliveryError(f"slack: {code} (retry in {wait} s)", retry_after=wait), code)
    if status >= 500 or code in TRANSIENT_ERRORS:
        return Failure(DeliveryError(f"slack: {code} (HTTP {status})"), code)
    if code in UNREACHABLE_ERRORS:
        return Failure(DeliveryError(f"slack: {code}", permanent=True), code, unreachable=True)
    # invalid_auth and friends, and every request Slack refused as wrong (msg_too_long,
    # invalid_blocks, ...): the same request would fail again.
    return Failure(DeliveryError(f"slack: {code}", permanent=True), code)
