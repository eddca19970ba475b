"""Logging: ``OMNIGATE_LOG_FORMAT`` text (the classic one-line format) or json (one object
per line), request and conversation ids from context variables, and the access log.

- ``request_id_middleware`` gives every HTTP request an id (the caller's ``X-Request-ID``
  when it is a sane token, else a new one), binds it for the request's log lines and
  echoes it in the response's ``X-Request-ID`` header (also on web socket upgrades and
  error pages).
- ``bind_conversation(conversation_id)`` binds a conversation id for the log lines of a
  block (a turn, a delivery): ``with bind_conversation(cid): ...``. Tasks started inside
  inherit it (context variables are copied into new tasks).
- ``AccessLogger`` writes one line per request when ``OMNIGATE_ACCESS_LOG`` is on
  (``access_log_options`` gives ``web.run_app`` its arguments).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler

from gateway.proxies import client_of

if TYPE_CHECKING:
    from gateway.settings import Settings

REQUEST_ID_HEADER = "X-Request-ID"
# A caller's id is kept when it is 1-128 of these characters (UUIDs, ULIDs, hex, "req-42").
_VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ACCESS_LOGGER = "omnigate.access"

request_id_var: ContextVar[str | None] = ContextVar("omnigate_request_id", default=None)
REQUEST_ID = web.RequestKey("request_id", str)
conversation_id_var: ContextVar[str | None] = ContextVar("omnigate_conversation_id",
                                                         default=None)

# Attributes every LogRecord has: everything else on a record came from ``extra=``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "taskName"}


@contextlib.contextmanager
def bind_conversation(conversation_id: str | None) -> Iterator[None]:
    """Log lines inside the block carry ``conversation_id``."""
    token = conversation_id_var.set(conversation_id)
    try:
        yield
    finally:
        conversation_id_var.reset(token)


def request_id_of(request: web.BaseRequest) -> str | None:
    return request.get(REQUEST_ID)


class ContextFilter(logging.Filter):
    """Puts the bound request and conversation ids on every record (``extra=`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        if getattr(record, "conversation_id", None) is None:
            record.conversation_id = conversation_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the ids
    when known, ``exc_info`` (the formatted traceback) and any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and value is not None:
                out[key] = value
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc_info"] = record.exc_text
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure_logging(settings: Settings) -> None:
    """The root logger as the settings say: level, text or json, on standard error."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if settings.log_format == "json"
                         else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    given = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = given if _VALID_ID.fullmatch(given) else uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    token = request_id_var.set(request_id)
    try:
        return await handler(request)
    finally:
        request_id_var.reset(token)


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the id goes out with the headers, whatever the response."""
    request_id = request_id_of(request)
    if request_id is not None:
        response.headers[REQUEST_ID_HEADER] = request_id


def setup_request_ids(app: web.Application) -> None:
    app.middlewares.append(request_id_middleware)
    app.on_response_prepare.append(echo_request_id)


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, path (no query string: it may carry secrets),
    status, duration_ms, request_id, remote (the client's address: behind a trusted proxy the
    forwarded one); in json as fields of the object."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        duration_ms = round(time * 1000, 3)
        request_id = request_id_of(request)
        remote = client_of(request)  # behind a trusted proxy: the client (gateway/proxies.py)
        self.logger.info(
            '%s "%s %s" %d %.1fms request_id=%s', remote, request.method,
            request.path, response.status, duration_ms, request_id,
            extra={"method": request.method, "path": request.path,
                   "status": response.status, "duration_ms": duration_ms,
                   "request_id": request_id, "remote": remote},
        )


def access_log_options(settings: Settings) -> dict[str, Any]:
    """``web.run_app``'s access log arguments: ours when OMNIGATE_ACCESS_LOG is on."""
    if not settings.access_log:
        return {"access_log": None}
    return {"access_log": logging.getLogger(ACCESS_LOGGER), "access_log_class": AccessLogger}
