"""Automatic assignment: waiting conversations, in queue order, go to available agents.

An agent is available for a conversation when active, online, in the handoff's team (if
it names one), with the handoff's skill (if it names one), and below capacity. Among
those, the least busy gets it; between equally busy agents, the one idle longest (oldest
``last_assigned_at``).

A pass runs whenever something may have made a conversation assignable (``kick``: a
handoff, a resolve or hand back, a transfer, an agent going online, a capacity raised)
and, as a safety net, on every sweep. Several passes in several processes may run at
once: each assignment is a store transaction that takes a slot of the agent's
capacity only below capacity and moves the conversation only while it is queued
(gateway/store/queue.py), so no agent is ever given more than its capacity and no
conversation two agents.

The sweeper also re-queues the conversations of agents offline longer than the grace
period, and repairs load counters that disagree with the conversations the agents own
(recounted in one snapshot; loads change only in transactions with the owner, so this
finds only counters written by hand or by an older version): at start, then every
``REPAIR_EVERY`` sweeps.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from pymongo.errors import PyMongoError

from gateway.aio import Background
from gateway.model import Agent, Handoff, Presence, utcnow
from gateway.routing import Assigned, Routing, who

log = logging.getLogger(__name__)

NEVER = datetime(1970, 1, 1, tzinfo=UTC)
BATCH = 200  # conversations looked at per pass (a pass repeats while it assigns)
ATTEMPTS = 5  # tries per conversation when agents fill up under our feet
REPAIR_EVERY = 12  # sweeps


def can_take(agent: Agent, handoff: Handoff | None) -> bool:
    """Could this agent be given the conversation now (skill, team, capacity, presence)?"""
    if not agent.active or agent.presence is not Presence.ONLINE:
        return False
    if agent.load >= agent.capacity:
        return False
    if handoff is not None:
        if handoff.skill is not None and handoff.skill not in agent.skills:
            return False
        if handoff.team is not None and handoff.team not in agent.teams:
            return False
    return True


def candidates(agents: Iterable[Agent], handoff: Handoff | None) -> list[Agent]:
    """The agents who could take it, best first: least busy, then idle longest."""
    able = [a for a in agents if can_take(a, handoff)]
    return sorted(able, key=lambda a: (a.load, a.last_assigned_at or NEVER, a.id))


class Assigner:
    def __init__(
        self,
        routing: Routing,
        *,
        grace: timedelta = timedelta(seconds=120),
        sweep_seconds: float = 5.0,
    ) -> None:
        self.routing = routing
        self.queue = routing.queue
        self.grace = grace
        self.sweep_seconds = sweep_seconds
        self._background = Background("assign")
        self._running = False
        self._again = False
        self._indexed = False
        self._sweeps = 0

    # -------------------------------------------------------------- assignment

    def kick(self) -> None:
        """Run an assignment pass in the background (once more if one is running)."""
        if self._running:
            self._again = True
            return
        self._running = True
        self._background.spawn(self._drain(), "assign-pass")

    async def _drain(self) -> None:
        try:
            while True:
                self._again = False
                try:
                    await self.assign_all()
                except PyMongoError as exc:
                    log.warning("assignment: store error (the sweeper retries): %s", exc)
                    return
                except Exception:
                    log.exception("assignment: unexpected error")
                    return
                if not self._again:
                    return
        finally:
            self._running = False

    async def assign_all(self) -> int:
        """Passes until one assigns nothing; returns how many conversations were assigned."""
        total = 0
        while (assigned := await self.assign_once()) > 0:
            total += assigned
        return total

    async def assign_once(self) -> int:
        """One pass over the head of the queue; returns how many were assigned."""
        agents = {a.id: a for a in await self.queue.available()}
        if not any(a.load < a.capacity for a in agents.values()):
            return 0
        assigned = 0
        for conversation in await self.queue.queue(limit=BATCH):
            for _ in range(ATTEMPTS):
                best = candidates(agents.values(), conversation.handoff)
                if not best:
                    break
                agent = best[0]
                result = await self.routing.assign(conversation.id, agent)
                if result is Assigned.ASSIGNED:
                    assigned += 1
                    agents[agent.id] = agent.model_copy(
                        update={"load": agent.load + 1, "last_assigned_at": utcnow()}
                    )
                    break
                if result is Assigned.TAKEN:
                    break
                fresh = await self.queue.get_agent(agent.id)  # full, or changed: look again
                if fresh is None:
                    agents.pop(agent.id, None)
                else:
                    agents[agent.id] = fresh
            if not any(a.load < a.capacity for a in agents.values()):
                break
        return assigned

    # ------------------------------------------------------------------- sweeper

    async def requeue_offline(self) -> int:
        """Re-queue the conversations of agents offline longer than the grace period."""
        moved = 0
        for agent in await self.queue.due_requeue(utcnow()):
            moved += await self.routing.requeue_agent(agent)
            assert agent.requeue_at is not None
            await self.queue.clear_requeue(agent.id, agent.requeue_at)
        return moved

    async def repair_loads(self) -> int:
        """Set every load counter that disagrees with the agent's conversations."""
        repaired = 0
        for agent in await self.queue.all_agents():
            fixed = await self.queue.repair(agent.id)
            if fixed is not None:
                log.warning("agent %s: load counter was %d, is %d: repaired", who(agent),
                            *fixed)
                repaired += 1
        return repaired

    async def sweep(self, first: bool = False) -> None:
        if not self._indexed:
            await self.queue.ensure_indexes()
            self._indexed = True
        await self.requeue_offline()
        if self._sweeps % REPAIR_EVERY == 0:
            await self.repair_loads()
        self._sweeps += 1
        self.kick()  # the safety net: whatever no event woke us for

    def start(self) -> None:
        self.routing.on_wake(self.kick)
        self._background.every(self.sweep_seconds, self.sweep)

    async def stop(self, grace: float = 5.0) -> None:
        self.routing.on_wake(lambda: None)
        await self._background.stop(grace)
