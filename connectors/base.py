"""The one interface every channel connector implements.

Inbound, a connector verifies and parses what its network sends, turns it into an
``InboundMessage`` and hands it to ``ConnectorContext.ingest``; it acknowledges the
network only after that call returned (the message is then durably stored).
Outbound, the outbox calls ``send`` with a stored item; the connector renders it for its
channel. Platform SDK objects never leave the connector.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from gateway.model import Activity, Conversation, DeliveryStatus, InboundMessage
from gateway.store import Store


@dataclass(frozen=True, slots=True)
class IngestResult:
    item: Activity
    conversation: Conversation
    duplicate: bool


Ingest = Callable[[InboundMessage], Awaitable[IngestResult]]


@dataclass(frozen=True, slots=True)
class ConnectorContext:
    """What the core lends a connector: the way in, the store for its own state, and
    which channels this gateway runs (e.g. for the web chat to offer linking them)."""

    ingest: Ingest
    store: Store
    channels: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    status: DeliveryStatus
    external_id: str | None = None


class DeliveryError(Exception):
    """Sending failed. ``permanent`` errors are not retried; ``retry_after`` is honoured."""

    def __init__(
        self, message: str, *, permanent: bool = False, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.retry_after = retry_after


class Connector(ABC):
    #: the channel name stored on every message and conversation ("webchat", ...)
    channel: str

    @abstractmethod
    def setup(self, app: web.Application) -> None:
        """Mount routes (usually a sub-app) on ``app``; called before the app starts."""

    @abstractmethod
    async def start(self, context: ConnectorContext) -> None:
        """The core is up: start receiving (polling loops, webhooks registration...)."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Stop receiving; called before the core shuts down."""

    @abstractmethod
    async def send(self, conversation: Conversation, item: Activity) -> DeliveryResult:
        """Deliver one stored outbound item. Raise ``DeliveryError`` on failure."""
