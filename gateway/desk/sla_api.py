"""Agent API endpoints for service levels (part of ``/api``, see api.py).

``GET /api/v1/conversations/{id}/sla``: the conversation's timers (due times, remaining or
overdue seconds, computed by the server); ``GET /api/v1/sla/breaches``: breaches counted
by priority, team, channel and kind over a period; ``GET /api/v1/sla/hours``: the
targets and every team's business hours (open now? next opening).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from aiohttp import web
from pydantic import BaseModel, Field

from gateway.desk.auth import BadInput
from gateway.desk.http import json_response, query_time
from gateway.desk.http import load_conversation as _load
from gateway.desk.openapi import Endpoint, Query, time_query
from gateway.hours import is_open, next_opening
from gateway.keys import ROUTING
from gateway.sla import SlaOut, timers
from gateway.store import NotFound
from gateway.store.sla import GROUPS

# The api module imports this one (for the endpoint table), so its names are imported
# where they are used.

DEFAULT_PERIOD = timedelta(days=7)


class BreachRow(BaseModel):
    kind: str = Field(description="first_response, resolution (or all: not grouped by kind)")
    priority: str | None
    team: str | None
    channel: str | None
    count: int


class BreachesOut(BaseModel):
    since: datetime
    until: datetime
    by: list[str]
    total: int
    items: list[BreachRow] = Field(description="most breaches first")


class TargetOut(BaseModel):
    priority: str
    first_response_seconds: float
    resolution_seconds: float


class TeamHoursOut(BaseModel):
    team: str | None = Field(description="null: the default (teams not listed, no team)")
    timezone: str | None = Field(description="null: always open")
    open_now: bool
    next_opening: datetime | None = Field(description="now if open; null: not within a year")


class HoursOut(BaseModel):
    targets: list[TargetOut]
    teams: list[TeamHoursOut]
    now: datetime


SLA_MODELS: list[type[BaseModel]] = [SlaOut, BreachesOut, BreachRow, HoursOut]


async def conversation_sla(request: web.Request) -> web.Response:

    conversation = await _load(request)
    levels = request.config_dict[ROUTING].levels
    out = timers(conversation, levels.clock())
    if out is None:
        raise NotFound("this conversation was never handed off: it has no SLA timers")
    return json_response(out)


async def breaches(request: web.Request) -> web.Response:
    levels = request.config_dict[ROUTING].levels
    until = query_time(request, "until", levels.clock())
    since = query_time(request, "since", until - DEFAULT_PERIOD)
    if since >= until:
        raise BadInput("since must be before until")
    by = tuple(b.strip() for b in request.query.get("by", "priority,team,kind").split(",")
               if b.strip())
    if set(by) - set(GROUPS):
        raise BadInput(f"by: a comma-separated subset of {', '.join(GROUPS)}")
    rows = await levels.sla.counts(since, until, by)
    return json_response(BreachesOut(
        since=since, until=until, by=list(by), total=sum(r.count for r in rows),
        items=[BreachRow(kind=r.kind, priority=r.priority, team=r.team, channel=r.channel,
                         count=r.count) for r in rows],
    ))


async def hours(request: web.Request) -> web.Response:
    levels = request.config_dict[ROUTING].levels
    now = levels.clock()
    teams = [(None, levels.hours.default), *sorted(levels.hours.teams.items())]
    return json_response(HoursOut(
        targets=[TargetOut(priority=p, first_response_seconds=t.first_response.total_seconds(),
                           resolution_seconds=t.resolution.total_seconds())
                 for p, t in levels.targets.items()],
        teams=[TeamHoursOut(team=name, timezone=s.timezone if s else None,
                            open_now=is_open(s, now), next_opening=next_opening(s, now))
               for name, s in teams],
        now=now,
    ))


def sla_endpoints() -> list[Endpoint]:
    return [
        Endpoint(
            "GET", "/v1/conversations/{id}/sla", conversation_sla,
            "The conversation's SLA timers: due times, remaining or overdue seconds",
            SlaOut, errors=(401, 404, 503),
            description="Due times are measured in the team's business hours; the "
            "seconds are wall-clock seconds at the server's `now`. 404 also when the "
            "conversation was never handed off.",
        ),
        Endpoint(
            "GET", "/v1/sla/breaches", breaches,
            "SLA breaches over a period, counted by priority, team, channel and kind",
            BreachesOut, tag="sla",
            query=(
                time_query("since", "ISO 8601 start (default: 7 days before until)"),
                time_query("until", "ISO 8601 end, exclusive (default: now)"),
                Query("by", f"comma-separated subset of {', '.join(GROUPS)} "
                      "(default priority,team,kind; empty: one total)", enum=tuple(GROUPS),
                      array=True),
            ),
            description="A breach counts in the period its due time falls in.",
        ),
        Endpoint(
            "GET", "/v1/sla/hours", hours,
            "SLA targets per priority and every team's business hours (open now, next "
            "opening)", HoursOut, tag="sla",
        ),
    ]
