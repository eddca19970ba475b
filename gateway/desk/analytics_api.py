"""Analytics over the agent REST API (part of ``/api``, see api.py; definitions in
gateway/analytics.py).

``GET /api/v1/analytics`` returns every figure; ``/api/v1/analytics/{conversations,
handoff-reasons, response-times, sla, csat}`` one figure each. All take ``from`` / ``to``
(ISO 8601; default: the 7 days up to now; a time without a zone is UTC) and the filters
``channel``, ``team``, ``topic``, ``intent``, ``label``, ``agent``, and break each figure
down per channel, team, topic, intent, label and agent.

Roles: admins see everything. Agents see only conversations handed to their own teams
(``team=`` another team is 403; ``started``, which has no team, is empty for them) and,
per agent, only their own row (``agent=`` another agent is 403). An agent in no team sees
the conversations they had when they ended (``scope: own``), with a ``note`` saying so:
before, such an agent got zeros with no word why. Bot designers are refused.
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
    Scope,
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
FILTERS = ("channel", "team", "topic", "intent", "label", "agent")
NO_TEAM = (
    "You are in no team, so these are only the conversations you had when they ended: "
    "team figures show once an admin adds you to a team.")


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
    filters = Filters(**{name: _text(request, name) for name in FILTERS})
    agent = request[AGENT]
    scope: Scope = "all"
    note: str | None = None
    if agent.role is not AgentRole.ADMIN:
        if filters.team is not None and filters.team not in agent.teams:
            raise Forbidden(f"agents see the analytics of their own teams only "
                            f"({', '.join(sorted(agent.teams)) or 'you have none'})")
        if filters.agent is not None and filters.agent != agent.id:
            raise Forbidden("agents see their own figures only, not another agent's")
        if agent.teams:
            scope, filters.teams = "teams", sorted(agent.teams)
        else:  # no team to see: their own conversations, said so (not silent zeros)
            scope, filters.agent, note = "own", agent.id, NO_TEAM
    outcomes = request.config_dict[ROUTING].outcomes
    report = await outcomes.report(Period(start=start, end=end), filters, scope, note)
    if agent.role is not AgentRole.ADMIN:  # colleagues' figures are for admins
        report.by_agent = {k: v for k, v in report.by_agent.items() if k == agent.id}
        report.agent_names = {k: v for k, v in report.agent_names.items() if k == agent.id}
    return report


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
    Query("intent", "only conversations in which the bot recognised this intent (empty: "
          "all)", schema={"maxLength": MAX_FILTER}),
    Query("label", "only conversations with this label id when they ended (empty: all)",
          schema={"maxLength": MAX_FILTER}),
    Query("agent", "only conversations this agent id had when they ended (agents: their "
          "own id only; empty: all)", schema={"maxLength": MAX_FILTER}),
)
DESCRIPTION = (
    "Counted over conversations that ended in the period, once per resolve: by an agent, "
    "by the bot, or abandoned (no activity for OMNIGATE_IDLE_RESOLVE_HOURS). "
    "Containment: resolved by the bot without a handoff / all ended. Times: median and "
    "p90 (nearest rank) in seconds from the handoff. Broken down per channel, team, "
    "topic, intent, label and agent (who had it when it ended). Admins see all; agents "
    "their own teams and, per agent, their own row; an agent in no team their own "
    "conversations, with a note saying so. docs/analytics.md has the definitions."
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
