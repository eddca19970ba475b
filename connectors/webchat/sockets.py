"""Open visitor sockets, and the rule that each gets every item once, in seq order.

A socket remembers the last ``seq`` it sent. Whenever something may have been added to
its conversation it *catches up*: reads ``seq > last`` from the store (an index range) and
sends it. Because seqs are contiguous and become visible in order, this sends nothing
twice and skips nothing, whether the item was pushed live, replayed after a reconnect, or
both at once. A live push carries the item itself (``hint``): the next one in line is
sent without a read, one already sent is nothing to do.

Live pushes come from the process that stored the item and, for every process, from the
store's change feed, so a socket held by any gateway process sees what any other stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from aiohttp import web

from connectors.webchat.frames import item_frame
from gateway.model import Activity
from gateway.store import Store

log = logging.getLogger(__name__)

CHANNEL = "webchat"
BATCH = 200


async def conversation_of(store: Store, visitor_id: str) -> str | None:
    """The visitor's conversation: the one they continue if they came by a link from
    another channel (their identity says), else their own thread's; None: none yet."""
    identity = await store.identities.find_one({"_id": f"{CHANNEL}:{visitor_id}"},
                                               {"conversation_id": 1})
    if identity is not None and identity.get("conversation_id"):
        return str(identity["conversation_id"])
    conversation = await store.find_conversation(CHANNEL, visitor_id)
    return conversation.id if conversation else None


class VisitorSocket:
    def __init__(self, ws: web.WebSocketResponse, store: Store, visitor_id: str,
                 link: Callable[[str], str] | None = None) -> None:
        self.ws = ws
        self.store = store
        self.visitor_id = visitor_id
        self.link = link  # attachment id -> a link for this visitor (files.FileLinks)
        self.conversation_id: str | None = None
        self.last_seq = 0
        self.lock = asyncio.Lock()  # one writer at a time, and catch-ups in order

    async def send(self, frame: dict[str, Any]) -> None:
        async with self.lock:
            await self._send(frame)

    async def _send(self, frame: dict[str, Any]) -> None:
        if not self.ws.closed:
            await self.ws.send_json(frame)

    async def raw_send(self, frame: dict[str, Any]) -> None:
        """Send while the caller holds ``lock``."""
        assert self.lock.locked()
        await self._send(frame)

    async def find_conversation(self) -> str | None:
        if self.conversation_id is None:
            self.conversation_id = await conversation_of(self.store, self.visitor_id)
        return self.conversation_id

    async def replay(self, watermark: int | None) -> dict[str, Any]:
        """Send history after ``watermark`` (or the last 50 items); return the synced frame."""
        async with self.lock:
            conversation_id = await self.find_conversation()
            has_more = truncated = False
            items: list[Activity] = []
            if conversation_id is not None:
                if watermark is None:
                    page, has_more = await self.store.history(conversation_id, limit=50)
                    items = page[::-1]
                else:
                    top = await self.store.top_seq(conversation_id)
                    start = min(watermark, top)
                    if top - start > 1000:
                        start, truncated = top - 1000, True
                    items = await self.store.items_after(conversation_id, start, 1000)
                    self.last_seq = start
                    has_more = start > 0
            for item in items:
                await self._send(item_frame(item, self.link))
                self.last_seq = item.seq
            return {
                "type": "synced",
                "watermark": self.last_seq,
                "has_more": has_more,
                "truncated": truncated,
            }

    async def catch_up(self, hint: Activity | None = None) -> bool:
        """Send every item this socket has not sent yet. Returns False if it is closed."""
        if self.ws.closed:
            return False
        async with self.lock:
            if hint is not None and hint.seq <= self.last_seq and (
                    hint.conversation_id == self.conversation_id):
                return True  # sent already (pushed here, then seen again on the feed)
            if hint is not None and hint.seq == self.last_seq + 1:
                self.conversation_id = hint.conversation_id
                await self._send(item_frame(hint, self.link))  # fast path: no read needed
                self.last_seq = hint.seq
                return True
            conversation_id = await self.find_conversation()
            if conversation_id is None:
                return True
            while True:
                items = await self.store.items_after(conversation_id, self.last_seq, BATCH)
                for item in items:
                    await self._send(item_frame(item, self.link))
                    self.last_seq = item.seq
                if len(items) < BATCH:
                    return not self.ws.closed

    async def history(self, before: int, limit: int) -> dict[str, Any]:
        conversation_id = await self.find_conversation()
        items: list[Activity] = []
        has_more = False
        if conversation_id is not None:
            page, has_more = await self.store.history(conversation_id, before=before, limit=limit)
            items = page[::-1]
        shown = [item_frame(i, self.link) for i in items if not i.private]  # notes: agents only
        return {"type": "history", "items": shown, "has_more": has_more}


class Hub:
    """The open sockets of this process, by visitor (one visitor, one conversation)."""

    def __init__(self) -> None:
        self._sockets: defaultdict[str, set[VisitorSocket]] = defaultdict(set)
        self._visitors: dict[str, str] = {}  # conversation id -> visitor id

    def add(self, socket: VisitorSocket) -> None:
        self._sockets[socket.visitor_id].add(socket)
        if socket.conversation_id is not None:
            self._visitors[socket.conversation_id] = socket.visitor_id

    def bind(self, socket: VisitorSocket, conversation_id: str) -> None:
        """The visitor's conversation exists now (their first message made it)."""
        socket.conversation_id = conversation_id
        if socket.visitor_id in self._sockets:
            self._visitors[conversation_id] = socket.visitor_id

    def bind_visitor(self, visitor_id: str, conversation_id: str) -> None:
        """Every socket of the visitor: their conversation exists now."""
        for socket in self._sockets.get(visitor_id, ()):
            self.bind(socket, conversation_id)

    def remove(self, socket: VisitorSocket) -> None:
        sockets = self._sockets.get(socket.visitor_id)
        if sockets is not None:
            sockets.discard(socket)
            if not sockets:
                del self._sockets[socket.visitor_id]
                if socket.conversation_id is not None:
                    self._visitors.pop(socket.conversation_id, None)

    def visitor_of(self, conversation_id: str) -> str | None:
        """The visitor with a socket open here on that conversation, if any."""
        return self._visitors.get(conversation_id)

    def count(self, visitor_id: str | None = None) -> int:
        if visitor_id is None:
            return sum(len(s) for s in self._sockets.values())
        return len(self._sockets.get(visitor_id, ()))

    async def push(self, visitor_id: str, hint: Activity | None = None) -> int:
        """Make every socket of the visitor catch up. Returns how many are still open."""
        delivered = 0
        for socket in list(self._sockets.get(visitor_id, ())):
            try:
                if await socket.catch_up(hint):
                    delivered += 1
            except (ConnectionError, RuntimeError) as exc:
                log.info("webchat: socket of %s went away: %s", visitor_id, exc)
        return delivered

    async def resend(self, visitor_id: str, item: Activity) -> int:
        """An item the visitor's sockets showed already, again (its files changed);
        a socket that has not reached it yet gets it with its catch-up anyway."""
        sent = 0
        for socket in list(self._sockets.get(visitor_id, ())):
            if socket.conversation_id == item.conversation_id and item.seq <= socket.last_seq:
                try:
                    await socket.send({"type": "update", "item": item_frame(item, socket.link)})
                    sent += 1
                except (ConnectionError, RuntimeError) as exc:
                    log.info("webchat: socket of %s went away: %s", visitor_id, exc)
        return sent

    async def tell(self, visitor_id: str, frame: dict[str, Any]) -> int:
        """Send a frame that is no item (typing, ...) to every socket of the visitor."""
        told = 0
        for socket in list(self._sockets.get(visitor_id, ())):
            try:
                await socket.send(frame)
                told += 1
            except (ConnectionError, RuntimeError) as exc:
                log.info("webchat: socket of %s went away: %s", visitor_id, exc)
        return told

    async def close_all(self, code: int, message: bytes) -> None:
        for sockets in list(self._sockets.values()):
            for socket in list(sockets):
                with contextlib.suppress(Exception):
                    await socket.ws.close(code=code, message=message)
