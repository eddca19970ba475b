"""The one interface every channel connector implements.

Inbound, a connector verifies and parses what its network sends, turns it into an
``InboundMessage`` and hands it to ``ConnectorContext.ingest``; it acknowledges the
network only after that call returned (the message is then durably stored).
Outbound, the outbox calls ``send`` with a stored item; the connector renders it for its
channel (a connector that ``combines_turns`` gets a bot turn's replies together in
``send_together``). Platform SDK objects never leave the connector.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.feed import Change
from gateway.files import Files
from gateway.leases import Leases
from gateway.model import Activity, Conversation, DeliveryStatus, InboundMessage, LinkOffer
from gateway.store import Store


@dataclass(frozen=True, slots=True)
class IngestResult:
    item: Activity
    conversation: Conversation
    duplicate: bool


Ingest = Callable[[InboundMessage], Awaitable[IngestResult]]
ChangeListener = Callable[[Change], Awaitable[None]]
Watch = Callable[[ChangeListener], Callable[[], None]]


def _nothing_watched(_listener: ChangeListener) -> Callable[[], None]:
    return lambda: None


def _not_recorded(_conversation_id: str, _seq: int) -> None:
    return None


async def _no_offers(_conversation: Conversation) -> list[LinkOffer]:
    return []


@dataclass(frozen=True, slots=True)
class ConnectorContext:
    """What the core lends a connector: the way in, the store for its own state, which
    channels this gateway runs (e.g. for the web chat to offer linking them), the store's
    change feed (``watch(listener)`` returns the unsubscribe: every item stored by any
    gateway process, gateway/feed.py), and ``delivered(conversation_id, seq)`` for a
    store-backed connector to record how far a live client got. ``leases`` (named
    leases in the store, gateway/leases.py) runs work that must run in one gateway
    process only, e.g. a polling loop, under ``Singleton``; None: run it here. ``files``:
    the attachment store (an outbound item's files are read from it: ``Files.load``).
    ``offers(conversation)``: links that continue it on the gateway's other channels,
    for a mail to carry (gateway/identity.py)."""

    ingest: Ingest
    store: Store
    channels: frozenset[str] = frozenset()
    watch: Watch = _nothing_watched
    delivered: Callable[[str, int], None] = _not_recorded
    leases: Leases | None = None
    files: Files | None = None
    offers: Callable[[Conversation], Awaitable[list[LinkOffer]]] = _no_offers


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


class FetchError(Exception):
    """A file could not be downloaded from the channel. ``permanent``: trying again will
    not help (gone, too large, forbidden); else it is retried with backoff."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class Connector(ABC):
    #: the channel name stored on every message and conversation ("webchat", ...)
    channel: str
    #: True when clients read the conversation from the store themselves (web chat: the
    #: socket catches up by seq, live through the change feed): the outbox stores such
    #: items as ``stored`` and calls ``send`` only to show them on this process's open
    #: clients, never retrying it.
    store_backed: bool = False
    #: True when the channel says all replies of one bot turn in one message (email: one
    #: mail per turn): the outbox hands a turn's undelivered replies, in seq order, to
    #: ``send_together`` at once, and records its one outcome on each of them.
    combines_turns: bool = False
    #: A connector with ``deep_link`` (gateway/identity.py ``DeepLinks``) whose links
    #: cannot carry the token (Slack): the customer sends the code there themselves.
    link_by_code: bool = False

    @property
    def links_enabled(self) -> bool:
        """False when its ``deep_link`` cannot work in this configuration (the web chat
        without a page URL): the channel is then not offered."""
        return True

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

    async def send_together(self, conversation: Conversation,
                            items: Sequence[Activity]) -> DeliveryResult:
        """Deliver several stored items of one bot turn as one message (called only when
        ``combines_turns``); the result counts for all of them. Raise ``DeliveryError``."""
        raise DeliveryError(f"channel {self.channel} cannot send items together",
                            permanent=True)

    async def fetch(self, ref: Mapping[str, Any]) -> bytes:
        """Download a file that an inbound message named by reference
        (``IncomingFile.ref``), for the attachment store. Raise ``FetchError``."""
        raise FetchError(f"channel {self.channel} cannot fetch files", permanent=True)
