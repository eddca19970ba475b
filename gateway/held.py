"""A conversation whose turns this process runs (it holds the conversation's lease), and
what its next turn needs: the pipeline's view of it (gateway/pipeline.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gateway.model import Activity, Contact, Conversation


@dataclass(eq=False)
class Held:
    """A conversation whose lease this process holds, and what its next turn needs."""

    id: str
    until: datetime
    known: bool = False  # ``pending`` holds every inbound item above ``processed``
    processed: int = 0
    pending: dict[int, Activity] = field(default_factory=dict)
    conversation: Conversation | None = None  # None: read it before the next turn
    bot_state: dict[str, Any] = field(default_factory=dict)  # read with ``conversation``
    bot_since: int = 0  # TurnState.bot_since, read with it
    epoch: int = 0  # TurnState.epoch, read with it
    # The seq up to which what the turns decide on (owner, memory) is known: a turn's
    # commit is fenced there (Unit.fence).
    fence: int = 0
    # Turn records are ahead of the turn state's checkpoint (``BotTurns.checkpoint`` writes it).
    dirty: bool = False
    checkpoint_due: bool = False
    active_at: float = 0.0  # time.monotonic() of the last turn
    contact: Contact | None = None
    lost: bool = False
    # Every item up to ``seen`` is known here (stored by this process, read, or seen on
    # the feed); ``above`` holds the known seqs past a gap. A pending item after a gap
    # waits until the gap is read: another process may have stored an inbound item there.
    seen: int = 0
    above: set[int] = field(default_factory=set)

    def note(self, seq: int) -> None:
        if seq > self.seen:
            self.above.add(seq)
            self._close()

    def known_upto(self, seq: int) -> None:
        """Every item up to ``seq`` is known (read from the store: a conversation's seqs
        are committed in order, so one missing below a stored one never comes)."""
        self.seen = max(self.seen, seq)
        self._close()

    def _close(self) -> None:
        self.above = {s for s in self.above if s > self.seen}
        while self.seen + 1 in self.above:
            self.seen += 1
            self.above.discard(self.seen)

    def next(self) -> Activity | None:
        """The next inbound item to answer (None: nothing waits, or a gap comes first:
        see ``gap``)."""
        for seq in sorted(self.pending):
            if seq <= self.processed:
                del self.pending[seq]
                continue
            return self.pending[seq] if seq <= self.seen + 1 else None
        return None

    def gap(self) -> bool:
        """An unanswered item waits behind seqs this process has not seen."""
        return any(seq > self.seen + 1 for seq in self.pending if seq > self.processed)
