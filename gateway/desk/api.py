"""The agent REST API (JSON, bearer-token auth), mounted at ``/api``.

Agents list the queue, claim a conversation (one winner; the others get 409), read the
whole history, reply (delivered on the customer's channel), resolve, and hand back to the
bot. ``GET /api/openapi.json`` is the OpenAPI 3.1 description, ``GET /api/docs`` a page
(Swagger UI: gateway/desk/apidocs.py).
"""

from __future__ import annotations

import logging
import re
from datetime import datetime
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema
from pymongo.errors import PyMongoError

from gateway.desk.admin_api import PRINCIPAL, AccessApi, AgentOut
from gateway.desk.analytics_api import analytics_endpoints
from gateway.desk.apidocs import docs_endpoints
from gateway.desk.audit import AUDIT_MODELS, audit_endpoints, audit_middleware
from gateway.desk.auth import ALL_ROLES, AccessError, BadInput, authenticate, authorize
from gateway.desk.contacts_api import ContactPatch, contact_endpoints, update_contact
from gateway.desk.files_api import MULTIPART_REPLY, files_endpoints, read_multipart
from gateway.desk.http import AGENT, NOT_BLANK, json_response, read_body
from gateway.desk.http import load_conversation as _load
from gateway.desk.labels_api import LABEL_MODELS, ConversationLabels, label_endpoints, set_labels
from gateway.desk.live import live_endpoints
from gateway.desk.notes_api import notes_endpoints
from gateway.desk.openapi import (
    ENDPOINTS,
    Endpoint,
    Query,
    add_routes,
    build_spec,
    limit_query,
)
from gateway.desk.queue_api import QUEUE_MODELS, queue_endpoints
from gateway.desk.rights_api import RIGHTS_MODELS, rights_endpoints
from gateway.desk.search_api import SEARCH_MODELS, search_endpoints
from gateway.desk.sla_api import SLA_MODELS, sla_endpoints
from gateway.keys import AGENTS, FILES, ROUTING, STORE
from gateway.model import (
    Activity,
    Contact,
    Conversation,
    Direction,
    Handoff,
    Identity,
    OwnerState,
    Party,
    Role,
)
from gateway.routing import Conflict, Routing
from gateway.sla import SlaOut, timers
from gateway.store import NotFound, Store
from gateway.store.writer import new_id
from gateway.timeline import BadCursor, Timeline, TimelinePage

log = logging.getLogger(__name__)

SPEC = web.AppKey("openapi_spec", dict)
MAX_INT = 2**53  # query integers above this are no seq (and overflow the store's int64)
MINE = {"true": True, "false": False, "1": True, "0": False}


def _no_default(schema: dict[str, Any]) -> None:
    """An optional field that is left out, never null: no ``default: null`` in the spec."""
    schema.pop("default", None)


class ErrorOut(BaseModel):
    error: str = Field(description="machine-readable code")
    message: str = Field(description="what went wrong, written for people")
    # absent, not null, when there is nothing to say (every error but a conversation's 409)
    owner: OwnerState | SkipJsonSchema[None] = Field(
        None, description="only on a 409 about a conversation: the state it is in now",
        json_schema_extra=_no_default)


class IdentityOut(BaseModel):
    channel: str
    external_id: str
    display_name: str | None
    reachable: bool


class ContactOut(BaseModel):
    id: str
    name: str | None
    profile: dict[str, Any] = Field(description="what the bot saved about the customer "
                                    "(profile slots, e.g. email), by name")
    identities: list[IdentityOut]
    merged_into: str | None = Field(None, description="merged into that contact (it lives "
                                    "on there: read and change that one)")

    @classmethod
    def of(cls, contact: Contact) -> ContactOut:
        return cls(
            id=contact.id,
            name=contact.name,
            # keys starting with "_" are the gateway's own bookkeeping (flows/menu.py's
            # _menu_counts), not the customer's data: never shown (flow slots cannot start so)
            profile={k: v for k, v in contact.profile.items() if not k.startswith("_")},
            identities=[_identity(i) for i in contact.identities],
            merged_into=contact.merged_into,
        )


def _identity(identity: Identity) -> IdentityOut:
    return IdentityOut(
        channel=identity.channel,
        external_id=identity.external_id,
        display_name=identity.display_name,
        reachable=identity.reachable,
    )


class ConversationOut(BaseModel):
    id: str
    channel: str
    owner: OwnerState
    assignee_id: str | None
    handoff: Handoff | None
    contact: ContactOut | None
    last_seq: int = Field(description="seq of the newest item")
    created_at: datetime
    last_activity_at: datetime | None
    reply_channel: str = Field(description="where replies go: the channel the customer "
                               "wrote from last (or this conversation's own channel)")
    routes: dict[str, str] = Field(description="other channels the customer wrote from in "
                                   "this conversation (channel -> thread there)")
    sla: SlaOut | None = Field(None, description="SLA timers of the last handoff (null: "
                               "never handed off)")
    labels: list[str] = Field(default_factory=list,
                              description="label ids (GET /api/v1/labels: names, colours)")


class ConversationList(BaseModel):
    items: list[ConversationOut]


class Page(BaseModel):
    items: list[Activity] = Field(description="newest first")
    has_more: bool
    next_before: int | None = Field(description="pass as ?before= for the next, older page")


class ReplyIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    text: str = Field(min_length=1, max_length=4000, pattern=NOT_BLANK)
    channel: str | None = Field(None, min_length=1, max_length=32, pattern=NOT_BLANK, description=(
        "send on this channel of the contact (default: where the customer wrote last)"))


def _store(request: web.Request) -> Store:
    return request.config_dict[STORE]


def _routing(request: web.Request) -> Routing:
    return request.config_dict[ROUTING]


async def _conversation_out(request: web.Request, conversation: Conversation) -> ConversationOut:
    contact = await _store(request).get_contact(conversation.contact_id)
    return ConversationOut(
        id=conversation.id,
        channel=conversation.channel,
        owner=conversation.owner,
        assignee_id=conversation.assignee_id,
        handoff=conversation.handoff,
        contact=ContactOut.of(contact) if contact else None,
        last_seq=await _store(request).seq_above(conversation.id, conversation.seq),
        created_at=conversation.created_at,
        last_activity_at=conversation.last_activity_at,
        reply_channel=conversation.reply_channel or conversation.channel,
        routes=conversation.routes,
        sla=timers(conversation, _routing(request).levels.clock()),
        labels=conversation.labels,
    )


class DeskApi:
    """Handlers; the services they use come from the app (``request.config_dict``)."""

    # ----------------------------------------------------------------- handlers

    async def me(self, request: web.Request) -> web.Response:
        return json_response(AgentOut.of(request[AGENT]))

    async def list_conversations(self, request: web.Request) -> web.Response:
        owner = request.query.get("owner", "queued")
        try:
            owners = [OwnerState(o) for o in owner.split(",")]
        except ValueError:
            raise BadInput(
                "owner must be bot, queued, agent or resolved (comma separated)") from None
        mine = request.query.get("mine", "false")
        if mine not in MINE:
            raise BadInput("mine must be true or false (or 1 or 0)")
        assignee = request[AGENT].id if MINE[mine] else None
        limit = _int(request, "limit", 50, 1, 200)
        label = request.query.get("label") or None
        if owners == [OwnerState.QUEUED] and assignee is None and label is None:
            conversations = await _routing(request).queue.queue(limit)  # priority, waiting
        else:
            conversations = await _store(request).list_conversations(
                owners, assignee_id=assignee, label=label, limit=limit
            )
        items = [await _conversation_out(request, c) for c in conversations]
        return json_response(ConversationList(items=items))

    async def get_conversation(self, request: web.Request) -> web.Response:
        return json_response(await _conversation_out(request, await _load(request)))

    async def messages(self, request: web.Request) -> web.Response:
        conversation = await _load(request)
        before = _int(request, "before", None, 1, None)
        items, has_more = await _store(request).history(
            conversation.id, before=before, limit=_int(request, "limit", 50, 1, 200)
        )
        return json_response(
            Page(
                items=items,
                has_more=has_more,
                next_before=items[-1].seq if has_more and items else None,
            )
        )

    async def claim(self, request: web.Request) -> web.Response:
        await _load(request)
        conversation = await _routing(request).claim(request.match_info["id"], request[AGENT])
        return json_response(await _conversation_out(request, conversation))

    async def reply(self, request: web.Request) -> web.Response:
        """JSON (text), or multipart/form-data with files (gateway/desk/files_api.py)."""
        routing, agent = _routing(request), request[AGENT]
        if request.content_type != "multipart/form-data":
            body = await read_body(request, ReplyIn)
            item = await routing.reply(request.match_info["id"], agent, body.text,
                                       channel=body.channel)
            return json_response(item, status=201)
        files = request.config_dict[FILES]
        parts = await read_multipart(request, files.max_bytes)
        conversation = await routing.require_assignee(request.match_info["id"], agent)
        sender = Party(role=Role.AGENT, id=agent.id, name=agent.name)
        attachments = [await files.keep(
            new_id(), data, name=name, conversation_id=conversation.id,
            contact_id=conversation.contact_id, sender=sender,
            channel=parts.channel or conversation.reply_channel or conversation.channel,
            direction=Direction.OUTBOUND) for name, data in parts.files]
        item = await routing.reply(conversation.id, agent, parts.text, channel=parts.channel,
                                   attachments=attachments)
        return json_response(item, status=201)

    async def resolve(self, request: web.Request) -> web.Response:
        await _load(request)
        conversation = await _routing(request).resolve(request.match_info["id"], request[AGENT])
        return json_response(await _conversation_out(request, conversation))

    async def handback(self, request: web.Request) -> web.Response:
        await _load(request)
        conversation = await _routing(request).handback(request.match_info["id"], request[AGENT])
        return json_response(await _conversation_out(request, conversation))

    async def contact(self, request: web.Request) -> web.Response:
        contact = await _store(request).get_contact(request.match_info["id"])
        if contact is None:
            raise NotFound("no such contact")
        return json_response(ContactOut.of(contact))

    async def timeline(self, request: web.Request) -> web.Response:
        try:
            page = await Timeline(_store(request)).page(
                request.match_info["id"], request.query.get("cursor"),
                limit=_int(request, "limit", 50, 1, 200))
        except BadCursor as exc:
            raise BadInput(f"cursor: {exc}") from None
        return json_response(page)

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(request.app[SPEC])

    # ------------------------------------------------------------------ routing

    def endpoints(self) -> list[Endpoint]:
        page = (
            Query("before", "only items older than this seq", "integer",
                  schema={"minimum": 1, "maximum": MAX_INT}),
            limit_query(),
        )
        conflict = (401, 404, 409, 503)
        return [
            Endpoint(
                "GET", "/v1/me", self.me, "The agent who sent the request", AgentOut,
                tag="agents", roles=ALL_ROLES,
            ),
            *AccessApi().endpoints(),  # session sign-in/out, admin: agents (admin_api.py)
            Endpoint(
                "GET",
                "/v1/conversations",
                self.list_conversations,
                "List conversations: by default the queue (urgent, high, normal, low; "
                "oldest handoff first within a priority)",
                ConversationList,
                query=(
                    Query(
                        "owner",
                        "comma-separated owner states (default queued)",
                        enum=tuple(o.value for o in OwnerState),
                        array=True,
                        schema={"minItems": 1},
                    ),
                    Query("mine", "true (or 1): only conversations assigned to me",
                          enum=tuple(MINE)),
                    Query("label", "only conversations with this label (id); the queue "
                          "is then ordered by waiting time alone"),
                    limit_query("1-200 (default 50)"),
                ),
            ),
            Endpoint(
                "GET",
                "/v1/conversations/{id}",
                self.get_conversation,
                "One conversation with its contact",
                ConversationOut,
                errors=(401, 404, 503),
            ),
            Endpoint(
                "GET",
                "/v1/conversations/{id}/messages",
                self.messages,
                "The conversation's history, newest first, paged by seq",
                Page,
                query=page,
                errors=(401, 404, 503),
            ),
            Endpoint(
                "POST",
                "/v1/conversations/{id}/claim",
                self.claim,
                "Take a queued conversation. Of concurrent claims exactly one wins; "
                "the others get 409",
                ConversationOut,
                errors=conflict,
            ),
            Endpoint(
                "POST",
                "/v1/conversations/{id}/messages",
                self.reply,
                "Reply as the assigned agent; delivered on the customer's channel",
                Activity,
                status=201,
                body=ReplyIn,
                errors=conflict,
                description="JSON for text; multipart/form-data (parts text, channel and "
                "one or more file) to send files, with or without text.",
                multipart=MULTIPART_REPLY,
            ),
            Endpoint(
                "POST",
                "/v1/conversations/{id}/resolve",
                self.resolve,
                "Mark resolved (assigned agent only)",
                ConversationOut,
                errors=conflict,
            ),
            Endpoint(
                "POST",
                "/v1/conversations/{id}/handback",
                self.handback,
                "Hand the conversation back to the bot (assigned agent only)",
                ConversationOut,
                errors=conflict,
            ),
            *queue_endpoints(),  # presence, transfer (gateway/desk/queue_api.py)
            *sla_endpoints(),  # SLA timers, breach counts, hours (gateway/desk/sla_api.py)
            *contact_endpoints(),  # merge, undo merge (gateway/desk/contacts_api.py)
            *rights_endpoints(),  # export, erase a contact (gateway/desk/rights_api.py)
            *live_endpoints(), *notes_endpoints(),  # socket; notes, canned (live, notes_api)
            *analytics_endpoints(),  # figures over a period (gateway/desk/analytics_api.py)
            *files_endpoints(),  # attachments (gateway/desk/files_api.py)
            *search_endpoints(),  # conversations and contacts (gateway/desk/search_api.py)
            *label_endpoints(),  # the labels admins define (gateway/desk/labels_api.py)
            *audit_endpoints(),  # who changed what (gateway/desk/audit.py)
            Endpoint(
                "PUT", "/v1/conversations/{id}/labels", set_labels,
                "Set the conversation's labels (all of them: send the whole list)",
                ConversationOut, body=ConversationLabels, errors=(400, 401, 404, 503),
            ),
            Endpoint(
                "GET",
                "/v1/contacts/{id}",
                self.contact,
                "A contact with all of its channel identities",
                ContactOut,
                errors=(401, 404, 503),
                tag="contacts",
            ),
            Endpoint(
                "PATCH", "/v1/contacts/{id}", update_contact,
                "Change a contact's name, and the email, phone and notes in its profile "
                "(the fields sent; null clears one)", ContactOut, body=ContactPatch,
                errors=(401, 403, 404, 409, 503), tag="contacts",
            ),
            Endpoint(
                "GET",
                "/v1/contacts/{id}/timeline",
                self.timeline,
                "Everything the contact said and was told, on every channel and in "
                "every conversation (also of contacts merged into it), newest first; "
                "paged back with an exact cursor (gateway/timeline.py)",
                TimelinePage,
                query=(
                    Query("cursor", "next_cursor of the previous page (omit: newest)"),
                    limit_query(),
                ),
                errors=(401, 404, 503),
                tag="contacts",
            ),
            Endpoint(
                "GET",
                "/openapi.json",
                self.openapi,
                "This API as OpenAPI 3.1",
                None,
                errors=(),
                tag="meta",
                auth=False,
            ),
            *docs_endpoints(),  # GET /api/docs: Swagger UI (gateway/desk/apidocs.py)
        ]

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, audit_middleware, self._auth])
        endpoints = self.endpoints()
        add_routes(app, endpoints)
        app[SPEC] = build_spec(
            endpoints,
            prefix="/api",
            title="Omnigate agent API",
            version="1",
            description="Work the queue of conversations that the bot handed off.",
            models=[
                ErrorOut,
                AgentOut,
                ConversationList,
                ConversationOut,
                Page,
                TimelinePage,
                ReplyIn,
                ContactOut,
                Activity,
                *QUEUE_MODELS,
                *SLA_MODELS,
                *SEARCH_MODELS,
                *RIGHTS_MODELS,
                *LABEL_MODELS,
                *AUDIT_MODELS,
            ],
        )
        return app

    # --------------------------------------------------------------- middleware

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Authenticate (bearer token or session cookie + CSRF) and check the route's
        roles; a route outside the table (404, 405) needs any signed-in agent."""
        endpoint = request.app[ENDPOINTS].get(request.match_info.route)
        try:
            if endpoint is None or endpoint.auth:
                who = await authenticate(request, request.config_dict[AGENTS])
                authorize(who.agent, endpoint.roles if endpoint else ALL_ROLES)
                request[AGENT], request[PRINCIPAL] = who.agent, who
            return await handler(request)  # type: ignore[no-any-return]
        except AccessError as exc:
            headers = dict(exc.headers)
            if exc.status == 401:
                headers["WWW-Authenticate"] = 'Bearer realm="omnigate"'
            return _error(exc.status, exc.code, str(exc), headers=headers)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)  # type: ignore[no-any-return]
        except NotFound as exc:
            return _error(404, "not_found", str(exc))
        except Conflict as exc:
            owner = exc.conversation.owner if exc.conversation else None
            return _error(409, "conflict", str(exc), owner=owner)
        except PyMongoError as exc:
            log.warning("agent API: store unavailable: %s", exc)
            return _error(503, "unavailable", "the store is unavailable; nothing was changed")
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            # Keep what the exception says beyond its body: a 405's Allow (RFC 9110).
            kept = {k: v for k, v in exc.headers.items()
                    if k.lower() not in ("content-type", "content-length")}
            return _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason,
                          headers=kept)




def _error(
    status: int,
    code: str,
    message: str,
    *,
    owner: OwnerState | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = ErrorOut(error=code, message=message, owner=owner).model_dump(
        mode="json", exclude_none=True)
    return web.json_response(body, status=status, headers=headers)




def _int(request: web.Request, name: str, default: int | None, low: int, high: int | None) -> Any:
    high = MAX_INT if high is None else high
    raw = request.query.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"-?[0-9]{1,20}", raw):  # int() would take " 7", "7_0", Arabic digits
        raise BadInput(f"{name} must be an integer")
    value = int(raw)
    if value < low or value > high:
        raise BadInput(f"{name} must be between {low} and {high}")
    return value
