"""Agent API: labels (part of ``/api``, see api.py).

Admins define labels (``POST``/``PATCH``/``DELETE /api/v1/labels``: a name, unique
whatever its case, and a colour); agents read them (``GET /api/v1/labels``) and set a
conversation's (``PUT /api/v1/conversations/{id}/labels``). ``GET /api/v1/conversations``
and the search filter by one (``?label=<id>``). Store side: gateway/store/labels.py.
"""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from gateway.desk.auth import ADMIN_ONLY, STAFF, BadInput
from gateway.desk.http import json_response, read_body
from gateway.desk.http import load_conversation as _load
from gateway.desk.openapi import Endpoint
from gateway.keys import STORE
from gateway.store import NotFound
from gateway.store.labels import COLOR, Label, Labels, LabelTaken, UnknownLabels

# The api module imports this one (for the endpoint table), so its names are imported
# where they are used.


# A name: no control characters, something besides whitespace (Python's strip and the
# schema's \s agree on that set).
NAME = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"


class LabelIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    name: str = Field(min_length=1, max_length=60, pattern=NAME)
    color: str = Field("#6b7280", pattern=COLOR, description="#rrggbb")


class LabelPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    name: str | None = Field(None, min_length=1, max_length=60, pattern=NAME)
    color: str | None = Field(None, pattern=COLOR)


class LabelList(BaseModel):
    items: list[Label] = Field(description="by name")


class ConversationLabels(BaseModel):
    model_config = ConfigDict(extra="forbid")
    labels: list[str] = Field(max_length=50, description="label ids: the conversation's "
                              "labels are exactly these afterwards")


LABEL_MODELS: list[type[BaseModel]] = [LabelIn, LabelPatch, Label, LabelList,
                                       ConversationLabels]


def _labels(request: web.Request) -> Labels:
    return Labels(request.config_dict[STORE])


def _conflict(exc: Exception) -> Exception:
    from gateway.routing import Conflict  # noqa: PLC0415 - keeps this module's imports light

    return Conflict(str(exc))


async def list_labels(request: web.Request) -> web.Response:
    return json_response(LabelList(items=await _labels(request).all()))


async def create_label(request: web.Request) -> web.Response:
    body = await read_body(request, LabelIn)
    try:
        label = await _labels(request).create(body.name, body.color.lower())
    except LabelTaken as exc:
        raise _conflict(exc) from None
    return json_response(label, status=201)


async def update_label(request: web.Request) -> web.Response:
    body = await read_body(request, LabelPatch)
    changes = body.model_dump(exclude_none=True)
    if "color" in changes:
        changes["color"] = changes["color"].lower()
    try:
        label = await _labels(request).update(request.match_info["id"], changes)
    except LabelTaken as exc:
        raise _conflict(exc) from None
    if label is None:
        raise NotFound("no such label")
    return json_response(label)


async def delete_label(request: web.Request) -> web.Response:
    if not await _labels(request).delete(request.match_info["id"]):
        raise NotFound("no such label")
    return web.Response(status=204)


async def set_labels(request: web.Request) -> web.Response:
    from gateway.desk.api import _conversation_out  # noqa: PLC0415

    conversation = await _load(request)
    body = await read_body(request, ConversationLabels)
    try:
        await _labels(request).set_on(conversation.id, body.labels)
    except UnknownLabels as exc:
        raise BadInput(str(exc)) from None
    return json_response(await _conversation_out(request, await _load(request)))


def label_endpoints() -> list[Endpoint]:
    return [
        Endpoint("GET", "/v1/labels", list_labels, "The labels, by name", LabelList,
                 tag="labels", roles=STAFF),
        Endpoint("POST", "/v1/labels", create_label, "Add a label (admins)", Label,
                 status=201, body=LabelIn, errors=(401, 409, 503), tag="labels",
                 roles=ADMIN_ONLY),
        Endpoint("PATCH", "/v1/labels/{id}", update_label,
                 "Rename or recolour a label (admins)", Label, body=LabelPatch,
                 errors=(401, 404, 409, 503), tag="labels", roles=ADMIN_ONLY),
        Endpoint("DELETE", "/v1/labels/{id}", delete_label,
                 "Delete a label; it is taken off every conversation (admins)", None,
                 status=204, errors=(401, 404, 503), tag="labels", roles=ADMIN_ONLY),
    ]
