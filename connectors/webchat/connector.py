"""Web chat: an embeddable widget talking to the gateway over a WebSocket.

Routes (sub-app mounted at ``/webchat``): ``GET /ws`` (the socket, protocol in
docs/webchat-protocol.md), ``GET /widget.js``, ``GET /widget.css``. The demo page at ``/``
is ``demo_page``. A visitor token (kept by the browser; signed, never stored:
connectors/webchat/tokens.py) is bound to one visitor and so to that visitor's one
conversation. A ``hello`` writes nothing; the first message creates the visitor's contact
and conversation. New sockets per client address and messages per visitor are rate
limited in this process (gateway/ratelimit.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from pydantic import ValidationError
from pymongo.errors import PyMongoError

from connectors.base import Connector, ConnectorContext, DeliveryResult
from connectors.webchat import demo, email_link
from connectors.webchat.files import FileLinks, handle_download, handle_upload
from connectors.webchat.frames import (
    PROTOCOL_VERSION,
    EmailLinkRequest,
    EmailVerify,
    ErrorCode,
    FileRequest,
    Hello,
    HistoryRequest,
    LinkRequest,
    SendAction,
    SendMessage,
    Typing,
    error,
)
from connectors.webchat.sockets import CHANNEL, Hub, VisitorSocket
from connectors.webchat.tokens import (
    TokenSigner,
    is_signed,
    legacy_key,
    load_secret,
    new_visitor_id,
)
from gateway.feed import Change, ChangeKind
from gateway.model import Activity, Conversation, DeliveryStatus, InboundMessage, Party, Role
from gateway.ratelimit import RateLimit
from gateway.store.mongo import from_doc

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
# channels a visitor can link by a code (email) or a link (``link`` frame)
LINKABLE = frozenset({"email", "slack", "telegram"})
HARD_FRAME_LIMIT = 1024 * 1024  # aiohttp closes the socket with 1009 above this
HELLO_TIMEOUT = 10.0
CLOSE_INVALID_TOKEN = 4401
CLOSE_NO_HELLO = 4408
CLOSE_RATE_LIMITED = 4429
MAX_TOKEN_CHARS = 200


@dataclass(frozen=True, slots=True)
class WebchatConfig:
    allowed_origins: list[str] = field(default_factory=list)
    max_frame_bytes: int = 65536
    max_text: int = 4000
    secret_key: str | None = None  # signs visitor tokens; None: a random one in the store
    connects_per_minute: int = 120  # hellos per client address (burst: the same); 0 = off
    messages_per_minute: int = 600  # messages and actions per visitor; 0 = off
    message_burst: int = 30
    page_url: str | None = None  # the page with the widget: "continue in the web chat" links


class WebchatConnector(Connector):
    channel = CHANNEL
    store_backed = True  # sockets read the conversation from the store (sockets.py)

    def __init__(self, config: WebchatConfig | None = None) -> None:
        self.config = config or WebchatConfig()
        self.hub = Hub()
        self.demo = demo.DemoPage()  # the page at / says which channels the chat can move to
        self._context: ConnectorContext | None = None
        self._unwatch: Callable[[], None] | None = None
        self._signer: TokenSigner | None = None
        self._links: FileLinks | None = None
        if self.config.secret_key is not None:
            self._signer = TokenSigner(self.config.secret_key.encode())
            self._links = FileLinks(self.config.secret_key.encode())
        self._signer_lock = asyncio.Lock()
        self.connects = RateLimit.per_minute(self.config.connects_per_minute)
        self.messages = RateLimit.per_minute(self.config.messages_per_minute,
                                             self.config.message_burst)

    @property
    def context(self) -> ConnectorContext:
        if self._context is None:
            raise RuntimeError("WebchatConnector.setup() was not called")
        return self._context

    # ------------------------------------------------------------------- wiring

    def setup(self, app: web.Application) -> None:
        sub = web.Application()
        sub.router.add_get("/ws", self.handle_socket)
        sub.router.add_post("/upload", self.handle_upload)
        sub.router.add_route("OPTIONS", "/upload", self.upload_preflight)
        sub.router.add_get("/files/{id}", self.handle_file)
        sub.router.add_get("/widget.js", self._static("widget.js", "text/javascript"))
        sub.router.add_get("/widget.css", self._static("widget.css", "text/css"))
        app.add_subapp("/webchat", sub)
        app.on_shutdown.append(self._on_shutdown)
        app[demo.DEMO] = self.demo

    async def start(self, context: ConnectorContext) -> None:
        self._context = context
        self.demo.channels = LINKABLE & context.channels
        self._unwatch = context.watch(self._on_change)
        try:
            await self.signer()  # read once now; if the store is down, at the first hello
        except PyMongoError as exc:
            log.warning("webchat: token secret not read yet (%s); will retry", exc)

    async def signer(self) -> TokenSigner:
        """The token signer: OMNIGATE_SECRET_KEY, or the store's secret, read once."""
        if self._signer is None:
            async with self._signer_lock:
                if self._signer is None:
                    secret = await load_secret(self.context.store)
                    self._signer, self._links = TokenSigner(secret), FileLinks(secret)
        return self._signer

    async def file_links(self) -> FileLinks:
        """Signs visitors' links to their files (the same secret, its own derived key)."""
        await self.signer()
        assert self._links is not None
        return self._links

    async def visitor_of(self, token: str) -> str | None:
        """The visitor a token binds (None: unknown, forged, malformed)."""
        return await self._visitor_of(await self.signer(), token)

    async def stop(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None

    async def _on_change(self, change: Change) -> None:
        """An item stored by any gateway process: show it on the sockets open here."""
        doc = change.doc
        if change.kind is ChangeKind.ITEM and doc is None and "files_at" in change.fields:
            await self._files_changed(change.id)
            return
        if change.kind is not ChangeKind.ITEM or doc is None:
            return
        if doc.get("channel") != self.channel:
            # said on another channel after a channel switch: not pushed live here (the
            # widget shows it when it next catches up, as the whole conversation)
            return
        visitor = self.hub.visitor_of(str(doc.get("conversation_id")))
        if visitor is None:
            return
        item = from_doc(Activity, doc)
        if await self.hub.push(visitor, item):
            self.context.delivered(item.conversation_id, item.seq)

    async def _files_changed(self, item_id: str) -> None:
        """An item's files were fetched (or failed): sockets that showed it get it again
        (the widget replaces it: docs/webchat-protocol.md, Files)."""
        item = await self.context.store.get_message(item_id)
        visitor = None if item is None else self.hub.visitor_of(item.conversation_id)
        if item is not None and visitor is not None:
            await self.hub.resend(visitor, item)

    async def _on_shutdown(self, _app: web.Application) -> None:
        await self.hub.close_all(WSCloseCode.GOING_AWAY, b"server shutting down")

    @staticmethod
    def _static(name: str, content_type: str) -> Any:
        path = STATIC / name

        async def handler(_request: web.Request) -> web.StreamResponse:
            return web.Response(
                body=path.read_bytes(),
                content_type=content_type,
                charset="utf-8",
                headers={
                    "Cache-Control": "no-cache",
                    "X-Content-Type-Options": "nosniff",
                    "Access-Control-Allow-Origin": "*",
                },
            )

        return handler

    demo_page = staticmethod(demo.demo_page)  # GET / (connectors/webchat/demo.py)

    # ------------------------------------------------------------- deep links

    @property
    def links_enabled(self) -> bool:
        """Links into the web chat need the page that shows it."""
        return self.config.page_url is not None

    async def deep_link(self, payload: str) -> str:
        """The chat page with a link token in its fragment (the widget redeems it at
        hello: connectors/webchat/continued.py)."""
        if self.config.page_url is None:
            raise RuntimeError("OMNIGATE_WEBCHAT_PAGE_URL is not set")
        return f"{self.config.page_url}#omnigate-link={payload}"

    # ------------------------------------------------------------------ outbound

    async def send(self, conversation: Conversation, item: Activity) -> DeliveryResult:
        """Push to the visitor's open sockets; otherwise it waits in the store for them."""
        delivered = await self.hub.push(conversation.thread_key, item)
        return DeliveryResult(DeliveryStatus.DELIVERED if delivered else DeliveryStatus.STORED)

    async def show_typing(self, thread_key: str, on: bool, name: str | None) -> int:
        """An agent is (or stopped) typing: tell the visitor's sockets in this process
        (gateway/desk/live.py calls it in every process). Returns how many were told."""
        return await self.hub.tell(thread_key, {"type": "typing", "role": "agent",
                                                "name": name, "on": on})

    # ------------------------------------------------------------------- inbound

    def origin_allowed(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:
            return True  # not a browser; the token still guards every conversation
        allowed = self.config.allowed_origins
        if "*" in allowed or origin.rstrip("/") in allowed:
            return True
        # request.scheme: behind a trusted proxy the client's (OMNIGATE_TRUSTED_PROXIES)
        return origin == f"{request.scheme}://{request.host}"

    async def handle_socket(self, request: web.Request) -> web.StreamResponse:
        if not self.origin_allowed(request):
            log.info("webchat: refused Origin %s", request.headers.get("Origin"))
            return web.json_response(
                {
                    "error": "origin_not_allowed",
                    "message": "this page's origin may not open the chat; see "
                    "OMNIGATE_WEBCHAT_ALLOWED_ORIGINS",
                },
                status=403,
            )
        ws = web.WebSocketResponse(max_msg_size=HARD_FRAME_LIMIT, heartbeat=30.0)
        await ws.prepare(request)
        socket: VisitorSocket | None = None
        try:
            socket = await self._handshake(ws, request)
            if socket is not None:
                await self._serve(ws, socket, request)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("webchat: socket failed")
            if not ws.closed:
                await ws.send_json(error(ErrorCode.INTERNAL, "unexpected server error"))
                await ws.close(code=WSCloseCode.INTERNAL_ERROR)
        finally:
            if socket is not None:
                self.hub.remove(socket)
        return ws

    async def _read_frame(
        self, ws: web.WebSocketResponse, deadline: float | None = None
    ) -> dict[str, Any] | None:
        """The next JSON object from the client; errors are answered; None when closed.

        ``deadline`` (event loop time) bounds the whole wait, however many bad frames come.
        """
        loop = asyncio.get_running_loop()
        while True:
            wait = None if deadline is None else max(0.0, deadline - loop.time())
            msg = await ws.receive(timeout=wait)
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return None
            if msg.type is WSMsgType.ERROR:
                log.info("webchat: socket error: %s", ws.exception())
                return None
            if msg.type is not WSMsgType.TEXT:
                await ws.send_json(error(ErrorCode.BAD_FRAME, "only JSON text frames"))
                continue
            try:
                frame = json.loads(msg.data)
            except (ValueError, RecursionError):  # RecursionError: nested too deeply
                frame = None
            if len(msg.data.encode()) > self.config.max_frame_bytes:
                limit = self.config.max_frame_bytes
                message = f"frame over {limit} bytes"
                await ws.send_json(error(ErrorCode.TOO_LARGE, message, _client_id(frame)))
                continue
            if not isinstance(frame, dict):
                await ws.send_json(error(ErrorCode.BAD_JSON, "frame is not a JSON object"))
                continue
            return frame

    async def _handshake(
        self, ws: web.WebSocketResponse, request: web.Request
    ) -> VisitorSocket | None:
        """Wait for hello, then open the visitor's session; None if the socket is done."""
        hello = await self._read_hello(ws)
        if hello is None:
            return None
        # Per client address (request.remote: behind a trusted proxy the forwarded one,
        # gateway/proxies.py). Checked before anything is read.
        wait = self.connects.take(request.remote or "")
        if wait > 0:
            await ws.send_json(rate_limited(wait, "too many new chats from this address"))
            await ws.close(code=CLOSE_RATE_LIMITED, message=b"rate limited")
            return None
        try:
            return await self._open_session(ws, hello, request)
        except PyMongoError as exc:
            log.warning("webchat: store unavailable at hello: %s", exc)
            await ws.send_json(error(ErrorCode.UNAVAILABLE, "store unavailable, retry"))
            await ws.close(code=WSCloseCode.TRY_AGAIN_LATER)
            return None

    async def _read_hello(self, ws: web.WebSocketResponse) -> Hello | None:
        deadline = asyncio.get_running_loop().time() + HELLO_TIMEOUT
        while True:
            try:
                frame = await self._read_frame(ws, deadline)
            except TimeoutError:
                await ws.close(code=CLOSE_NO_HELLO, message=b"no hello")
                return None
            if frame is None:
                return None
            if frame.get("type") != "hello":
                await ws.send_json(
                    error(ErrorCode.NOT_READY, "say hello first", _client_id(frame))
                )
                continue
            try:
                return Hello.model_validate(frame)
            except ValidationError as exc:
                await ws.send_json(error(ErrorCode.BAD_FRAME, _explain(exc)))

    async def _open_session(
        self, ws: web.WebSocketResponse, hello: Hello, request: web.Request
    ) -> VisitorSocket | None:
        """Check or issue the token (redeem a link), say welcome, replay, join the hub."""
        store = self.context.store
        signer = await self.signer()
        found = prior = None
        if hello.token is not None:
            found = await self._visitor_of(signer, hello.token)
            if found is None:
                message = "unknown visitor token; say hello without one"
                await ws.send_json(error(ErrorCode.INVALID_TOKEN, message))
                await ws.close(code=CLOSE_INVALID_TOKEN, message=b"invalid token")
                return None
            prior = found
        linked: dict[str, str] | None = None
        if hello.link is not None:  # continues a conversation from another channel
            found, linked = await self._arrive(found, hello.link, request)
        if found is None:  # nothing written: the first message creates the visitor
            visitor_id = new_visitor_id()
            token = signer.issue(visitor_id)
        else:
            visitor_id = found
            token = hello.token if hello.token is not None and hello.link is None else (
                signer.issue(visitor_id))
        links = await self.file_links()
        socket = VisitorSocket(ws, store, visitor_id,
                               link=lambda attachment: links.url(attachment, visitor_id))
        conversation_id = await socket.find_conversation()
        await ws.send_json(
            {
                "type": "welcome",
                "protocol": PROTOCOL_VERSION,
                "token": token,
                "visitor_id": visitor_id,
                "conversation_id": conversation_id,
                "new": visitor_id != prior,
                # the channels this visitor can link to (the widget offers only these)
                "links": sorted(LINKABLE & self.context.channels),
                **({} if linked is None else {"linked": linked}),
            }
        )
        await socket.send(await socket.replay(hello.watermark))
        self.hub.add(socket)
        try:
            await socket.catch_up()  # anything stored between the replay and joining the hub
        except BaseException:
            self.hub.remove(socket)
            raise
        return socket

    async def _arrive(self, known: str | None, link: str, request: web.Request
                      ) -> tuple[str, dict[str, str]]:
        """Redeem a link token at hello (connectors/webchat/continued.py)."""
        from connectors.webchat import continued  # noqa: PLC0415 (loads the core)
        from gateway.keys import OUTBOX  # noqa: PLC0415

        return await continued.arrive(self.context.store, request.config_dict[OUTBOX],
                                      known, link)

    async def _visitor_of(self, signer: TokenSigner, token: str) -> str | None:
        """The visitor a token binds: a signed one by its MAC, an older one (a random
        string) by its stored SHA-256; None if neither."""
        if len(token) > MAX_TOKEN_CHARS:
            return None  # longer than any we issue: malformed, not looked up
        if is_signed(token):
            return signer.verify(token)
        state = await self.context.store.get_state(CHANNEL, legacy_key(token))
        return None if state is None else str(state["visitor_id"])

    async def _serve(
        self, ws: web.WebSocketResponse, socket: VisitorSocket, request: web.Request
    ) -> None:
        while (frame := await self._read_frame(ws)) is not None:
            kind = frame.get("type")
            client_id = _client_id(frame)
            try:
                if kind in ("message", "action"):
                    await self._receive(socket, frame)
                elif kind == "typing":
                    await self._typing(socket, frame, request)
                elif kind == "ping":
                    await socket.send({"type": "pong"})
                elif kind == "history":
                    asked = HistoryRequest.model_validate(frame)
                    await socket.send(await socket.history(asked.before, asked.limit))
                elif kind == "file":
                    await self._file_link(socket, FileRequest.model_validate(frame))
                elif kind == "link":
                    await self._link(socket, LinkRequest.model_validate(frame), request)
                elif kind in ("email_link", "email_verify"):
                    await self._email_link(socket, frame, request)
                elif kind == "hello":
                    await socket.send(error(ErrorCode.ALREADY_READY, "already said hello"))
                else:
                    await socket.send(
                        error(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {kind!r}", client_id)
                    )
            except ValidationError as exc:
                await socket.send(error(ErrorCode.BAD_FRAME, _explain(exc), client_id))
            except PyMongoError as exc:
                log.warning("webchat: store unavailable: %s", exc)
                await socket.send(
                    error(
                        ErrorCode.UNAVAILABLE,
                        "not stored: the store is unavailable; send it "
                        "again with the same client_id",
                        client_id,
                    )
                )

    async def _link(
        self, socket: VisitorSocket, frame: LinkRequest, request: web.Request
    ) -> None:
        """A single-use, expiring link (a Telegram deep link, a Slack code) that joins
        the visitor's account there to this visitor's contact: the chat can go on on that
        channel (connectors/webchat/continued.py)."""
        from connectors.webchat import continued  # noqa: PLC0415 (loads the core)
        from gateway.keys import OUTBOX  # noqa: PLC0415

        await socket.send(await continued.offer(
            self.context.store, request.config_dict[OUTBOX], socket, frame.channel))

    async def _file_link(self, socket: VisitorSocket, frame: FileRequest) -> None:
        """A fresh link to a file of the visitor's own chat."""
        files = self.context.files
        record = None if files is None else await files.get(frame.id)
        conversation_id = await socket.find_conversation()
        if record is None or record.conversation_id != conversation_id or socket.link is None:
            await socket.send(error(ErrorCode.NOT_FOUND, "no such file in this chat"))
            return
        await socket.send({"type": "file", "id": frame.id, "url": socket.link(frame.id)})

    async def handle_upload(self, request: web.Request) -> web.StreamResponse:
        """POST /webchat/upload: a message with files (connectors/webchat/files.py)."""
        response = await handle_upload(self, request)
        self._cors(request, response)
        return response

    async def upload_preflight(self, request: web.Request) -> web.StreamResponse:
        response = web.Response(status=204 if self.origin_allowed(request) else 403)
        self._cors(request, response)
        response.headers["Access-Control-Allow-Methods"] = "POST"
        response.headers["Access-Control-Allow-Headers"] = "Authorization"
        response.headers["Access-Control-Max-Age"] = "600"
        return response

    def _cors(self, request: web.Request, response: web.StreamResponse) -> None:
        """An embedding page of an allowed origin may read the answer."""
        origin = request.headers.get("Origin")
        if origin is not None and self.origin_allowed(request):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = "Retry-After"
            response.headers["Vary"] = "Origin"

    async def handle_file(self, request: web.Request) -> web.StreamResponse:
        """GET /webchat/files/{id}: a file of the visitor's chat, by a signed link."""
        return await handle_download(self, request)

    async def _email_link(
        self, socket: VisitorSocket, frame: dict[str, Any], request: web.Request
    ) -> None:
        """Link an email address by a mailed code (connectors/webchat/email_link.py)."""
        from gateway.keys import OUTBOX  # noqa: PLC0415

        outbox = request.config_dict[OUTBOX]
        if frame.get("type") == "email_link":
            await email_link.ask_code(socket, EmailLinkRequest.model_validate(frame),
                                      self.context.store, outbox)
        else:
            await email_link.confirm_code(socket, EmailVerify.model_validate(frame),
                                          self.context.store, outbox)

    async def _typing(
        self, socket: VisitorSocket, frame: dict[str, Any], request: web.Request
    ) -> None:
        """The visitor is (or stopped) typing: agents watching the conversation see it
        (through the change feed, in every gateway process)."""
        from gateway.keys import FEED  # noqa: PLC0415 - the core, loaded where it is used

        typing = Typing.model_validate(frame)
        feed = request.config_dict.get(FEED)
        conversation_id = await socket.find_conversation()
        if feed is not None and conversation_id is not None:
            await feed.typing(conversation_id, "customer", typing.on)

    async def _receive(self, socket: VisitorSocket, frame: dict[str, Any]) -> None:
        """A message or a button press: checked, then (under the visitor's rate limit)
        stored and acked."""
        if frame.get("type") == "message":
            sent = SendMessage.model_validate(frame)
            text, value, client_id = sent.text.strip(), None, sent.client_id
            if not text:
                await socket.send(error(ErrorCode.BAD_FRAME, "text is empty", client_id))
                return
            if len(text) > self.config.max_text:
                await socket.send(
                    error(
                        ErrorCode.TEXT_TOO_LONG,
                        f"text over {self.config.max_text} characters",
                        client_id,
                    )
                )
                return
        else:
            action = SendAction.model_validate(frame)
            text, value, client_id = action.title.strip(), action.value, action.client_id
        wait = self.messages.take(socket.visitor_id)
        if wait > 0:  # not stored, never acked: the client sends it again after the wait
            await socket.send(rate_limited(wait, "too many messages; this one was not "
                                           "stored: send it again later", client_id))
            return
        # The ack comes first on the sender's socket (docs/webchat-protocol.md): the echo
        # and the bot's answer, pushed by the feed or the outbox as soon as the item is
        # stored, wait for the socket's lock until the ack is out.
        async with socket.lock:
            result = await self.context.ingest(
                InboundMessage(
                    channel=CHANNEL,
                    external_id=f"{socket.visitor_id}:{client_id}",
                    thread_key=socket.visitor_id,
                    sender=Party(role=Role.CUSTOMER, id=socket.visitor_id),
                    sender_external_id=socket.visitor_id,
                    text=text,
                    value=value,
                )
            )
            self.hub.bind(socket, result.conversation.id)
            await socket.raw_send(
                {
                    "type": "ack",
                    "client_id": client_id,
                    "id": result.item.id,
                    "seq": result.item.seq,
                    "duplicate": result.duplicate,
                }
            )
        try:
            await self.hub.push(socket.visitor_id, result.item)
        except PyMongoError as exc:  # stored and acked: the echo comes with the next catch-up
            log.warning("webchat: could not echo %s yet: %s", result.item.id, exc)


def rate_limited(wait: float, message: str, client_id: str | None = None) -> dict[str, Any]:
    """The ``rate_limited`` error: ``retry_after`` seconds (rounded up to 0.1 s)."""
    frame = error(ErrorCode.RATE_LIMITED, message, client_id)
    frame["retry_after"] = math.ceil(wait * 10) / 10
    return frame


def _client_id(frame: object) -> str | None:
    """The frame's client_id if it has a usable one, so errors can name the message."""
    if isinstance(frame, dict):
        value = frame.get("client_id")
        if isinstance(value, str) and len(value) <= 64:
            return value
    return None


def _explain(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'frame'}: {e['msg']}" for e in exc.errors()
    )
