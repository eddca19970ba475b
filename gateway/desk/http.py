"""Request bodies and responses of the agent API: JSON read into a pydantic model, strictly
(or a 400 that says which field is wrong: ``BadInput``, turned into the error response by
the API's middleware), and a model written as the JSON answer.

``NOT_BLANK`` and ``not_null`` make a model's JSON Schema say what its validation does:
text stripped of whitespace must keep a character; a field that may be left out but not
sent as null."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from gateway.desk.auth import BadInput
from gateway.keys import STORE
from gateway.model import Agent, Conversation
from gateway.store import NotFound

M = TypeVar("M", bound=BaseModel)
AGENT = web.RequestKey("agent", Agent)  # the signed-in agent (the API's auth middleware)
NOT_BLANK = r"\S"  # with str_strip_whitespace and min_length=1: not only whitespace


def not_null(**keywords: Any) -> Callable[[dict[str, Any]], None]:
    """``json_schema_extra`` of an optional field whose null is refused (type
    ``X | SkipJsonSchema[None]``): no ``default: null`` in its schema, plus ``keywords``."""

    def edit(schema: dict[str, Any]) -> None:
        schema.pop("default", None)
        schema.update(keywords)

    return edit


async def read_body(request: web.Request, model: type[M]) -> M:
    try:
        data = await request.json()
    except RecursionError:  # "[[[[..." deeper than the parser's recursion limit
        raise BadInput("the body is JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise BadInput("the body must be JSON") from None
    del data  # parsed above for the error messages; validated below from the same text
    try:
        # Strict: JSON types as they are (``false`` is no integer, ``"3"`` no number,
        # ``1`` no boolean), as the spec's schemas say. JSON mode keeps enums and times
        # from their strings.
        return model.model_validate_json(await request.text(), strict=True)
    except ValidationError as exc:
        raise BadInput(
            "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        ) from None


async def load_conversation(request: web.Request) -> Conversation:
    """The conversation named by the path's ``{id}`` (404 if there is none)."""
    conversation = await request.config_dict[STORE].get_conversation(request.match_info["id"])
    if conversation is None:
        raise NotFound("no such conversation")
    return conversation


def json_response(model: BaseModel, status: int = 200) -> web.Response:
    return web.json_response(text=model.model_dump_json(), status=status)


def query_time(request: web.Request, name: str, default: datetime) -> datetime:
    """An ISO 8601 date or time from the query (UTC if it names no zone), in UTC."""
    raw = request.query.get(name)
    if raw is None:
        return default
    for text in (raw.strip(), raw.strip().replace(" ", "+")):  # "+01:00" unescaped is " 01:00"
        try:
            value = datetime.fromisoformat(text)
            break
        except ValueError:
            continue
    else:
        raise BadInput(f"{name} must be an ISO 8601 date or time, e.g. 2025-03-01 or "
                       "2025-03-01T09:00:00+01:00")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
