"""Idle conversations resolve themselves (``OMNIGATE_IDLE_RESOLVE_HOURS``, default 24;
0: never), as Chatwoot's "auto-resolve" does.

**Which.** Every conversation that is not resolved, whoever has it: the bot, the queue
or an agent, with no activity for that long. Chatwoot resolves its *open* conversations
(assigned or not) that have had no activity; Omnigate does the same and adds the bot's:
a customer who walked away from the bot mid-flow would otherwise stay "with the bot"
forever, and analytics would never count them (bot containment only looked at the
conversations the bot closed). Activity is what ``last_activity_at`` records: a message
from or to the customer, a routing event (handoff, assignment, transfer, ...); private
notes and labels are not (gateway/store/idle.py). A conversation waiting in the queue
that long is resolved too, as in Chatwoot by default: it is counted apart
(``abandoned_in: queued``) so analytics shows the customers who gave up waiting.

**How.** ``Routing.resolve_idle``: one conditional change in the store (only if its last
activity, owner and assignee are still as read), with a private event for the agents'
timeline and, unless ``OMNIGATE_IDLE_RESOLVE_NOTICE=false``, a short message from the
bot to the customer on their channel (``OMNIGATE_IDLE_RESOLVE_TEXT``; email sends none
to an automatic sender), all in one unit; then an
outcome with ``resolved_by: idle`` (analytics' *abandoned*). No CSAT question is asked
and the SLA's resolution target is not met by it. The customer's next message reopens
the conversation as after any resolve (to the bot, gateway/pipeline.py).

**Where.** The sweep runs every ``SWEEP_SECONDS`` in one gateway process, under the
``idle-resolver`` lease (gateway/leases.py); it is also safe in several at once (a
takeover mid-sweep, tests racing two): each conversation is resolved by a conditional
update, so once, and the customer is told once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from aiohttp import web
from pymongo.errors import PyMongoError

from gateway.aio import cancel_and_wait, raise_if_cancelled
from gateway.keys import ROUTING, SETTINGS, STORE
from gateway.leases import Leases, Singleton
from gateway.model import utcnow
from gateway.store.idle import OPEN_OWNERS, IdleStore

if TYPE_CHECKING:
    from gateway.routing import Routing
    from gateway.settings import Settings

log = logging.getLogger(__name__)

LEASE = "idle-resolver"
SWEEP_SECONDS = 60.0
BATCH = 100  # conversations read per query
DEFAULT_IDLE_TEXT = (  # OMNIGATE_IDLE_RESOLVE_TEXT's default (gateway/settings.py)
    "We closed this conversation as there was no activity for a while. "
    "Write to us any time to continue.")


@dataclass(frozen=True)
class IdleConfig:
    after: timedelta | None = timedelta(hours=24)  # None: never
    notice: str | None = DEFAULT_IDLE_TEXT  # None: the customer is not told


def idle_config(settings: Settings) -> IdleConfig:
    """The idle settings (``OMNIGATE_IDLE_RESOLVE_*``)."""
    hours = settings.idle_resolve_hours
    return IdleConfig(after=timedelta(hours=hours) if hours > 0 else None,
                      notice=settings.idle_resolve_text if settings.idle_resolve_notice
                      else None)


def spoken(duration: timedelta) -> str:
    """``24 hours``, ``1 hour``, ``90 minutes``, ``2 days`` (days from two on): for the
    timeline's event."""
    seconds = int(duration.total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds % size == 0 and seconds >= (2 * size if unit == "day" else size):
            n = seconds // size
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds} seconds"


class IdleResolver:
    """Finds idle conversations and resolves them (see the module's docstring).

    ``clock`` is injectable: tests move time instead of waiting for it."""

    def __init__(self, routing: Routing, leases: Leases | None, config: IdleConfig, *,
                 sweep_seconds: float = SWEEP_SECONDS,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.routing = routing
        self.db = IdleStore(routing.store)
        self.leases = leases
        self.config = config
        self.sweep_seconds = sweep_seconds
        self.clock = clock
        self._lease: Singleton | None = None
        self._task: asyncio.Task[None] | None = None
        self._indexed = False

    async def sweep_once(self, now: datetime | None = None) -> int:
        """Resolve every conversation idle at ``now``; returns how many this call did
        (another process's concurrent sweep may have done some)."""
        after = self.config.after
        if after is None:
            return 0
        if not self._indexed:
            await self.db.ensure_indexes()
            self._indexed = True
        before = (now or self.clock()) - after
        idle_for = spoken(after)
        resolved = 0
        for owner in OPEN_OWNERS:
            seen: set[str] = set()
            while True:
                batch = [c for c in await self.db.idle(owner, before, BATCH)
                         if c.id not in seen]
                for conversation in batch:
                    seen.add(conversation.id)
                    if await self.routing.resolve_idle(conversation, idle_for,
                                                       self.config.notice):
                        resolved += 1
                if not batch:
                    break  # what is left changed under us (or is another's): next sweep
        if resolved:
            log.info("idle resolver: %d conversation(s) resolved after %s without activity",
                     resolved, idle_for)
        return resolved

    async def _work(self) -> None:
        while True:
            try:
                await self.sweep_once()
            except PyMongoError as exc:
                raise_if_cancelled()
                log.warning("idle resolver: sweep failed (%s); next in %g s", exc,
                            self.sweep_seconds)
            except Exception:
                log.exception("idle resolver: unexpected error; next sweep in %g s",
                              self.sweep_seconds)
            await asyncio.sleep(self.sweep_seconds)

    def start(self) -> None:
        if self.config.after is None:
            return
        if self.leases is None:
            self._task = asyncio.create_task(self._work(), name="idle-resolver")
        else:
            self._lease = Singleton(self.leases, LEASE, self._work)
            self._lease.start()

    async def stop(self) -> None:
        if self._lease is not None:
            await self._lease.stop()
        if self._task is not None:
            await cancel_and_wait(self._task)


IDLE = web.AppKey("idle", IdleResolver)


async def idle_ctx(app: web.Application) -> AsyncIterator[None]:
    """The idle resolver, after the core services (app.py's cleanup contexts)."""
    resolver = app[IDLE] = IdleResolver(app[ROUTING], Leases(app[STORE]),
                                        idle_config(app[SETTINGS]))
    resolver.start()
    try:
        yield
    finally:
        await resolver.stop()
