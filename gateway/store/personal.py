"""Personal data in the store: where one contact's data is, and taking it out.

``CATALOGUE`` names every collection the gateway writes and what personal data it holds
(docs/data-rights.md is written from it; tests/test_data_rights.py checks that every
collection a running gateway creates is in it). ``find_scope`` gathers what belongs to
one contact: the contact and every contact merged into it (recursively, by
``merged_from``), the empty shells a channel link left behind (``timeline_sources``),
their identities, their conversations, and their messages in other contacts' group
conversations (a Telegram group, a Slack channel thread, a mail with Cc: those
conversations are the first writer's). ``Remover`` deletes conversations with everything
hanging off them (erase and retention) and a scope's contact data (erase).

A conversation is first *tombstoned*: in one transaction its owner becomes ``resolved``
(with the turn state's copy, so a bot turn in flight cannot commit after it), its agent's
load counter goes down, and its ``contact_id`` becomes ``erased:<id>``. That change
travels through the change feed to every gateway process, which forget what they cached
of the conversation (the web chat thread cache, the writer's seq numbers, the held turn),
so nothing is appended to it afterwards from a cache. Then what hangs off it is deleted,
the conversation last; a second pass a moment later deletes what a process wrote while it
happened (the search indexer lags by about a second). A failed removal can be run again:
tombstoned conversations are found by their ``erased:`` contact id.

Analytics keep their figures: ``outcomes`` and ``sla_breaches`` are anonymised (contact,
conversation and the customer's CSAT comment removed), not deleted.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from gridfs import AsyncGridFSBucket, NoFile

from gateway.model import OwnerState, utcnow
from gateway.store.mongo import Doc, Op, Store, new_id, owner_copy_op
from gateway.store.writer import Precondition

ERASED = "erased:"  # a tombstoned conversation's contact_id: erased:<the erased contact>
RETAINED = ERASED + "retention"  # ... of one removed by retention
BATCH = 500  # ids per $in
LATE_WRITES = 1.5  # seconds before the second pass (the search indexer writes within ~1 s)
MAX_CONTACTS = 200  # contacts one scope may gather (merges of merges ...)
BUCKET = "attachment_files"  # gateway/store/files.py
# channel_state keys (``<channel>:<key>``) written by the connectors for one conversation
# or one person; the connectors own the formats (named here, the core does not import
# them; the erase test fails if one is missed).
EMAIL_RAW = "email:raw:"  # + sha256 of the raw mail: connectors/email/connector.py raw_key
EMAIL_THREAD = "email:thread:"  # + thread key: address, name, subject (threads.py)
SLACK_UPLOAD = "slack:upload:"  # + outbound item id: Slack file ids (slack/files.py)

# collection -> (what personal data it holds, what erase / retention do with it)
CATALOGUE: dict[str, tuple[str, str]] = {
    "contacts": ("name, profile (what the bot saved: email, phone, ...), merges",
                 "erase: deleted"),
    "identities": ("channel accounts: web chat visitor id, Telegram user id, Slack user "
                   "id, email address; display names", "erase: deleted"),
    "conversations": ("thread keys (chat ids, email threads), routes, CSAT comment, "
                      "labels", "erase and retention: deleted"),
    "messages": ("everything said and sent, both ways; names, email headers and bodies; "
                 "outbox items (delivery state) are messages too",
                 "erase and retention: deleted"),
    "attachments": ("file records: names, sender", "erase and retention: deleted"),
    f"{BUCKET}.files": ("the files' bytes (GridFS)", "erase and retention: deleted"),
    f"{BUCKET}.chunks": ("the files' bytes (GridFS)", "erase and retention: deleted"),
    "file_fetches": ("files still to fetch from Telegram/Slack: sender, file reference",
                     "erase and retention: deleted"),
    "search_terms": ("the words of every message (search)", "erase and retention: deleted"),
    "turn_state": ("the bot's memory of a conversation (slots)",
                   "erase and retention: deleted"),
    "bot_events": ("the bot's event log of turns without a reply",
                   "erase and retention: deleted"),
    "channel_state": ("raw mails (email:raw:*), email threads' address and subject, sent "
                      "mails' threading, Slack uploads, old web chat tokens; also global "
                      "state without personal data", "erase and retention: the "
                      "conversation's or the person's keys deleted"),
    "link_tokens": ("channel-link tokens (hashed) of a contact, who redeemed them",
                    "erase: deleted; expire after a day anyway"),
    "email_codes": ("email-link codes (hashed) with the address they went to",
                    "erase: deleted; expire after a day anyway"),
    "email_code_limits": ("per-address and per-visitor counters (the address is in the "
                          "id)", "erase: deleted; expire after a day anyway"),
    "contact_merges": ("what a merge moved: identity ids, profile values",
                       "erase: deleted (the merge cannot be undone then)"),
    "timeline_sources": ("which contacts' conversations a link moved to a contact",
                         "erase: deleted"),
    "outcomes": ("analytics per ended conversation: contact, conversation, CSAT comment",
                 "erase and retention: anonymised (figures kept)"),
    "sla_breaches": ("SLA breaches per conversation (conversation id only)",
                     "erase and retention: anonymised (figures kept)"),
    "live_signals": ("typing signals per conversation (kept a minute)",
                     "erase and retention: deleted"),
    "audit": ("who erased or exported which contact id, counts (no content)", "kept"),
    "agents": ("agents' names, emails, password hashes (not customers)", "not touched"),
    "sessions": ("agents' console sessions", "not touched"),
    "login_attempts": ("agents' failed sign-ins (email, address)", "not touched"),
    "canned_responses": ("texts agents reuse (no customer data)", "not touched"),
    "labels": ("label names", "not touched"),
    "leases": ("which process runs what", "not touched"),
    "live_sockets": ("agents' open console sockets", "not touched"),
    "search_state": ("the search indexer's mark", "not touched"),
}


class Merged(Exception):
    """The contact was merged into another: its data is the survivor's now."""

    def __init__(self, contact_id: str, survivor: str) -> None:
        super().__init__(f"contact {contact_id} was merged into {survivor}: its data is "
                         f"{survivor}'s now")
        self.survivor = survivor


@dataclass
class Scope:
    """Everything of one contact (``root``) in the store, as ids."""

    root: str
    contacts: list[str]  # the root first, then those merged into it, then link shells
    identities: list[Doc]
    conversations: list[str]  # the contacts' own conversations
    # their items in others' conversations (and the bot's replies to them there), and
    # the bot's event log of those turns
    elsewhere: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)

    @property
    def identity_ids(self) -> list[str]:
        return [str(d["_id"]) for d in self.identities]

    def senders(self) -> dict[str, set[str]]:
        """channel -> the external ids the contact writes as there."""
        found: dict[str, set[str]] = {}
        for doc in self.identities:
            found.setdefault(str(doc["channel"]), set()).add(str(doc["external_id"]))
        return found

    def wrote(self, doc: Doc) -> bool:
        """An item the contact sent (a customer's message from one of its identities)."""
        sender = doc.get("sender") or {}
        return sender.get("role") == "customer" and (
            f"{doc.get('channel')}:{sender.get('id')}" in self._identity_set)

    @cached_property
    def _identity_set(self) -> frozenset[str]:
        return frozenset(self.identity_ids)


def chunks(ids: Iterable[Any], size: int = BATCH) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for value in ids:
        batch.append(value)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


async def survivor_of(store: Store, contact_id: str) -> str | None:
    """The contact ``contact_id`` lives on as (itself unless merged); None: no such."""
    doc = await store.contacts.find_one({"_id": contact_id}, {"merged_into": 1})
    for _ in range(MAX_CONTACTS):
        if doc is None:
            return None
        if not doc.get("merged_into"):
            return str(doc["_id"])
        doc = await store.contacts.find_one({"_id": doc["merged_into"]}, {"merged_into": 1})
    return None


async def find_scope(store: Store, contact_id: str) -> Scope | None:
    """Everything of ``contact_id``; None if there is no such contact. Raises ``Merged``
    for a contact merged into another (its data is the survivor's)."""
    root = await store.contacts.find_one({"_id": contact_id}, {"merged_into": 1})
    if root is None:
        return None
    if root.get("merged_into"):
        raise Merged(contact_id, await survivor_of(store, contact_id) or str(
            root["merged_into"]))
    contacts = await _contacts(store, contact_id)
    identities = [d async for d in store.identities.find({"contact_id": {"$in": contacts}})]
    conversations = [str(d["_id"]) async for d in store.conversations.find(
        {"contact_id": {"$in": [*contacts, ERASED + contact_id]}}, {"_id": 1})]
    scope = Scope(contact_id, contacts, identities, conversations)
    scope.elsewhere, scope.events = await _elsewhere(store, scope)
    return scope


async def _contacts(store: Store, root: str) -> list[str]:
    """``root``, the contacts merged into it (recursively: a merge moves everything of the
    merged contact, so it is the same person), and the shells a link emptied (their
    identity moved here by a verified link; nothing of theirs is left elsewhere)."""
    found = [root]
    frontier = [root]
    while frontier and len(found) < MAX_CONTACTS:
        docs = store.contacts.find({"_id": {"$in": frontier}}, {"merged_from": 1})
        merged = [str(m) async for d in docs for m in d.get("merged_from") or []]
        linked = [str(s) async for d in store.db["timeline_sources"].find(
            {"_id": {"$in": frontier}}) for s in d.get("linked") or []]
        frontier = []
        for other in merged + [s for s in linked if await _shell(store, s)]:
            if other not in found:
                found.append(other)
                frontier.append(other)
    return found


async def _shell(store: Store, contact_id: str) -> bool:
    """A contact with no identity and no conversation left (a link took them)."""
    return not (await store.identities.count_documents({"contact_id": contact_id}, limit=1)
                or await store.conversations.count_documents({"contact_id": contact_id},
                                                             limit=1))


async def _elsewhere(store: Store, scope: Scope) -> tuple[list[str], list[str]]:
    """The contact's items outside its conversations: stored under its id in a
    conversation that moved on, or written by it in another's group conversation (one
    not ``one_to_one``: only those can have more than one customer), with the bot's
    replies to them there. Returns (item ids, ``bot_events`` ids of their turns)."""
    own = set(scope.conversations)
    found: dict[str, tuple[str, int]] = {}  # item id -> (conversation id, seq)
    fields = {"conversation_id": 1, "seq": 1}
    async for doc in store.messages.find({"contact_id": {"$in": scope.contacts}}, fields):
        if str(doc["conversation_id"]) not in own:
            found[str(doc["_id"])] = (str(doc["conversation_id"]), int(doc["seq"]))
    senders = scope.senders()
    groups = [str(d["_id"]) async for d in store.conversations.find(
        {"one_to_one": {"$ne": True}}, {"_id": 1}) if str(d["_id"]) not in own]
    for batch in chunks(groups if senders else []):
        for channel, ids in senders.items():
            async for doc in store.messages.find(
                    {"conversation_id": {"$in": batch}, "channel": channel,
                     "sender.role": "customer", "sender.id": {"$in": sorted(ids)}}, fields):
                found[str(doc["_id"])] = (str(doc["conversation_id"]), int(doc["seq"]))
    events = [f"{cid}:{seq:012d}" for cid, seq in found.values()]  # turn_records.event_key
    replies: list[str] = []
    for cid in sorted({cid for cid, _ in found.values()}):
        async for doc in store.messages.find(
                {"conversation_id": cid, "reply_to_id": {"$in": list(found)}}, {"_id": 1}):
            replies.append(str(doc["_id"]))
    return [*found, *(r for r in replies if r not in found)], events


async def find_retained(store: Store, before: Any) -> list[str]:
    """Resolved conversations with no activity since ``before`` (the oldest first)."""
    found: list[tuple[Any, str]] = []
    async for doc in store.conversations.find(
            {"owner": OwnerState.RESOLVED.value, "updated_at": {"$lt": before}},
            {"updated_at": 1, "last_activity_at": 1}):
        active = doc.get("last_activity_at")
        if active is None or active < before:
            found.append((doc["updated_at"], str(doc["_id"])))
    found.sort()
    return [cid for _, cid in found]


class Remover:
    """Deletes a scope's or a list of conversations' data; counts what it removed."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.db = store.db
        self.bucket = AsyncGridFSBucket(store.db, bucket_name=BUCKET)
        self.counts: Counter[str] = Counter()

    def _count(self, name: str, n: int) -> None:
        if n:
            self.counts[name] += n

    async def _delete(self, collection: str, query: Doc, name: str | None = None) -> None:
        result = await self.db[collection].delete_many(query)
        self._count(name or collection, result.deleted_count)

    async def _delete_in(self, collection: str, key: str, values: Iterable[Any],
                         name: str | None = None) -> None:
        for batch in chunks(values):
            await self._delete(collection, {key: {"$in": batch}}, name)

    # ------------------------------------------------------------- conversations

    async def conversations(self, ids: Sequence[str], tombstone: str,
                            items: Sequence[str] = ()) -> None:
        """Delete conversations ``ids`` with everything hanging off them, and the items
        ``items`` of other conversations (the contact's own, with their files)."""
        threads: list[str] = []
        for cid in ids:
            threads += await self._tombstone(cid, tombstone)
        message_ids, digests, files = await self._items(ids, items)
        await self._files(ids, items, files)
        keys = [EMAIL_RAW + d for d in digests] + [EMAIL_THREAD + t for t in threads]
        keys += [SLACK_UPLOAD + m for m in message_ids]
        await self._delete_in("channel_state", "_id", keys)
        await self._delete_in("channel_state", "conversation_id", ids)  # email:sent:*
        await self._delete_in("search_terms", "c", ids)
        await self._delete_in("search_terms", "_id", message_ids)
        await self._delete_in("turn_state", "_id", ids)
        await self._delete_in("bot_events", "conversation_id", ids)
        await self._delete_in("live_signals", "conversation_id", ids)
        await self._anonymise(ids)
        await self._delete_in("messages", "conversation_id", ids)
        await self._delete_in("messages", "_id", items)
        await self._delete_in("conversations", "_id", ids)

    async def late_writes(self, ids: Sequence[str], items: Sequence[str] = ()) -> None:
        """The second pass: what a process wrote to the conversations while they were
        removed (a turn's checkpoint, the search indexer's batch, a fetched file)."""
        await asyncio.sleep(LATE_WRITES)
        before = self.counts.copy()
        _, _, files = await self._items(ids, items)
        await self._files(ids, items, files)
        for collection, key in (("search_terms", "c"), ("turn_state", "_id"),
                                ("bot_events", "conversation_id"),
                                ("messages", "conversation_id")):
            await self._delete_in(collection, key, ids)
        await self._delete_in("search_terms", "_id", items)
        self.counts = before  # already counted (or written after: not the customer's ask)

    async def _tombstone(self, cid: str, tombstone: str) -> list[str]:
        """Resolve the conversation, free its agent, point it at the tombstone contact:
        every process drops what it cached of it. Returns its email thread keys."""
        for _ in range(5):
            doc = await self.store.conversations.find_one({"_id": cid})
            if doc is None:
                return []
            threads = [str(doc["thread_key"])] if doc.get("channel") == "email" else []
            threads += [str(t) for c, t in (doc.get("routes") or {}).items() if c == "email"]
            query: Doc = {"_id": cid, "owner": doc.get("owner"),
                          "assignee_id": doc.get("assignee_id")}
            ops = [Op("conversations", query, {"$set": {
                "owner": OwnerState.RESOLVED.value, "assignee_id": None,
                "contact_id": tombstone, "updated_at": utcnow()}}, required=True),
                owner_copy_op(cid, OwnerState.RESOLVED, reset_bot=True)]
            if doc.get("owner") == OwnerState.AGENT.value and doc.get("assignee_id"):
                ops.append(Op("agents", {"_id": doc["assignee_id"], "load": {"$gt": 0}},
                              {"$inc": {"load": -1}}))
            try:
                await self.store.apply(ops)
            except Precondition:
                continue  # claimed, resolved ... meanwhile: read it again
            return threads
        raise RuntimeError(f"conversation {cid} kept changing; try again")

    async def _items(self, ids: Sequence[str], items: Sequence[str]
                     ) -> tuple[list[str], set[str], set[str]]:
        """(message ids, raw-mail digests, attachment ids) of the conversations' items
        and of ``items``."""
        message_ids: list[str] = []
        digests: set[str] = set()
        files: set[str] = set()
        fields = {"channel_data.raw_digest": 1, "channel_data.raw_attachment_id": 1,
                  "attachments.id": 1}

        async def read(query: Doc) -> None:
            async for doc in self.store.messages.find(query, fields):
                message_ids.append(str(doc["_id"]))
                data = doc.get("channel_data") or {}
                if isinstance(data.get("raw_digest"), str):
                    digests.add(data["raw_digest"])
                if isinstance(data.get("raw_attachment_id"), str):
                    files.add(data["raw_attachment_id"])
                files.update(str(a["id"]) for a in doc.get("attachments") or []
                             if isinstance(a, dict) and a.get("id"))

        for batch in chunks(ids):
            await read({"conversation_id": {"$in": batch}})
        for batch in chunks(items):
            await read({"_id": {"$in": batch}})
        return message_ids, digests, files

    async def _files(self, ids: Sequence[str], items: Sequence[str],
                     files: Iterable[str]) -> None:
        """Attachments of the conversations and of the items: records, bytes, jobs."""
        found: dict[str, Any] = {}
        for key, values in (("conversation_id", ids), ("item_id", items),
                            ("_id", sorted(files))):
            for batch in chunks(values):
                async for doc in self.db["attachments"].find({key: {"$in": batch}},
                                                             {"file_id": 1}):
                    found[str(doc["_id"])] = doc.get("file_id")
        await self._bytes(found)
        await self._delete_in("file_fetches", "conversation_id", ids)
        await self._delete_in("file_fetches", "_id", sorted({*files, *found}))

    async def _bytes(self, records: dict[str, Any]) -> None:
        """Delete attachment records and their GridFS files (and any other copy of the
        same attachment's bytes: a second process's upload that lost the race)."""
        gridfs = self.db[f"{BUCKET}.files"]
        for batch in chunks(records):
            copies = {d["_id"] async for d in gridfs.find(
                {"metadata.attachment_id": {"$in": batch}}, {"_id": 1})}
            for file_id in copies | {records[a] for a in batch if records[a] is not None}:
                try:
                    await self.bucket.delete(file_id)
                except NoFile:
                    continue
                self._count("files", 1)
            await self._delete("attachments", {"_id": {"$in": batch}})

    async def _anonymise(self, ids: Sequence[str]) -> None:
        """Outcomes and SLA breaches of the conversations keep their figures only."""
        for batch in chunks(ids):
            await self.anonymise_outcomes({"conversation_id": {"$in": batch}})
            async for doc in self.db["sla_breaches"].find({"conversation_id": {"$in": batch}}):
                await self.db["sla_breaches"].insert_one(
                    {**doc, "_id": f"anonymised:{new_id()}", "conversation_id": None})
                await self.db["sla_breaches"].delete_one({"_id": doc["_id"]})
                self._count("sla_breaches_anonymised", 1)

    async def anonymise_outcomes(self, query: Doc) -> None:
        result = await self.db["outcomes"].update_many(
            {**query}, {"$set": {"contact_id": None, "conversation_id": None,
                                 "csat_comment": None, "anonymised": True}})
        self._count("outcomes_anonymised", result.modified_count)

    # ------------------------------------------------------------------ contacts

    async def contact(self, scope: Scope) -> None:
        """Erase everything of ``scope``: its conversations, its items elsewhere, its
        identities and contacts, and what names them."""
        await self.conversations(scope.conversations, ERASED + scope.root, scope.elsewhere)
        await self._delete_in("bot_events", "_id", scope.events)
        contacts, identities = scope.contacts, scope.identity_ids
        addresses = {str(d["external_id"]) for d in scope.identities if d["channel"] == "email"}
        for key, values in (("contact_id", contacts), ("_id", identities)):
            for batch in chunks(values):
                async for doc in self.db["email_codes"].find({key: {"$in": batch}},
                                                             {"address": 1}):
                    if isinstance(doc.get("address"), str):
                        addresses.add(doc["address"])
                await self._delete("email_codes", {key: {"$in": batch}})
        await self._limits([f"requester:{i}" for i in identities]
                           + [f"address:{a}" for a in sorted(addresses)])
        await self._delete_in("link_tokens", "contact_id", contacts)
        await self._delete_in("link_tokens", "used_by", identities)
        await self._delete_in("link_tokens", "conversation_id", scope.conversations)
        visitors = sorted(scope.senders().get("webchat", set()))
        await self._delete_in("channel_state", "visitor_id", visitors)  # webchat:token:*
        await self._delete_in("contact_merges", "survivor", contacts)
        await self._delete_in("contact_merges", "merged", contacts)
        await self._delete_in("timeline_sources", "_id", contacts)
        for batch in chunks(contacts):
            await self.db["timeline_sources"].update_many(
                {"linked": {"$in": batch}}, {"$pull": {"linked": {"$in": batch}}})
            await self.anonymise_outcomes({"contact_id": {"$in": batch}})
        # files or jobs still under the contact's id (a conversation that moved on)
        await self._bytes({str(d["_id"]): d.get("file_id") async for d in self.db[
            "attachments"].find({"contact_id": {"$in": contacts}}, {"file_id": 1})})
        await self._delete_in("file_fetches", "contact_id", contacts)
        await self._delete_in("identities", "contact_id", contacts)
        await self._delete_in("identities", "_id", identities)
        await self._delete_in("contacts", "_id", contacts)

    async def _limits(self, prefixes: list[str]) -> None:
        """Email-code rate counters (``<kind>:<key>:<hour>``) of these keys."""
        for batch in chunks(prefixes, 50):
            pattern = "^(?:" + "|".join(re.escape(p) for p in batch) + "):[0-9]{10}$"
            await self._delete("email_code_limits", {"_id": {"$regex": pattern}})
