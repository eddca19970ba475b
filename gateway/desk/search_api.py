"""Agent API: search (part of ``/api``, see api.py).

``GET /api/v1/search/conversations`` finds conversations by words in any of their
messages, on any channel (an email's body and subject too; the customer's name, handle
and address as they wrote), and by filters: channel, owner state, team, agent, label,
the contact (name, email, phone, handle, any channel account), a date range. Words and
filters combine (all of them must hold); newest first, each with the newest message that
has the words. ``GET /api/v1/search/contacts`` finds contacts by name, email, phone or
any channel account. Only what the agent may read is found (the team rule of
gateway/desk/files_api.py ``may_read``).

Words are matched whole, the last one also as a prefix (3 characters or more); case and
accents do not matter (gateway/store/search.py).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field

from gateway.desk.auth import BadInput
from gateway.desk.files_api import may_read
from gateway.desk.http import AGENT, json_response, query_time
from gateway.desk.openapi import Endpoint, Query, time_query
from gateway.keys import STORE
from gateway.model import Activity, Contact, Conversation, OwnerState
from gateway.store import Store
from gateway.store.mongo import Doc, from_doc
from gateway.store.search import SearchTerms, fold, query_terms

MAX_LIMIT = 100
MAX_CONTACTS = 200  # contacts a contact filter may stand for

# The api module imports this one (for the endpoint table), so its names are imported
# where they are used.


class SearchHit(BaseModel):
    conversation: Any = Field(description="the conversation (as GET /conversations/{id})")
    message: Activity | None = Field(description="its newest message with the words "
                                     "(null when searching by filters only)")


class SearchResults(BaseModel):
    items: list[SearchHit] = Field(description="newest first")
    partial: bool = Field(description="the search stopped early (20,000 messages "
                          "checked): older matches may exist; narrow it down")


class ContactResults(BaseModel):
    items: list[Any] = Field(description="contacts (as in a conversation), by name")


SEARCH_MODELS: list[type[BaseModel]] = [SearchHit, SearchResults, ContactResults]


def _store(request: web.Request) -> Store:
    return request.config_dict[STORE]


def _list(request: web.Request, name: str) -> list[str]:
    raw = request.query.get(name, "")
    return [v.strip() for v in raw.split(",") if v.strip()]


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise BadInput(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return int(raw)


async def contact_ids(store: Store, text: str, limit: int = MAX_CONTACTS) -> list[str]:
    """Contacts whose name, profile email or phone, or any channel account (address,
    handle, user id, display name) contains ``text`` (case-insensitive)."""
    pattern = {"$regex": re.escape(text.strip()), "$options": "i"}
    found: dict[str, None] = {}
    async for doc in store.contacts.find(
            {"$or": [{"name": pattern}, {"profile.email.value": pattern},
                     {"profile.phone.value": pattern}, {"profile.email": pattern},
                     {"profile.phone": pattern}], "merged_into": None},
            {"_id": 1}).limit(limit):
        found[str(doc["_id"])] = None
    digits = re.sub(r"\D", "", text)
    ident_or: list[Doc] = [{"external_id": pattern}, {"display_name": pattern}]
    if len(digits) >= 6:  # a phone number written another way
        ident_or.append({"external_id": {"$regex": re.escape(digits)}})
    async for doc in store.identities.find({"$or": ident_or}, {"contact_id": 1}).limit(limit):
        found[str(doc["contact_id"])] = None
    return list(found)[:limit]


def _filters(request: web.Request) -> Doc:
    query: Doc = {}
    channels = _list(request, "channel")
    if channels:
        query["channel"] = {"$in": channels}
    owners = _list(request, "owner")
    if owners:
        try:
            query["owner"] = {"$in": [OwnerState(o).value for o in owners]}
        except ValueError:
            raise BadInput("owner must be bot, queued, agent or resolved "
                           "(comma separated)") from None
    if team := request.query.get("team", "").strip():
        query["handoff.team"] = team
    if agent := request.query.get("agent", "").strip():
        query["assignee_id"] = agent
    if label := request.query.get("label", "").strip():
        query["labels"] = label
    return query


def passes(conversation: Conversation, filters: Doc) -> bool:
    """``filters`` (as ``_filters`` builds them) hold for ``conversation``."""
    data = conversation.model_dump(mode="json")
    for field, wanted in filters.items():
        value: Any = data
        for part in field.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(wanted, dict):  # {"$in": [...]}
            if value not in wanted["$in"]:
                return False
        elif isinstance(value, list):  # labels: one of them
            if wanted not in value:
                return False
        elif value != wanted:
            return False
    return True


async def search_conversations(request: web.Request) -> web.Response:
    from gateway.desk.api import _conversation_out  # noqa: PLC0415

    store, agent = _store(request), request[AGENT]
    limit = _limit(request)
    filters = _filters(request)
    since = query_time(request, "since", datetime.min) if "since" in request.query else None
    until = query_time(request, "until", datetime.max) if "until" in request.query else None
    if contact := request.query.get("contact", "").strip():
        filters["contact_id"] = {"$in": await contact_ids(store, contact)}
    text = request.query.get("q", "")
    words, prefix = query_terms(text)
    if text.strip() and not words:  # no word that can be in a message ("!", "a")
        return json_response(SearchResults(items=[], partial=False))

    async def readable(ids: list[str]) -> dict[str, Conversation]:
        # by id alone, the filters checked here: the embedded store plans an _id $in
        # with other conditions as a scan of every conversation
        docs = store.conversations.find({"_id": {"$in": ids}})
        found = [from_doc(Conversation, d) async for d in docs]
        return {c.id: c for c in found if may_read(agent, c) and passes(c, filters)}

    items: list[SearchHit] = []
    partial = False
    if words:
        known: dict[str, Conversation] = {}

        async def accept(ids: list[str]) -> set[str]:
            allowed = await readable(ids)
            known.update(allowed)
            return set(allowed)

        hits = await SearchTerms(store).find(words, prefix, limit=limit, since=since,
                                             until=until, accept=accept)
        partial = hits.partial
        for conversation_id, message_id in hits.conversations:
            message = await store.get_message(message_id)
            items.append(SearchHit(
                conversation=await _conversation_out(request, known[conversation_id]),
                message=message))
    else:
        query = dict(filters)
        if since is not None or until is not None:
            query["created_at"] = {**({"$gte": since} if since else {}),
                                   **({"$lt": until} if until else {})}
        scanned = 0
        cursor = store.conversations.find(query).sort("created_at", -1)
        async for doc in cursor:
            scanned += 1
            conversation = from_doc(Conversation, doc)
            if may_read(agent, conversation):
                items.append(SearchHit(
                    conversation=await _conversation_out(request, conversation),
                    message=None))
            if len(items) >= limit:
                break
    return json_response(SearchResults(items=items, partial=partial))


async def search_contacts(request: web.Request) -> web.Response:
    from gateway.desk.api import ContactOut  # noqa: PLC0415

    store = _store(request)
    text = request.query.get("q", "").strip()
    limit = _limit(request)
    if fold(text).strip():
        ids = await contact_ids(store, text, limit)
    else:  # no q: the newest contacts
        ids = [str(d["_id"]) async for d in store.contacts.find(
            {"merged_into": None}, {"_id": 1}).sort("created_at", -1).limit(limit)]
    contacts: list[Contact] = []
    for contact_id in ids:
        contact = await store.get_contact(contact_id)
        if contact is not None:
            contacts.append(contact)
    contacts.sort(key=lambda c: ((c.name or "").casefold(), c.id))
    return json_response(ContactResults(items=[ContactOut.of(c) for c in contacts]))


FILTERS = (
    Query("channel", "only these channels (comma separated)"),
    Query("owner", "only conversations in these states", enum=tuple(o.value for o in
                                                                    OwnerState), array=True),
    Query("team", "only conversations handed to this team"),
    Query("agent", "only conversations assigned to this agent (id)"),
    Query("label", "only conversations with this label (id)"),
    Query("contact", "only conversations of contacts whose name, email, phone or channel "
          "account contains this"),
    time_query("since", "from this date or time (ISO 8601): the matching message's "
               "time, or the conversation's start without q"),
    time_query("until", "before this date or time (ISO 8601)"),
    Query("limit", "how many (1-100, default 20)", type="integer",
          schema={"minimum": 1, "maximum": MAX_LIMIT}),
)


def search_endpoints() -> list[Endpoint]:
    return [
        Endpoint(
            "GET", "/v1/search/conversations", search_conversations,
            "Find conversations by words in their messages and by filters (all must "
            "hold), newest first", SearchResults,
            query=(Query("q", "words, all in one message (the last also as a prefix); "
                         "case and accents do not matter"), *FILTERS),
            errors=(400, 401, 403, 503), tag="search",
        ),
        Endpoint(
            "GET", "/v1/search/contacts", search_contacts,
            "Find contacts by name, email, phone or any channel account (newest first "
            "without q)", ContactResults,
            query=(Query("q", "part of a name, an email, a phone number or a channel "
                         "account (none: the newest contacts)"),
                   Query("limit", "how many (1-100, default 20)", type="integer",
                         schema={"minimum": 1, "maximum": MAX_LIMIT})),
            errors=(400, 401, 403, 503), tag="search",
        ),
    ]
