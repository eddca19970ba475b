"""Inbound over IMAP (aioimaplib): IDLE when the server has it, polling otherwise.

One background task per connector: connect (TLS per settings), log in, select INBOX, and
compare UIDVALIDITY with the one in the store. Then, for every UID above the last one
stored: FETCH ``BODY.PEEK[]`` (which does not set \\Seen), hand the bytes to ``receive``
(which returns only once the message is durably stored), then ``UID STORE +FLAGS
(\\Seen)``, then ``put_state`` the UID. A crash between any two steps re-reads the
message on restart, and the store's dedupe (external id = Message-ID) takes it once.

First start, or a changed UIDVALIDITY (the mailbox was rebuilt, UIDs mean something
else): take in the messages that are not \\Seen (dedupe again keeps it safe), then go on
from the highest UID. Errors reconnect with exponential backoff.

With several gateway processes on one store, the connector runs ``run()`` under the
lease ``email:<state_key>`` (gateway/leases.py): one process reads the mailbox at a time.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aioimaplib  # type: ignore[import-untyped]
from pymongo.errors import PyMongoError

from gateway.aio import raise_if_cancelled
from gateway.channel_settings import MailServer
from gateway.store import Store

log = logging.getLogger(__name__)

CHANNEL = "email"
_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]")
_FETCH_HEAD = re.compile(rb"\(.*\bUID (\d+)")
_SIZE = re.compile(rb"RFC822\.SIZE (\d+)")
HEADER_BYTES = 256 * 1024  # what is fetched of a message over the size limit


class Outcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"  # not stored, on purpose (logged); never retried


Receive = Callable[[bytes, int], Awaitable[Outcome]]  # (raw bytes, declared size)


class ImapError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class ImapOptions:
    poll_seconds: float = 30.0  # without IDLE: how often to look
    idle_seconds: float = 25 * 60.0  # with IDLE: re-issued this often (RFC 2177: < 29 min)
    timeout: float = 30.0  # one IMAP command
    max_backoff: float = 300.0
    max_bytes: int = 10 * 1024 * 1024  # larger messages: only the first HEADER_BYTES


def _ok(response: Any, what: str) -> Any:
    if response.result != "OK":
        lines = b" ".join(line for line in response.lines if isinstance(line, bytes))
        raise ImapError(f"{what}: {response.result} {lines[:300]!r}")
    return response


class ImapInbox:
    """The IMAP loop of one mailbox (a background task between ``start`` and ``stop``)."""

    def __init__(self, server: MailServer, store: Store, receive: Receive,
                 options: ImapOptions) -> None:
        self.server = server
        self.store = store
        self.receive = receive
        self.options = options
        self.state_key = f"imap:{server.user}@{server.host}:{server.port}/INBOX"
        self.connected = asyncio.Event()  # set while a session is logged in and selected
        self.waiting = asyncio.Event()  # set while waiting for new mail (IDLE or a poll pause)
        self._task: asyncio.Task[None] | None = None
        self._client: Any = None
        self._idle_command: asyncio.Future[Any] | None = None
        self._lost = False  # the server closed the connection (IDLE would never hear)

    def start(self) -> None:
        """Run the loop here, in a task of its own (``stop`` ends it)."""
        self._task = asyncio.create_task(self.run(), name="email-imap")

    async def run(self) -> None:
        """The loop, until cancelled (e.g. under a lease: gateway/leases.py)."""
        try:
            await self._run()
        finally:
            await self._close()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._close()

    async def _close(self) -> None:
        client, self._client = self._client, None
        self.connected.clear()
        self.waiting.clear()
        if client is None:
            return
        idle, self._idle_command = self._idle_command, None
        try:
            if not self._lost:
                if idle is not None and not idle.done():  # DONE was sent when _idle ended
                    await asyncio.wait_for(asyncio.shield(idle), 1.0)
                await asyncio.wait_for(client.logout(), 2.0)
        except Exception:
            raise_if_cancelled()
        transport = getattr(client.protocol, "transport", None)
        if transport is not None:
            transport.close()

    async def _run(self) -> None:
        delay = 1.0
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise_if_cancelled()
                if self.connected.is_set():  # the session had worked: backoff starts anew
                    delay = 1.0
                expected = (ImapError, PyMongoError, OSError, TimeoutError,
                            aioimaplib.AioImapException)
                log.warning("email: IMAP %s:%s: %s; reconnecting in %.0f s",
                            self.server.host, self.server.port, str(exc) or repr(exc), delay,
                            exc_info=not isinstance(exc, expected))
            await self._close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.options.max_backoff)

    async def _connect(self) -> Any:
        server, timeout = self.server, self.options.timeout
        if server.tls == "ssl":
            client = aioimaplib.IMAP4_SSL(server.host, server.port, timeout=timeout,
                                          ssl_context=ssl.create_default_context())
        else:
            client = aioimaplib.IMAP4(server.host, server.port, timeout=timeout)
        self._client = client
        self._lost = False
        client.protocol.conn_lost_cb = self._connection_lost
        await client.wait_hello_from_server()
        if server.tls == "starttls":
            await self._starttls(client)
        _ok(await client.login(server.user or "", server.password or ""), "LOGIN")
        return client

    def _connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        client = self._client
        if client is not None:  # wake a wait_server_push (IDLE) at once
            client.protocol.idle_queue.put_nowait(aioimaplib.STOP_WAIT_SERVER_PUSH)

    def _check_connection(self) -> None:
        if self._lost:
            raise ImapError("the server closed the connection")

    async def _starttls(self, client: Any) -> None:
        """aioimaplib has no STARTTLS: send it, then upgrade the transport in place."""
        protocol = client.protocol
        if "STARTTLS" not in protocol.capabilities:
            raise ImapError("server does not offer STARTTLS (OMNIGATE_IMAP_TLS=starttls)")
        command = aioimaplib.Command("STARTTLS", protocol.new_tag(), loop=protocol.loop)
        _ok(await asyncio.wait_for(protocol.execute(command), self.options.timeout), "STARTTLS")
        loop = asyncio.get_running_loop()
        protocol.transport = await loop.start_tls(
            protocol.transport, protocol, ssl.create_default_context(),
            server_hostname=self.server.host)
        await asyncio.wait_for(protocol.capability(), self.options.timeout)

    async def _session(self) -> None:
        client = await self._connect()
        selected = _ok(await client.select("INBOX"), "SELECT INBOX")
        uidvalidity = next((int(m.group(1)) for line in selected.lines
                            if isinstance(line, bytes) and (m := _UIDVALIDITY.search(line))), 0)
        state = await self.store.get_state(CHANNEL, self.state_key)
        if state is None or state.get("uidvalidity") != uidvalidity:
            if state is not None:
                log.warning("email: UIDVALIDITY of %s changed (%s -> %s): resynchronising "
                            "from the unseen messages", self.state_key,
                            state.get("uidvalidity"), uidvalidity)
            await self._resync(client, uidvalidity)
        self.connected.set()
        idle = client.has_capability("IDLE")
        log.info("email: IMAP %s selected INBOX (%s)", self.server.host,
                 "IDLE" if idle else f"polling every {self.options.poll_seconds:g} s")
        while True:
            await self._take_new(client, uidvalidity)
            if idle:
                await self._idle(client)
            else:
                self.waiting.set()
                try:
                    await asyncio.sleep(self.options.poll_seconds)
                finally:
                    self.waiting.clear()
                self._check_connection()
                _ok(await client.noop(), "NOOP")

    async def _resync(self, client: Any, uidvalidity: int) -> None:
        unseen = await self._search(client, "UNSEEN")
        every = await self._search(client, "ALL")
        for uid, size in await self._sizes(client, unseen):
            await self._take(client, uid, size, uidvalidity, advance=False)
        await self.store.put_state(CHANNEL, self.state_key,
                                   {"uidvalidity": uidvalidity, "last_uid": max(every, default=0)})

    async def _search(self, client: Any, criterion: str) -> list[int]:
        response = _ok(await client.uid_search(criterion, charset=None), f"UID SEARCH {criterion}")
        found: list[int] = []
        for line in response.lines[:-1]:
            if isinstance(line, bytes):
                found += [int(n) for n in line.split() if n.isdigit()]
        return sorted(found)

    async def _sizes(self, client: Any, uids: list[int]) -> list[tuple[int, int]]:
        if not uids:
            return []
        found: list[tuple[int, int]] = []
        for start in range(0, len(uids), 200):
            chunk = ",".join(str(u) for u in uids[start:start + 200])
            response = _ok(await client.uid("fetch", chunk, "(UID RFC822.SIZE)"), "UID FETCH")
            found += self._parse_sizes(response)
        return sorted(found)

    @staticmethod
    def _parse_sizes(response: Any) -> list[tuple[int, int]]:
        found = []
        for line in response.lines:
            if isinstance(line, bytes) and (uid := _FETCH_HEAD.search(line)):
                size = _SIZE.search(line)
                found.append((int(uid.group(1)), int(size.group(1)) if size else 0))
        return found

    async def _take_new(self, client: Any, uidvalidity: int) -> None:
        state = await self.store.get_state(CHANNEL, self.state_key) or {}
        last = int(state.get("last_uid", 0))
        response = _ok(await client.uid("fetch", f"{last + 1}:*", "(UID RFC822.SIZE)"),
                       "UID FETCH")
        # "n:*" always names the newest message, even when its UID is below n
        for uid, size in sorted(u for u in self._parse_sizes(response) if u[0] > last):
            await self._take(client, uid, size, uidvalidity, advance=True)

    async def _take(self, client: Any, uid: int, size: int, uidvalidity: int, *,
                    advance: bool) -> None:
        part = "BODY.PEEK[]" if size <= self.options.max_bytes else \
            f"BODY.PEEK[]<0.{HEADER_BYTES}>"
        response = _ok(await client.uid("fetch", str(uid), f"(UID {part})"), "UID FETCH body")
        raw = next((bytes(line) for line in response.lines if isinstance(line, bytearray)), None)
        if raw is None:
            log.warning("email: UID %s vanished before it was read", uid)
            outcome = Outcome.REJECTED
        else:
            try:
                outcome = await self.receive(raw, max(size, len(raw)))
            except PyMongoError:
                raise  # not stored: not \Seen, UID not advanced; the session reconnects
            except Exception:
                log.exception("email: UID %s could not be taken in; left unseen", uid)
                outcome = Outcome.REJECTED
        if outcome is not Outcome.REJECTED:
            _ok(await client.uid("store", str(uid), "+FLAGS.SILENT (\\Seen)"), "UID STORE")
        if advance:
            await self.store.put_state(CHANNEL, self.state_key,
                                       {"uidvalidity": uidvalidity, "last_uid": uid})

    async def _idle(self, client: Any) -> None:
        idle = await client.idle_start(timeout=self.options.idle_seconds)
        self._idle_command = idle
        self.waiting.set()
        try:
            pushed = await client.wait_server_push(timeout=self.options.idle_seconds + 5)
            log.debug("email: IMAP push %r", pushed)
        except TimeoutError:
            pass
        finally:
            self.waiting.clear()
            if client.has_pending_idle() and not self._lost:
                client.idle_done()
        self._check_connection()
        _ok(await asyncio.wait_for(idle, self.options.timeout), "IDLE")
