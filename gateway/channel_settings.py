"""Typed settings of each optional channel, built from the flat ``OMNIGATE_*`` variables.

A channel whose settings are all absent is off. A channel with some but not all of what
it needs is a settings error that names the missing variable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TELEGRAM_API = "https://api.telegram.org"
SLACK_API = "https://slack.com/api/"

TlsMode = Literal["ssl", "starttls", "none"]


@dataclass(frozen=True, slots=True)
class TelegramSettings:
    token: str
    mode: Literal["webhook", "polling"] = "webhook"
    webhook_secret: str | None = None  # required in webhook mode
    webhook_url: str | None = None  # when set, setWebhook is called at start-up
    api_url: str = TELEGRAM_API  # Bot API server base (tests: a local fake)


@dataclass(frozen=True, slots=True)
class SlackSettings:
    bot_token: str
    signing_secret: str | None = None  # required for HTTP events
    app_token: str | None = None  # when set: Socket Mode instead of HTTP events
    api_url: str = SLACK_API  # Web API base (tests: a local fake)


@dataclass(frozen=True, slots=True)
class MailServer:
    host: str
    port: int
    user: str | None
    password: str | None
    tls: TlsMode


@dataclass(frozen=True, slots=True)
class EmailSettings:
    address: str  # the support address; its domain is used for Message-IDs
    imap: MailServer | None  # inbound by IMAP (IDLE, polling fallback)
    smtp: MailServer  # outbound
    smtp_listen: tuple[str, int] | None = None  # also accept mail directly (aiosmtpd)
    share_listen: bool = False  # serve --workers N: every worker accepts on smtp_listen


def default_port(kind: Literal["imap", "smtp"], tls: TlsMode) -> int:
    if kind == "imap":
        return 993 if tls == "ssl" else 143
    return {"ssl": 465, "starttls": 587, "none": 25}[tls]
