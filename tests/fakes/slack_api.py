"""A local Slack: the Web API methods the connector calls, Socket Mode, and Slack's side of
the Events API (signed events and interactive payloads sent to the gateway).

The real slack_sdk client is pointed at it through ``OMNIGATE_SLACK_API_URL``
(``AsyncWebClient(base_url=...)``). It speaks the real wire format: methods under
``/api/<method>``, the token in ``Authorization: Bearer``, JSON or form bodies, ``{"ok":
false, "error": ...}`` answers, ``429`` with ``Retry-After``, and ``x-oauth-scopes`` on
auth.test. Every call is recorded; failures are queued per method on demand.

Files: downloads of files a test hands it (``add_download``: ``url_private`` /
``url_private_download`` on the fake, answered only with the bot token), and Slack's
three-step upload (files.getUploadURLExternal, a POST of the bytes to the upload URL it
names, files.completeUploadExternal, which shares the files: ``shares``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
from aiohttp import web
from slack_sdk.signature import SignatureVerifier

BOT_TOKEN = "xoxb-1-omnigate-test"
APP_TOKEN = "xapp-1-A0001-omnigate-test"
SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
TEAM_ID = "T0001"
BOT_USER_ID = "UBOT0001"
BOT_ID = "BBOT0001"
APP_ID = "A0001"
ALL_SCOPES = ("app_mentions:read,channels:history,groups:history,im:history,mpim:history,"
              "chat:write,chat:write.customize,users:read,files:read,files:write")
LOGIN_PAGE = b"<!DOCTYPE html><html><head><title>Slack</title></head><body>Sign in</body></html>"


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    token: str | None
    at: float
    status: int = 200
    error: str | None = None


@dataclass
class Failure:
    error: str | None = None  # Slack's error code ({"ok": false, "error": ...})
    status: int = 200
    retry_after: int | None = None  # with status 429
    drop: bool = False  # do the call, then drop the connection (the caller cannot know)


@dataclass
class Message:
    channel: str
    ts: str
    text: str | None
    thread_ts: str | None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def blocks(self) -> list[dict[str, Any]]:
        return list(self.params.get("blocks") or [])

    @property
    def buttons(self) -> list[dict[str, Any]]:
        return [e for b in self.blocks if b.get("type") == "actions" for e in b["elements"]]


@dataclass
class Upload:
    """A file announced with files.getUploadURLExternal: its bytes once POSTed."""

    file_id: str
    filename: str
    length: int
    data: bytes | None = None
    posts: int = 0  # how often bytes were sent to its upload URL
    completed: bool = False


@dataclass
class SharedFile:
    id: str
    name: str
    title: str | None
    data: bytes


@dataclass
class Share:
    """One files.completeUploadExternal that shared files (into a channel or thread)."""

    channel: str | None
    thread_ts: str | None
    initial_comment: str | None
    files: list[SharedFile]
    ts: str


class FakeSlack:
    def __init__(self, *, scopes: str = ALL_SCOPES) -> None:
        self.scopes = scopes
        self.calls: list[Call] = []
        self.messages: list[Message] = []
        self.users: dict[str, dict[str, Any]] = {}
        self.files: dict[str, dict[str, Any]] = {}
        self.failures: dict[str, list[Failure | None]] = {}  # None: that call works
        self.blobs: dict[str, bytes] = {}  # file id -> what its download answers
        self.login_pages: set[str] = set()  # file ids whose download is a sign-in page
        self.downloads: list[Call] = []
        self.uploads: dict[str, Upload] = {}  # by file id
        self._upload_urls: dict[str, str] = {}  # upload URL key -> file id
        self.shares: list[Share] = []
        self.acks: dict[str, dict[str, Any]] = {}
        self.sockets: list[web.WebSocketResponse] = []
        self.socket_opens = 0
        self._last_ts = 0.0
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ----------------------------------------------------------------- control

    async def start(self) -> FakeSlack:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_get("/link/", self._socket)
        app.router.add_get("/files-pri/{path:.+}", self._download)
        app.router.add_post("/upload/v1/{key}", self._upload)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def close(self) -> None:
        for ws in list(self.sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    def fail(self, method: str, times: int = 1, *, after: int = 0, **failure: Any) -> None:
        """The next ``times`` calls of ``method`` (after ``after`` more that work) fail
        like this. Besides Web API methods: ``download`` (a file's URL) and ``upload`` (an
        upload URL), by ``status``."""
        queue = self.failures.setdefault(method, [])
        queue.extend([None] * after)
        queue.extend(Failure(**failure) for _ in range(times))

    def add_user(self, user_id: str, real_name: str, display_name: str = "") -> None:
        self.users[user_id] = {
            "id": user_id, "team_id": TEAM_ID, "name": real_name.lower().replace(" ", "."),
            "real_name": real_name, "is_bot": False,
            "profile": {"real_name": real_name, "display_name": display_name},
        }

    def add_file(self, file: dict[str, Any]) -> None:
        self.files[file["id"]] = file

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_download(self, name: str, data: bytes, mimetype: str | None = None, *,
                     file_id: str | None = None, login_page: bool = False) -> dict[str, Any]:
        """A file someone shared: the file object as a message event carries it (its URLs
        on this fake), also answered by files.info. ``login_page``: its download answers
        a sign-in web page, as Slack does for a token that may not read the file."""
        file_id = file_id or f"F{uuid.uuid4().hex[:10].upper()}"
        base = f"{self.origin}/files-pri/{TEAM_ID}-{file_id}"
        file = {"id": file_id, "created": int(time.time()), "name": name, "title": name,
                "mimetype": mimetype or "application/octet-stream",
                "filetype": name.rsplit(".", 1)[-1], "user": "U0000ADA", "size": len(data),
                "mode": "hosted", "is_external": False, "is_public": False,
                "url_private": f"{base}/{quote(name)}",
                "url_private_download": f"{base}/download/{quote(name)}",
                "permalink": f"https://omnigate-test.slack.com/files/U0000ADA/{file_id}/x"}
        self.files[file_id] = file
        self.blobs[file_id] = data
        if login_page:
            self.login_pages.add(file_id)
        return dict(file)

    def calls_of(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    def posts(self, channel: str | None = None) -> list[Message]:
        return [m for m in self.messages if channel is None or m.channel == channel]

    async def until(self, predicate: Any, timeout: float = 10.0, what: str = "") -> Any:
        """Wait (with a deadline) until ``predicate()`` is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or predicate}")
            await asyncio.sleep(0.02)

    def next_ts(self) -> str:
        now = max(time.time(), self._last_ts + 0.000001)
        self._last_ts = now
        return f"{now:.6f}"

    # -------------------------------------------------------------------- API

    async def _params(self, request: web.Request) -> dict[str, Any]:
        params: dict[str, Any] = dict(request.query)
        if request.content_type == "application/json":
            params.update(await request.json())
        elif request.can_read_body:
            params.update(dict(await request.post()))
        return params

    async def _api(self, request: web.Request) -> web.StreamResponse:
        method = request.match_info["method"]
        params = await self._params(request)
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else params.get("token")
        call = Call(method, params, token, time.monotonic())
        self.calls.append(call)
        queued = self.failures.get(method)
        failure = queued.pop(0) if queued else None
        if failure is not None and not failure.drop:
            call.status, call.error = failure.status, failure.error
            headers = {}
            if failure.retry_after is not None:
                headers["Retry-After"] = str(failure.retry_after)
            body = {"ok": False, "error": failure.error or "ratelimited"}
            return web.json_response(body, status=failure.status, headers=headers)
        expected = APP_TOKEN if method == "apps.connections.open" else BOT_TOKEN
        if token != expected:
            call.error = "invalid_auth"
            return web.json_response({"ok": False, "error": "invalid_auth"})
        handler = getattr(self, "m_" + method.replace(".", "_"), None)
        if handler is None:
            call.error = "unknown_method"
            return web.json_response({"ok": False, "error": "unknown_method"}, status=404)
        body, headers = handler(params)
        call.error = None if body.get("ok") else body.get("error")
        if failure is not None and failure.drop:
            # The call took effect; the answer never arrives.
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError
        return web.json_response(body, headers=headers)

    def m_auth_test(self, _params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        return ({"ok": True, "url": "https://omnigate-test.slack.com/", "team": "Omnigate Test",
                 "user": "omnigate", "team_id": TEAM_ID, "user_id": BOT_USER_ID,
                 "bot_id": BOT_ID, "is_enterprise_install": False},
                {"x-oauth-scopes": self.scopes})

    def m_chat_postMessage(self, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        channel = params.get("channel")
        if not channel or channel.startswith("X"):  # X…: a channel that does not exist
            return {"ok": False, "error": "channel_not_found"}, {}
        if not params.get("text") and not params.get("blocks"):
            return {"ok": False, "error": "no_text"}, {}
        message = Message(channel, self.next_ts(), params.get("text"),
                          params.get("thread_ts"), params)
        self.messages.append(message)
        return {"ok": True, "channel": channel, "ts": message.ts,
                "message": self._render(message, with_metadata=True)}, {}

    def _unknown_channel(self, channel: Any) -> bool:
        return not channel or str(channel).startswith("X")  # X…: no such channel

    def m_files_getUploadURLExternal(self, params: dict[str, Any]) -> tuple[dict[str, Any], dict]:
        filename, length = params.get("filename"), str(params.get("length") or "")
        if not filename or not length.isdigit():
            return {"ok": False, "error": "invalid_arguments"}, {}
        file_id, key = f"F{uuid.uuid4().hex[:10].upper()}", uuid.uuid4().hex
        self.uploads[file_id] = Upload(file_id, str(filename), int(length))
        self._upload_urls[key] = file_id
        return {"ok": True, "upload_url": f"{self.origin}/upload/v1/{key}",
                "file_id": file_id}, {}

    def m_files_completeUploadExternal(self, params: dict[str, Any]
                                       ) -> tuple[dict[str, Any], dict]:
        try:
            wanted = json.loads(params.get("files") or "")
        except ValueError:
            return {"ok": False, "error": "invalid_arguments"}, {}
        uploads = [self.uploads.get(str(f.get("id"))) for f in wanted if isinstance(f, dict)]
        if not wanted or len(uploads) != len(wanted):
            return {"ok": False, "error": "invalid_arguments"}, {}
        # Slack completes an upload once; after that (or before its bytes) it is no upload
        if any(u is None or u.data is None or u.completed for u in uploads):
            return {"ok": False, "error": "file_not_found"}, {}
        channel = params.get("channel_id")
        if channel is not None and self._unknown_channel(channel):
            return {"ok": False, "error": "channel_not_found"}, {}
        thread_ts, comment = params.get("thread_ts"), params.get("initial_comment")
        share = Share(channel, thread_ts, comment, [], self.next_ts())
        for upload, asked in zip(uploads, wanted, strict=True):
            assert upload is not None and upload.data is not None
            upload.completed = True
            share.files.append(SharedFile(upload.file_id, upload.filename, asked.get("title"),
                                          upload.data))
            where = "private" if channel and channel[0] in "DG" else "public"
            self.files[upload.file_id] = {
                "id": upload.file_id, "name": upload.filename, "title": asked.get("title"),
                "size": len(upload.data), "user": BOT_USER_ID,
                "shares": {where: {channel: [{"ts": share.ts, **(
                    {"thread_ts": thread_ts} if thread_ts else {})}]}} if channel else {}}
        self.shares.append(share)
        if channel:
            self.messages.append(Message(channel, share.ts, comment, thread_ts,
                                         {"files": [f.id for f in share.files]}))
        return {"ok": True, "files": [{"id": f.id, "title": f.title} for f in share.files]}, {}

    def m_users_info(self, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        user = self.users.get(params.get("user", ""))
        if user is None:
            return {"ok": False, "error": "user_not_found"}, {}
        return {"ok": True, "user": user}, {}

    def m_files_info(self, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        file = self.files.get(params.get("file", ""))
        if file is None:
            return {"ok": False, "error": "file_not_found"}, {}
        return {"ok": True, "file": file}, {}

    # ------------------------------------------------------------------ files

    def _failure(self, method: str, call: Call) -> web.Response | None:
        queued = self.failures.get(method)
        failure = queued.pop(0) if queued else None
        if failure is None:
            return None
        call.status, call.error = failure.status, failure.error
        return web.Response(status=failure.status, text=failure.error or "failed")

    async def _download(self, request: web.Request) -> web.StreamResponse:
        """A file's url_private / url_private_download: only with the bot token."""
        auth = request.headers.get("Authorization", "")
        call = Call("download", {"path": request.path}, auth.removeprefix("Bearer ") or None,
                    time.monotonic())
        self.downloads.append(call)
        failed = self._failure("download", call)
        if failed is not None:
            return failed
        if call.token != BOT_TOKEN:
            call.status = 401
            return web.Response(status=401, text="not authorised")
        head = request.match_info["path"].split("/", 1)[0]
        file_id = head.removeprefix(f"{TEAM_ID}-")
        if file_id not in self.blobs:
            call.status = 404
            return web.Response(status=404, text="file not found")
        if file_id in self.login_pages:
            return web.Response(body=LOGIN_PAGE, content_type="text/html")
        mimetype = str(self.files.get(file_id, {}).get("mimetype") or "application/octet-stream")
        return web.Response(body=self.blobs[file_id], content_type=mimetype)

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        """An upload URL of files.getUploadURLExternal: the file's bytes, POSTed raw."""
        file_id = self._upload_urls.get(request.match_info["key"])
        data = await request.read()
        call = Call("upload", {"file_id": file_id, "bytes": len(data)}, None, time.monotonic())
        self.calls.append(call)
        failed = self._failure("upload", call)
        if failed is not None:
            return failed
        upload = self.uploads.get(file_id or "")
        if upload is None or upload.completed:
            call.status = 404
            return web.Response(status=404, text="no such upload")
        upload.data, upload.posts = data, upload.posts + 1
        return web.Response(text=f"OK - {len(data)}")

    def _render(self, message: Message, *, with_metadata: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "message", "subtype": "bot_message", "ts": message.ts,
                               "text": message.text, "bot_id": BOT_ID, "app_id": APP_ID,
                               "user": BOT_USER_ID}
        if message.thread_ts:
            out["thread_ts"] = message.thread_ts
        if message.blocks:
            out["blocks"] = message.blocks
        if with_metadata and message.params.get("metadata"):
            out["metadata"] = message.params["metadata"]
        return out

    def _history(self, params: dict[str, Any], in_thread: bool) -> dict[str, Any]:
        channel, oldest = params.get("channel"), float(params.get("oldest") or 0)
        metadata = str(params.get("include_all_metadata")).lower() in ("1", "true")
        found = [m for m in self.messages if m.channel == channel and float(m.ts) > oldest
                 and (m.thread_ts == params.get("ts") if in_thread else m.thread_ts is None)]
        if not in_thread:
            found.reverse()  # history is newest first, replies oldest first
        return {"ok": True, "messages": [self._render(m, with_metadata=metadata) for m in found],
                "has_more": False, "response_metadata": {"next_cursor": ""}}

    def m_conversations_history(self, params: dict[str, Any]) -> tuple[dict[str, Any], dict]:
        return self._history(params, in_thread=False), {}

    def m_conversations_replies(self, params: dict[str, Any]) -> tuple[dict[str, Any], dict]:
        return self._history(params, in_thread=True), {}

    def m_apps_connections_open(self, _params: dict[str, Any]) -> tuple[dict[str, Any], dict]:
        return {"ok": True, "url": f"ws://127.0.0.1:{self.port}/link/?ticket={uuid.uuid4()}"}, {}

    # ------------------------------------------------------------ Socket Mode

    async def _socket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self.socket_opens += 1
        self.sockets.append(ws)
        await ws.send_json({"type": "hello", "num_connections": 1,
                            "connection_info": {"app_id": APP_ID},
                            "debug_info": {"host": "fake", "approximate_connection_time": 3600}})
        try:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    data = json.loads(msg.data)
                    if "envelope_id" in data:
                        self.acks[data["envelope_id"]] = data
        finally:
            self.sockets.remove(ws)
        return ws

    async def socket_send(self, payload: dict[str, Any], kind: str = "events_api",
                          retry_attempt: int = 0) -> str:
        """Deliver one envelope over the open Socket Mode connection; returns its id."""
        ws = await self.until(lambda: self.sockets and self.sockets[-1], what="a socket")
        envelope_id = str(uuid.uuid4())
        await ws.send_json({"envelope_id": envelope_id, "type": kind, "payload": payload,
                            "accepts_response_payload": kind == "interactive",
                            "retry_attempt": retry_attempt,
                            "retry_reason": "timeout" if retry_attempt else ""})
        return envelope_id


# ---------------------------------------------------------------- Slack → us


class SlackSender:
    """Slack's side of the Events API: builds payloads as Slack does and signs them."""

    def __init__(self, http: aiohttp.ClientSession, gateway_url: str,
                 secret: str = SIGNING_SECRET) -> None:
        self.http = http
        self.url = gateway_url
        self.verifier = SignatureVerifier(secret)

    def sign(self, body: bytes, timestamp: str) -> str:
        """Slack's v0 signature, from slack_sdk's own SignatureVerifier."""
        try:
            signature = self.verifier.generate_signature(timestamp=timestamp, body=body)
        except UnicodeDecodeError:  # slack_sdk signs text; Slack would sign these bytes so
            base = b"v0:" + timestamp.encode() + b":" + body
            key = self.verifier.signing_secret.encode()
            return "v0=" + hmac.new(key, base, hashlib.sha256).hexdigest()
        assert signature is not None
        return signature

    async def post(self, path: str, body: bytes, *, content_type: str = "application/json",
                   timestamp: int | None = None, signature: str | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, str]:
        ts = str(int(time.time()) if timestamp is None else timestamp)
        sent = {"Content-Type": content_type, "X-Slack-Request-Timestamp": ts,
                "X-Slack-Signature": signature if signature is not None else self.sign(body, ts),
                **(headers or {})}
        async with self.http.post(self.url + path, data=body, headers=sent) as response:
            return response.status, await response.text()

    @staticmethod
    def envelope(event: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
        """The Events API envelope (``event_callback``) around one event."""
        return {"token": "legacy-verification-token", "team_id": TEAM_ID, "api_app_id": APP_ID,
                "event": event, "type": "event_callback",
                "event_id": event_id or f"Ev{uuid.uuid4().hex[:10].upper()}",
                "event_time": int(time.time()), "authorizations": [
                    {"enterprise_id": None, "team_id": TEAM_ID, "user_id": BOT_USER_ID,
                     "is_bot": True, "is_enterprise_install": False}],
                "is_ext_shared_channel": False}

    async def event(self, event: dict[str, Any], *, event_id: str | None = None,
                    retry_num: int | None = None, **kwargs: Any) -> tuple[int, str]:
        headers = kwargs.pop("headers", {}) or {}
        if retry_num is not None:
            headers |= {"X-Slack-Retry-Num": str(retry_num), "X-Slack-Retry-Reason": "http_timeout"}
        body = json.dumps(self.envelope(event, event_id)).encode()
        return await self.post("/webhooks/slack/events", body, headers=headers, **kwargs)

    async def interactive(self, payload: dict[str, Any], **kwargs: Any) -> tuple[int, str]:
        body = urlencode({"payload": json.dumps(payload)}).encode()
        return await self.post("/webhooks/slack/interactive", body,
                               content_type="application/x-www-form-urlencoded", **kwargs)


def new_ts() -> str:
    return f"{time.time():.6f}"


def dm(user: str, text: str, *, channel: str = "D0000USER1", ts: str | None = None,
       **extra: Any) -> dict[str, Any]:
    """A ``message.im`` event: someone writes to the bot directly."""
    ts = ts or new_ts()
    return {"type": "message", "channel": channel, "channel_type": "im", "user": user,
            "text": text, "ts": ts, "event_ts": ts, "client_msg_id": str(uuid.uuid4()),
            "team": TEAM_ID, **extra}


def mention(user: str, text: str, *, channel: str = "C0000SUPPORT", ts: str | None = None,
            thread_ts: str | None = None) -> dict[str, Any]:
    """An ``app_mention`` event: ``<@bot> text`` in a channel (or in a thread there)."""
    ts = ts or new_ts()
    event = {"type": "app_mention", "channel": channel, "user": user, "ts": ts, "event_ts": ts,
             "text": f"<@{BOT_USER_ID}> {text}", "client_msg_id": str(uuid.uuid4()),
             "team": TEAM_ID}
    if thread_ts:
        event["thread_ts"] = thread_ts
    return event


def press(user: str, message: Message, button: dict[str, Any]) -> dict[str, Any]:
    """The ``block_actions`` payload Slack sends when ``user`` presses ``button``."""
    container = {"type": "message", "message_ts": message.ts, "channel_id": message.channel,
                 "is_ephemeral": False}
    if message.thread_ts:
        container["thread_ts"] = message.thread_ts
    return {
        "type": "block_actions",
        "user": {"id": user, "username": "someone", "name": "someone", "team_id": TEAM_ID},
        "api_app_id": APP_ID, "token": "legacy-verification-token", "container": container,
        "trigger_id": f"{uuid.uuid4().int % 10**12}.{uuid.uuid4().hex[:8]}",
        "team": {"id": TEAM_ID, "domain": "omnigate-test"}, "enterprise": None,
        "is_enterprise_install": False,
        "channel": {"id": message.channel, "name": "directmessage"},
        "message": {**{"type": "message", "ts": message.ts, "text": message.text,
                       "bot_id": BOT_ID, "blocks": message.blocks},
                    **({"thread_ts": message.thread_ts} if message.thread_ts else {})},
        "state": {"values": {}},
        "response_url": "https://hooks.slack.com/actions/T0001/1/x",
        "actions": [{"action_id": button["action_id"], "block_id": "omnigate:buttons:0",
                     "text": button["text"], "value": button["value"], "type": "button",
                     "action_ts": new_ts()}],
    }
