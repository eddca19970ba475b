"""Sign-in for the console (``/v1/session``) and agent management for admins (``/v1/agents``).

The handlers raise ``AccessError`` subclasses; the API's auth middleware turns them into
the usual JSON errors (with ``Retry-After`` on 429).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema, WithJsonSchema

from gateway.desk.agents import EMAIL_PATTERN, LABEL_PATTERN, NAME_PATTERN
from gateway.desk.auth import (
    ADMIN_ONLY,
    ALL_ROLES,
    COOKIE,
    MAX_PASSWORD,
    MIN_PASSWORD,
    BadInput,
    Forbidden,
    NoSuchAgent,
    Principal,
    Taken,
    clear_cookie,
    cross_site,
    login,
    set_cookie,
)
from gateway.desk.http import json_response, not_null, read_body
from gateway.desk.openapi import Endpoint
from gateway.keys import AGENTS, ROUTING
from gateway.model import Agent, AgentRole

PRINCIPAL = web.RequestKey("principal", Principal)


class AgentOut(BaseModel):
    id: str
    name: str
    email: str | None
    role: AgentRole
    teams: list[str]
    skills: list[str]
    capacity: int = Field(description="conversations at once")
    active: bool
    created_at: datetime

    @classmethod
    def of(cls, agent: Agent) -> AgentOut:
        return cls(
            id=agent.id, name=agent.name, email=agent.email, role=agent.role,
            teams=agent.teams, skills=agent.skills, capacity=agent.capacity,
            active=agent.active, created_at=agent.created_at,
        )


class AgentList(BaseModel):
    items: list[AgentOut]


def _whole(value: Any) -> Any:
    """JSON Schema's integer includes 3.0 (not true, not "3": bodies are read strictly)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Capacity = Annotated[int, Field(ge=0, le=100), BeforeValidator(_whole)]
# Team and skill names as gateway/desk/agents.py checks them (its messages stay the API's).
Label = Annotated[str, WithJsonSchema({"type": "string", "pattern": LABEL_PATTERN})]


class AgentCreate(BaseModel):
    # A password needs an email to sign in with (the store refuses one without).
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "if": {"required": ["password"], "properties": {"password": {"type": "string"}}},
        "then": {"required": ["email"], "properties": {"email": {"type": "string"}}},
    })
    name: str = Field(min_length=1, max_length=200, json_schema_extra={"pattern": NAME_PATTERN})
    email: str | None = Field(None, max_length=320, description="needed to sign in",
                              json_schema_extra={"pattern": EMAIL_PATTERN})
    role: AgentRole = AgentRole.AGENT
    teams: list[Label] = Field(default_factory=list, max_length=50)
    skills: list[Label] = Field(default_factory=list, max_length=50)
    capacity: Capacity = 3
    password: str | None = Field(None, min_length=MIN_PASSWORD, max_length=MAX_PASSWORD)


class AgentCreated(BaseModel):
    agent: AgentOut
    token: str = Field(description="the agent's API token: shown once, never stored")


class AgentUpdate(BaseModel):
    """Only the fields sent change. A new password or ``active: false`` ends the agent's
    console sessions; a deactivated agent's API token stops working too."""

    model_config = ConfigDict(extra="forbid")
    # Only email may be null (no email: the agent cannot sign in); the others may be
    # left out but not sent as null (the handler refuses that, the schema says so).
    name: Annotated[str, Field(min_length=1, max_length=200)] | SkipJsonSchema[None] = Field(
        None, json_schema_extra=not_null(pattern=NAME_PATTERN))
    email: str | None = Field(None, max_length=320, json_schema_extra={"pattern": EMAIL_PATTERN})
    role: AgentRole | SkipJsonSchema[None] = Field(None, json_schema_extra=not_null())
    teams: Annotated[list[Label], Field(max_length=50)] | SkipJsonSchema[None] = Field(
        None, json_schema_extra=not_null())
    skills: Annotated[list[Label], Field(max_length=50)] | SkipJsonSchema[None] = Field(
        None, json_schema_extra=not_null())
    capacity: Capacity | SkipJsonSchema[None] = Field(None, json_schema_extra=not_null())
    active: bool | SkipJsonSchema[None] = Field(None, json_schema_extra=not_null())
    password: (Annotated[str, Field(min_length=MIN_PASSWORD, max_length=MAX_PASSWORD)]
               | SkipJsonSchema[None]) = Field(None, json_schema_extra=not_null())


class LoginIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email: str = Field(min_length=1, max_length=320)
    password: str = Field(min_length=1, max_length=MAX_PASSWORD)


class SessionOut(BaseModel):
    agent: AgentOut
    via: Literal["session", "token"] = Field(description="how this request authenticated")
    csrf_token: str | None = Field(
        description="send as X-CSRF-Token with every POST, PUT, PATCH and DELETE that the "
        "session cookie authenticates (null for API tokens: they need none)"
    )
    idle_expires_at: datetime | None = Field(description="ends if unused until then")
    expires_at: datetime | None = Field(description="ends then at the latest")


def principal(request: web.Request) -> Principal:
    return request[PRINCIPAL]




def _session_out(who: Principal) -> SessionOut:
    record = who.session
    return SessionOut(
        agent=AgentOut.of(who.agent),
        via="token" if record is None else "session",
        csrf_token=None if record is None else record.csrf,
        idle_expires_at=None if record is None else record.idle_until,
        expires_at=None if record is None else record.expires_at,
    )


class AccessApi:
    """The handlers; ``endpoints()`` is added to the agent API's endpoint table."""

    async def sign_in(self, request: web.Request) -> web.Response:
        if cross_site(request):
            raise Forbidden("cross-site sign-in refused")
        body = await read_body(request, LoginIn)
        agents = request.config_dict[AGENTS]
        agent, session = await login(agents, body.email, body.password, request.remote)
        if previous := request.cookies.get(COOKIE):
            await agents.sessions.end(previous)  # one browser, one session
        response = json_response(_session_out(Principal(agent, session.record)))
        set_cookie(request, response, session)
        return response

    async def session(self, request: web.Request) -> web.Response:
        return json_response(_session_out(principal(request)))

    async def sign_out(self, request: web.Request) -> web.Response:
        record = principal(request).session
        if record is not None:
            await request.config_dict[AGENTS].sessions.records.delete(record.id_hash)
        response = web.Response(status=204)
        clear_cookie(request, response)
        return response

    async def list_agents(self, request: web.Request) -> web.Response:
        agents = await request.config_dict[AGENTS].list()
        return json_response(AgentList(items=[AgentOut.of(a) for a in agents]))

    async def create_agent(self, request: web.Request) -> web.Response:
        body = await read_body(request, AgentCreate)
        agent, token = await request.config_dict[AGENTS].add(
            body.name, body.email, role=body.role, teams=body.teams, skills=body.skills,
            capacity=body.capacity, password=body.password,
        )
        return json_response(AgentCreated(agent=AgentOut.of(agent), token=token), status=201)

    async def update_agent(self, request: web.Request) -> web.Response:
        body = await read_body(request, AgentUpdate)
        changes: dict[str, Any] = body.model_dump(exclude_unset=True)
        for name in ("name", "role", "teams", "skills", "capacity", "active", "password"):
            if name in changes and changes[name] is None:
                raise BadInput(f"{name} cannot be null")
        agent_id = request.match_info["id"]
        if agent_id == principal(request).agent.id and (
            changes.get("active") is False or changes.get("role", AgentRole.ADMIN) != "admin"
        ):
            raise Taken("an admin cannot demote or deactivate themselves")
        agent = await request.config_dict[AGENTS].update(agent_id, changes)
        if agent is None:
            raise NoSuchAgent("no such agent")
        routing = request.config_dict[ROUTING]
        if changes.get("active") is False:  # nobody may wait on a deactivated agent
            await routing.requeue_agent(agent)
        if changes.keys() & {"capacity", "teams", "skills", "active", "role"}:
            routing.wake()  # waiting conversations may fit now
        return json_response(AgentOut.of(agent))

    def endpoints(self) -> list[Endpoint]:
        return [
            Endpoint(
                "POST",
                "/v1/session",
                self.sign_in,
                "Sign in to the console: sets the session cookie",
                SessionOut,
                body=LoginIn,
                errors=(401, 403, 429, 503),
                description="Wrong email and unknown account get the same 401. Too many "
                "failures for the account from this client address, or from the address: "
                "429 with Retry-After, even for the right password (an address that has "
                "not failed is not held back by another's failures). Cross-site: 403.",
                tag="session",
                auth=False,
            ),
            Endpoint(
                "GET",
                "/v1/session",
                self.session,
                "Who is signed in, and the CSRF token for the session",
                SessionOut,
                tag="session",
                roles=ALL_ROLES,
            ),
            Endpoint(
                "DELETE",
                "/v1/session",
                self.sign_out,
                "Sign out: ends the session and clears the cookie",
                None,
                status=204,
                tag="session",
                roles=ALL_ROLES,
            ),
            Endpoint(
                "GET", "/v1/agents", self.list_agents, "All agents", AgentList,
                tag="admin", roles=ADMIN_ONLY,
            ),
            Endpoint(
                "POST",
                "/v1/agents",
                self.create_agent,
                "Create an agent; its API token is in the answer, once",
                AgentCreated,
                status=201,
                body=AgentCreate,
                errors=(401, 409, 503),
                tag="admin",
                roles=ADMIN_ONLY,
            ),
            Endpoint(
                "PATCH",
                "/v1/agents/{id}",
                self.update_agent,
                "Change an agent's role, teams, skills, capacity, active flag or password",
                AgentOut,
                body=AgentUpdate,
                errors=(401, 404, 409, 503),
                tag="admin",
                roles=ADMIN_ONLY,
            ),
        ]
