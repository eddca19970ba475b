"""Words of every message, findable on MongoDB and on the embedded store alike.

No ``$text`` (the embedded store has none, and a text index would tie us to one server):
each message's words are kept, normalised, in a ``search_terms`` document
``{_id: message id, c: conversation id, t: [terms], at: stored at}`` with a multikey
index on ``(t, at)``. A query looks one term up in that index (the rarest of its words,
counted on the index first) and checks the others on the documents found, newest first:
on the embedded store a single-term lookup is a few ms over 100,000 messages where an
``$all`` of two terms scans everything (bench/search.py, BENCHMARKS.md).

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
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING, IndexModel, InsertOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError

from gateway.store.mongo import Doc, Store

TERMS = "search_terms"
MAX_TERMS = 300  # per message
MAX_QUERY_WORDS = 8
PREFIX_MIN = 3
PAGE = 1000  # documents read at a time while checking the other words
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


def entry(doc: Doc) -> Doc:
    return {"_id": doc["_id"], "c": doc["conversation_id"], "t": message_terms(doc),
            "at": doc["created_at"]}


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
            IndexModel([("t", ASCENDING), ("at", DESCENDING)], name="terms"),
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

    async def _count(self, term: str, prefix: bool) -> int:
        return await self.coll.count_documents(_match(term, prefix))

    async def find(self, words: list[str], prefix: str | None, *, limit: int,
                   since: datetime | None = None, until: datetime | None = None,
                   accept: Any = None) -> Hits:
        """Conversations with a message that has every word (the last one also as a
        prefix), newest first. ``accept(ids) -> set of ids``: the conversation filter
        (team, channel, ...), applied page by page; ``since``/``until`` bound the
        message's time."""
        conditions = [(w, w == prefix) for w in words]
        counts = [await self._count(w, p) for w, p in conditions]
        key_term, key_prefix = conditions[counts.index(min(counts))]
        others = [(w, p) for w, p in conditions if (w, p) != (key_term, key_prefix)]
        query = _match(key_term, key_prefix)
        if since is not None or until is not None:
            bounds: Doc = {"$gte": since} if since else {}
            query["at"] = {**bounds, **({"$lt": until} if until else {})}
        found: dict[str, str] = {}
        scanned, skip = 0, 0
        while len(found) < limit and scanned < MAX_SCANNED:
            page = await self.coll.find(query, {"c": 1, "t": 1}).sort(
                "at", DESCENDING).skip(skip).limit(PAGE).to_list()
            skip += len(page)
            scanned += len(page)
            fresh: dict[str, str] = {}
            for doc in page:
                if doc["c"] in found or doc["c"] in fresh:
                    continue
                if all(_has(doc["t"], w, p) for w, p in others):
                    fresh[str(doc["c"])] = str(doc["_id"])
            allowed = set(fresh) if accept is None else await accept(list(fresh))
            for conversation_id, message_id in fresh.items():
                if conversation_id in allowed and len(found) < limit:
                    found[conversation_id] = message_id
            if len(page) < PAGE:
                return Hits(list(found.items()), False)
        return Hits(list(found.items()), len(found) < limit)


def _match(term: str, prefix: bool) -> Doc:
    if not prefix:
        return {"t": term}
    return {"t": {"$gte": term, "$lt": term + "\U0010ffff"}}


def _has(found: list[str], term: str, prefix: bool) -> bool:
    if not prefix:
        return term in found
    return any(t.startswith(term) for t in found)
