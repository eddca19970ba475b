"""Analytics over the agent REST API (part of ``/api``, see api.py; definitions in
gateway/analytics.py).

``GET /api/v1/analytics`` returns every figure; ``/api/v1/analytics/{conversations,
handoff-reasons, response-times, sla, csat}`` one figure each. All take ``from`` / ``to``
(ISO 8601; default: the 7 days up to now; a time without a zone is UTC) and the filters
``channel``, ``team``, ``topic``, and break each figure down per channel, team and topic.

Roles: admins see everything. Agents see only conversations handed to their own teams
(``team=`` another team is 403; ``started``, which has no team, is empty for them).
Bot designers are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from gateway.analytics import (
    AnalyticsReport,
    ConversationsReport,
    CsatReport,
    Figures,
    Filters,
    HandoffReasonsReport,
    Period,
    ResponseTimesReport,
    SlaReport,
)
from gateway.desk.auth import BadInput, Forbidden
from gateway.desk.http import AGENT, json_response, query_time
from gateway.desk.openapi import STAFF, Endpoint, Query, time_query
from gateway.keys import ROUTING
from gateway.model import AgentRole

DEFAULT_DAYS = 7
MAX_DAYS = 366
MAX_FILTER = 200


def _text(request: web.Request, name: str) -> str | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    if len(raw) > MAX_FILTER:
        raise BadInput(f"{name} is longer than {MAX_FILTER} characters")
    return raw


async def _report(request: web.Request) -> AnalyticsReport:

    end = query_time(request, "to", datetime.now(UTC))
    start = query_time(request, "from", end - timedelta(days=DEFAULT_DAYS))
    if start >= end:
        raise BadInput("from must be before to")
    if end - start > timedelta(days=MAX_DAYS):
        raise BadInput(f"the period may be at most {MAX_DAYS} days")
    filters = Filters(channel=_text(request, "channel"), team=_text(request, "team"),
                      topic=_text(request, "topic"))
    agent = request[AGENT]
    if agent.role is not AgentRole.ADMIN:
        if filters.team is not None and filters.team not in agent.teams:
            raise Forbidden(f"agents see the analytics of their own teams only "
                            f"({', '.join(sorted(agent.teams)) or 'you have none'})")
        filters.teams = sorted(agent.teams)
    outcomes = request.config_dict[ROUTING].outcomes
    return await outcomes.report(Period(start=start, end=end), filters)


def _handler(
    model: type[BaseModel], pick: Callable[[Figures], Any] | None, name: str
) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.Response:
        report = await _report(request)
        if pick is None:
            body: BaseModel = report
        else:
            extra = {"started": report.started} if "started" in model.model_fields else {}
            body = model.model_validate({**report.parts(pick), **extra})
        return json_response(body)

    handler.__name__ = name
    return handler


QUERY = (
    time_query("from", "start of the period, inclusive (ISO 8601; default: 7 days before to)"),
    time_query("to", "end of the period, exclusive (ISO 8601; default: now)"),
    Query("channel", "only this channel (webchat, telegram, slack, email; empty: all)",
          schema={"maxLength": MAX_FILTER}),
    Query("team", "only this team (agents: one of their own teams; empty: all)",
          schema={"maxLength": MAX_FILTER}),
    Query("topic", "only this topic (the bot flow that handed off or resolved, else the "
          "handoff reason; empty: all)", schema={"maxLength": MAX_FILTER}),
)
DESCRIPTION = (
    "Counted over conversations that ended (were resolved) in the period, once per "
    "resolve. Containment: resolved by the bot without a handoff / all ended. Times: "
    "median and p90 (nearest rank) in seconds from the handoff. Admins see all; agents "
    "only their own teams."
)
FIGURES: list[tuple[str, type[BaseModel], Callable[[Figures], Any] | None, str, str]] = [
    ("", AnalyticsReport, None, "analytics_report",
     "Every figure: conversations, containment, handoff reasons, response times, SLA, CSAT"),
    ("/conversations", ConversationsReport, lambda f: f.volume, "analytics_conversations",
     "Conversations per channel (started, ended) and bot containment"),
    ("/handoff-reasons", HandoffReasonsReport, lambda f: f.handoff_reasons,
     "analytics_handoff_reasons", "Handoff reasons, counted"),
    ("/response-times", ResponseTimesReport, lambda f: f.times, "analytics_response_times",
     "First-response and resolution times (median, p90)"),
    ("/sla", SlaReport, lambda f: f.sla, "analytics_sla", "SLA breaches"),
    ("/csat", CsatReport, lambda f: f.csat, "analytics_csat",
     "CSAT: asked, answered, average, distribution"),
]


def analytics_endpoints() -> list[Endpoint]:
    return [
        Endpoint("GET", "/v1/analytics" + path, _handler(model, pick, name), summary, model,
                 query=QUERY, errors=(401, 503), tag="analytics", description=DESCRIPTION,
                 roles=STAFF)
        for path, model, pick, name, summary in FIGURES
    ]
