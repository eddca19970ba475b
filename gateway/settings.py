"""One validated settings tree, read from ``OMNIGATE_*`` environment variables.

Command-line options override the environment. A bad value stops start-up with a message
that names the setting (``OMNIGATE_PORT: ...``), never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gateway.channel_settings import (
    SLACK_API,
    TELEGRAM_API,
    EmailSettings,
    MailServer,
    SlackSettings,
    TelegramSettings,
    TlsMode,
    default_port,
)
from gateway.hours import ALWAYS_OPEN, TeamHours, load_teams
from gateway.proxies import Network, parse_networks
from gateway.sla import DEFAULT_TARGETS_TEXT, Target, parse_targets

ENV_PREFIX = "OMNIGATE_"
DEFAULT_FLOWS_DIR = Path(__file__).resolve().parent.parent / "examples" / "flows"
EXAMPLE_ACTIONS = "examples.actions"  # the custom actions the example flows call


class SettingsError(Exception):
    """Settings failed validation; ``str()`` is a readable, multi-line explanation."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64)  # serve --workers N: N processes on one port
    data_dir: Path = Path(".omnigate")
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")
    # Observability (gateway/logs.py, gateway/metrics.py, docs/metrics.md)
    log_format: Literal["text", "json"] = "text"
    access_log: bool = False
    metrics: bool = True  # GET /metrics
    metrics_token: str | None = Field(None, pattern=r"^[\x21-\x7e]{16,512}$")

    # Store. Unset: start the embedded SecantusDB server in data_dir/db.
    mongodb_uri: str | None = None
    mongodb_db: str = Field("omnigate", pattern=r"^[A-Za-z0-9_-]{1,63}$")
    # Embedded store: fsync every commit so an acknowledged write survives a crash.
    embedded_sync_on_commit: bool = True

    # Bot: the directory with the flow files (*.yaml), reloaded live when they change.
    flows_dir: Path = DEFAULT_FLOWS_DIR
    flows_hot_reload: bool = True
    # Custom actions (rasa-sdk Action classes): run in-process from this package
    # (importable, e.g. "examples.actions"), or by a remote rasa-sdk action server.
    actions_package: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*$")
    action_server_url: str | None = Field(None, pattern=r"^https?://")

    # Web chat
    webchat_allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    webchat_max_frame_bytes: int = Field(65536, ge=1024, le=1024 * 1024)
    webchat_max_text: int = Field(4000, ge=1, le=100_000)
    # Rate limits (gateway/ratelimit.py), per gateway process, 0 = off: new sockets per
    # client address (burst: the same number), messages per visitor (with a burst).
    webchat_connects_per_minute: int = Field(120, ge=0, le=1_000_000)
    webchat_messages_per_minute: int = Field(600, ge=0, le=1_000_000)
    webchat_message_burst: int = Field(30, ge=1, le=1_000_000)
    # The page that shows the chat widget: links that continue a conversation in the web
    # chat open it (unset: no such links are offered on the other channels).
    webchat_page_url: str | None = Field(None, pattern=r"^https?://[^#\s]+$")
    # Webhook requests (POST /webhooks/...) per client address per second (burst: 2 s).
    webhook_requests_per_second: int = Field(200, ge=0, le=1_000_000)
    # Signs web chat visitor tokens (unset: a random key kept in the store, shared by
    # every process on it). 32-512 printable characters.
    secret_key: str | None = Field(None, pattern=r"^[\x21-\x7e]{32,512}$")
    # Reverse proxies (gateway/proxies.py): from a peer in these networks X-Forwarded-For
    # and X-Forwarded-Proto give the client's address and scheme; empty: trust none.
    trusted_proxies: Annotated[list[Network], NoDecode] = Field(default_factory=list)

    # Attachments (gateway/files.py): a file over this many bytes is not kept (the
    # customer is told); 20 MB is what Telegram lets bots download.
    max_attachment_bytes: int = Field(20 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)

    # Retention (gateway/retention.py, docs/data-rights.md): conversations resolved longer
    # ago than this many days are deleted, their analytics kept anonymised (unset: kept
    # for ever); checked every hour by one gateway process, or `omnigate retention`.
    retention_days: int | None = Field(None, ge=1, le=36500)

    # Outbox
    outbox_max_attempts: int = Field(8, ge=1, le=100)
    outbox_sweep_seconds: float = Field(2.0, gt=0, le=300)

    # Routing: an agent offline this long gets their conversations re-queued; the
    # sweeper (re-queue, assignment safety net, load repair) runs this often.
    agent_offline_grace_seconds: float = Field(120.0, ge=0, le=86400)
    routing_sweep_seconds: float = Field(5.0, gt=0, le=300)

    # Service levels (gateway/sla.py): first response/resolution per priority, measured in
    # each team's business hours (OMNIGATE_TEAMS_FILE, gateway/hours.py; none: always open);
    # the breach checker runs this often.
    sla_targets: str = DEFAULT_TARGETS_TEXT
    teams_file: Path | None = None
    sla_check_seconds: float = Field(15.0, gt=0, le=3600)

    # CSAT (gateway/csat.py): after an agent resolves (and, with csat_after_bot, after the
    # bot does), ask the customer to rate the help 1-5; answers count within the window.
    csat: bool = False
    csat_after_bot: bool = False
    csat_question: str = Field(
        "How satisfied are you with the help you got? Rate us from 1 (poor) to 5 (excellent).",
        min_length=1, max_length=1000)
    csat_thanks: str = Field("Thank you for your feedback!", min_length=1, max_length=1000)
    csat_window_hours: float = Field(24.0, gt=0, le=24 * 30)

    # Idle conversations (gateway/idle.py): one with no activity for this many hours
    # (bot, queued or with an agent) is resolved, counted as abandoned (0: never); the
    # customer is told (idle_resolve_notice) with idle_resolve_text.
    idle_resolve_hours: float = Field(24.0, ge=0, le=24 * 365)
    idle_resolve_notice: bool = True
    idle_resolve_text: str = Field(
        "We closed this conversation as there was no activity for a while. "
        "Write to us any time to continue.", min_length=1, max_length=1000)

    # Telegram (on when the token is set)
    telegram_token: str | None = Field(None, pattern=r"^\d+:[A-Za-z0-9_-]+$")
    telegram_mode: Literal["webhook", "polling"] = "webhook"
    telegram_webhook_secret: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,256}$")
    telegram_webhook_url: str | None = Field(None, pattern=r"^https?://")
    telegram_api_url: str = Field(TELEGRAM_API, pattern=r"^https?://")

    # Slack (on when the bot token is set)
    slack_bot_token: str | None = Field(None, pattern=r"^xox[a-z]-")
    slack_signing_secret: str | None = Field(None, min_length=1)
    slack_app_token: str | None = Field(None, pattern=r"^xapp-")
    slack_api_url: str = Field(SLACK_API, pattern=r"^https?://")

    # Email (on when the address is set)
    email_address: str | None = Field(None, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
    imap_host: str | None = None
    imap_port: int | None = Field(None, ge=1, le=65535)
    imap_user: str | None = None
    imap_password: str | None = None
    imap_tls: TlsMode = "ssl"
    smtp_host: str | None = None
    smtp_port: int | None = Field(None, ge=1, le=65535)
    smtp_user: str | None = None
    smtp_password: str | None = None
    smtp_tls: TlsMode = "starttls"
    smtp_listen: str | None = Field(None, pattern=r"^[^:]+:\d{1,5}$")

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _any_case(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            value = value.strip()
            return value.upper() if info.field_name == "log_level" else value.lower()
        return value

    @field_validator("webchat_allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip().rstrip("/") for part in value.split(",") if part.strip()]
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_networks(cls, value: Any) -> Any:
        if isinstance(value, str | list | tuple):
            return parse_networks(value)
        return value

    @field_validator("webchat_allowed_origins")
    @classmethod
    def _check_origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"{origin!r} is not an origin like https://shop.example.com")
        return value

    @model_validator(mode="after")
    def _frame_fits_text(self) -> Settings:
        # A text of max_text characters, each JSON-escaped as \uXXXX, must fit in a frame.
        needed = 6 * self.webchat_max_text + 1024
        if self.webchat_max_frame_bytes < needed:
            raise ValueError(
                f"OMNIGATE_WEBCHAT_MAX_FRAME_BYTES must be at least {needed} "
                "(6 x OMNIGATE_WEBCHAT_MAX_TEXT + 1024) so a maximal message fits in one frame"
            )
        return self

    @model_validator(mode="after")
    def _channels_complete(self) -> Settings:
        # Build each enabled channel now, so a half-configured one fails at start-up.
        self.telegram()
        self.slack()
        self.email()
        return self

    def with_default_actions(self) -> Settings:
        """These settings, with the shipped example actions when they run the shipped
        example flows and no action runner is configured: the examples call them."""
        if (self.actions_package is not None or self.action_server_url is not None
                or self.flows_dir.resolve() != DEFAULT_FLOWS_DIR.resolve()):
            return self
        root = str(DEFAULT_FLOWS_DIR.resolve().parent.parent)  # the source tree
        if root not in sys.path:
            sys.path.append(root)  # after everything installed: never shadows a package
        return self.model_copy(update={"actions_package": EXAMPLE_ACTIONS})

    def telegram(self) -> TelegramSettings | None:
        """Telegram's settings, or None when the channel is off."""
        if self.telegram_token is None:
            return None
        if self.telegram_mode == "webhook" and not self.telegram_webhook_secret:
            raise ValueError(
                "OMNIGATE_TELEGRAM_WEBHOOK_SECRET is required in webhook mode "
                "(1-256 characters A-Z a-z 0-9 _ -); or set OMNIGATE_TELEGRAM_MODE=polling"
            )
        return TelegramSettings(
            token=self.telegram_token, mode=self.telegram_mode,
            webhook_secret=self.telegram_webhook_secret,
            webhook_url=self.telegram_webhook_url, api_url=self.telegram_api_url,
        )

    def slack(self) -> SlackSettings | None:
        """Slack's settings, or None when the channel is off."""
        if self.slack_bot_token is None:
            return None
        if self.slack_app_token is None and not self.slack_signing_secret:
            raise ValueError(
                "OMNIGATE_SLACK_SIGNING_SECRET is required for HTTP events "
                "(or set OMNIGATE_SLACK_APP_TOKEN for Socket Mode)"
            )
        return SlackSettings(
            bot_token=self.slack_bot_token, signing_secret=self.slack_signing_secret,
            app_token=self.slack_app_token, api_url=self.slack_api_url,
        )

    def email(self) -> EmailSettings | None:
        """Email's settings, or None when the channel is off."""
        if self.email_address is None:
            return None
        if not self.smtp_host:
            raise ValueError("OMNIGATE_SMTP_HOST is required when OMNIGATE_EMAIL_ADDRESS is set")
        if not self.imap_host and not self.smtp_listen:
            raise ValueError(
                "email needs a way in: set OMNIGATE_IMAP_HOST (and _USER, _PASSWORD) "
                "or OMNIGATE_SMTP_LISTEN"
            )
        imap = None
        if self.imap_host:
            if not (self.imap_user and self.imap_password):
                raise ValueError("OMNIGATE_IMAP_USER and OMNIGATE_IMAP_PASSWORD are required "
                                 "with OMNIGATE_IMAP_HOST")
            imap = MailServer(self.imap_host, self.imap_port or default_port("imap", self.imap_tls),
                              self.imap_user, self.imap_password, self.imap_tls)
        smtp = MailServer(self.smtp_host, self.smtp_port or default_port("smtp", self.smtp_tls),
                          self.smtp_user, self.smtp_password, self.smtp_tls)
        listen = None
        if self.smtp_listen:
            host, _, port = self.smtp_listen.rpartition(":")
            listen = (host, int(port))
        return EmailSettings(self.email_address, imap, smtp, listen,
                             share_listen=self.workers > 1)

    @field_validator("mongodb_uri")
    @classmethod
    def _check_uri(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("mongodb://", "mongodb+srv://")):
            raise ValueError("must start with mongodb:// or mongodb+srv://")
        return value or None

    @field_validator("sla_targets")
    @classmethod
    def _check_sla_targets(cls, value: str) -> str:
        parse_targets(value)
        return value

    @field_validator("teams_file")
    @classmethod
    def _check_teams_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            load_teams(value)
        return value

    def sla_target_map(self) -> dict[str, Target]:
        return parse_targets(self.sla_targets)

    def team_hours(self) -> TeamHours:
        return ALWAYS_OPEN if self.teams_file is None else load_teams(self.teams_file)

    @field_validator("flows_dir")
    @classmethod
    def _check_flows_dir(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"{value} is not a directory")
        return value


def load_settings(**overrides: Any) -> Settings:
    """Read the environment, apply non-None ``overrides``, validate; raise SettingsError."""
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            if error["loc"]:
                field = str(error["loc"][0])
                name = ENV_PREFIX + field.upper()
                secret = any(word in field for word in ("token", "secret", "password"))
                got = "(value hidden)" if secret else f"(got {error.get('input')!r})"
                lines.append(f"{name}: {error['msg']} {got}")
            else:
                lines.append(str(error["msg"]).removeprefix("Value error, "))
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None
