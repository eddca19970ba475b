"""Prometheus metrics: ``GET /metrics`` (names and meanings in docs/metrics.md).

One ``Metrics`` per app, with its own registry (no global state). Counters are counted
where things happen in this process (messages stored, store commands sent, webhook
answers, deliveries given up); the gauges that describe the shared store (outbox
pending, queue waiting, agents online) are read from the store when scraped, by cheap
indexed counts cached for a second, so every gateway process reports the same value.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from pymongo import monitoring
from pymongo.errors import PyMongoError

from gateway.model import DeliveryStatus, OwnerState, Presence
from gateway.store import Store

log = logging.getLogger(__name__)

Doc = dict[str, Any]
GAUGES_TTL = 1.0  # seconds a scrape's store counts are reused
TURN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
COMMAND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class CommandCounter(monitoring.CommandListener):
    """pymongo command monitoring: every command this process sends to the store.

    Runs for every command on the hot path, so it only looks up a cached child metric
    and increments it."""

    def __init__(self, metrics: Metrics) -> None:
        self._commands = metrics.store_commands
        self._failures = metrics.store_command_failures
        self._seconds = metrics.store_command_seconds
        self._started: dict[str, Any] = {}
        self._timed: dict[str, Any] = {}
        self._failed: dict[str, Any] = {}

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        name = event.command_name
        child = self._started.get(name)
        if child is None:
            child = self._started[name] = self._commands.labels(name)
        child.inc()

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        name = event.command_name
        child = self._timed.get(name)
        if child is None:
            child = self._timed[name] = self._seconds.labels(name)
        child.observe(event.duration_micros / 1e6)

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        name = event.command_name
        child = self._failed.get(name)
        if child is None:
            child = self._failed[name] = self._failures.labels(name)
        child.inc()


class Metrics:
    """The gateway's metrics (one registry per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.messages = Counter(
            "omnigate_messages", "Messages stored by this process",
            ["channel", "direction"], registry=r)
        self.turn_seconds = Histogram(
            "omnigate_turn_seconds",
            "Bot turns: the inbound message stored to the replies stored and handed to "
            "delivery", buckets=TURN_BUCKETS, registry=r)
        self.store_commands = Counter(
            "omnigate_store_commands", "Commands this process sent to the store",
            ["command"], registry=r)
        self.store_command_failures = Counter(
            "omnigate_store_command_failures", "Store commands that failed", ["command"],
            registry=r)
        self.store_command_seconds = Histogram(
            "omnigate_store_command_seconds", "Store command round trip times", ["command"],
            buckets=COMMAND_BUCKETS, registry=r)
        self.outbox_failed = Counter(
            "omnigate_outbox_failed", "Outbound items given up on (delivery failed)",
            ["channel"], registry=r)
        self.webhook_requests = Counter(
            "omnigate_webhook_requests", "Webhook requests answered, by status",
            ["channel", "status"], registry=r)
        self.outbox_pending = Gauge(
            "omnigate_outbox_pending", "Outbound items waiting to be sent (the store's)",
            registry=r)
        self.queue_waiting = Gauge(
            "omnigate_queue_waiting", "Conversations waiting for a human (the store's)",
            registry=r)
        self.agents_online = Gauge(
            "omnigate_agents_online", "Active agents online (the store's)", registry=r)
        self.listener = CommandCounter(self)
        self._gauges_at = 0.0
        self._refreshing: asyncio.Lock | None = None

    # ----------------------------------------------------------- hot path hooks

    def stored(self, docs: list[Doc]) -> None:
        """Items this process stored: the messages among them are counted."""
        for doc in docs:
            if doc.get("type") == "message":
                self.messages.labels(str(doc.get("channel")), str(doc.get("direction"))).inc()

    def turn_done(self, seconds: float) -> None:
        self.turn_seconds.observe(max(seconds, 0.0))

    def delivery_failed(self, channel: str) -> None:
        self.outbox_failed.labels(channel).inc()

    # ---------------------------------------------------------------- scraping

    async def refresh(self, store: Store) -> None:
        """The shared gauges from the store (at most once per GAUGES_TTL)."""
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:  # a scrape storm waits for one count
            if time.monotonic() - self._gauges_at < GAUGES_TTL:
                return
            pending, waiting, online = await asyncio.gather(
                store.messages.count_documents({"delivery.status": {"$in": [
                    DeliveryStatus.PENDING.value, DeliveryStatus.SENDING.value]}}),
                store.conversations.count_documents({"owner": OwnerState.QUEUED.value}),
                store.agents.count_documents({"presence": Presence.ONLINE.value,
                                              "active": True}),
            )
            self.outbox_pending.set(pending)
            self.queue_waiting.set(waiting)
            self.agents_online.set(online)
            self._gauges_at = time.monotonic()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def webhook_counter(metrics: Metrics) -> Middleware:
    """A middleware counting ``/webhooks/<channel>/...`` answers by status (also when
    the handler raises)."""

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/webhooks/"):
            return await handler(request)
        channel = request.path.split("/", 3)[2] or "unknown"
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            metrics.webhook_requests.labels(channel, str(status)).inc()

    return count


def metrics_handler(metrics: Metrics, store: Callable[[], Store | None],
                    token: str | None) -> Handler:
    """``GET /metrics``: Prometheus text format; a bearer token if one is set."""

    async def handle(request: web.Request) -> web.StreamResponse:
        if token is not None:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return web.json_response({"error": "unauthorized",
                                          "message": "a bearer token is required"},
                                         status=401, headers={"WWW-Authenticate": "Bearer"})
        current = store()
        if current is not None:
            try:
                await asyncio.wait_for(metrics.refresh(current), 1.0)
            except (PyMongoError, TimeoutError) as exc:  # the counters still answer
                log.debug("metrics: store gauges not refreshed: %r", exc)
        response = web.Response(body=metrics.exposition())
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        response.charset = "utf-8"
        return response

    return handle


__all__ = ["Metrics", "metrics_handler", "webhook_counter"]
