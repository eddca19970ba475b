"""CSAT: after a resolve, one question to the customer on their channel, rated 1 to 5.

The question is an ordinary outbound message with five buttons (values ``csat:1`` ...
``csat:5``), so every connector renders it the way it renders buttons: web chat
buttons, a Telegram inline keyboard, Slack Block Kit, numbered options in email (a reply
"4" chooses the fourth).

An answer is a press of one of those buttons, or a typed digit 1-5, optionally followed
by a comment ("4 quick and friendly"), within the window (``OMNIGATE_CSAT_WINDOW_HOURS``)
after the question. It is stored in ``Conversation.csat`` (and on the outcome it rates,
for analytics) by one conditional update: the first answer wins, a repeated answer
changes nothing and is not counted twice, the customer is thanked once. An answer does
not reopen the conversation. A typed digit counts only while the conversation is still
resolved (once it was reopened, the bot reads digits: menus use them); a press of the
question's buttons counts while the question is unanswered and within the window, even
after a reopen (the customer wrote "thanks" first, then pressed a rating). Any other
message, or an answer after the window, reopens the conversation as before.

Agents' resolves ask; the bot's resolves ask only with ``OMNIGATE_CSAT_AFTER_BOT``
(the bot already said goodbye; asking after every contained FAQ answer is noisy).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from gateway.analytics import Outcomes
from gateway.model import (
    Activity,
    Button,
    Conversation,
    Csat,
    OutboundDraft,
    OwnerState,
    Party,
    Role,
    utcnow,
)
from gateway.outbox import Outbox
from gateway.settings import Settings
from gateway.store import Store
from gateway.store.mongo import Doc

log = logging.getLogger(__name__)

VALUE_PREFIX = "csat:"
DEFAULT_QUESTION = (
    "How satisfied are you with the help you got? Rate us from 1 (poor) to 5 (excellent).")
DEFAULT_THANKS = "Thank you for your feedback!"
MAX_COMMENT = 1000
# "4", "4/5", "4 stars", "4 - great", "5! thanks"; not "45", "4.5" or "10".
TYPED = re.compile(
    r"^\s*([1-5])(?!\d|[.,]\d)(?:\s*/\s*5)?(?:\s*(?:stars?|★+))?\s*[-\u2013\u2014:,.!)]*\s*(.*)$",
    re.DOTALL | re.IGNORECASE,
)


@dataclass(frozen=True)
class CsatConfig:
    enabled: bool = False
    after_bot: bool = False
    question: str = DEFAULT_QUESTION
    thanks: str = DEFAULT_THANKS
    window: timedelta = timedelta(hours=24)


@dataclass(frozen=True)
class Answer:
    score: int
    comment: str | None


def _ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


def parse_answer(item: Activity, *, typed: bool) -> Answer | None:
    """The rating in a customer's message: a CSAT button's value, or (``typed``) a text
    starting with a digit 1-5; the rest of the text is the comment."""
    if item.value is not None:
        if item.value.startswith(VALUE_PREFIX) and item.value[len(VALUE_PREFIX):] in "12345" \
                and len(item.value) == len(VALUE_PREFIX) + 1:
            return Answer(int(item.value[-1]), None)
        return None
    if not typed or not item.text:
        return None
    match = TYPED.match(item.text)
    if match is None:
        return None
    comment = match.group(2).strip()[:MAX_COMMENT] or None
    return Answer(int(match.group(1)), comment)


class CsatSurvey:
    """Asks after resolves and takes the answers (see the module's docstring)."""

    def __init__(self, store: Store, outbox: Outbox, outcomes: Outcomes,
                 config: CsatConfig | None = None) -> None:
        self.store = store
        self.outbox = outbox
        self.outcomes = outcomes
        self.config = config or CsatConfig()
        self.sender = Party(role=Role.BOT, name=None)

    def wants(self, resolved_by: str) -> bool:
        return self.config.enabled and (resolved_by == "agent" or self.config.after_bot)

    async def ask(self, conversation: Conversation, outcome: Doc) -> bool:
        """Ask the customer to rate the conversation that just ended (``outcome``).
        False if it was not resolved any more (the customer already wrote again)."""
        asked_at: datetime = outcome["ended_at"]
        csat = Csat(asked_at=asked_at)
        done = await self.store.conversations.update_one(
            {"_id": conversation.id, "owner": OwnerState.RESOLVED.value},
            {"$set": {"csat": csat.model_dump(mode="python")}})
        if not done.matched_count:
            return False
        await self.outcomes.mark_asked(outcome)
        buttons = [Button(title=str(n), value=f"{VALUE_PREFIX}{n}") for n in range(1, 6)]
        draft = OutboundDraft(sender=self.sender, text=self.config.question, buttons=buttons,
                              dedupe_key=f"csat:{conversation.id}:{_ms(asked_at)}:ask")
        await self.outbox.enqueue(conversation, [draft])
        return True

    async def take_answer(self, conversation: Conversation, item: Activity) -> bool:
        """If ``item`` answers the conversation's CSAT question, record it (once), thank
        the customer (once) and return True: the message needs nothing else. False: it
        is an ordinary message."""
        csat = conversation.csat
        if csat is None or item.created_at - csat.asked_at > self.config.window:
            return False
        typed = conversation.owner is OwnerState.RESOLVED and csat.score is None
        answer = parse_answer(item, typed=typed)
        if answer is None:
            return False
        if csat.score is None:
            now = utcnow()
            won = await self.store.conversations.update_one(
                {"_id": conversation.id, "csat.asked_at": csat.asked_at, "csat.score": None},
                {"$set": {"csat.score": answer.score, "csat.comment": answer.comment,
                          "csat.answered_at": now}})
            if won.matched_count:
                await self.outcomes.db.set_csat(conversation.id, csat.asked_at, answer.score,
                                                answer.comment, now)
                log.info("conversation %s: CSAT %d", conversation.id, answer.score)
        # Answered now or before (a second press, a re-processed message): thank once.
        stored = await self.store.get_conversation(conversation.id)
        final = stored.csat if stored is not None else None
        if final is None or final.asked_at != csat.asked_at or final.score is None:
            return False  # asked again meanwhile: not an answer to this question
        if final.answered_at is not None:  # a re-run after a crash: the outcome too
            await self.outcomes.db.set_csat(conversation.id, csat.asked_at, final.score,
                                            final.comment, final.answered_at)
        thanks = OutboundDraft(sender=self.sender, text=self.config.thanks,
                               reply_to_id=item.id,
                               dedupe_key=f"csat:{conversation.id}:{_ms(csat.asked_at)}:thanks")
        await self.outbox.enqueue(conversation, [thanks])
        return True


def csat_config(settings: Settings) -> CsatConfig:
    """The CSAT settings (``OMNIGATE_CSAT*``)."""
    return CsatConfig(
        enabled=settings.csat, after_bot=settings.csat_after_bot,
        question=settings.csat_question, thanks=settings.csat_thanks,
        window=timedelta(hours=settings.csat_window_hours),
    )
