"""Agent API endpoints for one customer on every channel (part of ``/api``, see api.py).

``PATCH /api/v1/contacts/{id}`` changes what agents know of a customer: the name, and the
email address, phone number and notes in the profile (where the bot reads them too: an
agent's email is the bot's ``{contact.email}``; null clears one).
``POST /api/v1/contacts/{id}/merge`` merges another contact into this one (its identities,
conversations and profile move here); ``GET /api/v1/contacts/{id}/merges`` lists the
merges into a contact; ``POST /api/v1/merges/{id}/undo`` puts back exactly what a merge
moved, or answers 409 saying what changed since (then it could no longer be exact).
"""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from gateway.desk.http import AGENT, NOT_BLANK, json_response, read_body
from gateway.desk.openapi import Endpoint
from gateway.identity import Identity
from gateway.keys import OUTBOX, STORE
from gateway.model import Agent, utcnow
from gateway.store import NotFound
from gateway.store.contacts import Merge, MergeConflict

# The api module imports this one (for the endpoint table), so its names are imported
# where they are used.


class MergeIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    contact_id: str = Field(min_length=1, max_length=64, pattern=NOT_BLANK,
                            description="the contact merged into this one (it lives on here)")


EMAIL = r"^[^@\s]{1,64}@[^@\s]{1,253}\.[^@\s]{1,63}$"
PHONE = r"^\+?[0-9 ().\-/]{4,30}$"


class ContactPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    name: str | None = Field(None, min_length=1, max_length=200, pattern=NOT_BLANK)
    email: str | None = Field(None, max_length=254, pattern=EMAIL)
    phone: str | None = Field(None, max_length=30, pattern=PHONE)
    notes: str | None = Field(None, max_length=5000, description="what agents should know")


class MergeList(BaseModel):
    items: list[Merge] = Field(description="newest first")


CONTACT_MODELS: list[type[BaseModel]] = [MergeIn, Merge, MergeList, ContactPatch]


def _identity(request: web.Request) -> Identity:
    return Identity(request.config_dict[STORE], request.config_dict[OUTBOX])


def _agent(request: web.Request) -> Agent:

    return request[AGENT]


def _conflict(exc: MergeConflict) -> Exception:
    from gateway.routing import Conflict  # noqa: PLC0415 - keeps this module's imports light

    return Conflict(str(exc))


async def update_contact(request: web.Request) -> web.Response:
    """Fields sent are set (null: cleared); the others are left as they are."""
    from gateway.desk.api import ContactOut  # noqa: PLC0415

    body = await read_body(request, ContactPatch)
    store = request.config_dict[STORE]
    contact_id = request.match_info["id"]
    found = await store.get_contact(contact_id, with_identities=False)
    if found is None:
        raise NotFound("no such contact")
    if found.merged_into:  # a change here would go to a record nobody reads any more
        raise _conflict(MergeConflict(
            f"this contact was merged into {found.merged_into}: change that one"))
    sent = body.model_dump(exclude_unset=True)
    now = utcnow()
    if "name" in sent:
        await store.contacts.update_one({"_id": contact_id}, {"$set": {"name": sent["name"]}})
    by = _agent(request).id
    profile = {key: None if value is None else {
        "value": value.lower() if key == "email" else value, "set_at": now.isoformat(),
        "expires_at": None, "set_by": by} for key, value in sent.items() if key != "name"}
    if profile:
        await store.update_profile(contact_id, profile)
    contact = await store.get_contact(contact_id)
    assert contact is not None
    return json_response(ContactOut.of(contact))


async def merge(request: web.Request) -> web.Response:
    body = await read_body(request, MergeIn)
    try:
        record = await _identity(request).merge(
            request.match_info["id"], body.contact_id, _agent(request).id)
    except MergeConflict as exc:
        raise _conflict(exc) from None
    return json_response(record, status=201)


async def merges(request: web.Request) -> web.Response:
    found = await _identity(request).contacts.merges_of(request.match_info["id"])
    return json_response(MergeList(items=found))


async def get_merge(request: web.Request) -> web.Response:
    return json_response(await _identity(request).contacts.get_merge(request.match_info["id"]))


async def undo_merge(request: web.Request) -> web.Response:
    try:
        record = await _identity(request).undo_merge(request.match_info["id"],
                                                     _agent(request).id)
    except MergeConflict as exc:
        raise _conflict(exc) from None
    return json_response(record)


def contact_endpoints() -> list[Endpoint]:
    return [

        Endpoint(
            "POST", "/v1/contacts/{id}/merge", merge,
            "Merge another contact into this one: its identities, conversations and profile "
            "move here (profile values this contact has stay, unless the other's are newer)",
            Merge, status=201, body=MergeIn, errors=(401, 403, 404, 409, 503),
            tag="contacts",
        ),
        Endpoint(
            "GET", "/v1/contacts/{id}/merges", merges,
            "The merges into this contact, newest first", MergeList,
            errors=(401, 403, 503), tag="contacts",
        ),
        Endpoint(
            "GET", "/v1/merges/{id}", get_merge, "One merge: exactly what it moved", Merge,
            errors=(401, 403, 404, 503), tag="contacts",
        ),
        Endpoint(
            "POST", "/v1/merges/{id}/undo", undo_merge,
            "Undo a merge: put back exactly what it moved. 409 (with the reason) when that "
            "is no longer exact: something moved or changed since", Merge,
            errors=(401, 403, 404, 409, 503), tag="contacts",
        ),
    ]
