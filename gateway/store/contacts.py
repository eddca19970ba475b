"""Store operations for one customer on every channel: link tokens, merges and their undo,
and which conversation a message from another channel continues.

- A *link token* proves that two channel accounts are one person: issued to a customer on
  one channel (web chat), redeemed by whoever sends it on another (Telegram ``/start``).
  Only its SHA-256 is stored; it is consumed by one conditional update (one winner), and
  refused once used, expired or unknown.
- A *merge* (an agent's decision) moves one contact's identities, conversations and
  profile onto another and records exactly what moved, so that ``undo`` can put back that
  and nothing else. Both run in a transaction; an undo that could no longer be exact
  (something moved or changed since) is refused with the reason.
- *Channel switch*: a message from a contact's one-to-one thread on channel A continues the
  contact's open conversation on channel B (the most recently active one); replies go
  where the customer wrote last (``Conversation.reply_channel`` / ``routes``).

One-to-one only: a thread is the person's own when its key is their external id there
(web chat visitors, Telegram private chats), when it is a Slack direct message, or when it
is a NEW email thread whose mail went to our address alone (the connector vouches:
``one_to_one``; such conversations are marked ``Conversation.one_to_one``). Group chats,
Slack channel threads and existing email threads keep their conversations, so nothing
private is continued or answered in a shared place.

``claim_identity`` joins a verified account (an email address proven by a code) to a
contact, unless another customer with a history holds it (then an agent decides: merge).
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from gateway.model import Conversation, ConversationRef, OwnerState, utcnow
from gateway.store.mongo import Doc, NotFound, Store, from_doc, new_id

LINK_PREFIX = "link_"  # a deep-link payload that is a link token (Telegram: [A-Za-z0-9_-])
LINK_TTL = timedelta(minutes=15)
# A conversation the bot holds is continued from another channel only if it was active
# this recently (a human's conversation, queued or assigned, always is).
SWITCH_WINDOW = timedelta(hours=24)
OPEN = (OwnerState.BOT, OwnerState.QUEUED, OwnerState.AGENT)
# Web chat binds a visitor's socket to their one conversation (its seq is the client's
# watermark), so web chat messages stay in the web chat's own conversation; a conversation
# that moved on to Telegram comes back there naturally (it is that conversation).
NO_SWITCH_FROM = frozenset({"webchat"})
# Email threads are keyed by their first mail, not by the person; a NEW mail from a
# verified address to our address alone is one-to-one, so it may continue the contact's
# open conversation (replies then go by email, threaded under that mail).
NEW_THREAD_SWITCH = frozenset({"email"})
# A direct-message channel is the person's own thread, new or not (its key is the DM
# channel's id, not the person's: the connector vouches ``one_to_one``).
DIRECT_THREADS = frozenset({"slack"})
MAX_MERGE_CHAIN = 20


class LinkState(StrEnum):
    LINKED = "linked"  # this identity redeemed it: it is linked
    EXPIRED = "expired"
    USED = "used"  # someone else redeemed it
    UNKNOWN = "unknown"
    # the account (an email address: its sender is not proven by the channel) belongs to
    # another customer with a history: not moved; an agent can merge the two
    TAKEN = "taken"


class NoRoute(NotFound):
    """The contact has no one-to-one thread on the channel asked for."""


class MergeConflict(Exception):
    """A merge or undo that cannot be done (exactly); the message says why."""


class Merge(BaseModel):
    """What one merge moved from ``merged`` onto ``survivor``: undo puts back exactly that."""

    model_config = ConfigDict(extra="forbid")

    id: str
    survivor: str = Field(description="the contact that lives on")
    merged: str = Field(description="the contact merged into it")
    by: str | None = Field(None, description="the agent who merged")
    merged_at: datetime
    identities: list[str] = Field(description="identity ids moved (channel:external id)")
    conversations: dict[str, int] = Field(description="conversation id -> its seq then")
    profile_added: dict[str, Any] = Field(description="profile keys the survivor gained")
    profile_replaced: dict[str, dict[str, Any]] = Field(
        description="key -> {before, after}: newer values that replaced the survivor's")
    survivor_seq: int = Field(description="the survivor's timeline counter at the merge")
    undone_at: datetime | None = None
    undone_by: str | None = None


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def is_link_payload(payload: str | None) -> bool:
    return bool(payload) and str(payload).startswith(LINK_PREFIX) and len(str(payload)) <= 64


def _newer(mine: Any, theirs: Any) -> bool:
    """``theirs`` is a profile entry set later than ``mine`` (both engine entries)."""
    if not (isinstance(mine, dict) and isinstance(theirs, dict)):
        return False
    a, b = mine.get("set_at"), theirs.get("set_at")
    return isinstance(a, datetime) and isinstance(b, datetime) and b > a


def _activity(conversation: Conversation) -> datetime:
    return conversation.last_activity_at or conversation.created_at


class ContactStore:
    """Link tokens, merges, channel switch: typed access over the ``Store``."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.tokens: AsyncCollection[Doc] = store.db["link_tokens"]
        self.merges: AsyncCollection[Doc] = store.db["contact_merges"]

    # -------------------------------------------------------------- link tokens

    async def create_token(
        self, contact_id: str, channel: str, *, conversation_id: str | None = None,
        ttl: timedelta = LINK_TTL,
    ) -> tuple[str, datetime]:
        """A new single-use token for ``contact_id`` to be redeemed on ``channel``."""
        token = LINK_PREFIX + secrets.token_urlsafe(24)
        now = utcnow()
        expires = now + ttl
        await self.tokens.insert_one({
            "_id": token_hash(token), "contact_id": contact_id, "channel": channel,
            "conversation_id": conversation_id, "created_at": now, "expires_at": expires,
            "used_at": None, "used_by": None})
        return token, expires

    async def consume_token(
        self, token: str, channel: str, identity_id: str
    ) -> tuple[LinkState, str | None]:
        """Redeem ``token`` for ``identity_id``: (state, the contact to link to if LINKED).
        ``token_conversation`` says which conversation it was asked for in.

        One conditional update: of two concurrent redeemers exactly one wins. Redeeming
        again by the same identity (a redelivered message) is LINKED again.
        """
        now = utcnow()
        key = token_hash(token)
        won = await self.tokens.update_one(
            {"_id": key, "used_at": None, "channel": channel, "expires_at": {"$gt": now}},
            {"$set": {"used_at": now, "used_by": identity_id}})
        doc = await self.tokens.find_one({"_id": key})
        state = self._state(doc, channel, identity_id, now, won.matched_count == 1)
        if state is not LinkState.LINKED or doc is None:
            return state, None
        return state, await self.survivor(str(doc["contact_id"]))

    async def token_conversation(self, token: str) -> str | None:
        """The conversation a token was asked for in (None: none, or unknown token)."""
        doc = await self.tokens.find_one({"_id": token_hash(token)}, {"conversation_id": 1})
        return None if doc is None or not doc.get("conversation_id") else str(
            doc["conversation_id"])

    async def token_contact(self, token: str) -> str | None:
        """The contact a token links to (as it lives on after merges); None: unknown."""
        doc = await self.tokens.find_one({"_id": token_hash(token)}, {"contact_id": 1})
        return None if doc is None else await self.survivor(str(doc["contact_id"]))

    async def token_state(self, token: str, channel: str, identity_id: str) -> LinkState:
        doc = await self.tokens.find_one({"_id": token_hash(token)})
        return self._state(doc, channel, identity_id, utcnow(), False)

    @staticmethod
    def _state(
        doc: Doc | None, channel: str, identity_id: str, now: datetime, won: bool
    ) -> LinkState:
        if doc is None or doc.get("channel") != channel:
            return LinkState.UNKNOWN
        if won or doc.get("used_by") == identity_id:
            return LinkState.LINKED
        if doc.get("used_at") is not None:
            return LinkState.USED
        return LinkState.EXPIRED if doc["expires_at"] <= now else LinkState.UNKNOWN

    async def survivor(self, contact_id: str) -> str:
        """The contact that ``contact_id`` lives on as (itself unless merged)."""
        for _ in range(MAX_MERGE_CHAIN):
            doc = await self.store.contacts.find_one({"_id": contact_id}, {"merged_into": 1})
            if doc is None or not doc.get("merged_into"):
                return contact_id
            contact_id = str(doc["merged_into"])
        return contact_id

    async def claim_identity(self, channel: str, external_id: str, contact_id: str) -> bool:
        """Make a *verified* account (channel, external id) an identity of ``contact_id``.

        True when it is the contact's now: new, already theirs, or held by a contact that
        has nothing else (no other identity, no conversation: nothing is merged by it).
        False when another customer with a history holds it: never merged silently; an
        agent can merge the two contacts (recorded, undoable). One conditional update
        decides a move, so concurrent claims have one winner."""
        key = f"{channel}:{external_id}"
        identities = self.store.identities
        try:
            await identities.insert_one({
                "_id": key, "channel": channel, "external_id": external_id,
                "contact_id": contact_id, "reachable": True, "created_at": utcnow(),
                "display_name": None})
            return True
        except DuplicateKeyError:
            pass
        had = await identities.find_one({"_id": key}, {"contact_id": 1})
        if had is None:  # pragma: no cover - deleted concurrently
            return False
        other = str(had["contact_id"])
        if other == contact_id:
            return True
        if await identities.count_documents({"contact_id": other, "_id": {"$ne": key}},
                                            limit=1):
            return False
        if await self.store.conversations.count_documents({"contact_id": other}, limit=1):
            return False
        moved = await identities.update_one({"_id": key, "contact_id": other},
                                            {"$set": {"contact_id": contact_id}})
        return moved.matched_count == 1

    # ------------------------------------------------------------ channel switch

    async def _own_threads(self, contact_id: str) -> set[str]:
        """``channel:thread key`` of the contact's one-to-one threads (key = their id)."""
        return {str(d["_id"]) async for d in self.store.identities.find(
            {"contact_id": contact_id}, {"_id": 1})}

    async def conversation_to_continue(
        self, channel: str, thread_key: str, contact_id: str, sender_external_id: str,
        *, one_to_one: bool = False,
    ) -> Conversation | None:
        """The contact's open conversation on another channel that this message continues,
        or None (the message goes to its own thread's conversation, as always).

        ``one_to_one``: the connector vouches that only the sender and we are in this
        message (an email to our address alone); then a *new* thread on a channel of
        NEW_THREAD_SWITCH continues it too. An existing thread keeps its conversation."""
        if channel in NO_SWITCH_FROM:
            return None
        personal = thread_key == sender_external_id or (
            one_to_one and channel in DIRECT_THREADS)
        if not personal:
            if not (one_to_one and channel in NEW_THREAD_SWITCH):
                return None  # not the person's own thread (a group, a Slack thread)
            if await self.store.find_conversation(channel, thread_key) is not None:
                return None  # a thread that has its conversation already keeps it
            routed = await self.store.conversations.find_one({
                "contact_id": contact_id, f"routes.{channel}": thread_key,
                "owner": {"$in": [o.value for o in OPEN]}})
            if routed is not None:  # a thread begun by a switch to it (even from its own
                return from_doc(Conversation, routed)  # channel): that conversation
        docs = self.store.conversations.find({
            "contact_id": contact_id, "owner": {"$in": [o.value for o in OPEN]},
            "channel": {"$ne": channel}})
        since = utcnow() - SWITCH_WINDOW
        others = [c for c in [from_doc(Conversation, d) async for d in docs]
                  if c.owner is not OwnerState.BOT or _activity(c) >= since]
        # resolved, with its CSAT question sent to this very thread and unanswered: the
        # answer goes there (anything else reopens it), as in the conversation's own thread
        asked = self.store.conversations.find({
            "contact_id": contact_id, "owner": OwnerState.RESOLVED.value,
            "reply_channel": channel, "csat.score": None, "csat.asked_at": {"$gte": since}})
        others += [c for c in [from_doc(Conversation, d) async for d in asked]
                   if c.routes.get(channel) == thread_key]
        if not others:
            return None
        own_threads = await self._own_threads(contact_id)
        others = [c for c in others
                  if c.one_to_one or f"{c.channel}:{c.thread_key}" in own_threads]
        if not others:
            return None
        best = max(others, key=_activity)
        own = await self.store.find_conversation(channel, thread_key)
        if (own is not None and own.contact_id == contact_id and own.owner in OPEN
                and (own.owner is not OwnerState.BOT or _activity(own) >= since)
                and _activity(own) >= _activity(best)):
            return None  # the customer's own thread here is the more recent one
        return best

    async def note_inbound(
        self, conversation: Conversation, channel: str, thread_key: str
    ) -> Conversation:
        """The customer wrote in ``conversation`` from (channel, thread key): replies go
        there from now on. Writes only when that changes where replies go."""
        own = (channel, thread_key) == (conversation.channel, conversation.thread_key)
        if own and conversation.reply_channel is None and channel not in conversation.routes:
            return conversation
        if not own and conversation.reply_channel == channel and (
                conversation.routes.get(channel) == thread_key):
            return conversation
        update: Doc = {"$set": {"reply_channel": None if own else channel}}
        routes = dict(conversation.routes)
        if own and channel in routes:  # another thread of this channel had taken over
            update["$unset"] = {f"routes.{channel}": ""}
            del routes[channel]
        if not own:
            update["$set"][f"routes.{channel}"] = thread_key
            routes[channel] = thread_key
        await self.store.conversations.update_one({"_id": conversation.id}, update)
        return conversation.model_copy(
            update={"reply_channel": None if own else channel, "routes": routes})

    async def route(self, conversation: Conversation, channel: str | None) -> ConversationRef:
        """Where an outbound item of ``conversation`` goes: on ``channel`` if asked (the
        conversation's own thread, or the contact's one-to-one thread there), else where
        the customer wrote last. Raises NoRoute if the contact has no thread there."""
        own = ConversationRef(channel=conversation.channel, thread_key=conversation.thread_key)
        wanted = channel or conversation.reply_channel
        if wanted is None:
            return own
        if wanted in conversation.routes:  # (on its own channel: a web chat visitor who
            # came back by a link, gateway/identity.py)
            return ConversationRef(channel=wanted, thread_key=conversation.routes[wanted])
        if wanted == conversation.channel:
            return own
        if channel is None:
            return own  # a reply channel without its thread (cannot happen): stay home
        threads = await self._own_threads(conversation.contact_id)
        for ident in sorted(threads):
            kind, _, external_id = ident.partition(":")
            # a thread whose key is the person's id there is their own (one-to-one)
            if kind == wanted and await self.store.find_conversation(wanted, external_id):
                return ConversationRef(channel=wanted, thread_key=external_id)
        # or their newest one-to-one thread there (a Slack DM, a mail to us alone)
        doc = await self.store.conversations.find_one(
            {"contact_id": conversation.contact_id, "channel": wanted, "one_to_one": True},
            {"thread_key": 1}, sort=[("created_at", -1)])
        if doc is not None:
            return ConversationRef(channel=wanted, thread_key=str(doc["thread_key"]))
        raise NoRoute(f"the contact has no {wanted} account to send to")

    # -------------------------------------------------------------------- merges

    async def _txn(self, work: Any) -> Any:
        async with self.store.client.start_session() as session:
            return await session.with_transaction(work)

    async def merge(self, survivor: str, merged: str, by: str | None = None) -> Merge:
        """Move ``merged``'s identities, conversations and profile onto ``survivor``."""
        if survivor == merged:
            raise MergeConflict("a contact cannot be merged into itself")

        async def work(s: AsyncClientSession) -> Merge:
            contacts = self.store.contacts
            keep = await contacts.find_one({"_id": survivor}, session=s)
            gone = await contacts.find_one({"_id": merged}, session=s)
            for cid, doc in ((survivor, keep), (merged, gone)):
                if doc is None:
                    raise NotFound(f"contact {cid} does not exist")
                if doc.get("merged_into"):
                    raise MergeConflict(
                        f"contact {cid} was already merged into {doc['merged_into']}")
            assert keep is not None
            assert gone is not None
            identities = [str(d["_id"]) async for d in self.store.identities.find(
                {"contact_id": merged}, {"_id": 1}, session=s)]
            conversations = {
                str(d["_id"]): await self.store.seq_above(str(d["_id"]), int(d["seq"]),
                                                          session=s)
                async for d in self.store.conversations.find({"contact_id": merged},
                                                             {"seq": 1}, session=s)}
            mine: dict[str, Any] = keep.get("profile") or {}
            added = {k: v for k, v in (gone.get("profile") or {}).items() if k not in mine}
            replaced = {k: {"before": mine[k], "after": v}
                        for k, v in (gone.get("profile") or {}).items()
                        if k in mine and _newer(mine[k], v)}
            record = Merge(
                id=new_id(), survivor=survivor, merged=merged, by=by, merged_at=utcnow(),
                identities=identities, conversations=conversations, profile_added=added,
                profile_replaced=replaced, survivor_seq=int(keep.get("seq", 0)))
            await self.store.identities.update_many(
                {"_id": {"$in": identities}}, {"$set": {"contact_id": survivor}}, session=s)
            await self.store.conversations.update_many(
                {"_id": {"$in": list(conversations)}}, {"$set": {"contact_id": survivor}},
                session=s)
            sets = {f"profile.{k}": v for k, v in added.items()}
            sets.update({f"profile.{k}": v["after"] for k, v in replaced.items()})
            update: Doc = {"$push": {"merged_from": merged}}
            if sets:
                update["$set"] = sets
            await contacts.update_one({"_id": survivor}, update, session=s)
            done = await contacts.update_one(
                {"_id": merged, "merged_into": {"$in": [None]}},
                {"$set": {"merged_into": survivor}}, session=s)
            if done.matched_count != 1:
                raise MergeConflict(f"contact {merged} was merged concurrently")
            doc = record.model_dump(mode="python")
            doc["_id"] = doc.pop("id")
            await self.merges.insert_one(doc, session=s)
            return record

        result: Merge = await self._txn(work)
        return result

    async def get_merge(self, merge_id: str) -> Merge:
        doc = await self.merges.find_one({"_id": merge_id})
        if doc is None:
            raise NotFound(f"merge {merge_id} does not exist")
        data = dict(doc)
        data["id"] = data.pop("_id")
        return Merge.model_validate(data)

    async def merges_of(self, contact_id: str) -> list[Merge]:
        """Merges into ``contact_id``, newest first."""
        ids = [str(d["_id"]) async for d in self.merges.find({"survivor": contact_id},
                                                             {"_id": 1})]
        found = [await self.get_merge(i) for i in ids]
        return sorted(found, key=lambda m: m.merged_at, reverse=True)

    async def undo(self, merge_id: str, by: str | None = None) -> Merge:
        """Put back exactly what the merge moved; MergeConflict if that is no longer exact."""

        async def work(s: AsyncClientSession) -> Merge:
            record = await self.get_merge(merge_id)
            if record.undone_at is not None:
                raise MergeConflict("this merge was already undone")
            await self._check_exact(record, s)
            keep, gone = record.survivor, record.merged
            await self.store.identities.update_many(
                {"_id": {"$in": record.identities}}, {"$set": {"contact_id": gone}},
                session=s)
            await self.store.conversations.update_many(
                {"_id": {"$in": list(record.conversations)}}, {"$set": {"contact_id": gone}},
                session=s)
            survivor_doc = await self.store.contacts.find_one(
                {"_id": keep}, {"merged_from": 1}, session=s) or {}
            update: Doc = (
                {"$pull": {"merged_from": gone}}
                if set(survivor_doc.get("merged_from") or []) - {gone}
                else {"$unset": {"merged_from": ""}})  # as it was before any merge
            if record.profile_added:
                update.setdefault("$unset", {}).update(
                    {f"profile.{k}": "" for k in record.profile_added})
            if record.profile_replaced:
                update["$set"] = {f"profile.{k}": v["before"]
                                  for k, v in record.profile_replaced.items()}
            await self.store.contacts.update_one({"_id": keep}, update, session=s)
            await self.store.contacts.update_one(
                {"_id": gone}, {"$unset": {"merged_into": ""}}, session=s)
            now = utcnow()
            done = await self.merges.update_one(
                {"_id": merge_id, "undone_at": None},
                {"$set": {"undone_at": now, "undone_by": by}}, session=s)
            if done.matched_count != 1:
                raise MergeConflict("this merge was undone concurrently")
            return record.model_copy(update={"undone_at": now, "undone_by": by})

        result: Merge = await self._txn(work)
        return result

    async def _check_exact(self, record: Merge, s: AsyncClientSession) -> None:
        """Raise MergeConflict naming the first thing that changed since the merge."""
        keep = await self.store.contacts.find_one({"_id": record.survivor}, session=s)
        if keep is None:
            raise NotFound(f"contact {record.survivor} does not exist")
        if keep.get("merged_into"):
            raise MergeConflict(
                f"contact {record.survivor} was itself merged into {keep['merged_into']} "
                "since; undo that merge first")
        async for doc in self.store.identities.find(
                {"_id": {"$in": record.identities}}, session=s):
            if doc["contact_id"] != record.survivor:
                raise MergeConflict(f"identity {doc['_id']} was moved to another contact "
                                    "since the merge")
        async for doc in self.store.conversations.find(
                {"_id": {"$in": list(record.conversations)}}, session=s):
            if doc["contact_id"] != record.survivor:
                raise MergeConflict(f"conversation {doc['_id']} was moved to another "
                                    "contact since the merge")
            top = await self.store.seq_above(str(doc["_id"]), int(doc["seq"]), session=s)
            if top != record.conversations[str(doc["_id"])]:
                raise MergeConflict(f"conversation {doc['_id']} has new messages since the "
                                    "merge")
        moved = set(record.identities)
        async for doc in self.store.messages.find(
                {"contact_id": record.survivor, "contact_seq": {"$gt": record.survivor_seq},
                 "direction": "in"}, {"channel": 1, "sender": 1}, session=s):
            if f"{doc['channel']}:{(doc.get('sender') or {}).get('id')}" in moved:
                raise MergeConflict(f"the merged contact wrote on {doc['channel']} since the "
                                    "merge (that conversation belongs to both now)")
        profile = keep.get("profile") or {}
        for key, value in record.profile_added.items():
            if profile.get(key) != value:
                raise MergeConflict(f"profile field {key!r} changed since the merge")
        for key, change in record.profile_replaced.items():
            if profile.get(key) != change["after"]:
                raise MergeConflict(f"profile field {key!r} changed since the merge")
