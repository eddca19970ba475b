"""Agent API endpoints for routing: presence and transfer (part of ``/api``, see api.py).

``PUT /api/v1/me/presence`` sets the agent online, away or offline (until the console's
socket does it): only online agents get conversations assigned; an agent offline longer
than ``OMNIGATE_AGENT_OFFLINE_GRACE_SECONDS`` gets their conversations re-queued.
``POST /api/v1/conversations/{id}/transfer`` hands a conversation to another agent, or
back to the queue for a team.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.desk.http import AGENT, NOT_BLANK, json_response, read_body
from gateway.desk.http import load_conversation as _load
from gateway.desk.openapi import Endpoint
from gateway.keys import ROUTING, SETTINGS
from gateway.model import Agent, Presence

# The api module imports this one (for the endpoint table), so its names are imported
# where they are used.


class PresenceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    presence: Presence


class AgentStatus(BaseModel):
    id: str
    name: str
    presence: Presence
    presence_at: datetime | None
    load: int = Field(description="conversations assigned to the agent now")
    capacity: int = Field(description="automatic assignment stops at this load")
    teams: list[str]
    skills: list[str]
    requeue_at: datetime | None = Field(
        description="offline: when the agent's conversations go back to the queue"
    )

    @classmethod
    def of(cls, agent: Agent) -> AgentStatus:
        return cls(
            id=agent.id, name=agent.name, presence=agent.presence,
            presence_at=agent.presence_at, load=agent.load, capacity=agent.capacity,
            teams=agent.teams, skills=agent.skills, requeue_at=agent.requeue_at,
        )


class TransferIn(BaseModel):
    # Exactly one of the two as a string (the other left out or null), in the schema too.
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, json_schema_extra={
        "oneOf": [{"required": [name], "properties": {name: {"type": "string"}}}
                  for name in ("agent_id", "team")]})
    agent_id: str | None = Field(None, min_length=1, max_length=64, pattern=NOT_BLANK,
                                 description="give the conversation to this agent")
    team: str | None = Field(None, min_length=1, max_length=100, pattern=NOT_BLANK,
                             description="or: back to the queue, for this team")

    @model_validator(mode="after")
    def _one_target(self) -> TransferIn:
        if (self.agent_id is None) == (self.team is None):
            raise ValueError("give exactly one of agent_id and team")
        return self


class Colleagues(BaseModel):
    items: list[AgentStatus] = Field(description="active agents, by name")


QUEUE_MODELS: list[type[BaseModel]] = [PresenceIn, AgentStatus, TransferIn, Colleagues]


async def colleagues(request: web.Request) -> web.Response:
    agents = await request.config_dict[ROUTING].queue.all_agents()
    active = sorted((a for a in agents if a.active), key=lambda a: (a.name.casefold(), a.id))
    return json_response(Colleagues(items=[AgentStatus.of(a) for a in active]))


async def set_presence(request: web.Request) -> web.Response:

    body = await read_body(request, PresenceIn)
    grace = timedelta(seconds=request.config_dict[SETTINGS].agent_offline_grace_seconds)
    agent = await request.config_dict[ROUTING].set_presence(request[AGENT], body.presence, grace)
    return json_response(AgentStatus.of(agent))


async def transfer(request: web.Request) -> web.Response:
    from gateway.desk.api import _conversation_out  # noqa: PLC0415

    body = await read_body(request, TransferIn)
    await _load(request)
    routing, agent = request.config_dict[ROUTING], request[AGENT]
    conversation_id = request.match_info["id"]
    if body.agent_id is not None:
        conversation = await routing.transfer_to_agent(conversation_id, agent, body.agent_id)
    else:
        assert body.team is not None
        conversation = await routing.transfer_to_team(conversation_id, agent, body.team)
    return json_response(await _conversation_out(request, conversation))


def queue_endpoints() -> list[Endpoint]:
    from gateway.desk.api import ConversationOut  # noqa: PLC0415

    return [
        Endpoint(
            "PUT", "/v1/me/presence", set_presence,
            "Set my presence: online (conversations are assigned to me), away or offline",
            AgentStatus, body=PresenceIn, errors=(401, 503), tag="agents",
            description="Offline longer than the grace period "
            "(OMNIGATE_AGENT_OFFLINE_GRACE_SECONDS) puts my conversations back in the queue.",
        ),
        Endpoint(
            "GET", "/v1/colleagues", colleagues,
            "Active agents with their presence, load, teams and skills (to pick whom to "
            "transfer to)", Colleagues, errors=(401, 503), tag="agents",
        ),
        Endpoint(
            "POST", "/v1/conversations/{id}/transfer", transfer,
            "Transfer my conversation to another agent, or to a team's queue",
            ConversationOut, body=TransferIn, errors=(401, 404, 409, 503),
            description="To an agent: it is theirs at once. To a team: it goes back to "
            "the queue (keeping its place) and is assigned to an available agent of the team.",
        ),
    ]
