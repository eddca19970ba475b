"""``create_app(settings)``: mounts the connectors, the agent API, and opens every resource
in a cleanup context (store first, then the core services, then the connectors)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

from aiohttp import web
from pymongo.errors import PyMongoError

from connectors.base import Connector, ConnectorContext
from connectors.webchat import WebchatConfig, WebchatConnector
from flows.actions import InProcessActions, RemoteActions, make_runner
from flows.engine import FlowEngine
from flows.registry import FlowRegistry
from gateway.aio import cancel_and_wait, raise_if_cancelled
from gateway.assign import Assigner
from gateway.csat import csat_config
from gateway.desk.agents import Agents
from gateway.desk.api import DeskApi
from gateway.desk.console import setup_console
from gateway.desk.live import setup_live
from gateway.feed import Feed
from gateway.fetcher import Fetcher
from gateway.fetcher import ensure_indexes as ensure_fetch_indexes
from gateway.files import Files
from gateway.idle import idle_ctx
from gateway.keys import (
    AGENTS,
    CONNECTORS,
    FEED,
    FETCHER,
    FILES,
    INDEXER,
    METRICS,
    OUTBOX,
    PIPELINE,
    ROUTING,
    SETTINGS,
    STORE,
    STORE_READY,
)
from gateway.leases import Leases
from gateway.logs import setup_request_ids
from gateway.metrics import Metrics, metrics_handler, multiprocess_dir, webhook_middleware
from gateway.outbox import Outbox
from gateway.pipeline import Pipeline
from gateway.proxies import forwarded_middleware
from gateway.ratelimit import RateLimit, webhook_limit_middleware
from gateway.retention import retention_ctx
from gateway.routing import Routing
from gateway.search import Indexer
from gateway.settings import Settings
from gateway.sla import ServiceLevels
from gateway.store import Store
from gateway.store.access import ensure_indexes as ensure_access_indexes
from gateway.store.audit import AuditLog
from gateway.store.email_link import ensure_indexes as ensure_link_indexes
from gateway.store.embedded import EmbeddedStore
from gateway.store.files import FileStore
from gateway.store.labels import Labels
from gateway.store.search import SearchTerms

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BotParts:
    """The flows (hot-reloaded) and the custom-action runner the flow engine uses."""

    flows: FlowRegistry
    actions: InProcessActions | RemoteActions | None


BOT = web.AppKey("bot", BotParts)


def build_bot(settings: Settings) -> BotParts:
    """Load the flows now (FlowLoadError, with file:line:column, if they have errors)."""
    settings = settings.with_default_actions()
    actions = make_runner(settings.actions_package, settings.action_server_url)
    registered = actions.registered() if actions is not None else None
    if actions is None:
        log.info("custom actions: none configured (OMNIGATE_ACTIONS_PACKAGE or "
                 "OMNIGATE_ACTION_SERVER_URL); a flow step calling one gets the polite "
                 "failure message")
    # in-process actions: flows/actions.py names them, once
    return BotParts(FlowRegistry(settings.flows_dir, actions=registered), actions)


def build_connectors(settings: Settings) -> dict[str, Connector]:
    """Web chat always; every other channel when its settings are there (one log line)."""
    webchat = WebchatConnector(
        WebchatConfig(
            allowed_origins=settings.webchat_allowed_origins,
            max_frame_bytes=settings.webchat_max_frame_bytes,
            max_text=settings.webchat_max_text,
            secret_key=settings.secret_key,
            connects_per_minute=settings.webchat_connects_per_minute,
            messages_per_minute=settings.webchat_messages_per_minute,
            message_burst=settings.webchat_message_burst,
            page_url=settings.webchat_page_url,
        )
    )
    connectors: dict[str, Connector] = {webchat.channel: webchat}
    # Imported only when enabled: a channel's SDK stays out of a gateway that does not use it.
    if (telegram := settings.telegram()) is not None:
        from connectors.telegram import TelegramConnector  # noqa: PLC0415

        connectors["telegram"] = TelegramConnector(telegram)
    else:
        log.info("channel telegram: off (set OMNIGATE_TELEGRAM_TOKEN to turn it on)")
    if (slack := settings.slack()) is not None:
        from connectors.slack import SlackConnector  # noqa: PLC0415

        connectors["slack"] = SlackConnector(slack)
    else:
        log.info("channel slack: off (set OMNIGATE_SLACK_BOT_TOKEN to turn it on)")
    if (email := settings.email()) is not None:
        from connectors.email import EmailConnector  # noqa: PLC0415

        connectors["email"] = EmailConnector(email)
    else:
        log.info("channel email: off (set OMNIGATE_EMAIL_ADDRESS to turn it on)")
    return connectors


async def _ensure_indexes(store: Store, ready: dict[str, bool]) -> None:
    """Create indexes, retrying until the store answers; /healthz is 503 until then."""
    delay = 0.5
    while True:
        try:
            await store.ensure_indexes()
            await ensure_access_indexes(store)
            await ensure_link_indexes(store)
            await FileStore(store).ensure_indexes()
            await ensure_fetch_indexes(store)
            await Labels(store).ensure_indexes()
            await AuditLog(store).ensure_indexes()
            await SearchTerms(store).ensure_indexes()
        except PyMongoError as exc:
            raise_if_cancelled()
            log.error("store unreachable (%s); retrying in %.0f s", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
        else:
            ready["ready"] = True
            return


async def store_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    embedded: EmbeddedStore | None = None
    uri = settings.mongodb_uri
    if uri is None:
        embedded = EmbeddedStore(settings.data_dir, sync_on_commit=settings.embedded_sync_on_commit)
        uri = await embedded.start()
    metrics = app[METRICS]
    store = Store.connect(uri, settings.mongodb_db, event_listeners=[metrics.store_commands])
    app[STORE] = store
    metrics.store_gauges.store = store
    ready = app[STORE_READY]
    indexer = asyncio.create_task(_ensure_indexes(store, ready), name="ensure-indexes")
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(indexer), 10.0)
    try:
        yield
    finally:
        await cancel_and_wait(indexer)
        if not indexer.cancelled() and (failure := indexer.exception()) is not None:
            log.error("creating the store's indexes failed: %r", failure)
        metrics.store_gauges.store = None
        await store.close()
        if embedded is not None:
            await embedded.stop()


async def metrics_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    app[METRICS].close()  # multiprocess mode: this worker leaves the live sums


async def core_ctx(app: web.Application) -> AsyncIterator[None]:
    settings, store, connectors = app[SETTINGS], app[STORE], app[CONNECTORS]
    parts = app[BOT]
    bot = FlowEngine(parts.flows, parts.actions)
    outbox = Outbox(
        store,
        connectors,
        max_attempts=settings.outbox_max_attempts,
        sweep_seconds=settings.outbox_sweep_seconds,
    )
    routing = Routing(store, outbox)
    routing.levels = ServiceLevels(store, outbox, targets=settings.sla_target_map(),
                                   hours=settings.team_hours(),
                                   check_seconds=settings.sla_check_seconds)
    routing.configure_csat(csat_config(settings))
    bot_name = parts.flows.current().domain.bot_name
    files = Files(store, max_bytes=settings.max_attachment_bytes)
    pipeline = Pipeline(store, bot, outbox, routing, bot_name=bot_name, files=files)
    fetcher = Fetcher(store, files, connectors)
    fetcher.on_too_large = pipeline.too_large
    pipeline.fetch_now = fetcher.wake
    metrics = app[METRICS]
    pipeline.metrics = metrics
    outbox.on_failed = metrics.outbox_failed
    # The store's change feed: what another process stored or changed reaches this one
    # (the pipeline's held conversations, web chat sockets, the console).
    feed = Feed(store)
    feed.subscribe(pipeline.on_change)
    app[OUTBOX], app[ROUTING], app[PIPELINE], app[FEED] = outbox, routing, pipeline, feed
    app[FILES], app[FETCHER] = files, fetcher
    app[AGENTS] = Agents(store)
    assigner = Assigner(routing, grace=timedelta(seconds=settings.agent_offline_grace_seconds),
                        sweep_seconds=settings.routing_sweep_seconds)
    app[INDEXER] = indexer = Indexer(store, feed, Leases(store))  # in one process: a lease
    feed.start()
    indexer.start()
    outbox.start()
    pipeline.start()
    fetcher.start()
    assigner.start()
    routing.levels.start()  # the SLA breach checker
    if settings.flows_hot_reload:
        await parts.flows.start()
    context = ConnectorContext(ingest=pipeline.ingest, store=store,
                               channels=frozenset(connectors), watch=feed.subscribe,
                               delivered=outbox.marks.seen,
                               leases=Leases(store),  # pollers run in one process
                               files=files, offers=pipeline.identity.mail_offers)
    for connector in connectors.values():
        await connector.start(context)
        log.info("channel %s: on", connector.channel)
    try:
        yield
    finally:
        await fetcher.stop()  # before the connectors its downloads go through
        for connector in connectors.values():
            await connector.stop()
        await pipeline.stop()
        await assigner.stop()
        await routing.levels.stop()
        await outbox.stop()
        await indexer.stop()
        await feed.stop()
        await parts.flows.stop()
        if parts.actions is not None:
            await parts.actions.close()


HEALTH_WAIT = 0.8  # seconds a health check waits for the store at most


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process is up and its event loop answers (no store round trip)."""
    return web.json_response({"status": "ok", "pid": os.getpid()})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 when the store answers and its indexes exist, else 503 (within
    about a second either way: a ping that takes longer counts as unreachable)."""
    if not request.app[STORE_READY]["ready"]:
        return web.json_response({"status": "unavailable", "store": "starting",
                                  "pid": os.getpid()}, status=503)
    try:
        answered = await asyncio.wait_for(request.app[STORE].ping(), HEALTH_WAIT)
    except TimeoutError:
        answered = False
    if answered:
        return web.json_response({"status": "ok", "store": "ok", "pid": os.getpid()})
    return web.json_response({"status": "unavailable", "store": "unreachable",
                              "pid": os.getpid()}, status=503)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every response (sub-apps', static files, 404/405 and 500 errors too): no MIME
    sniffing, so a JSON or text answer is never run as a script or a page."""
    response.headers["X-Content-Type-Options"] = "nosniff"


def create_app(settings: Settings) -> web.Application:
    """The whole gateway as one aiohttp application."""
    bot = build_bot(settings)  # fail now, with file:line:column, if the flows are bad
    app = web.Application(client_max_size=1024 * 1024)
    app.on_response_prepare.append(_security_headers)
    app[BOT] = bot
    app[SETTINGS] = settings
    app[STORE_READY] = {"ready": False}
    connectors = build_connectors(settings)
    app[CONNECTORS] = connectors
    metrics = app[METRICS] = Metrics(multiproc_dir=multiprocess_dir())
    metrics.known_channels(connectors)
    setup_request_ids(app)  # X-Request-ID, request_id in log lines (gateway/logs.py)
    if settings.trusted_proxies:  # before everything that reads the client's address
        app.middlewares.append(forwarded_middleware(settings.trusted_proxies))
    app.middlewares.append(webhook_middleware(metrics))
    # after the counting one: a 429 is counted; per client address, burst 2 s worth
    per_second = settings.webhook_requests_per_second
    app.middlewares.append(webhook_limit_middleware(RateLimit(per_second, 2 * per_second)))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if settings.metrics:
        app.router.add_get("/metrics", metrics_handler(metrics, settings.metrics_token))
    app.router.add_get("/", WebchatConnector.demo_page)
    for connector in connectors.values():
        connector.setup(app)
    app.add_subapp("/api", DeskApi().app())
    app.cleanup_ctx.extend([metrics_ctx, store_ctx, core_ctx, idle_ctx, retention_ctx])
    setup_live(app)  # the console socket and the change feed (gateway/desk/live.py)
    setup_console(app)  # the agent console's pages at /console/ (gateway/desk/console)
    return app
