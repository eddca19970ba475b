"""Service levels: first-response and resolution targets per priority, and breaches.

On handoff a conversation gets its due times (``Conversation.sla``): the priority's
targets measured in the team's business hours (gateway/hours.py): the clock runs only
while the team is open, so a 1-hour target handed off on Friday at 16:30 to a team open
09:00-17:00 is due Monday at 09:30. A team without hours is always open. The targets
come from one setting, ``OMNIGATE_SLA_TARGETS``::

    urgent=5m/4h, high=15m/8h, normal=1h/24h, low=4h/72h

(first response / resolution; priorities not named keep these defaults; an unknown
priority on a handoff uses ``normal``'s).

The first agent reply after the handoff sets ``first_response_at``, resolve sets
``resolved_at``; done after the due time, the timer is flagged as breached at that
moment. A background checker flags timers that ran out with nothing done (only while a
human owns the conversation or it waits in the queue). Each breach leaves an event
"SLA breached: first response" in the conversation for the agents' timeline (never sent
to a channel) and is counted (``SlaStore.counts``: by priority, team, channel, kind).
A transfer or a re-queue keeps the timers (same handoff); a new handoff starts new ones.

When the handoff finds the team closed, the customer is told once, on their channel,
when to expect an answer. While they wait the bot stays silent (the pipeline never
runs the bot for a queued conversation) and nothing else is sent.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from pydantic import BaseModel, Field
from pymongo.errors import PyMongoError

from gateway.aio import Background
from gateway.hours import ALWAYS_OPEN, TeamHours, add_open_time, closed_notice, next_opening
from gateway.model import Conversation, Handoff, OutboundDraft, Party, Role, Sla, utcnow
from gateway.outbox import Outbox
from gateway.store import Store
from gateway.store.sla import KINDS, Kind, SlaStore

log = logging.getLogger(__name__)

SYSTEM = Party(role=Role.SYSTEM, name="Omnigate")
LABEL = {"first_response": "first response", "resolution": "resolution"}


@dataclass(frozen=True)
class Target:
    first_response: timedelta
    resolution: timedelta


DEFAULT_TARGETS: Mapping[str, Target] = {
    "urgent": Target(timedelta(minutes=5), timedelta(hours=4)),
    "high": Target(timedelta(minutes=15), timedelta(hours=8)),
    "normal": Target(timedelta(hours=1), timedelta(hours=24)),
    "low": Target(timedelta(hours=4), timedelta(hours=72)),
}
DEFAULT_TARGETS_TEXT = "urgent=5m/4h, high=15m/8h, normal=1h/24h, low=4h/72h"
_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_duration(text: str) -> timedelta:
    """``30s``, ``5m``, ``4h``, ``2d``, ``1h30m``; ValueError otherwise."""
    match = _DURATION.match(text.strip().lower())
    if not text.strip() or match is None:
        raise ValueError(f"{text.strip()!r} is not a duration like 30s, 5m, 4h, 2d or 1h30m")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    duration = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    if duration <= timedelta(0):
        raise ValueError(f"{text.strip()!r}: a target must be longer than zero")
    return duration


def parse_targets(text: str) -> dict[str, Target]:
    """``"urgent=5m/4h, high=15m/8h"``: the defaults with these priorities replaced."""
    targets = dict(DEFAULT_TARGETS)
    for part in filter(None, (p.strip() for p in text.split(","))):
        priority, equals, value = part.partition("=")
        priority = priority.strip().lower()
        if not equals or priority not in DEFAULT_TARGETS:
            raise ValueError(
                f"{part!r}: expected <priority>=<first response>/<resolution> with priority "
                f"one of {', '.join(DEFAULT_TARGETS)}, e.g. {DEFAULT_TARGETS_TEXT}")
        first, slash, resolution = value.partition("/")
        if not slash:
            raise ValueError(f"{part!r}: give both targets, first response/resolution, "
                             "e.g. high=15m/8h")
        target = Target(parse_duration(first), parse_duration(resolution))
        if target.resolution < target.first_response:
            raise ValueError(f"{part!r}: the resolution target is shorter than the first "
                             "response target")
        targets[priority] = target
    return targets


# ------------------------------------------------------------------ the timers out


class Timer(BaseModel):
    """One target as the console shows it (computed by the server at ``now``)."""

    due: datetime | None = Field(description="the target time (in business hours)")
    done_at: datetime | None = Field(description="when it was met (replied / resolved)")
    breached: bool
    state: str = Field(description="running, met, breached (done late or still open "
                       "past due), or stopped (handed back to the bot)")
    remaining_seconds: float | None = Field(
        description="running: seconds until due (wall clock); else null")
    overdue_seconds: float | None = Field(
        description="past due and not done: seconds since due; done late: how late")


class SlaOut(BaseModel):
    started_at: datetime | None
    team: str | None
    first_response: Timer
    resolution: Timer
    now: datetime = Field(description="the server's clock the seconds were computed at")


def _timer(due: datetime | None, done: datetime | None, breached: bool, now: datetime,
           running: bool) -> Timer:
    remaining = overdue = None
    if done is not None:
        state = "breached" if breached else "met"
        if due is not None and done > due:
            overdue = (done - due).total_seconds()
    elif running and due is not None and now >= due:  # the checker may not have run yet
        state, breached, overdue = "breached", True, (now - due).total_seconds()
    elif not running:
        state = "breached" if breached else "stopped"
    else:
        state = "running"
        remaining = (due - now).total_seconds() if due is not None else None
    return Timer(due=due, done_at=done, breached=breached, state=state,
                 remaining_seconds=remaining, overdue_seconds=overdue)


def timers(conversation: Conversation, now: datetime) -> SlaOut | None:
    """The conversation's timers at ``now`` (None: never handed off)."""
    sla = conversation.sla
    if sla is None:
        return None
    running = conversation.owner.value in ("queued", "agent")
    return SlaOut(
        started_at=sla.started_at, team=sla.team,
        first_response=_timer(sla.first_response_due, sla.first_response_at,
                              sla.first_response_breached, now, running),
        resolution=_timer(sla.resolution_due, sla.resolved_at, sla.resolution_breached,
                          now, running),
        now=now,
    )


# --------------------------------------------------------------------- the service


class ServiceLevels:
    """Sets, stops and checks the timers; tells the customer when the team is closed.

    ``clock`` is injectable (tests move time instead of waiting for it)."""

    def __init__(
        self,
        store: Store,
        outbox: Outbox,
        *,
        targets: Mapping[str, Target] = DEFAULT_TARGETS,
        hours: TeamHours = ALWAYS_OPEN,
        check_seconds: float = 15.0,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.sla = SlaStore(store)
        self.targets = dict(targets)
        self.hours = hours
        self.check_seconds = check_seconds
        self.clock = clock
        self._background = Background("sla")
        self._indexed = False

    def target(self, priority: str) -> Target:
        return self.targets.get(priority) or self.targets.get("normal") or DEFAULT_TARGETS[
            "normal"]

    def plan(self, handoff: Handoff, start: datetime) -> Sla:
        """The timers for a handoff starting at ``start``."""
        schedule = self.hours.for_team(handoff.team)
        target = self.target(handoff.priority)
        return Sla(
            started_at=start, team=handoff.team,
            first_response_due=add_open_time(schedule, start, target.first_response),
            resolution_due=add_open_time(schedule, start, target.resolution),
        )

    # ----------------------------------------------------------------- hooks

    async def handed_off(self, conversation: Conversation) -> None:
        """After a handoff: tell the customer once if the team is closed now."""
        sla, handoff = conversation.sla, conversation.handoff
        if sla is None or sla.started_at is None or handoff is None:
            return
        schedule = self.hours.for_team(handoff.team)
        if schedule is None:
            return
        opening = next_opening(schedule, sla.started_at)
        if opening == sla.started_at:
            return  # open now
        draft = OutboundDraft(
            sender=SYSTEM, name="closed", text=closed_notice(schedule, opening, sla.started_at),
            dedupe_key=f"{conversation.id}:closed:{sla.started_at.isoformat()}",
        )
        await self.outbox.enqueue(conversation, [draft])

    async def replied(self, conversation: Conversation) -> None:
        """An agent replied: the first reply since the handoff meets the first target."""
        await self._done(conversation, "first_response")

    async def resolved(self, conversation: Conversation) -> Conversation:
        """Resolved: meets the resolution target. Returns the conversation as it is now."""
        if not await self._done(conversation, "resolution"):
            return conversation
        return await self.store.get_conversation(conversation.id) or conversation

    async def _done(self, conversation: Conversation, kind: Kind) -> bool:
        sla = conversation.sla
        if sla is None:
            return False
        now = self.clock()
        if not await self.sla.mark_done(conversation, kind, now):
            return False
        due = sla.first_response_due if kind == "first_response" else sla.resolution_due
        if due is not None and now > due:
            await self._breach(conversation, kind, now)
        return True

    async def _breach(self, conversation: Conversation, kind: Kind, now: datetime) -> bool:
        """Flag it and leave the event for the timeline, once. True if this call did."""
        if not await self.sla.flag(conversation, kind, now):
            return False
        assert conversation.sla is not None
        assert conversation.sla.started_at is not None
        log.info("conversation %s: SLA breached: %s", conversation.id, LABEL[kind])
        await self.sla.note(
            conversation, "sla_breached", f"SLA breached: {LABEL[kind]}",
            f"{conversation.id}:sla:{conversation.sla.started_at.isoformat()}:{kind}",
        )
        return True

    # --------------------------------------------------------------- checker

    async def check_once(self, now: datetime | None = None) -> int:
        """Flag every timer that ran out with nothing done; returns how many."""
        if not self._indexed:
            await self.sla.ensure_indexes()
            self._indexed = True
        now = now or self.clock()
        flagged = 0
        for kind in KINDS:
            for conversation in await self.sla.overdue(kind, now):
                flagged += await self._breach(conversation, kind, now)
        return flagged

    async def _sweep(self, _first: bool) -> None:
        try:
            await self.check_once()
        except PyMongoError:
            raise
        except Exception:
            log.exception("SLA checker: unexpected error")

    def start(self) -> None:
        self._background.every(self.check_seconds, self._sweep)

    async def stop(self, grace: float = 5.0) -> None:
        await self._background.stop(grace)
