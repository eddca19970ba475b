"""Prometheus metrics: ``GET /metrics`` (names, types and labels: docs/metrics.md).

One ``Metrics`` object per gateway process, on the app under ``METRICS`` (gateway/keys.py).
The hot path calls its small methods (``message_stored``, ``turn_done``, ``outbox_failed``);
every command the store client sends is counted by a pymongo ``CommandListener``
(``StoreCommands``) given to ``Store.connect``; requests to ``/webhooks/<channel>/...`` are
counted by ``webhook_middleware``.

Gauges that describe the shared store (outbox pending, queue waiting, agents online) are
not kept in any process's memory: ``StoreGauges`` counts them in the store at scrape time
(indexed counts, cached for a second), so every gateway process reports the same values.

With ``PROMETHEUS_MULTIPROC_DIR`` set (several worker processes on one machine) the
counters and histograms live in prometheus-client's per-process files in that directory
and a scrape of any worker merges them (``MultiProcessCollector``): the sum over the box.
The variable must be set before the process starts (prometheus-client reads it when it is
imported), the directory must exist, and it should be emptied when the whole service is
(re)started. The process and platform collectors describe one process, so they are left
out in that mode.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from pymongo.errors import PyMongoError
from pymongo.monitoring import (
    CommandFailedEvent,
    CommandListener,
    CommandStartedEvent,
    CommandSucceededEvent,
)

from gateway.model import DeliveryStatus, Direction, OwnerState, Presence

if TYPE_CHECKING:
    from gateway.store import Store

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Inbound stored .. reply delivered: 5 ms .. 30 s.
TURN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# One store command: 0.5 ms .. 10 s.
COMMAND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 10.0)
DIRECTIONS = {Direction.INBOUND: "inbound", Direction.OUTBOUND: "outbound"}
OTHER_CHANNEL = "other"  # a webhook path naming no enabled channel (label stays bounded)
STORE_GAUGES_TTL = 1.0  # seconds a scrape reuses the store's counts


def multiprocess_dir() -> str | None:
    """The multiprocess directory, if this process runs in that mode."""
    return os.environ.get(MULTIPROC_ENV) or None


class StoreCommands(CommandListener):
    """Counts every command the store client sends (pymongo command monitoring).

    Runs for every command on the hot path, so it does the least: ``started`` does
    nothing (a command is counted when it ends, succeeded or failed, with the duration the
    driver measured), the labelled children are looked up once per command name and kept
    in a plain dict, and no string is built.
    """

    def __init__(self, total: Counter, failures: Counter, seconds: Histogram) -> None:
        self._total, self._failures, self._seconds = total, failures, seconds
        self._ok: dict[str, tuple[Counter, Histogram]] = {}
        self._failed: dict[str, tuple[Counter, Histogram, Counter]] = {}

    def started(self, event: CommandStartedEvent) -> None:
        pass

    def succeeded(self, event: CommandSucceededEvent) -> None:
        children = self._ok.get(event.command_name)
        if children is None:
            name = event.command_name
            children = self._ok[name] = (self._total.labels(name), self._seconds.labels(name))
            self._failures.labels(name)  # its failures series starts at 0
        children[0].inc()
        children[1].observe(event.duration_micros * 1e-6)

    def failed(self, event: CommandFailedEvent) -> None:
        children = self._failed.get(event.command_name)
        if children is None:
            name = event.command_name
            children = self._failed[name] = (self._total.labels(name),
                                             self._seconds.labels(name),
                                             self._failures.labels(name))
        children[0].inc()
        children[1].observe(event.duration_micros * 1e-6)
        children[2].inc()


class StoreGauges(Collector):
    """``omnigate_outbox_pending``, ``omnigate_queue_waiting``, ``omnigate_agents_online``
    counted in the store at scrape time (``refresh``, then the registry's ``collect``).

    Each is one ``count_documents`` on an index: ``outbox_due`` (``delivery.status``,
    one equality count per active status: SecantusDB scans for ``$in``/``$or``),
    ``queue_order`` (``owner``), ``presence`` (``presence``, ``active``). The counts are
    reused for ``STORE_GAUGES_TTL`` seconds and concurrent scrapes share one refresh. When
    the store does not answer, the gauges are left out of the scrape (not reported stale).
    """

    def __init__(self, ttl: float = STORE_GAUGES_TTL) -> None:
        self.store: Store | None = None
        self.ttl = ttl
        self._values: dict[str, float] | None = None
        self._at = -float("inf")
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        if time.monotonic() - self._at < self.ttl:
            return
        async with self._lock:
            if time.monotonic() - self._at < self.ttl or self.store is None:
                return
            self._values = await self._count(self.store)
            self._at = time.monotonic()

    @staticmethod
    async def _count(store: Store) -> dict[str, float] | None:
        try:
            pending, sending, queued, online = await asyncio.gather(
                store.messages.count_documents(
                    {"delivery.status": DeliveryStatus.PENDING.value}),
                store.messages.count_documents(
                    {"delivery.status": DeliveryStatus.SENDING.value}),
                store.conversations.count_documents({"owner": OwnerState.QUEUED.value}),
                store.agents.count_documents(
                    {"presence": Presence.ONLINE.value, "active": True}),
            )
        except PyMongoError as exc:
            log.warning("metrics: the store's gauges could not be counted (%s)", exc)
            return None
        return {"omnigate_outbox_pending": pending + sending,
                "omnigate_queue_waiting": queued, "omnigate_agents_online": online}

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterable[Metric]:
        if self._values is None:
            return
        for name, value in self._values.items():
            yield GaugeMetricFamily(name, GAUGE_HELP[name], value=value)


GAUGE_HELP = {
    "omnigate_outbox_pending": "Outbound items not yet delivered or given up "
                               "(pending or being sent), in the whole store.",
    "omnigate_queue_waiting": "Conversations waiting in the queue for an agent.",
    "omnigate_agents_online": "Active agents whose presence is online.",
}


class Metrics:
    """This process's metrics and the ``/metrics`` page (one per app; no global registry).

    In multiprocess mode prometheus-client keys its files by metric name and process, so
    run one ``Metrics`` per process there (one gateway app per worker).
    """

    def __init__(self, *, multiproc_dir: str | None = None) -> None:
        self.multiproc_dir = multiproc_dir
        reg = self.registry = CollectorRegistry(auto_describe=False)
        self.messages = Counter(
            "omnigate_messages", "Items stored, by channel and direction.",
            ["channel", "direction"], registry=reg)
        self.turn_seconds = Histogram(
            "omnigate_turn_seconds", "From an inbound item stored to its reply delivered.",
            buckets=TURN_BUCKETS, registry=reg)
        self.outbox_failures = Counter(
            "omnigate_outbox_failed", "Outbound items the outbox gave up on, by channel.",
            ["channel"], registry=reg)
        self.webhook_requests = Counter(
            "omnigate_webhook_requests", "Requests to /webhooks/<channel>/..., by status.",
            ["channel", "status"], registry=reg)
        store_total = Counter(
            "omnigate_store_commands", "Commands the gateway sent to the store.",
            ["command"], registry=reg)
        store_failures = Counter(
            "omnigate_store_command_failures", "Store commands that failed.",
            ["command"], registry=reg)
        store_seconds = Histogram(
            "omnigate_store_command_seconds", "Store command round trip, as the driver "
            "measured it.", ["command"], buckets=COMMAND_BUCKETS, registry=reg)
        self.store_commands = StoreCommands(store_total, store_failures, store_seconds)
        # One per live worker: livesum adds up the workers that are running.
        self.workers = Gauge("omnigate_worker_processes", "Gateway processes running.",
                             registry=reg, multiprocess_mode="livesum")
        self.workers.set(1)
        self.store_gauges = StoreGauges()
        self.channels: tuple[str, ...] = ()
        if multiproc_dir is None:
            self._scrape = reg
            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                reg.register(collector)
        else:
            self._scrape = CollectorRegistry(auto_describe=False)
            MultiProcessCollector(self._scrape, path=multiproc_dir)  # type: ignore[no-untyped-call]
        self._scrape.register(self.store_gauges)

    # ------------------------------------------------------------ the hot path's API

    def known_channels(self, channels: Iterable[str]) -> None:
        """Start the per-channel series at 0, so they exist before the first item."""
        self.channels = tuple(channels)
        for channel in self.channels:
            for direction in DIRECTIONS.values():
                self.messages.labels(channel, direction)
            self.outbox_failures.labels(channel)

    def message_stored(self, channel: str, direction: Direction) -> None:
        """An item was stored durably (call once per item, after the commit)."""
        self.messages.labels(channel, DIRECTIONS[direction]).inc()

    def turn_done(self, seconds: float) -> None:
        """An inbound item's reply was delivered ``seconds`` after the item was stored."""
        self.turn_seconds.observe(seconds)

    def outbox_failed(self, channel: str) -> None:
        """The outbox gave up on an item (marked it failed)."""
        self.outbox_failures.labels(channel).inc()

    def webhook_request(self, channel: str, status: int) -> None:
        self.webhook_requests.labels(channel, str(status)).inc()

    # ------------------------------------------------------------------ the page

    async def render(self) -> bytes:
        await self.store_gauges.refresh()
        return generate_latest(self._scrape)

    def close(self) -> None:
        """This process stops: its live gauges leave the multiprocess sums."""
        if self.multiproc_dir is not None:
            mark_process_dead(os.getpid(), self.multiproc_dir)  # type: ignore[no-untyped-call]


def metrics_handler(metrics: Metrics, token: str | None
                    ) -> Callable[[web.Request], Awaitable[web.Response]]:
    """``GET /metrics``; with ``token``, only for ``Authorization: Bearer <token>``."""
    expected = None if token is None else f"Bearer {token}".encode()

    async def handler(request: web.Request) -> web.Response:
        if expected is not None:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return web.json_response(
                    {"error": "unauthorized", "detail": "GET /metrics needs "
                     "Authorization: Bearer <OMNIGATE_METRICS_TOKEN>"},
                    status=401, headers={"WWW-Authenticate": 'Bearer realm="metrics"'})
        body = await metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return handler


def webhook_middleware(metrics: Metrics) -> Middleware:
    """Counts requests to ``/webhooks/<channel>[/...]`` by the status answered, also when
    the handler raises (an ``HTTPException``'s status, else 500)."""

    @web.middleware
    async def count_webhooks(request: web.Request, handler: Handler
                             ) -> web.StreamResponse:
        parts = request.path.split("/", 3)
        if len(parts) < 3 or parts[1] != "webhooks":
            return await handler(request)
        channel = parts[2] if parts[2] in metrics.channels else OTHER_CHANNEL
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            metrics.webhook_request(channel, exc.status)
            raise
        except Exception:
            metrics.webhook_request(channel, 500)
            raise
        metrics.webhook_request(channel, response.status)
        return response

    return count_webhooks
