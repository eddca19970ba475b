"""Agent API: a contact's data rights, for admins only (part of ``/api``, see api.py).

- ``GET /api/v1/contacts/{id}/export``: everything of the contact as one ZIP download
  (``contact.json`` and the files: gateway/data_rights.py);
- ``POST /api/v1/contacts/{id}/erase`` with ``{"confirm": "<the contact's id>"}``: the
  contact, the contacts merged into it and everything of them are erased; the answer
  counts what went, and an audit entry (``contact.erase``, no content) stays.
"""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from gateway.data_rights import DataRights, NoSuchContact
from gateway.desk.auth import ADMIN_ONLY, BadInput
from gateway.desk.http import AGENT, json_response, read_body
from gateway.desk.openapi import Endpoint
from gateway.keys import FILES, STORE
from gateway.store import NotFound
from gateway.store.audit import Actor
from gateway.store.personal import Merged


class EraseIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    confirm: str = Field(min_length=1, max_length=64,
                         description="the contact's id again: erasing cannot be undone")


class ErasedOut(BaseModel):
    contact_id: str
    contacts: list[str] = Field(description="every contact erased: this one, then those "
                                "merged into it and those a channel link emptied")
    counts: dict[str, int] = Field(description="what was removed or anonymised, by kind")
    audit_id: str = Field(description="the audit entry that stays (no content)")


RIGHTS_MODELS: list[type[BaseModel]] = [EraseIn, ErasedOut]


def _rights(request: web.Request) -> DataRights:
    return DataRights(request.config_dict[STORE], request.config_dict[FILES])


def _who(request: web.Request) -> Actor:
    agent = request[AGENT]
    return Actor(id=agent.id, name=agent.name)


async def export_contact(request: web.Request) -> web.StreamResponse:
    try:
        export = await _rights(request).export(request.match_info["id"], _who(request))
    except NoSuchContact:
        raise NotFound("no such contact") from None
    try:
        response = web.StreamResponse(headers={
            "Content-Type": "application/zip", "Content-Length": str(export.size),
            "Content-Disposition": f'attachment; filename="{export.filename}"',
            "Cache-Control": "no-store"})
        await response.prepare(request)
        async for block in export.chunks():
            await response.write(block)
        await response.write_eof()
        return response
    finally:
        export.close()


async def erase_contact(request: web.Request) -> web.Response:
    from gateway.routing import Conflict  # noqa: PLC0415 - keeps this module's imports light

    body = await read_body(request, EraseIn)
    contact_id = request.match_info["id"]
    rights = _rights(request)
    if await rights.store.contacts.count_documents({"_id": contact_id}, limit=1) == 0:
        raise NotFound("no such contact")
    if body.confirm != contact_id:
        raise BadInput("confirm must be the contact's id: erasing cannot be undone")
    try:
        erased = await rights.erase(contact_id, _who(request), ip=request.remote,
                                    user_agent=request.headers.get("User-Agent"))
    except NoSuchContact:
        raise NotFound("no such contact") from None
    except Merged as exc:
        raise Conflict(f"{exc}: erase {exc.survivor}, which erases this contact with it"
                       ) from None
    return json_response(ErasedOut(contact_id=erased.contact_id, contacts=erased.contacts,
                                   counts=dict(erased.counts), audit_id=erased.audit_id))


def rights_endpoints() -> list[Endpoint]:
    return [
        Endpoint(
            "GET", "/v1/contacts/{id}/export", export_contact,
            "Export everything of a contact: one ZIP with contact.json (the contact, "
            "those merged into it, identities, conversations with their messages, files "
            "listed) and every file under files/", None,
            errors=(401, 403, 404, 503), tag="contacts", roles=ADMIN_ONLY,
            description="A contact merged into another answers the survivor's export "
            "(contact.json says asked_for). Other customers' messages in a group "
            "conversation are left out. Writes an audit entry contact.export. See "
            "docs/data-rights.md.",
            content={"application/zip": {"schema": {"type": "string", "format": "binary"}}},
        ),
        Endpoint(
            "POST", "/v1/contacts/{id}/erase", erase_contact,
            "Erase a contact and everything of it, for good: messages, files, identities, "
            "profile, and the contacts merged into it", ErasedOut, body=EraseIn,
            errors=(401, 403, 404, 409, 503), tag="contacts", roles=ADMIN_ONLY,
            description="confirm must be the contact's id (400 otherwise). 409 for a "
            "contact merged into another: erase the survivor. Analytics keep anonymised "
            "figures; an audit entry contact.erase with the counts (no content) stays. "
            "See docs/data-rights.md.",
        ),
    ]
