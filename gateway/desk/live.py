"""The agent console's live socket: ``GET /api/v1/live`` (protocol: docs/console-protocol.md).

Authenticated like every API route (session cookie or bearer token, by the API's auth
middleware); a cross-site ``Origin`` is refused before the upgrade. Every client frame is
checked again: the session or token must still be valid, and ``authorize`` must allow the
frame's type for the agent's role (``ROLES``); a designer gets nothing of conversations.

Changes reach the sockets through the process's change stream (gateway/feed.py), so a
change made by any gateway process reaches every process's sockets. Presence: an agent's
first socket (in any process) makes them online; when their last one closes they go
offline, which starts the re-queue grace (gateway/routing.py). Open sockets are recorded
in the store (``live_sockets``) and refreshed by each process; those of a process that
died go stale and are removed by the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket as _socket
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any, Protocol, runtime_checkable

from aiohttp import WSMsgType, web
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pymongo import ASCENDING, IndexModel
from pymongo.errors import PyMongoError

from connectors.base import Connector
from gateway.aio import Background
from gateway.desk.agents import Agents
from gateway.desk.auth import (
    ALL_ROLES,
    COOKIE,
    STAFF,
    AccessError,
    NotAuthenticated,
    authorize,
    bearer,
    cross_site,
)
from gateway.desk.http import AGENT
from gateway.desk.openapi import Endpoint
from gateway.feed import Change, ChangeKind, Feed
from gateway.keys import AGENTS, CONNECTORS, FEED, ROUTING, SETTINGS, STORE
from gateway.model import (
    Activity,
    Agent,
    AgentRole,
    Conversation,
    Direction,
    OwnerState,
    Presence,
    Role,
    utcnow,
)
from gateway.routing import Conflict, Routing
from gateway.store import NotFound, Store
from gateway.store.mongo import from_doc, new_id

log = logging.getLogger(__name__)

PROTOCOL = 1
SOCKETS = "live_sockets"
CLOSE_UNAUTHORIZED = 4401
CLOSE_TOO_SLOW = 4429
OUT_QUEUE = 1000  # frames waiting for a slow client before it is dropped
MAX_FRAME = 64 * 1024
ROLES: dict[str, frozenset[AgentRole]] = {
    "ping": ALL_ROLES,
    "subscribe": STAFF,
    "unsubscribe": STAFF,
    "typing": STAFF,
    "presence": STAFF,
}


@runtime_checkable
class TypingChannel(Protocol):
    """A connector that can show the customer that an agent is typing (web chat)."""

    async def show_typing(self, thread_key: str, on: bool, name: str | None) -> int: ...


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    ref: str | None = Field(None, max_length=64)


class ConversationIn(_In):
    conversation_id: str = Field(min_length=1, max_length=64)


class TypingIn(ConversationIn):
    on: bool = True


class PresenceIn(_In):
    presence: Presence


class ConsoleSocket:
    def __init__(self, request: web.Request, ws: web.WebSocketResponse, agent: Agent,
                 cookie: str | None, token: str | None) -> None:
        self.id = new_id()
        self.request = request
        self.ws = ws
        self.agent = agent
        self.cookie, self.token = cookie, token
        self.subscriptions: set[str] = set()
        self._out: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(OUT_QUEUE)
        self._writer = asyncio.create_task(self._write(), name=f"live-writer:{self.id}")

    @property
    def staff(self) -> bool:
        return self.agent.active and self.agent.role in STAFF

    def send(self, frame: dict[str, Any]) -> None:
        """Queue a frame; a client too slow to take ``OUT_QUEUE`` frames is dropped."""
        try:
            self._out.put_nowait(frame)
        except asyncio.QueueFull:
            log.info("live: socket %s of %s too slow; closing", self.id, self.agent.id)
            asyncio.get_running_loop().create_task(
                self.ws.close(code=CLOSE_TOO_SLOW, message=b"too slow"))

    async def _write(self) -> None:
        while (frame := await self._out.get()) is not None:
            if self.ws.closed:
                return
            try:
                await self.ws.send_str(json.dumps(frame, default=str))
            except (ConnectionError, RuntimeError):
                return

    async def close(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._out.put_nowait(None)
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._writer), 2.0)
        self._writer.cancel()


def _error(code: str, message: str, ref: str | None = None) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, "ref": ref}


class LiveHub:
    def __init__(self, store: Store, feed: Feed, agents: Agents, routing: Routing,
                 connectors: dict[str, Connector], *, grace: timedelta,
                 heartbeat: float = 15.0) -> None:
        self.store, self.feed, self.agents, self.routing = store, feed, agents, routing
        self.connectors = connectors
        self.grace = grace
        self.heartbeat = heartbeat
        self.instance = f"{_socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.coll = store.db[SOCKETS]
        self.by_agent: dict[str, set[ConsoleSocket]] = {}
        self._background = Background("live")
        self._unsubscribe = feed.subscribe(self.on_change)

    @property
    def sockets(self) -> list[ConsoleSocket]:
        return [s for group in self.by_agent.values() for s in group]

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._background.every(self.heartbeat, self._beat)

    async def shutdown(self, _app: web.Application) -> None:
        for sock in self.sockets:
            with contextlib.suppress(Exception):
                await sock.ws.close(code=1001, message=b"server shutting down")

    async def stop(self) -> None:
        self._unsubscribe()
        await self._background.stop(1.0)

    # --------------------------------------------------------------- the socket

    async def handle(self, request: web.Request) -> web.StreamResponse:
        from gateway.desk.admin_api import PRINCIPAL  # noqa: PLC0415 - api imports us

        if cross_site(request):
            return web.json_response(
                {"error": "forbidden", "message": "cross-site request refused"}, status=403)
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=MAX_FRAME)
        if not ws.can_prepare(request).ok:  # a plain GET: what this is
            return web.json_response({"protocol": PROTOCOL, "websocket": True, "message":
                                      "upgrade to a WebSocket; see docs/console-protocol.md"})
        principal = request[PRINCIPAL]
        cookie = request.cookies.get(COOKIE) if principal.session is not None else None
        token = bearer(request) if principal.session is None else None
        await ws.prepare(request)
        sock = ConsoleSocket(request, ws, request[AGENT], cookie, token)
        self.by_agent.setdefault(sock.agent.id, set()).add(sock)
        try:
            if sock.staff:
                await self._joined(sock)
            live = await self.feed.ready()
            sock.send({"type": "ready", "protocol": PROTOCOL, "socket_id": sock.id,
                       "live": live, "agent": {"id": sock.agent.id, "name": sock.agent.name,
                                               "role": sock.agent.role.value}})
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    if not await self._on_frame(sock, msg.data):
                        break
                elif msg.type is WSMsgType.BINARY:
                    sock.send(_error("bad_frame", "only JSON text frames"))
        finally:
            group = self.by_agent.get(sock.agent.id, set())
            group.discard(sock)
            if not group:
                self.by_agent.pop(sock.agent.id, None)
            await sock.close()
            if sock.agent.role in STAFF:
                with contextlib.suppress(PyMongoError):
                    await self._left(sock)
        return ws

    async def _recheck(self, sock: ConsoleSocket) -> Agent | None:
        """The socket's agent as the store has it now, if its session or token is valid."""
        agent: Agent | None = None
        if sock.cookie is not None:
            record = await self.agents.sessions.resolve(sock.cookie)
            agent = None if record is None else await self.agents.get(record.agent_id)
        elif sock.token is not None:
            agent = await self.agents.authenticate(sock.token)
        if agent is None or agent.id != sock.agent.id or not agent.active:
            return None
        sock.agent = agent
        return agent

    async def _on_frame(self, sock: ConsoleSocket, data: str) -> bool:
        """Handle one client frame; False when the socket must close."""
        try:
            raw = json.loads(data)
        except (ValueError, RecursionError):
            raw = None
        if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
            sock.send(_error("bad_json", "a frame is a JSON object with a type"))
            return True
        ref = raw.get("ref") if isinstance(raw.get("ref"), str) else None
        roles = ROLES.get(raw["type"])
        if roles is None:
            sock.send(_error("unknown_type", f"unknown frame type {raw['type']!r}", ref))
            return True
        try:
            agent = await self._recheck(sock)
            if agent is None:
                raise NotAuthenticated("the session has ended or the agent is inactive")
            authorize(agent, roles)
            await self._dispatch(sock, raw)
        except NotAuthenticated as exc:
            sock.send(_error(exc.code, str(exc), ref))
            await sock.close()
            await sock.ws.close(code=CLOSE_UNAUTHORIZED, message=b"unauthorized")
            return False
        except AccessError as exc:
            sock.send(_error(exc.code, str(exc), ref))
        except ValidationError as exc:
            sock.send(_error("bad_frame", "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()), ref))
        except NotFound as exc:
            sock.send(_error("not_found", str(exc), ref))
        except Conflict as exc:
            sock.send(_error("conflict", str(exc), ref))
        except PyMongoError as exc:
            log.warning("live: store unavailable: %s", exc)
            sock.send(_error("unavailable", "the store is unavailable; try again", ref))
        return True

    async def _dispatch(self, sock: ConsoleSocket, raw: dict[str, Any]) -> None:
        kind, agent = raw["type"], sock.agent
        if kind == "ping":
            sock.send({"type": "pong", "ref": raw.get("ref")})
        elif kind in ("subscribe", "unsubscribe"):
            frame = ConversationIn.model_validate(raw)
            conversation = await self._conversation(frame.conversation_id)
            if kind == "subscribe":
                sock.subscriptions.add(conversation.id)
            else:
                sock.subscriptions.discard(conversation.id)
            sock.send({"type": f"{kind}d", "conversation_id": conversation.id,
                       "last_seq": await self.store.seq_above(conversation.id, conversation.seq),
                       "ref": frame.ref})
        elif kind == "typing":
            typing = TypingIn.model_validate(raw)
            conversation = await self._conversation(typing.conversation_id)
            if conversation.owner is not OwnerState.AGENT or conversation.assignee_id != agent.id:
                raise Conflict("only the assigned agent's typing is shown to the customer")
            targets = {conversation.channel: conversation.thread_key, **conversation.routes}
            await self.feed.typing(conversation.id, f"agent:{agent.id}", typing.on,
                                   agent_id=agent.id, name=agent.name, targets=targets)
        elif kind == "presence":
            wanted = PresenceIn.model_validate(raw)
            updated = await self.routing.set_presence(agent, wanted.presence, self.grace)
            sock.send({"type": "presence", "agent": _agent_frame(updated), "ref": wanted.ref})

    async def _conversation(self, conversation_id: str) -> Conversation:
        conversation = await self.store.get_conversation(conversation_id)
        if conversation is None:
            raise NotFound("no such conversation")
        return conversation

    # ----------------------------------------------------------------- presence

    async def _connected(self, agent_id: str) -> bool:
        fresh = utcnow() - timedelta(seconds=self.heartbeat * 3)
        found = await self.coll.find_one({"agent_id": agent_id, "seen_at": {"$gt": fresh}})
        return found is not None

    async def _joined(self, sock: ConsoleSocket) -> None:
        await self.coll.insert_one({"_id": sock.id, "agent_id": sock.agent.id,
                                    "instance": self.instance, "seen_at": utcnow()})
        sock.agent = await self.routing.set_presence(sock.agent, Presence.ONLINE, self.grace)

    async def _left(self, sock: ConsoleSocket) -> None:
        await self.coll.delete_one({"_id": sock.id})
        await self._maybe_offline(sock.agent.id)

    async def _maybe_offline(self, agent_id: str) -> None:
        """Offline if the agent has no socket left in any process. Rechecked after the
        write: a socket that opened meanwhile (elsewhere) makes them online again."""
        if await self._connected(agent_id):
            return
        agent = await self.routing.queue.get_agent(agent_id)
        if agent is None or agent.presence is Presence.OFFLINE:
            return
        await self.routing.set_presence(agent, Presence.OFFLINE, self.grace)
        if await self._connected(agent_id):
            await self.routing.set_presence(agent, Presence.ONLINE, self.grace)

    async def _beat(self, first: bool) -> None:
        if first:
            await self.coll.create_indexes([IndexModel([("agent_id", ASCENDING),
                                                        ("seen_at", ASCENDING)]),
                                            IndexModel([("seen_at", ASCENDING)])])
        now = utcnow()
        ids = [s.id for s in self.sockets]
        if ids:
            await self.coll.update_many({"_id": {"$in": ids}}, {"$set": {"seen_at": now}})
        stale = now - timedelta(seconds=self.heartbeat * 3)
        async for doc in self.coll.find({"seen_at": {"$lt": stale}}):
            gone = await self.coll.delete_one({"_id": doc["_id"], "seen_at": doc["seen_at"]})
            if gone.deleted_count:  # its process died: was it the agent's last socket?
                await self._maybe_offline(str(doc["agent_id"]))

    # ------------------------------------------------------------------ changes

    async def on_change(self, change: Change) -> None:
        if change.kind is ChangeKind.RESYNC:
            for sock in self.sockets:
                sock.send({"type": "resync"})
        elif change.kind is ChangeKind.SIGNAL:
            await self._signal(change.doc or {})
        elif not any(s.staff for s in self.sockets):
            return  # nobody here to tell: no lookups
        elif change.kind is ChangeKind.CONVERSATION:
            await self._conversation_changed(change)
        elif change.kind is ChangeKind.ITEM and change.doc is not None:
            await self._item(from_doc(Activity, change.doc))
        elif change.kind is ChangeKind.ITEM and "files_at" in change.fields:
            await self._files_changed(change.id)
        elif change.kind is ChangeKind.AGENT:
            await self._agent_changed(change)

    def _staff(self) -> list[ConsoleSocket]:
        return [s for s in self.sockets if s.staff]

    async def _summary(self, conversation: Conversation, sock: ConsoleSocket) -> dict[str, Any]:
        """The conversation exactly as ``GET /api/v1/conversations/{id}`` shows it (built by
        the same function, with the socket's upgrade request for the app's services)."""
        from gateway.desk.api import _conversation_out  # noqa: PLC0415

        out = await _conversation_out(sock.request, conversation)
        return out.model_dump(mode="json")

    async def _conversation_changed(self, change: Change) -> None:
        conversation = await self.store.get_conversation(change.id)
        staff = self._staff()
        if conversation is None or not staff:
            return
        summary = await self._summary(conversation, staff[0])
        owner, assignee = conversation.owner, conversation.assignee_id
        for sock in staff:
            sock.send({"type": "conversation", "conversation": summary,
                       "in_queue": owner is OwnerState.QUEUED,
                       "mine": owner is OwnerState.AGENT and assignee == sock.agent.id})
        if "assignee_id" in change.fields and owner is OwnerState.AGENT and assignee:
            for sock in self.by_agent.get(assignee, ()):
                if sock.staff:
                    sock.send({"type": "notification", "kind": "assigned",
                               "conversation": summary})

    def _show(self, item: Activity) -> dict[str, Any]:
        """Send ``item`` to the staff sockets subscribed to its conversation."""
        frame = {"type": "item", "conversation_id": item.conversation_id,
                 "item": item.model_dump(mode="json")}
        for sock in self._staff():
            if item.conversation_id in sock.subscriptions:
                sock.send(frame)
        return frame

    async def _item(self, item: Activity) -> None:
        frame = self._show(item)
        if item.direction is not Direction.INBOUND or item.sender.role is not Role.CUSTOMER:
            return
        conversation = await self.store.get_conversation(item.conversation_id)
        if conversation is None or conversation.owner is not OwnerState.AGENT:
            return
        for sock in self.by_agent.get(conversation.assignee_id or "", ()):
            if sock.staff:
                sock.send({"type": "notification", "kind": "message",
                           "conversation_id": item.conversation_id,
                           "item": frame["item"]})

    async def _files_changed(self, item_id: str) -> None:
        """An item's files were fetched (or failed): the item again, with them."""
        item = await self.store.get_message(item_id)
        if item is not None:
            self._show(item)

    async def _agent_changed(self, change: Change) -> None:
        agent = await self.agents.get(change.id)
        if agent is None:
            return
        for sock in list(self.by_agent.get(agent.id, ())):
            sock.agent = agent  # a new role or deactivation applies to the open sockets
            if not agent.active:
                sock.send(_error("unauthorized", "the agent was deactivated"))
                await sock.ws.close(code=CLOSE_UNAUTHORIZED, message=b"deactivated")
        if "presence" in change.fields or change.doc is not None:
            frame = {"type": "presence", "agent": _agent_frame(agent)}
            for sock in self._staff():
                sock.send(frame)

    async def _signal(self, doc: dict[str, Any]) -> None:
        if doc.get("kind") != "typing":
            return
        who, on = str(doc.get("who")), bool(doc.get("on"))
        conversation_id = str(doc.get("conversation_id"))
        frame = {"type": "typing", "conversation_id": conversation_id, "on": on,
                 "role": "customer" if who == "customer" else "agent",
                 "agent_id": doc.get("agent_id"), "name": doc.get("name")}
        for sock in self._staff():
            if conversation_id in sock.subscriptions and sock.agent.id != doc.get("agent_id"):
                sock.send(frame)
        if who == "customer":
            return
        for channel, thread_key in dict(doc.get("targets") or {}).items():
            connector = self.connectors.get(channel)
            if isinstance(connector, TypingChannel):
                try:
                    await connector.show_typing(str(thread_key), on, doc.get("name"))
                except (ConnectionError, RuntimeError) as exc:
                    log.info("live: typing to %s failed: %s", channel, exc)


def _agent_frame(agent: Agent) -> dict[str, Any]:
    return {"id": agent.id, "name": agent.name, "presence": agent.presence.value,
            "presence_at": agent.presence_at.isoformat() if agent.presence_at else None}


LIVE = web.AppKey("live_hub", LiveHub)


async def live(request: web.Request) -> web.StreamResponse:
    return await request.config_dict[LIVE].handle(request)


def live_endpoints() -> list[Endpoint]:
    return [Endpoint(
        "GET", "/v1/live", live, "The console's live socket (WebSocket)", None,
        errors=(401, 503), tag="agents", roles=ALL_ROLES,
        description="Upgrade to a WebSocket (a plain GET says what it is). Queue and "
        "my-conversation changes, new "
        "items, notifications, typing and presence, both ways: see docs/console-protocol.md. "
        "Every client frame is checked against the agent's role; designers get nothing "
        "of conversations.",
    )]


async def live_ctx(app: web.Application) -> AsyncIterator[None]:
    """The feed and the hub (after the core: they use the store, routing and agents)."""
    settings = app[SETTINGS]
    feed = app[FEED]  # opened by the core (gateway/app.py)
    hub = LiveHub(app[STORE], feed, app[AGENTS], app[ROUTING], app[CONNECTORS],
                  grace=timedelta(seconds=settings.agent_offline_grace_seconds))
    app[LIVE] = hub
    hub.start()
    try:
        yield
    finally:
        await hub.stop()


async def _shutdown(app: web.Application) -> None:
    if LIVE in app:
        await app[LIVE].shutdown(app)


def setup_live(app: web.Application) -> None:
    """Open the feed and the hub with the app; close the sockets at shutdown."""
    app.cleanup_ctx.append(live_ctx)
    app.on_shutdown.append(_shutdown)
