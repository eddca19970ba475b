"""Analytics: what happened to conversations, over a period, per channel, team and topic.

The unit is an *ended conversation* (an outcome, gateway/store/analytics.py): each time
a conversation is resolved, by an agent or by the bot, one outcome is recorded. A
conversation reopened and resolved again counts once per resolution. The period
``[from, to)`` selects outcomes by when they ended; only ``started`` (conversations per
channel created in the period) is read from the conversations themselves.

Definitions (the API documents them too):

- **bot containment**: outcomes resolved by the bot with no handoff to a human since the
  conversation (re)opened, divided by all outcomes.
- **handoff reasons**: the handoff's reason, counted over outcomes that were handed off.
- **topic**: the bot flow that was running when the bot handed off (or resolved), also
  one started and handed off in the same turn (the menu's "Talk to a human" runs the
  flow ``human``); if no flow was running (a global intent such as "talk to a human"
  typed outside a flow, or the fallback), the handoff reason.
- **team**: the handoff's team; if the handoff named none, the first team (by name) of the
  agent who resolved it; else none.
- **first response**: from the handoff to the first agent reply (``Conversation.sla.
  first_response_at`` when the SLA timer recorded it, else the first agent message in the
  history); **resolution**: from the handoff to the resolve (``sla.resolved_at`` when
  set). Median and p90 by nearest rank, in seconds, over outcomes that have them.
- **SLA breaches**: outcomes whose ``sla.*_breached`` flag was set when they ended.
- **CSAT**: questions asked, answered, the average score and its distribution (1-5).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, Field

from gateway.model import Agent, Conversation, utcnow
from gateway.store import Store
from gateway.store.analytics import DIMENSIONS, NONE_KEY, AnalyticsStore, Dimension
from gateway.store.mongo import Doc, new_id

__all__ = ["NONE_KEY", "AnalyticsReport", "Outcomes", "Period", "nearest_rank"]


# -------------------------------------------------------------------- figures


class Durations(BaseModel):
    count: int = Field(description="outcomes that have this time")
    median_seconds: float | None
    p90_seconds: float | None


class Volume(BaseModel):
    ended: int = Field(description="conversations that ended (were resolved) in the period")
    bot_contained: int = Field(description="resolved by the bot, never handed to a human")
    handed_off: int = Field(description="handed to a human before they ended")
    containment_rate: float | None = Field(description="bot_contained / ended (None: none)")


class ResponseTimes(BaseModel):
    first_response: Durations = Field(description="handoff to the first agent reply")
    resolution: Durations = Field(description="handoff to resolve")


class SlaFigures(BaseModel):
    with_sla: int = Field(description="ended conversations that had SLA targets")
    first_response_breaches: int
    resolution_breaches: int


class CsatFigures(BaseModel):
    asked: int
    answered: int
    average: float | None = Field(description="mean score of the answers (None: none)")
    distribution: dict[str, int] = Field(description="answers per score, '1' to '5'")


class Figures(BaseModel):
    volume: Volume
    handoff_reasons: dict[str, int]
    times: ResponseTimes
    sla: SlaFigures
    csat: CsatFigures


class Period(BaseModel):
    start: datetime = Field(description="inclusive (query ?from=)")
    end: datetime = Field(description="exclusive (query ?to=)")


class Filters(BaseModel):
    channel: str | None = None
    team: str | None = None
    topic: str | None = None
    teams: list[str] | None = Field(None, description="only these teams (an agent's own "
                                    "teams, when an agent asks without team=)")

    def match(self) -> dict[str, Any]:
        """The filters as store conditions."""
        match: dict[str, Any] = {k: v for k, v in (("channel", self.channel),
                                 ("team", self.team), ("topic", self.topic)) if v is not None}
        if self.team is None and self.teams is not None:
            match["team"] = {"$in": self.teams}
        return match


F = TypeVar("F")
G = TypeVar("G")


class Report(BaseModel, Generic[F]):
    period: Period
    filters: Filters
    total: F
    by_channel: dict[str, F]
    by_team: dict[str, F] = Field(description=f"'{NONE_KEY}': no team")
    by_topic: dict[str, F] = Field(description=f"'{NONE_KEY}': no topic")

    def parts(self, pick: Callable[[F], G]) -> dict[str, Any]:
        return {
            "period": self.period, "filters": self.filters, "total": pick(self.total),
            "by_channel": {k: pick(v) for k, v in self.by_channel.items()},
            "by_team": {k: pick(v) for k, v in self.by_team.items()},
            "by_topic": {k: pick(v) for k, v in self.by_topic.items()},
        }


class AnalyticsReport(Report[Figures]):
    started: dict[str, int] = Field(description="conversations created in the period, per "
                                    "channel (only the channel filter applies)")


class ConversationsReport(Report[Volume]):
    started: dict[str, int] = Field(description="conversations created in the period, per "
                                    "channel (only the channel filter applies)")


class HandoffReasonsReport(Report[dict[str, int]]):
    pass


class ResponseTimesReport(Report[ResponseTimes]):
    pass


class SlaReport(Report[SlaFigures]):
    pass


class CsatReport(Report[CsatFigures]):
    pass


REPORT_MODELS: list[type[BaseModel]] = [
    AnalyticsReport, ConversationsReport, HandoffReasonsReport, ResponseTimesReport,
    SlaReport, CsatReport,
]


def nearest_rank(values: list[float], fraction: float) -> float | None:
    """The ``fraction`` quantile by nearest rank (0.5: median, 0.9: p90)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def _durations(raw: list[Any]) -> Durations:
    values = [float(v) for v in raw if isinstance(v, int | float)]
    return Durations(count=len(values), median_seconds=nearest_rank(values, 0.5),
                     p90_seconds=nearest_rank(values, 0.9))


def _figures(doc: Doc | None, reasons: dict[str, int]) -> Figures:
    doc = doc or {}
    ended, contained = int(doc.get("ended", 0)), int(doc.get("contained", 0))
    answered = int(doc.get("csat_answered", 0))
    return Figures(
        volume=Volume(ended=ended, bot_contained=contained,
                      handed_off=int(doc.get("handed_off", 0)),
                      containment_rate=contained / ended if ended else None),
        handoff_reasons=dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        times=ResponseTimes(first_response=_durations(doc.get("first_response", [])),
                            resolution=_durations(doc.get("resolution", []))),
        sla=SlaFigures(with_sla=int(doc.get("with_sla", 0)),
                       first_response_breaches=int(doc.get("first_response_breaches", 0)),
                       resolution_breaches=int(doc.get("resolution_breaches", 0))),
        csat=CsatFigures(
            asked=int(doc.get("csat_asked", 0)), answered=answered,
            average=int(doc.get("csat_sum", 0)) / answered if answered else None,
            distribution={str(s): int(doc.get(f"csat_{s}", 0)) for s in range(1, 6)}),
    )


# -------------------------------------------------------------------- service


class Outcomes:
    """Records outcomes when conversations end, and computes the reports."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.db = AnalyticsStore(store)
        self.clock: Callable[[], datetime] = utcnow  # when outcomes end (tests set it)

    async def record(
        self, conversation: Conversation, *, resolved_by: str, agent: Agent | None = None,
        topic: str | None = None, ended_at: datetime | None = None,
    ) -> Doc:
        """The outcome of ``conversation``, just resolved (read again from the store, so
        the SLA fields set around the resolve are in it). Returns the stored document."""
        ended = ended_at or self.clock()
        current = await self.store.get_conversation(conversation.id) or conversation
        handoff, sla = current.handoff, current.sla
        since = await self.db.last_end(current.id) or current.created_at
        handed_off = (handoff is not None or resolved_by == "agent"
                      or await self.db.handed_off_since(current.id, since))
        team = handoff.team if handoff is not None else None
        if team is None and agent is not None and agent.teams:
            team = sorted(agent.teams)[0]
        reason = handoff.reason if handoff is not None else None
        topic = (handoff.topic if handoff is not None else None) or topic or reason
        handoff_at = handoff.requested_at if handoff is not None else None
        first_at = sla.first_response_at if sla is not None else None
        if first_at is None and handoff_at is not None:
            first_at = await self.db.first_agent_reply(current.id, handoff_at)
        resolved_at = (sla.resolved_at if sla is not None else None) or ended
        doc: Doc = {
            "_id": new_id(),
            "conversation_id": current.id,
            "contact_id": current.contact_id,
            "channel": current.channel,
            "started_at": since,
            "ended_at": ended,
            "resolved_by": resolved_by,
            "agent_id": agent.id if agent is not None else None,
            "handed_off": handed_off,
            "reason": reason,
            "team": team,
            "topic": topic,
            "priority": handoff.priority if handoff is not None else None,
            "handoff_at": handoff_at,
            "first_response_at": first_at,
            "first_response_seconds": _seconds(handoff_at, first_at),
            "resolution_seconds": _seconds(handoff_at, resolved_at),
            "has_sla": sla is not None,
            "first_response_breached": bool(sla and sla.first_response_breached),
            "resolution_breached": bool(sla and sla.resolution_breached),
            "csat_asked": False,
            "csat_score": None,
            "csat_comment": None,
            "csat_answered_at": None,
        }
        await self.db.insert(doc)
        return doc

    async def mark_asked(self, doc: Doc) -> None:
        await self.db.outcomes.update_one({"_id": doc["_id"]}, {"$set": {"csat_asked": True}})

    async def report(self, period: Period, filters: Filters) -> AnalyticsReport:
        """Every figure, in total and per channel, team and topic."""
        args = (period.start, period.end, filters.match())
        totals = await self.db.groups(*args, None)
        reasons = _reasons(await self.db.reasons(*args, None))
        by: dict[Dimension, dict[str, Figures]] = {}
        for dimension in DIMENSIONS:
            groups = await self.db.groups(*args, dimension)
            split = _reasons(await self.db.reasons(*args, dimension))
            by[dimension] = {str(g["_id"]): _figures(g, split.get(str(g["_id"]), {}))
                             for g in sorted(groups, key=lambda g: str(g["_id"]))}
        # Conversations have no team before a handoff: a team-restricted report has none.
        started = [] if filters.teams is not None else await self.db.started(
            period.start, period.end, filters.channel)
        return AnalyticsReport(
            period=period, filters=filters,
            total=_figures(totals[0] if totals else None, reasons.get("", {})),
            by_channel=by["channel"], by_team=by["team"], by_topic=by["topic"],
            started={str(d["_id"]): int(d["n"]) for d in sorted(started, key=lambda d: d["_id"])},
        )


def _reasons(docs: list[Doc]) -> dict[str, dict[str, int]]:
    """Reason counts per group key ("" for the total)."""
    out: dict[str, dict[str, int]] = {}
    for doc in docs:
        key = doc["_id"].get("key")
        out.setdefault("" if key is None else str(key), {})[str(doc["_id"]["reason"])] = int(
            doc["n"])
    return out


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max(0.0, (end - start).total_seconds())
