"""Data rights: export everything of one contact, or erase it (docs/data-rights.md).

**Export** is one ZIP file, as helpdesks' own data exports are (Zendesk's and Chatwoot's
account exports, Slack's, Google Takeout): ``contact.json`` with the contact, every
contact merged into it, their identities, conversations (each with its messages, in
order, and the bot's memory of it), their messages in other customers' group
conversations, and the merges; and every file under ``files/<attachment id>/<name>``,
as it was sent (photos open as photos, the raw mails as .eml). An admin hands the file
to the customer as it is; base64 inside the JSON would make it a third larger and
unreadable without a program. ``contact.json`` names each file's path in the ZIP.

In a group conversation (Telegram group, Slack channel thread, a mail with Cc) the other
customers' messages are left out (``redacted``: their place, not their words or files):
an export holds nothing of another customer. Private notes of agents about the customer
are in (``private: true``): the admin reviews them before handing the file over.

**Erase** removes the contact, the contacts merged into it, and everything of them
(gateway/store/personal.py says where); analytics keep anonymised figures. An audit
entry without content stays: ``contact.erase`` with the counts of what went.

Both act on the contact as it lives on: a contact merged into another is the survivor's
now (export answers the survivor's export; erase refuses it and names the survivor).
"""

from __future__ import annotations

import asyncio
import base64
import json
import tempfile
import zipfile
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any

from bson import ObjectId
from pymongo import ASCENDING

from gateway.files import Files
from gateway.model import Activity, Conversation, utcnow
from gateway.store.audit import Actor, AuditLog
from gateway.store.files import FileRecord
from gateway.store.mongo import Doc, Store, from_doc, new_id
from gateway.store.personal import Remover, Scope, chunks, find_scope, survivor_of
from gateway.store.turn_records import current

FORMAT = "omnigate.contact-export"
VERSION = 1
IN_MEMORY = 8 * 1024 * 1024  # an export larger than this is built in a temporary file
SEND_SIZE = 1024 * 1024
REDACTED = "another customer's message in this group conversation: left out"


def plain(value: Any) -> Any:
    """A stored value as JSON: times in ISO 8601, bytes in base64, ObjectIds as text."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [plain(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _doc(doc: Doc) -> dict[str, Any]:
    data = plain(doc)
    data["id"] = data.pop("_id")
    return dict(data)


def file_path(record: FileRecord) -> str:
    return f"files/{record.id}/{record.name}"


async def audit(store: Store, action: str, who: Actor, target: str | None,
                counts: Mapping[str, int], *, ip: str | None = None,
                user_agent: str | None = None) -> str:
    """One audit entry (gateway/store/audit.py) with ``counts`` and no content."""
    entry_id = new_id()
    await AuditLog(store).coll.insert_one({
        "_id": entry_id, "at": utcnow(), "action": action, "who": who.model_dump(),
        "target": target, "ip": ip, "user_agent": (user_agent or "")[:300] or None,
        "details": {}, "counts": dict(sorted(counts.items()))})
    return entry_id


@dataclass
class Export:
    """A built export: the ZIP (``file``, rewound), its size and what it holds."""

    contact_id: str
    file: IO[bytes]
    size: int
    counts: Counter[str]

    @property
    def filename(self) -> str:
        return f"omnigate-contact-{self.contact_id}.zip"

    async def chunks(self) -> AsyncIterator[bytes]:
        while block := self.file.read(SEND_SIZE):
            yield block

    def close(self) -> None:
        self.file.close()


@dataclass
class Erased:
    contact_id: str
    contacts: list[str]
    counts: Counter[str]
    audit_id: str


class NoSuchContact(LookupError):
    pass


class DataRights:
    def __init__(self, store: Store, files: Files) -> None:
        self.store = store
        self.files = files

    async def _scope(self, contact_id: str) -> Scope:
        scope = await find_scope(self.store, contact_id)
        if scope is None:
            raise NoSuchContact(f"no contact {contact_id}")
        return scope

    # ------------------------------------------------------------------- export

    async def export(self, contact_id: str, who: Actor) -> Export:
        """The ZIP of everything of ``contact_id`` (of its survivor, if it was merged)."""
        survivor = await survivor_of(self.store, contact_id)
        if survivor is None:
            raise NoSuchContact(f"no contact {contact_id}")
        scope = await self._scope(survivor)
        counts: Counter[str] = Counter()
        data, records = await self._data(scope, who, counts)
        if survivor != contact_id:
            data["asked_for"] = contact_id  # merged into the survivor: this is its export
        out = tempfile.SpooledTemporaryFile(max_size=IN_MEMORY)  # noqa: SIM115 - handed on
        try:
            stamp = utcnow().timetuple()[:6]
            with zipfile.ZipFile(out, "w", allowZip64=True) as archive:
                info = zipfile.ZipInfo("contact.json", date_time=stamp)
                info.compress_type = zipfile.ZIP_DEFLATED
                text = await asyncio.to_thread(json.dumps, data, indent=2, ensure_ascii=False)
                await asyncio.to_thread(archive.writestr, info, text)  # deflate: not here
                for record in records:
                    info = zipfile.ZipInfo(file_path(record), date_time=stamp)
                    with archive.open(info, "w", force_zip64=True) as entry:
                        async for block in self.files.store.chunks(record):
                            entry.write(block)
            size = out.tell()
            out.seek(0)
        except BaseException:
            out.close()
            raise
        await audit(self.store, "contact.export", who, survivor, counts)
        return Export(survivor, out, size, counts)

    async def _data(self, scope: Scope, who: Actor, counts: Counter[str]
                    ) -> tuple[dict[str, Any], list[FileRecord]]:
        store = self.store
        contacts = {str(d["_id"]): d async for d in store.contacts.find(
            {"_id": {"$in": scope.contacts}})}
        conversations: list[dict[str, Any]] = []
        keep: set[str] = set()  # attachment ids of what is exported
        for cid in scope.conversations:
            doc = await store.conversations.find_one({"_id": cid})
            if doc is None:
                continue
            conversation = from_doc(Conversation, doc)
            out = conversation.model_dump(mode="json")
            state = await current(store, cid)
            out["bot_memory"] = plain(state.bot_state) if state is not None else {}
            out["messages"] = []
            async for item in store.messages.find({"conversation_id": cid}).sort(
                    "seq", ASCENDING):
                if not conversation.one_to_one and _another(scope, item):
                    out["messages"].append(_redacted(item))
                    counts["left_out"] += 1
                    continue
                out["messages"].append(_item(item, keep))
                counts["messages"] += 1
            conversations.append(out)
        elsewhere = []  # without the ids of the conversation's contact (another)
        items = [d for batch in chunks(scope.elsewhere)
                 async for d in store.messages.find({"_id": {"$in": batch}})]
        for item in sorted(items, key=lambda d: (d["created_at"], d["seq"])):
            out = _item(item, keep)
            for key in ("contact_id", "conversation_id", "contact_seq"):
                out.pop(key, None)
            if out.get("reply_to_id") not in scope.elsewhere:
                out.pop("reply_to_id", None)
            elsewhere.append(out)
            counts["messages"] += 1
        records: list[FileRecord] = []
        for batch in chunks(sorted(keep)):
            async for doc in store.db["attachments"].find({"_id": {"$in": batch}}):
                doc["id"] = doc.pop("_id")
                records.append(FileRecord.model_validate(doc))
        records.sort(key=lambda r: (r.created_at, r.id))
        merges = [_doc(d) async for d in store.db["contact_merges"].find(
            {"survivor": {"$in": scope.contacts}})]
        counts.update(contacts=len(contacts), identities=len(scope.identities),
                      conversations=len(conversations), files=len(records))
        data = {
            "format": FORMAT, "version": VERSION, "exported_at": utcnow().isoformat(),
            "exported_by": who.model_dump(),
            "contact": _doc(contacts[scope.root]),
            "merged_contacts": [_doc(contacts[c]) for c in scope.contacts[1:]
                                if c in contacts],
            "identities": [_doc(d) for d in scope.identities],
            "conversations": conversations,
            "messages_elsewhere": elsewhere,
            "files": [{**r.model_dump(mode="json", exclude={"file_id"}),
                       "path": file_path(r)} for r in records],
            "merges": merges,
        }
        return data, records

    # -------------------------------------------------------------------- erase

    async def erase(self, contact_id: str, who: Actor, *, ip: str | None = None,
                    user_agent: str | None = None) -> Erased:
        """Erase ``contact_id`` and everything of it (raises ``Merged`` for a contact
        merged into another, ``NoSuchContact``)."""
        scope = await self._scope(contact_id)
        remover = Remover(self.store)
        await remover.contact(scope)
        await remover.late_writes(scope.conversations, scope.elsewhere)
        counts = remover.counts
        entry = await audit(self.store, "contact.erase", who, contact_id, counts, ip=ip,
                            user_agent=user_agent)
        return Erased(contact_id, scope.contacts, counts, entry)


def _another(scope: Scope, item: Doc) -> bool:
    """A customer's message that is not the contact's (a group conversation)."""
    sender = item.get("sender") or {}
    return sender.get("role") == "customer" and sender.get("id") is not None \
        and not scope.wrote(item)


def _item(item: Doc, keep: set[str]) -> dict[str, Any]:
    activity = from_doc(Activity, item)
    keep.update(a.id for a in activity.attachments if a.id)
    raw = activity.channel_data.get("raw_attachment_id")
    if isinstance(raw, str):
        keep.add(raw)
    data: dict[str, Any] = activity.model_dump(mode="json", exclude={
        "delivery", "idem_key", "dedupe_key", "processed", "channel_data"})
    data["channel_data"] = plain(activity.channel_data)
    return data


def _redacted(item: Doc) -> dict[str, Any]:
    return {"id": str(item["_id"]), "seq": item.get("seq"), "channel": item.get("channel"),
            "created_at": plain(item.get("created_at")),
            "sender": {"role": "customer"}, "redacted": REDACTED}
