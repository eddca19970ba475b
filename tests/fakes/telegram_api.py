"""A local Telegram Bot API server for tests: the real HTTP API, answered from memory.

The real aiogram client talks to it (``OMNIGATE_TELEGRAM_API_URL`` / ``api_url``):
``POST /bot<token>/<method>`` with query, form (urlencoded or multipart, as aiogram
sends) or JSON parameters, answered ``{"ok": true, "result": ...}`` or
``{"ok": false, "error_code", "description", "parameters"}`` like Telegram does.
Files it was given (``add_file``) are looked up with getFile (400 "invalid file_id" for
an unknown id, "file is too big" over 20 MB) and served at ``/file/bot<token>/<file_path>``
(404 for a wrong token or path; every download is recorded in ``downloads``).
sendPhoto, sendDocument, sendVoice and sendAnimation take multipart uploads as aiogram
sends them (``attach://<part>``), or the file_id of a file the fake knows; each upload is
recorded in ``uploads`` (bytes, file name, caption, chat) and becomes a file the fake
serves, as Telegram's would.

It records every call (``calls``), can fail any method on demand (``fail``: 429 with
retry_after, 403, 400 chat not found, 5xx...; ``fail("download", ...)`` fails file
downloads), keeps a queue of updates for ``getUpdates`` (long polling with offsets, as
Telegram confirms them) and can deliver an update to a webhook with the secret header, as
Telegram does.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

JSON_FIELDS = {"reply_markup", "allowed_updates", "entities", "caption_entities",
               "reply_parameters", "link_preview_options", "media", "commands", "scope"}
INT_FIELDS = {"offset", "limit", "timeout", "message_id", "max_connections"}
MAX_DOWNLOAD = 20 * 1024 * 1024
MAX_UPLOAD = 50 * 1024 * 1024
MAX_CAPTION = 1024
MEDIA = {"sendphoto": "photo", "senddocument": "document", "sendvoice": "voice",
         "sendanimation": "animation"}
SECRET = re.compile(r"^[A-Za-z0-9_-]{1,256}$")


CHAT_ACTIONS = {"typing", "upload_photo", "record_video", "upload_video", "record_voice",
                "upload_voice", "upload_document", "choose_sticker", "find_location",
                "record_video_note", "upload_video_note"}

@dataclass
class Call:
    method: str
    params: dict[str, Any]
    at: float  # time.monotonic()
    status: int = 200
    result: Any = None
    ended: float | None = None  # time.monotonic() when it was answered
    client_gone: bool = False  # the client had hung up before the answer (e.g. killed)


@dataclass
class Failure:
    method: str
    status: int
    description: str
    retry_after: int | None = None
    times: int = 1
    after: int = 0  # let this many matching calls through first
    chat_id: int | None = None


@dataclass
class FakeFile:
    file_id: str
    file_unique_id: str
    size: int
    path: str
    content: bytes = b""


@dataclass
class Upload:
    """A file the bot sent (sendPhoto, sendDocument, ...), as the fake received it."""

    method: str
    chat_id: int
    filename: str | None
    content: bytes
    caption: str | None
    caption_entities: list[dict[str, Any]] | None
    message: dict[str, Any]


@dataclass
class FakeTelegram:
    """One bot's Bot API. ``await start()``, then point the client at ``url``."""

    token: str = "123456:TEST-token_abc"
    bot_id: int = 7000001
    username: str = "omnigate_test_bot"
    calls: list[Call] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    blocked: set[int] = field(default_factory=set)  # users who blocked the bot: 403
    missing_chats: set[int] = field(default_factory=set)  # 400 chat not found
    files: dict[str, FakeFile] = field(default_factory=dict)
    downloads: list[str] = field(default_factory=list)  # file paths served
    uploads: list[Upload] = field(default_factory=list)
    no_voice: set[int] = field(default_factory=set)  # chats that forbid voice messages
    webhook: dict[str, Any] | None = None
    pending: list[dict[str, Any]] = field(default_factory=list)  # for getUpdates
    answered: set[str] = field(default_factory=set)
    server: TestServer | None = None

    def __post_init__(self) -> None:
        self._update_ids = itertools.count(500_000_001)
        self._message_ids: dict[int, itertools.count[int]] = {}
        self._changed = asyncio.Event()
        self._poller = 0  # generation of the getUpdates request allowed to wait

    # ------------------------------------------------------------------ server

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        app.router.add_get("/file/bot{token}/{path:.+}", self._download)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self.url

    async def close(self) -> None:
        self._poller += 1
        self._notify()
        if self.server is not None:
            await self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    @property
    def me(self) -> dict[str, Any]:
        return {"id": self.bot_id, "is_bot": True, "first_name": "Omnigate test",
                "username": self.username, "can_join_groups": True,
                "can_read_all_group_messages": False, "supports_inline_queries": False}

    # ------------------------------------------------------------- test controls

    def fail(self, method: str, status: int, description: str, *,
             retry_after: int | None = None, times: int = 1, after: int = 0,
             chat_id: int | None = None) -> None:
        """Answer the next ``times`` matching calls (after ``after`` more) with an error."""
        self.failures.append(Failure(method, status, description, retry_after, times, after,
                                     chat_id))

    def add_file(self, file_id: str, size: int | None = None, *, path: str | None = None,
                 content: bytes = b"") -> FakeFile:
        """A file getFile knows (its size: the content's, unless given)."""
        size = len(content) if size is None else size
        file = FakeFile(file_id, "u" + file_id, size, path or f"documents/{file_id}.bin",
                        content)
        self.files[file_id] = file
        return file

    def sent_files(self, chat_id: int | None = None) -> list[Upload]:
        """The files sent successfully (to ``chat_id``), in order."""
        return [u for u in self.uploads if chat_id is None or u.chat_id == chat_id]

    def push(self, update: dict[str, Any]) -> dict[str, Any]:
        """Queue an update for getUpdates (it gets the next update_id if it has none)."""
        update.setdefault("update_id", next(self._update_ids))
        self.pending.append(update)
        self._notify()
        return update

    def new_update(self, **kinds: Any) -> dict[str, Any]:
        return {"update_id": next(self._update_ids), **kinds}

    async def deliver(self, http: aiohttp.ClientSession, url: str, update: dict[str, Any],
                      secret: str | None = None) -> tuple[int, Any]:
        """POST an update to a webhook as Telegram does; returns (status, body)."""
        headers = {"Content-Type": "application/json"}
        secret = secret if secret is not None else (self.webhook or {}).get("secret_token")
        if secret is not None:
            headers["X-Telegram-Bot-Api-Secret-Token"] = secret
        async with http.post(url, data=json.dumps(update), headers=headers) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text)
            except ValueError:
                return response.status, text

    # -------------------------------------------------------------- inspection

    def of(self, method: str, *, ok: bool | None = True) -> list[Call]:
        return [c for c in self.calls if c.method.lower() == method.lower()
                and (ok is None or (c.status == 200) == ok)]

    def poll_conflicts(self) -> list[Call]:
        """getUpdates calls terminated by another poller while their client still waited
        (two bot instances polling at once; a killed client's poll does not count)."""
        return [c for c in self.of("getUpdates", ok=False)
                if c.status == 409 and not c.client_gone and "other getUpdates" in
                str(c.result)]

    def texts(self, chat_id: int | None = None) -> list[str]:
        """Texts of the messages sent successfully (to ``chat_id``), in order."""
        return [c.params["text"] for c in self.of("sendMessage")
                if chat_id is None or c.params.get("chat_id") == chat_id]

    async def wait_for(self, check: Any, timeout: float = 10.0) -> Any:
        """Wait until ``check()`` is truthy; returns its value (fails at the deadline)."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"fake Telegram: condition not met in {timeout} s; "
                                     f"calls: {[(c.method, c.status) for c in self.calls]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.1))

    def _notify(self) -> None:
        self._changed.set()

    # ----------------------------------------------------------------- handlers

    async def _params(self, request: web.Request) -> dict[str, Any]:
        params: dict[str, Any] = dict(request.query)
        if request.content_type == "application/json":
            body = await request.json()
            if isinstance(body, dict):
                params.update(body)
        elif request.content_type in ("multipart/form-data",
                                      "application/x-www-form-urlencoded"):
            for key, value in (await request.post()).items():
                if isinstance(value, str):
                    params[key] = value
                else:
                    content = value.file.read()
                    params[key] = {"filename": value.filename, "size": len(content),
                                   "content": content}
        for key, value in list(params.items()):
            if key in JSON_FIELDS and isinstance(value, str):
                params[key] = json.loads(value)
            elif (key in INT_FIELDS or key == "chat_id") and isinstance(value, str):
                with contextlib.suppress(ValueError):
                    params[key] = int(value)
            elif isinstance(value, str) and value in ("true", "false"):
                params[key] = value == "true"
        return params

    def _take_failure(self, method: str, params: dict[str, Any]) -> Failure | None:
        for failure in self.failures:
            if failure.method.lower() != method.lower():
                continue
            if failure.chat_id is not None and params.get("chat_id") != failure.chat_id:
                continue
            if failure.after > 0:
                failure.after -= 1
                return None
            failure.times -= 1
            if failure.times <= 0:
                self.failures.remove(failure)
            return failure
        return None

    async def _handle(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return _error(401, "Unauthorized")
        method = request.match_info["method"]
        params = await self._params(request)
        call = Call(method, params, time.monotonic())
        self.calls.append(call)
        try:
            failure = self._take_failure(method, params)
            if failure is not None:
                call.status = failure.status
                return _error(failure.status, failure.description, failure.retry_after)
            handler = getattr(self, "_m_" + method.lower(), None)
            if method.lower() in MEDIA:
                status, result = await self._send_media(MEDIA[method.lower()], params)
                call.status, call.result = status, result
                if status != 200:
                    return _error(status, str(result))
                return web.json_response({"ok": True, "result": result})
            if handler is None:
                call.status = 404
                return _error(404, "Not Found")
            status, result = await handler(params)
            call.status, call.result = status, result
            if status != 200:
                return _error(status, str(result))
            return web.json_response({"ok": True, "result": result})
        finally:
            call.ended = time.monotonic()
            call.client_gone = request.transport is None or request.transport.is_closing()
            self._notify()

    async def _download(self, request: web.Request) -> web.Response:
        try:
            if request.match_info["token"] != self.token:
                return _error(404, "Not Found")
            failure = self._take_failure("download", {})
            if failure is not None:
                return _error(failure.status, failure.description)
            for file in self.files.values():
                if file.path == request.match_info["path"]:
                    self.downloads.append(file.path)
                    return web.Response(body=file.content)
            return _error(404, "Not Found")
        finally:
            self._notify()

    # ------------------------------------------------------------------ methods

    async def _m_getme(self, _params: dict[str, Any]) -> tuple[int, Any]:
        return 200, self.me

    async def _m_setwebhook(self, params: dict[str, Any]) -> tuple[int, Any]:
        secret = params.get("secret_token")
        if secret is not None and not SECRET.match(str(secret)):
            return 400, "Bad Request: secret token contains unallowed characters"
        if not params.get("url"):
            self.webhook = None
            return 200, True
        self.webhook = {"url": params["url"], "secret_token": secret,
                        "allowed_updates": params.get("allowed_updates"),
                        "drop_pending_updates": params.get("drop_pending_updates", False)}
        if params.get("drop_pending_updates"):
            self.pending.clear()
        return 200, True

    async def _m_deletewebhook(self, params: dict[str, Any]) -> tuple[int, Any]:
        self.webhook = None
        if params.get("drop_pending_updates"):
            self.pending.clear()
        return 200, True

    async def _m_getwebhookinfo(self, _params: dict[str, Any]) -> tuple[int, Any]:
        return 200, {"url": (self.webhook or {}).get("url", ""), "has_custom_certificate": False,
                     "pending_update_count": len(self.pending)}

    async def _m_getupdates(self, params: dict[str, Any]) -> tuple[int, Any]:
        if self.webhook is not None:
            return 409, ("Conflict: can't use getUpdates method while webhook is active; "
                         "use deleteWebhook to delete the webhook first")
        offset = int(params.get("offset") or 0)
        if offset > 0:  # confirms every update below it: Telegram forgets them
            self.pending = [u for u in self.pending if u["update_id"] >= offset]
        limit = int(params.get("limit") or 100)
        deadline = time.monotonic() + float(params.get("timeout") or 0)
        self._poller += 1
        me = self._poller
        self._notify()  # an older long poll still waiting is terminated (409)
        while not self.pending and time.monotonic() < deadline:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), deadline - time.monotonic())
            except TimeoutError:
                break
            if self._poller != me:
                return 409, ("Conflict: terminated by other getUpdates request; make sure "
                             "that only one bot instance is running")
        return 200, self.pending[:limit]

    def _chat_error(self, chat_id: Any) -> tuple[int, str] | None:
        if chat_id is None or chat_id == "":
            return 400, "Bad Request: chat_id is empty"
        if chat_id in self.missing_chats or not isinstance(chat_id, int):
            return 400, "Bad Request: chat not found"
        if chat_id in self.blocked:
            return 403, "Forbidden: bot was blocked by the user"
        return None

    async def _m_sendmessage(self, params: dict[str, Any]) -> tuple[int, Any]:
        chat_id = params.get("chat_id")
        if (problem := self._chat_error(chat_id)) is not None:
            return problem
        text = str(params.get("text") or "")
        if not text.strip():
            return 400, "Bad Request: message text is empty"
        if len(text.encode("utf-16-le")) // 2 > 4096:
            return 400, "Bad Request: message is too long"
        markup = params.get("reply_markup")
        if _bad_buttons(markup):
            return 400, "Bad Request: BUTTON_DATA_INVALID"
        message = self._message(chat_id, text=text)
        if params.get("entities"):
            message["entities"] = params["entities"]
        if markup is not None:
            message["reply_markup"] = markup
        return 200, message

    def _message(self, chat_id: int, **content: Any) -> dict[str, Any]:
        """A message the bot sent, as Telegram returns it."""
        counter = self._message_ids.setdefault(chat_id, itertools.count(1001))
        return {
            "message_id": next(counter), "date": int(time.time()),
            "chat": {"id": chat_id, "type": "private" if chat_id > 0 else "supergroup"},
            "from": {"id": self.bot_id, "is_bot": True, "first_name": "Omnigate test",
                     "username": self.username},
            **content,
        }

    async def _send_media(self, kind: str, params: dict[str, Any]) -> tuple[int, Any]:
        """sendPhoto, sendDocument, sendVoice, sendAnimation: an upload or a file_id."""
        chat_id = params.get("chat_id")
        if (problem := self._chat_error(chat_id)) is not None:
            return problem
        assert isinstance(chat_id, int)
        given = params.get(kind)
        if isinstance(given, str) and given.startswith("attach://"):
            given = params.get(given.removeprefix("attach://"))
        if isinstance(given, dict):
            filename, content = given.get("filename"), bytes(given["content"])
        elif isinstance(given, str) and given in self.files:
            filename, content = None, self.files[given].content
        elif isinstance(given, str) and given.startswith(("http://", "https://")):
            return 400, "Bad Request: failed to get HTTP URL content"
        else:
            return 400, f"Bad Request: there is no {kind} in the request"
        if not content:
            return 400, "Bad Request: file must be non-empty"
        if len(content) > MAX_UPLOAD:
            return 413, "Request Entity Too Large"
        caption = params.get("caption")
        if caption is not None and len(str(caption).encode("utf-16-le")) // 2 > MAX_CAPTION:
            return 400, "Bad Request: message caption is too long"
        if _bad_buttons(params.get("reply_markup")):
            return 400, "Bad Request: BUTTON_DATA_INVALID"
        width, height = _png_size(content)
        if kind == "photo" and width + height > 10_000:
            return 400, "Bad Request: PHOTO_INVALID_DIMENSIONS"
        if kind == "voice" and chat_id in self.no_voice:
            return 400, "Bad Request: VOICE_MESSAGES_FORBIDDEN"
        file_id = f"up{len(self.uploads) + 1}"
        kept = self.add_file(file_id, content=content, path=f"{kind}s/{file_id}")
        meta: dict[str, Any] = {"file_id": kept.file_id, "file_unique_id": kept.file_unique_id,
                                "file_size": len(content)}
        if kind == "photo":
            shown: dict[str, Any] = {"photo": [{**meta, "width": width or 1,
                                               "height": height or 1}]}
        elif kind == "voice":
            shown = {"voice": {**meta, "duration": 1}}
        else:
            shown = {kind: {**meta, "file_name": filename}}
            if kind == "animation":
                shown.update(document=shown[kind], animation={**shown[kind], "width": 1,
                                                              "height": 1, "duration": 1})
        if caption is not None:
            shown["caption"] = caption
            if params.get("caption_entities"):
                shown["caption_entities"] = params["caption_entities"]
        message = self._message(chat_id, **shown)
        self.uploads.append(Upload(f"send{kind.title()}", chat_id, filename, content,
                                   caption, params.get("caption_entities"), message))
        return 200, message

    async def _m_sendchataction(self, params: dict[str, Any]) -> tuple[int, Any]:
        if (problem := self._chat_error(params.get("chat_id"))) is not None:
            return problem
        if params.get("action") not in CHAT_ACTIONS:
            return 400, "Bad Request: wrong parameter action in request"
        return 200, True

    async def _m_getfile(self, params: dict[str, Any]) -> tuple[int, Any]:
        file = self.files.get(str(params.get("file_id")))
        if file is None:
            return 400, "Bad Request: invalid file_id"
        if file.size > MAX_DOWNLOAD:
            return 400, "Bad Request: file is too big"
        return 200, {"file_id": file.file_id, "file_unique_id": file.file_unique_id,
                     "file_size": file.size, "file_path": file.path}

    async def _m_answercallbackquery(self, params: dict[str, Any]) -> tuple[int, Any]:
        query_id = str(params.get("callback_query_id") or "")
        if not query_id or query_id in self.answered:
            return 400, ("Bad Request: query is too old and response timeout expired or "
                         "query ID is invalid")
        self.answered.add(query_id)
        return 200, True

    async def _m_editmessagereplymarkup(self, params: dict[str, Any]) -> tuple[int, Any]:
        if (problem := self._chat_error(params.get("chat_id"))) is not None:
            return problem
        return 200, True


def _bad_buttons(markup: Any) -> bool:
    """An inline keyboard with a callback_data Telegram refuses (not 1-64 bytes)."""
    for row in (markup or {}).get("inline_keyboard", []):
        for button in row:
            data = button.get("callback_data")
            if data is not None and not 1 <= len(data.encode()) <= 64:
                return True
    return False


def _png_size(content: bytes) -> tuple[int, int]:
    """A PNG's width and height (0, 0 for anything else)."""
    if content[:8] == b"\x89PNG\r\n\x1a\n" and content[12:16] == b"IHDR":
        width, height = struct.unpack(">II", content[16:24])
        return int(width), int(height)
    return 0, 0


def _error(status: int, description: str, retry_after: int | None = None) -> web.Response:
    body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
    if retry_after is not None:
        body["parameters"] = {"retry_after": retry_after}
    return web.json_response(body, status=status)


# ------------------------------------------------------------------ update builders

class People:
    """Builds real-shaped update payloads (as Telegram sends them) for tests."""

    def __init__(self, fake: FakeTelegram) -> None:
        self.fake = fake
        self._ids = itertools.count(1)

    @staticmethod
    def user(user_id: int, first_name: str = "Ann", **extra: Any) -> dict[str, Any]:
        return {"id": user_id, "is_bot": False, "first_name": first_name,
                "language_code": "en", **extra}

    @staticmethod
    def private(user: dict[str, Any]) -> dict[str, Any]:
        return {"id": user["id"], "type": "private", "first_name": user["first_name"]}

    @staticmethod
    def group(chat_id: int, title: str = "Support group") -> dict[str, Any]:
        return {"id": chat_id, "type": "supergroup", "title": title}

    def message(self, user: dict[str, Any], chat: dict[str, Any] | None = None,
                text: str | None = None, *, message_id: int | None = None,
                **fields: Any) -> dict[str, Any]:
        """A ``message`` update (``text`` may carry entities via ``entities=``)."""
        body: dict[str, Any] = {
            "message_id": message_id or next(self._ids), "date": int(time.time()),
            "from": user, "chat": chat or self.private(user), **fields,
        }
        if text is not None:
            body["text"] = text
            if text.startswith("/") and "entities" not in fields:
                command = text.split(" ", 1)[0]
                body["entities"] = [{"type": "bot_command", "offset": 0,
                                     "length": len(command.encode("utf-16-le")) // 2}]
        return self.fake.new_update(message=body)

    def edited(self, original: dict[str, Any], text: str) -> dict[str, Any]:
        body = dict(original["message"], text=text, edit_date=int(time.time()))
        return self.fake.new_update(edited_message=body)

    def press(self, user: dict[str, Any], sent: dict[str, Any], data: str) -> dict[str, Any]:
        """A ``callback_query``: ``user`` pressed ``data`` on the bot's message ``sent``."""
        return self.fake.new_update(callback_query={
            "id": f"q{next(self._ids)}{int(time.time() * 1000)}", "from": user,
            "chat_instance": "ci-1", "message": sent, "data": data})
