"""Sign-in for the console (``/v1/session``) and agent management for admins (``/v1/agents``).

The handlers raise ``AccessError`` subclasses; the API's auth middleware turns them into
the usual JSON errors (with ``Retry-After`` on 429).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

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
from gateway.desk.http import json_response, read_body
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


class AgentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    email: str | None = Field(None, max_length=320, description="needed to sign in")
    role: AgentRole = AgentRole.AGENT
    teams: list[str] = Field(default_factory=list, max_length=50)
    skills: list[str] = Field(default_factory=list, max_length=50)
    capacity: int = Field(3, ge=0, le=100)
    password: str | None = Field(None, min_length=MIN_PASSWORD, max_length=MAX_PASSWORD)


class AgentCreated(BaseModel):
    agent: AgentOut
    token: str = Field(description="the agent's API token: shown once, never stored")


class AgentUpdate(BaseModel):
    """Only the fields sent change. A new password or ``active: false`` ends the agent's
    console sessions; a deactivated agent's API token stops working too."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, min_length=1, max_length=200)
    email: str | None = Field(None, max_length=320)
    role: AgentRole | None = None
    teams: list[str] | None = Field(None, max_length=50)
    skills: list[str] | None = Field(None, max_length=50)
    capacity: int | None = Field(None, ge=0, le=100)
    active: bool | None = None
    password: str | None = Field(None, min_length=MIN_PASSWORD, max_length=MAX_PASSWORD)


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
            await routing.requeue_agent(agent.id)
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
                "failures for an account or a client address: 429 with Retry-After, "
                "even for the right password. Cross-site requests: 403.",
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
