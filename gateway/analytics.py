"""Analytics: what happened to conversations, over a period, per channel, team, topic,
intent, label and agent.

The unit is an *ended conversation* (an outcome, gateway/store/analytics.py): each time
a conversation is resolved, by an agent, by the bot, or by the idle resolver (gateway/
idle.py: *abandoned*), one outcome is recorded. A conversation reopened and resolved
again counts once per resolution. The period ``[from, to)`` selects outcomes by when
they ended; only ``started`` (conversations per channel created in the period) is read
from the conversations themselves. docs/analytics.md says it for readers.

Definitions (the API documents them too):

- **bot containment**: outcomes resolved by the bot with no handoff to a human since the
  conversation (re)opened, divided by all outcomes (abandoned ones included).
- **abandoned**: resolved after ``OMNIGATE_IDLE_RESOLVE_HOURS`` without activity;
  ``abandoned_in`` says who had it then (bot, queued, agent).
- **handoff reasons**: the handoff's reason, counted over outcomes that were handed off.
- **topic**: the bot flow that was running when the bot handed off (or resolved, or the
  customer went quiet), also one started and handed off in the same turn (the menu's
  "Talk to a human" runs the flow ``human``); if no flow was running (a global intent
  such as "talk to a human" typed outside a flow, or the fallback), the handoff reason.
- **intent**: each intent the bot's NLU recognised in the customer's messages since the
  conversation (re)opened (``Conversation.intents``); an outcome counts under each.
- **label**: each label the conversation had when it ended; an outcome counts under each.
- **agent**: who had the conversation when it ended (resolved it, or held it when it was
  abandoned); their *handled* conversations are the outcomes in their group.
- **team**: the handoff's team; if the handoff named none, the first team (by name) of the
  agent who had it; else none.
- **first response**: from the handoff to the first agent reply (``Conversation.sla.
  first_response_at`` when the SLA timer recorded it, else the first agent message in the
  history); **resolution**: from the handoff to the resolve (``sla.resolved_at`` when
  set; none for an abandoned one). Median and p90 by nearest rank, in seconds, over
  outcomes that have them.
- **SLA breaches**: outcomes whose ``sla.*_breached`` flag was set when they ended.
- **CSAT**: questions asked, answered, the average score and its distribution (1-5).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, Field

from gateway.model import Agent, Conversation, utcnow
from gateway.store import Store
from gateway.store.analytics import (
    ABANDONED_IN,
    DIMENSIONS,
    NONE_KEY,
    AnalyticsStore,
    Dimension,
)
from gateway.store.mongo import Doc, new_id

__all__ = ["NONE_KEY", "AnalyticsReport", "Outcomes", "Period", "nearest_rank"]


# -------------------------------------------------------------------- figures


class Durations(BaseModel):
    count: int = Field(description="outcomes that have this time")
    median_seconds: float | None
    p90_seconds: float | None


class AbandonedIn(BaseModel):
    bot: int = Field(description="the bot had it (the customer left mid-conversation)")
    queued: int = Field(description="it was waiting in the queue (no agent took it)")
    agent: int = Field(description="an agent had it")


class Volume(BaseModel):
    ended: int = Field(description="conversations that ended (were resolved) in the period; "
                       "per agent: the conversations they handled")
    bot_contained: int = Field(description="resolved by the bot, never handed to a human")
    handed_off: int = Field(description="handed to a human before they ended")
    containment_rate: float | None = Field(description="bot_contained / ended (None: none)")
    resolved_by_agent: int = Field(description="resolved by an agent")
    resolved_by_bot: int = Field(description="resolved by the bot (handed off or not)")
    abandoned: int = Field(description="resolved by the idle resolver: no activity for "
                           "OMNIGATE_IDLE_RESOLVE_HOURS")
    abandoned_in: AbandonedIn = Field(description="abandoned, by who had it then")


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
    intent: str | None = None
    label: str | None = Field(None, description="a label id")
    agent: str | None = Field(None, description="an agent id (an agent in no team: "
                              "always their own)")
    teams: list[str] | None = Field(None, description="only these teams (an agent's own "
                                    "teams, when an agent asks without team=)")

    def match(self) -> dict[str, Any]:
        """The filters as store conditions."""
        match: dict[str, Any] = {
            field: value for field, value in (
                ("channel", self.channel), ("team", self.team), ("topic", self.topic),
                ("intents", self.intent), ("labels", self.label), ("agent_id", self.agent))
            if value is not None}
        if self.team is None and self.teams is not None:
            match["team"] = {"$in": self.teams}
        return match


Scope = Literal["all", "teams", "own"]


F = TypeVar("F")
G = TypeVar("G")


class Report(BaseModel, Generic[F]):
    period: Period
    filters: Filters
    scope: Scope = Field(description="whose conversations: all (admins), teams (an agent: "
                         "their teams'), own (an agent in no team: the ones they had)")
    note: str | None = Field(description="said to the reader when the scope needs "
                             "explaining (an agent in no team); else null")
    total: F
    by_channel: dict[str, F]
    by_team: dict[str, F] = Field(description=f"'{NONE_KEY}': no team")
    by_topic: dict[str, F] = Field(description=f"'{NONE_KEY}': no topic")
    by_intent: dict[str, F] = Field(description="per intent the bot recognised (an outcome "
                                    f"counts under each of its intents); '{NONE_KEY}': none")
    by_label: dict[str, F] = Field(description="per label id (an outcome counts under each "
                                   f"of its labels; names in label_names); '{NONE_KEY}': none")
    by_agent: dict[str, F] = Field(description="per agent id: who had the conversation when "
                                   "it ended (names in agent_names); agents see their own "
                                   f"row only; '{NONE_KEY}': no agent")
    agent_names: dict[str, str] = Field(description="the names of the agents in by_agent")
    label_names: dict[str, str] = Field(description="the names of the labels in by_label "
                                        "(a label deleted since is missing)")

    def parts(self, pick: Callable[[F], G]) -> dict[str, Any]:
        return {
            "period": self.period, "filters": self.filters, "scope": self.scope,
            "note": self.note, "total": pick(self.total),
            **{f"by_{d}": {k: pick(v) for k, v in getattr(self, f"by_{d}").items()}
               for d in DIMENSIONS},
            "agent_names": self.agent_names, "label_names": self.label_names,
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
                      containment_rate=contained / ended if ended else None,
                      resolved_by_agent=int(doc.get("resolved_by_agent", 0)),
                      resolved_by_bot=int(doc.get("resolved_by_bot", 0)),
                      abandoned=int(doc.get("abandoned", 0)),
                      abandoned_in=AbandonedIn(**{
                          owner: int(doc.get(f"abandoned_{owner}", 0))
                          for owner in ABANDONED_IN})),
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
        abandoned_in: str | None = None,
    ) -> Doc:
        """The outcome of ``conversation``, just resolved (read again from the store, so
        the SLA fields set around the resolve are in it) by ``resolved_by`` (agent, bot,
        idle: then ``abandoned_in`` says who had it). Returns the stored document."""
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
        resolved_at: datetime | None = (sla.resolved_at if sla is not None else None) or ended
        if resolved_by == "idle":
            resolved_at = None  # nobody resolved it: no resolution time
        doc: Doc = {
            "_id": new_id(),
            "conversation_id": current.id,
            "contact_id": current.contact_id,
            "channel": current.channel,
            "started_at": since,
            "ended_at": ended,
            "resolved_by": resolved_by,
            "agent_id": agent.id if agent is not None else None,
            "abandoned_in": abandoned_in if resolved_by == "idle" else None,
            "intents": list(current.intents),
            "labels": list(current.labels),
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

    async def report(self, period: Period, filters: Filters, scope: Scope = "all",
                     note: str | None = None) -> AnalyticsReport:
        """Every figure, in total and per channel, team, topic, intent, label and agent
        (``scope`` and ``note``: as the API restricted the filters, see Report)."""
        args = (period.start, period.end, filters.match())
        totals = await self.db.groups(*args, None)
        reasons = _reasons(await self.db.reasons(*args, None))
        by: dict[Dimension, dict[str, Figures]] = {}
        for dimension in DIMENSIONS:
            groups = await self.db.groups(*args, dimension)
            split = _reasons(await self.db.reasons(*args, dimension))
            by[dimension] = {str(g["_id"]): _figures(g, split.get(str(g["_id"]), {}))
                             for g in sorted(groups, key=lambda g: str(g["_id"]))}
        # Conversations have no team or agent before a handoff: a restricted report has none.
        started = [] if scope != "all" else await self.db.started(
            period.start, period.end, filters.channel)
        return AnalyticsReport(
            period=period, filters=filters, scope=scope, note=note,
            total=_figures(totals[0] if totals else None, reasons.get("", {})),
            by_channel=by["channel"], by_team=by["team"], by_topic=by["topic"],
            by_intent=by["intent"], by_label=by["label"], by_agent=by["agent"],
            agent_names=await self.db.names("agents", [k for k in by["agent"] if k != NONE_KEY]),
            label_names=await self.db.names("labels", [k for k in by["label"] if k != NONE_KEY]),
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
