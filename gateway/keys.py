"""Typed keys for everything shared on the aiohttp app (no globals).

Sub-apps read them through ``request.config_dict``, which falls back to the main app.
"""

from __future__ import annotations

from aiohttp import web

from connectors.base import Connector
from gateway.desk.agents import Agents
from gateway.feed import Feed
from gateway.fetcher import Fetcher
from gateway.files import Files
from gateway.metrics import Metrics
from gateway.outbox import Outbox
from gateway.pipeline import Pipeline
from gateway.routing import Routing
from gateway.search import Indexer
from gateway.settings import Settings
from gateway.store import Store

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
STORE_READY = web.AppKey("store_ready", dict)  # {"ready": bool}: indexes created
OUTBOX = web.AppKey("outbox", Outbox)
ROUTING = web.AppKey("routing", Routing)
PIPELINE = web.AppKey("pipeline", Pipeline)
AGENTS = web.AppKey("agents", Agents)
FEED = web.AppKey("feed", Feed)  # the change stream (gateway/feed.py)
CONNECTORS = web.AppKey("connectors", dict[str, Connector])
METRICS = web.AppKey("metrics", Metrics)  # gateway/metrics.py, GET /metrics
FILES = web.AppKey("files", Files)  # the attachment store (gateway/files.py)
FETCHER = web.AppKey("fetcher", Fetcher)  # files fetched from channels (gateway/fetcher.py)
INDEXER = web.AppKey("indexer", Indexer)  # message words for search (gateway/search.py)
