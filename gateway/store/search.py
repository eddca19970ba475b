"""Words of every message, findable on MongoDB and on the embedded store alike.

No ``$text`` (the embedded store has none, and a text index would tie us to one server):
each message's words are kept, normalised, in a ``search_terms`` document
``{_id: message id, c: conversation id, t: [terms], at: stored at}``, each term with the
message's hour: ``order|2026120714``, under a multikey index on ``t``. A word's messages
of a range of hours are then one index range (``order|2026120100`` .. ``order|2026120714``),
and a search walks back from now in windows of hours sized to about a page of matches:
it costs what the newest matches cost, however common the word. (Measured on the embedded
store, which reads every match of an index key before sorting or limiting: a plain term
index made "order" cost all its matches, 1.7 s at 80,000 of 100,000 messages;
bench/search.py, BENCHMARKS.md.)

Terms: NFKD-folded, accents dropped, lower case; the words (``\\w+``, 2 to 40
characters), each email address whole, and each phone-like number as its digits (so
``+49 30 1234-567`` is found as ``49301234567``). The last word of a query also matches
as a prefix (3 characters or more), for search as you type.

The documents are written by the indexer (gateway/search.py) after the messages, not
with them: the message path pays nothing for search, and search lags by about a second.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, IndexModel, InsertOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError

from gateway.model import utcnow
from gateway.store.mongo import Doc, Store

TERMS = "search_terms"
SEP = "|"  # term|yyyymmddhh (no term has it: terms are word runs, emails, digits)
MAX_TERMS = 300  # per message
MAX_QUERY_WORDS = 8
PREFIX_MIN = 3
PAGE = 1000  # documents read at a time (one time window) while checking the other words
GROWTH = 4  # an empty window of hours: the next, older one is this much longer
MAX_HOURS = 20 * 366 * 24
FLOOR = datetime(2000, 1, 1, tzinfo=UTC)  # no message is older
ASK_AT_ONCE = 50  # conversations checked against the filters in one query, at least
MAX_SCANNED = 20_000  # documents checked per query at the most (then: partial)
DUPLICATE = 11000

_WORD = re.compile(r"\w+")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_PHONE = re.compile(r"\+?\d[\d ().-]{5,}\d")


def fold(text: str) -> str:
    """Lower case, accents dropped (``Müller`` -> ``muller``), compatibility forms."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def terms(*texts: str | None) -> list[str]:
    """The searchable terms of ``texts``, each once, in the order first found."""
    found: dict[str, None] = {}
    for text in texts:
        if not text:
            continue
        folded = fold(text)
        for email in _EMAIL.findall(folded):
            found[email.strip(".")] = None
        for phone in _PHONE.findall(folded):
            found[re.sub(r"\D", "", phone)] = None
        for word in _WORD.findall(folded):
            if 2 <= len(word) <= 40:
                found[word] = None
        if len(found) >= MAX_TERMS:
            break
    return list(found)[:MAX_TERMS]


def query_terms(query: str) -> tuple[list[str], str | None]:
    """(whole words, the prefix its last word may be) of a search box's text."""
    words = terms(query)[:MAX_QUERY_WORDS]
    if not words:
        return [], None
    last = words[-1]
    prefix = last if len(last) >= PREFIX_MIN and not last.isdigit() and "@" not in last \
        else None
    return words, prefix


def message_terms(doc: Doc) -> list[str]:
    """What a stored item is found by: its text, an email's subject, and, for the
    customer's messages, the names and handles they wrote under."""
    data = doc.get("channel_data") or {}
    sender = doc.get("sender") or {}
    texts: list[str | None] = [doc.get("text"), _str(data.get("subject"))]
    if sender.get("role") == "customer":
        texts += [_str(sender.get("name")), _str(data.get("username")),
                  _str(data.get("from")), _str(data.get("from_name"))]
    texts += [_str(a.get("name")) for a in doc.get("attachments") or [] if isinstance(a, dict)]
    return terms(*texts)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def indexable(doc: Doc) -> bool:
    """Messages (and agents' notes) are found; events are not."""
    return doc.get("type") == "message"


def hour_of(at: datetime) -> datetime:
    """The UTC hour ``at`` is in (a naive time is UTC, as the store returns them)."""
    at = at.astimezone(UTC) if at.tzinfo else at.replace(tzinfo=UTC)
    return at.replace(minute=0, second=0, microsecond=0)


def stamp(hour: datetime) -> str:
    return hour.strftime("%Y%m%d%H")


def _hours(word: str, start: datetime, end: datetime) -> Doc:
    """The word's messages of the hours ``start``..``end``: one index range."""
    return {"t": {"$gte": f"{word}{SEP}{stamp(start)}", "$lte": f"{word}{SEP}{stamp(end)}"}}


def entry(doc: Doc) -> Doc:
    hour = stamp(hour_of(doc["created_at"]))
    return {"_id": doc["_id"], "c": doc["conversation_id"],
            "t": [f"{t}{SEP}{hour}" for t in message_terms(doc)], "at": doc["created_at"]}


def words_of(entry_terms: list[str]) -> set[str]:
    return {t.rsplit(SEP, 1)[0] for t in entry_terms}


@dataclass(frozen=True, slots=True)
class Hits:
    """Conversation ids with their newest matching message, newest first."""

    conversations: list[tuple[str, str]]  # (conversation id, message id)
    partial: bool  # stopped after MAX_SCANNED documents: older matches may exist


class SearchTerms:
    def __init__(self, store: Store) -> None:
        self.coll: AsyncCollection[Doc] = store.db[TERMS]

    async def ensure_indexes(self) -> None:
        await self.coll.create_indexes([
            IndexModel([("t", ASCENDING)], name="terms_by_hour"),
            IndexModel([("c", ASCENDING)], name="terms_conversation"),
        ])

    async def add(self, docs: Iterable[Doc]) -> int:
        """Index these stored items (those already indexed are left as they are: an
        edit's update wins). Returns how many were new."""
        entries = [entry(d) for d in docs if indexable(d)]
        if not entries:
            return 0
        try:
            result = await self.coll.bulk_write([InsertOne(e) for e in entries],
                                                ordered=False)
            return result.inserted_count
        except BulkWriteError as exc:
            if any(e.get("code") != DUPLICATE for e in exc.details.get("writeErrors", [])):
                raise
            return int(exc.details.get("nInserted", 0))

    async def replace(self, doc: Doc) -> None:
        """An item whose text changed (an edit): its terms now."""
        if indexable(doc):
            e = entry(doc)
            await self.coll.replace_one({"_id": e["_id"]}, e, upsert=True)

    async def forget_conversations(self, conversation_ids: Sequence[str]) -> None:
        await self.coll.delete_many({"c": {"$in": list(conversation_ids)}})

    async def find(self, words: list[str], prefix: str | None, *, limit: int,
                   since: datetime | None = None, until: datetime | None = None,
                   accept: Any = None) -> Hits:
        """Conversations with a message that has every word (the last one also as a
        prefix), newest first. ``accept(ids) -> set of ids``: the conversation filter
        (team, channel, ...), applied window by window; ``since``/``until`` bound the
        message's time."""
        whole = [w for w in words if w != prefix]
        found: dict[str, str] = {}
        bounds = {"limit": limit, "since": since, "until": until, "accept": accept,
                  "found": found}
        partial = await self._walk(whole or [prefix or ""], prefix if whole else None,
                                   **bounds)
        if not whole and prefix is not None and len(found) < limit and not partial:
            # one word being typed: the words it begins, when it is no word (yet) itself
            partial = await self._prefix_scan(prefix, **bounds)
        return Hits(list(found.items()), partial)

    async def _walk(self, whole: list[str], prefix: str | None, *, limit: int,
                    since: datetime | None, until: datetime | None, accept: Any,
                    found: dict[str, str]) -> bool:
        """Windows of hours from ``until`` back: the messages with every word of
        ``whole`` (and a word beginning with ``prefix``), newest first. The first window
        reads every word's index range; from then on only the rarest word's (seen so
        far), the others checked on its documents. True: stopped after MAX_SCANNED."""
        floor = hour_of(since or FLOOR)
        end = hour_of(until or utcnow())
        span = 1  # hours
        scanned = 0
        seen = dict.fromkeys(whole, 0)  # matches of each word so far
        while len(found) < limit and end >= floor:
            if scanned >= MAX_SCANNED:
                return True
            start = max(end - timedelta(hours=span - 1), floor)
            key = min(seen, key=lambda w: seen[w]) if any(seen.values()) else None
            docs, matches = await self._window(whole, prefix, start, end, key=key,
                                               seen=seen)
            scanned += matches
            await self._keep(_newest(docs, since, until), found, limit, accept)
            hours = int((end - start).total_seconds() // 3600) + 1
            density = matches / hours
            span = max(1, min(int(PAGE / density) if density else hours * GROWTH, MAX_HOURS))
            end = start - timedelta(hours=1)
        return False

    async def _window(self, whole: list[str], prefix: str | None, start: datetime,
                      end: datetime, *, key: str | None, seen: dict[str, int]
                      ) -> tuple[list[Doc], int]:
        """The messages of the hours ``start``..``end`` with every word (and the
        prefix): (their documents, how many index matches it took). With a ``key``
        word only its index range is read, the others are checked on its documents'
        words; without, each word's range (counting its matches in ``seen``)."""
        check = key is not None or prefix is not None
        fields = {"c": 1, "at": 1, **({"t": 1} if check else {})}
        if key is not None:
            docs = await self.coll.find(_hours(key, start, end), fields).to_list()
            matches = len(docs)
            others = [w for w in whole if w != key]
            docs = [d for d in docs if all(w in words_of(d["t"]) for w in others)]
        else:
            first, *rest = whole
            docs = await self.coll.find(_hours(first, start, end), fields).to_list()
            matches = seen[first] = len(docs)
            for word in rest:
                ids = {d["_id"] async for d in self.coll.find(_hours(word, start, end),
                                                               {"_id": 1})}
                seen[word] = len(ids)
                matches += len(ids)
                docs = [d for d in docs if d["_id"] in ids]
        if prefix:
            docs = [d for d in docs if any(w.startswith(prefix) for w in words_of(d["t"]))]
        return docs, matches

    async def _prefix_scan(self, prefix: str, *, limit: int, since: datetime | None,
                           until: datetime | None, accept: Any,
                           found: dict[str, str]) -> bool:
        """Messages with a word beginning with ``prefix`` (any day: the index range is
        the prefix's, so this costs all its matches, at most MAX_SCANNED)."""
        query: Doc = {"t": {"$gte": prefix, "$lt": prefix + "\U0010ffff"}}
        docs = await self.coll.find(query, {"c": 1, "at": 1}).limit(MAX_SCANNED).to_list()
        await self._keep(_newest(docs, since, until), found, limit, accept)
        return len(docs) >= MAX_SCANNED

    @staticmethod
    async def _keep(docs: list[Doc], found: dict[str, str], limit: int, accept: Any) -> None:
        """Add the conversations of ``docs`` (newest first) that ``accept`` lets through,
        asking about a few more than are missing at a time (not a whole page at once)."""
        fresh: dict[str, str] = {}
        for doc in docs:
            conversation_id = str(doc["c"])
            if conversation_id not in found and conversation_id not in fresh:
                fresh[conversation_id] = str(doc["_id"])
        pending = list(fresh.items())
        while pending and len(found) < limit:
            take = max(ASK_AT_ONCE, 4 * (limit - len(found)))
            chunk, pending = dict(pending[:take]), pending[take:]
            allowed = set(chunk) if accept is None else await accept(list(chunk))
            for conversation_id, message_id in chunk.items():
                if conversation_id in allowed and len(found) < limit:
                    found[conversation_id] = message_id


def _newest(docs: list[Doc], since: datetime | None, until: datetime | None) -> list[Doc]:
    """The entries from ``since`` to before ``until``, newest first."""
    kept = [d for d in docs if (since is None or d["at"] >= since)
            and (until is None or d["at"] < until)]
    return sorted(kept, key=lambda d: d["at"], reverse=True)
