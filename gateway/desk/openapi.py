"""Routes declared once, with their models: aiohttp serves them, OpenAPI documents them.

The spec is generated from the same ``Endpoint`` list the router is built from, and the
schemas from the same pydantic models the handlers use, so the documentation cannot
drift from the API.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gateway.model import AgentRole

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ERROR_TEXT = {
    400: "Bad request: the body or a parameter is invalid",
    401: "Not signed in: no valid session cookie or bearer token (or the agent is inactive)",
    403: "Refused: the agent's role may not do this, or a cookie request came from another "
    "site or lacks the X-CSRF-Token header",
    404: "No such conversation, contact or agent",
    409: "The conversation (or agent) is not in a state that allows this",
    413: "The body is larger than the server accepts",
    429: "Too many failed sign-ins: wait Retry-After seconds",
    503: "The store is unavailable; nothing was changed",
}
STAFF: frozenset[AgentRole] = frozenset({AgentRole.ADMIN, AgentRole.AGENT})
UNSAFE = ("POST", "PUT", "PATCH", "DELETE")


@dataclass(frozen=True)
class Query:
    """A query parameter; ``schema`` adds JSON Schema keywords (bounds, format, length).
    ``array``: comma-separated values of ``enum`` (OpenAPI ``style: form, explode: false``)."""

    name: str
    description: str
    type: str = "string"
    enum: tuple[str, ...] = ()
    required: bool = False
    schema: dict[str, Any] = field(default_factory=dict)
    array: bool = False

    def parameter(self) -> dict[str, Any]:
        values: dict[str, Any] = {"enum": list(self.enum)} if self.enum else {}
        if self.array:
            schema: dict[str, Any] = {"type": "array", "items": {"type": self.type, **values},
                                      **self.schema}
        else:
            schema = {"type": self.type, **values, **self.schema}
        parameter: dict[str, Any] = {"name": self.name, "in": "query",
                                     "required": self.required,
                                     "description": self.description, "schema": schema}
        if self.array:
            parameter |= {"style": "form", "explode": False}
        return parameter


def limit_query(description: str = "page size, 1-200 (default 50)") -> Query:
    return Query("limit", description, "integer", schema={"minimum": 1, "maximum": 200})


def time_query(name: str, description: str) -> Query:
    """An ISO 8601 time (RFC 3339 in the spec; the server also takes a date, and a time
    without a zone as UTC)."""
    return Query(name, description, schema={"format": "date-time"})


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    summary: str
    response: type[BaseModel] | None
    status: int = 200
    body: type[BaseModel] | None = None
    query: tuple[Query, ...] = ()
    errors: tuple[int, ...] = (401, 503)
    description: str = ""
    tag: str = "conversations"
    auth: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    # Who may call it (checked by the API's auth middleware; ignored when auth is False).
    roles: frozenset[AgentRole] = STAFF
    # The success response's content when it is not a JSON model (a file: {"*/*": ...}).
    content: dict[str, Any] | None = None
    # The body may also be multipart/form-data of this media type object (with ``body``).
    multipart: dict[str, Any] | None = None


ENDPOINTS = web.AppKey("endpoints", dict[web.AbstractRoute, Endpoint])


def add_routes(app: web.Application, endpoints: list[Endpoint]) -> None:
    """Route every endpoint; ``app[ENDPOINTS]`` maps each route back to its endpoint."""
    table: dict[web.AbstractRoute, Endpoint] = {}
    for endpoint in endpoints:
        table[app.router.add_route(endpoint.method, endpoint.path, endpoint.handler)] = endpoint
    app[ENDPOINTS] = table


def build_spec(
    endpoints: list[Endpoint],
    *,
    prefix: str,
    models: list[type[BaseModel]],
    title: str,
    version: str,
    description: str,
) -> dict[str, Any]:
    ref = "#/components/schemas/{model}"
    used = [m for ep in endpoints for m in (ep.response, ep.body) if m is not None]
    models = list(dict.fromkeys([*models, *used]))  # every model an endpoint names
    _, schemas = models_json_schema([(m, "serialization") for m in models], ref_template=ref)
    paths: dict[str, dict[str, Any]] = {}
    for ep in endpoints:
        params: list[dict[str, Any]] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"{(\w+)}", ep.path)
        ]
        params += [q.parameter() for q in ep.query]
        if ep.auth and ep.method in UNSAFE:
            params.append(
                {
                    "name": "X-CSRF-Token",
                    "in": "header",
                    "required": False,
                    "description": "required when the session cookie authenticates the "
                    "request: the csrf_token from GET /api/v1/session",
                    "schema": {"type": "string"},
                }
            )
        responses: dict[str, Any] = {
            str(ep.status): ({"description": "OK"} if ep.content is None
                             else {"description": "OK", "content": ep.content})
            if ep.response is None
            else {
                "description": "OK",
                "content": {
                    "application/json": {"schema": {"$ref": ref.format(model=ep.response.__name__)}}
                },
            }
        }
        errors = set(ep.errors) | ({400} if ep.body or ep.query else set())
        if ep.body:
            errors.add(413)  # larger than the server's client_max_size
        if ep.auth:
            errors |= {401, 403}
        for status in sorted(errors):
            responses[str(status)] = {
                "description": ERROR_TEXT.get(status, "Error"),
                "content": {"application/json": {"schema": {"$ref": ref.format(model="ErrorOut")}}},
            }
        operation: dict[str, Any] = {
            "summary": ep.summary,
            "operationId": ep.handler.__name__.strip("_"),
            "tags": [ep.tag],
            "parameters": params,
            "responses": responses,
            **ep.extra,
        }
        if ep.description:
            operation["description"] = ep.description
        if ep.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": ref.format(model=ep.body.__name__)}},
                    **({"multipart/form-data": ep.multipart} if ep.multipart else {}),
                },
            }
        if not ep.auth:
            operation["security"] = []
        else:
            roles = sorted(r.value for r in ep.roles)
            operation["x-roles"] = roles
            roles_text = f"Roles: {', '.join(roles) or 'none'}."
            operation["description"] = (
                f"{ep.description} {roles_text}" if ep.description else roles_text
            )
        paths.setdefault(prefix + ep.path, {})[ep.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": description,
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": "/"}],
        "security": [{"agentToken": []}, {"sessionCookie": []}],
        "paths": paths,
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {
                "agentToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An agent token from `omnigate agents add` (for "
                    "integrations; exempt from CSRF checks).",
                },
                "sessionCookie": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "omnigate_session",
                    "description": "The console's session (POST /api/v1/session). "
                    "POST, PUT, PATCH and DELETE also need the X-CSRF-Token header, and "
                    "requests from another site are refused.",
                },
            },
        },
    }
