"""Agent API endpoints for private notes and canned responses (part of ``/api``, see api.py).

- ``POST /api/v1/conversations/{id}/notes``: a private note, stored in the conversation's
  history (agents see it in order, ``private: true``); never sent to the customer.
- ``GET /api/v1/canned`` (agents, admins): the canned responses, by shortcode;
  ``POST``/``PATCH``/``DELETE`` (admins only) manage them.
- ``GET /api/v1/canned/{id}/render?conversation_id=...``: the text with its placeholders
  filled for that conversation's contact and the agent asking (gateway/store/canned.py).
  The console puts it in the reply box; the agent edits and sends it as a normal reply.
"""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from gateway.desk.auth import ADMIN_ONLY, STAFF, BadInput
from gateway.desk.http import AGENT, NOT_BLANK, json_response, read_body
from gateway.desk.http import load_conversation as _load
from gateway.desk.openapi import Endpoint, Query
from gateway.keys import STORE
from gateway.model import Activity
from gateway.routing import Conflict
from gateway.store import NotFound
from gateway.store.canned import Canned, CannedStore, ShortcodeTaken, render
from gateway.store.notes import append_note

SHORTCODE = r"^[a-z0-9][a-z0-9_-]{0,31}$"


class NoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    text: str = Field(min_length=1, max_length=4000, pattern=NOT_BLANK)


class CannedIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    shortcode: str = Field(pattern=SHORTCODE, description="lower case, what agents type")
    title: str = Field("", max_length=200)
    text: str = Field(min_length=1, max_length=4000, pattern=NOT_BLANK, description=(
        "may hold {contact.name}, {contact.<profile key>}, {agent.name}, {agent.email}; "
        "{{ and }} are literal braces"))


class CannedPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    shortcode: str | None = Field(None, pattern=SHORTCODE)
    title: str | None = Field(None, max_length=200)
    text: str | None = Field(None, min_length=1, max_length=4000, pattern=NOT_BLANK)


class CannedList(BaseModel):
    items: list[Canned]


class Rendered(BaseModel):
    id: str
    shortcode: str
    text: str = Field(description="the text with the placeholders filled")
    missing: list[str] = Field(description="placeholders without a value (left empty)")


NOTES_MODELS: list[type[BaseModel]] = [NoteIn, CannedIn, CannedPatch, CannedList, Rendered]


def _canned_store(request: web.Request) -> CannedStore:
    return CannedStore(request.config_dict[STORE])


async def add_note(request: web.Request) -> web.Response:

    body = await read_body(request, NoteIn)
    conversation = await _load(request)
    note = await append_note(request.config_dict[STORE], conversation, request[AGENT], body.text)
    return json_response(note, status=201)


async def list_canned(request: web.Request) -> web.Response:
    prefix = request.query.get("prefix", "")[:32] or None
    return json_response(CannedList(items=await _canned_store(request).list(prefix)))


async def create_canned(request: web.Request) -> web.Response:

    body = await read_body(request, CannedIn)
    try:
        canned = await _canned_store(request).create(
            body.shortcode, body.title, body.text, request[AGENT].id)
    except ShortcodeTaken as exc:
        raise Conflict(str(exc)) from None
    return json_response(canned, status=201)


async def update_canned(request: web.Request) -> web.Response:
    body = await read_body(request, CannedPatch)
    changes = body.model_dump(exclude_none=True)
    try:
        canned = await _canned_store(request).update(request.match_info["id"], changes)
    except ShortcodeTaken as exc:
        raise Conflict(str(exc)) from None
    if canned is None:
        raise NotFound("no such canned response")
    return json_response(canned)


async def delete_canned(request: web.Request) -> web.Response:
    if not await _canned_store(request).delete(request.match_info["id"]):
        raise NotFound("no such canned response")
    return web.Response(status=204)


async def render_canned(request: web.Request) -> web.Response:

    canned = await _canned_store(request).get(request.match_info["id"])
    if canned is None:
        raise NotFound("no such canned response")
    store = request.config_dict[STORE]
    conversation_id = request.query.get("conversation_id")
    if not conversation_id:
        raise BadInput("conversation_id is required")
    conversation = await store.get_conversation(conversation_id)
    if conversation is None:
        raise NotFound("no such conversation")
    contact = await store.get_contact(conversation.contact_id, with_identities=False)
    text, missing = render(canned.text, contact, request[AGENT])
    return json_response(
        Rendered(id=canned.id, shortcode=canned.shortcode, text=text, missing=missing))


def notes_endpoints() -> list[Endpoint]:
    return [
        Endpoint(
            "POST", "/v1/conversations/{id}/notes", add_note,
            "Add a private note to the conversation (agents only; never sent to the customer)",
            Activity, status=201, body=NoteIn, errors=(401, 404, 503), roles=STAFF,
            description="Stored in the history in order with private: true and direction "
            "internal; every console subscribed to the conversation gets it live.",
        ),
        Endpoint(
            "GET", "/v1/canned", list_canned, "The canned responses, by shortcode",
            CannedList, query=(Query("prefix", "only shortcodes starting with this"),),
            tag="canned", roles=STAFF,
        ),
        Endpoint(
            "POST", "/v1/canned", create_canned, "Add a canned response (admins)", Canned,
            status=201, body=CannedIn, errors=(401, 409, 503), tag="canned", roles=ADMIN_ONLY,
        ),
        Endpoint(
            "PATCH", "/v1/canned/{id}", update_canned, "Change a canned response (admins)",
            Canned, body=CannedPatch, errors=(401, 404, 409, 503), tag="canned",
            roles=ADMIN_ONLY,
        ),
        Endpoint(
            "DELETE", "/v1/canned/{id}", delete_canned, "Delete a canned response (admins)",
            None, status=204, errors=(401, 404, 503), tag="canned", roles=ADMIN_ONLY,
        ),
        Endpoint(
            "GET", "/v1/canned/{id}/render", render_canned,
            "A canned response with its placeholders filled for a conversation",
            Rendered, query=(Query("conversation_id", "the conversation (its contact)",
                                           required=True, schema={"minLength": 1}),),
            errors=(401, 404, 503), tag="canned", roles=STAFF,
        ),
    ]
