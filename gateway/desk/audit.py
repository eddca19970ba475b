"""Agent API: the audit log (``GET /api/v1/audit``, admins) and the middleware that writes
it (gateway/store/audit.py).

Every change an agent or admin makes through the API is recorded once it succeeded (a
2xx answer to POST, PUT, PATCH or DELETE): the operation (its OpenAPI operationId, e.g.
``claim``, ``transfer``, ``update_agent``), the object (the path's ``{id}``), who, from
which address (the client's, behind trusted proxies) and with which fields (secrets and
message texts left out). Sign-ins are recorded, and so are failed ones (the email tried).
Replies, private notes and presence changes are not: the conversation's history and the
agent's presence already say them.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field
from pymongo.errors import PyMongoError

from gateway.desk.auth import ADMIN_ONLY, BadInput
from gateway.desk.http import AGENT, json_response, query_time
from gateway.desk.openapi import ENDPOINTS, Endpoint, Query, time_query
from gateway.keys import STORE
from gateway.store.audit import Actor, AuditEntry, AuditLog

log = logging.getLogger(__name__)

UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# replies, notes, presence: the history says them; an erase writes its own entry (counts)
NOT_AUDITED = frozenset({"reply", "add_note", "set_presence", "erase_contact"})
SECRET = ("password", "token", "secret", "code")
TEXT = frozenset({"text"})  # content, not an action's parameters
SIGN_IN = "sign_in"
MAX_LIMIT = 200


class AuditPage(BaseModel):
    items: list[AuditEntry] = Field(description="newest first")
    next_cursor: str | None = Field(description="pass as ?cursor= for the next, older page "
                                    "(null: no more)")


AUDIT_MODELS: list[type[BaseModel]] = [AuditEntry, AuditPage]


def _details(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        return {}
    return {k: v for k, v in body.items()
            if k not in TEXT and not any(s in k.lower() for s in SECRET)}


@web.middleware
async def audit_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Record what succeeded (and failed sign-ins); never fails the request itself."""
    response: web.StreamResponse = await handler(request)
    if request.method not in UNSAFE:
        return response
    endpoint: Endpoint | None = request.app[ENDPOINTS].get(request.match_info.route)
    if endpoint is None:
        return response
    action = endpoint.handler.__name__.strip("_")
    ok = 200 <= response.status < 300
    if action in NOT_AUDITED or not (ok or (action == SIGN_IN and response.status == 401)):
        return response
    try:
        body = await request.json() if request.can_read_body or request.body_exists else None
    except ValueError:
        body = None
    agent = request.get(AGENT)
    who = Actor(id=agent.id, name=agent.name) if agent is not None else None
    target = request.match_info.get("id")
    if action == SIGN_IN:
        target = str(body.get("email", ""))[:254] if isinstance(body, dict) else None
        if not ok:
            action = "sign_in_failed"
        elif isinstance(response, web.Response) and response.text:
            signed = json.loads(response.text).get("agent") or {}
            who = Actor(id=signed.get("id"), name=signed.get("name"))
    try:
        await AuditLog(request.config_dict[STORE]).record(
            action, who=who, target=target, ip=request.remote,
            user_agent=request.headers.get("User-Agent"), details=_details(body))
    except PyMongoError as exc:  # the change is made; say that its record is missing
        log.warning("audit: %s by %s on %s not recorded: %s", action,
                    who.name if who else "-", target, exc)
    return response


async def list_audit(request: web.Request) -> web.Response:
    raw = request.query.get("limit", "50")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise BadInput(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    limit = int(raw)
    since = query_time(request, "since", datetime.min) if "since" in request.query else None
    before = query_time(request, "before", datetime.max) if "before" in request.query \
        else None
    items = await AuditLog(request.config_dict[STORE]).entries(
        action=request.query.get("action") or None, target=request.query.get("target") or None,
        who=request.query.get("who") or None, since=since, before=before,
        cursor=request.query.get("cursor") or None, limit=limit)
    return json_response(AuditPage(items=items, next_cursor=items[-1].id
                                   if len(items) == limit else None))


def audit_endpoints() -> list[Endpoint]:
    return [Endpoint(
        "GET", "/v1/audit", list_audit,
        "The audit log: who changed what, when and from where (admins)", AuditPage,
        query=(Query("action", "only this action (e.g. claim, sign_in_failed)"),
               Query("target", "only about this object (an id, or a sign-in's email)"),
               Query("who", "only by this agent (id)"),
               time_query("since", "from this time on"),
               time_query("before", "older than this time"),
               Query("cursor", "the next page: next_cursor of the page before"),
               Query("limit", "1-200 (default 50)", type="integer",
                     schema={"minimum": 1, "maximum": 200})),
        errors=(401, 403, 503), tag="admin", roles=ADMIN_ONLY)]
