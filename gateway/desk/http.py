"""Request bodies and responses of the agent API: JSON read into a pydantic model (or a
400 that says which field is wrong: ``BadInput``, turned into the error response by the
API's middleware), and a model written as the JSON answer."""

from __future__ import annotations

from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from gateway.desk.auth import BadInput

M = TypeVar("M", bound=BaseModel)


async def read_body(request: web.Request, model: type[M]) -> M:
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise BadInput("the body must be JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadInput(
            "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        ) from None


def json_response(model: BaseModel, status: int = 200) -> web.Response:
    return web.json_response(text=model.model_dump_json(), status=status)
