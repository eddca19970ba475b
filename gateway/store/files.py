"""The attachment store: every file of every conversation, in the same MongoDB.

The bytes are in GridFS (bucket ``attachment_files``: its ``files`` and ``chunks``
collections, written by pymongo's async GridFS API), so files replicate and are backed up
with everything else. Each attachment also has one record in ``attachments`` (``_id``:
the attachment's id, which items name in ``Attachment.id``): the conversation and contact
it belongs to, its name, the content type detected from its bytes, size, sha256, who
sent it on which channel, and the GridFS file that holds it.

Storing is idempotent by the attachment's id (derived from an idempotency key: the same
inbound file stored twice, by a redelivery or by two processes, is one attachment): the
bytes go to a GridFS file of their own first, the record second; a record that exists
already wins and the second copy is deleted. A file without a record (a process died
between the two) is never referenced and is deleted by ``sweep_orphans``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

from bson import ObjectId
from gridfs import AsyncGridFSBucket, NoFile
from pydantic import BaseModel, ConfigDict
from pymongo import ASCENDING, IndexModel
from pymongo.errors import DuplicateKeyError

from gateway.model import Direction, Party, utcnow
from gateway.store.mongo import Store

BUCKET = "attachment_files"
RECORDS = "attachments"
ORPHAN_AFTER = timedelta(hours=1)  # a GridFS file without a record this old is deleted
READ_SIZE = 4 * 1024 * 1024  # bytes read from GridFS at a time when a file is served


class FileRecord(BaseModel):
    """One stored attachment (collection ``attachments``)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    file_id: Any  # the GridFS file (an ObjectId)
    conversation_id: str
    contact_id: str
    item_id: str | None = None  # the item that carries it (inbound: known when stored)
    name: str
    content_type: str
    size: int
    sha256: str
    sender: Party
    channel: str
    direction: Direction
    created_at: datetime


class FileStore:
    """Records in ``attachments``, bytes in the ``attachment_files`` GridFS bucket."""

    def __init__(self, store: Store) -> None:
        self.records = store.db[RECORDS]
        self.bucket = AsyncGridFSBucket(store.db, bucket_name=BUCKET)
        self._gridfs_files = store.db[f"{BUCKET}.files"]

    async def ensure_indexes(self) -> None:
        await self.records.create_indexes(
            [IndexModel([("conversation_id", ASCENDING)], name="attachment_conversation")])
        await self._gridfs_files.create_indexes(  # the orphan sweep's window
            [IndexModel([("uploadDate", ASCENDING)], name="uploaded")])

    async def get(self, attachment_id: str) -> FileRecord | None:
        doc = await self.records.find_one({"_id": attachment_id})
        if doc is None:
            return None
        doc["id"] = doc.pop("_id")
        return FileRecord.model_validate(doc)

    async def put(self, attachment_id: str, data: bytes, *, name: str, content_type: str,
                  conversation_id: str, contact_id: str, sender: Party, channel: str,
                  direction: Direction, item_id: str | None = None) -> FileRecord:
        """Store ``data`` as attachment ``attachment_id`` (once: if it is stored already,
        the stored one is returned and ``data`` dropped)."""
        existing = await self.get(attachment_id)
        if existing is not None:
            return existing
        file_id = ObjectId()
        await self.bucket.upload_from_stream_with_id(
            file_id, name, data, metadata={"attachment_id": attachment_id})
        record = FileRecord(
            id=attachment_id, file_id=file_id, conversation_id=conversation_id,
            contact_id=contact_id, item_id=item_id, name=name, content_type=content_type,
            size=len(data), sha256=hashlib.sha256(data).hexdigest(), sender=sender,
            channel=channel, direction=direction, created_at=utcnow())
        doc = record.model_dump(mode="python")
        doc["_id"] = doc.pop("id")
        try:
            await self.records.insert_one(doc)
        except DuplicateKeyError:  # stored meanwhile by another process: theirs counts
            await self._delete_file(file_id)
            found = await self.get(attachment_id)
            if found is None:  # pragma: no cover - it collided, so it exists
                raise
            return found
        return record

    async def read(self, record: FileRecord) -> bytes:
        stream = await self.bucket.open_download_stream(record.file_id)
        return bytes(await stream.read())

    async def chunks(self, record: FileRecord, size: int = READ_SIZE) -> AsyncIterator[bytes]:
        """The file's bytes, ``size`` at a time (the GridFS chunks it spans are read in one
        query: bench.files)."""
        stream = await self.bucket.open_download_stream(record.file_id)
        while chunk := await stream.read(size):
            yield bytes(chunk)

    async def sweep_orphans(self, older_than: timedelta = ORPHAN_AFTER,
                            since: datetime | None = None) -> int:
        """Delete GridFS files that no record names (a process died between storing the
        bytes and the record), uploaded before ``older_than`` ago (and since ``since``:
        the previous sweep's window end). Returns how many."""
        before = utcnow() - older_than
        window: dict[str, Any] = {"$lt": before}
        if since is not None:
            window["$gte"] = since
        deleted = 0
        async for doc in self._gridfs_files.find(
                {"uploadDate": window}, {"metadata.attachment_id": 1}):
            attachment_id = (doc.get("metadata") or {}).get("attachment_id")
            record = await self.records.find_one({"_id": attachment_id}, {"file_id": 1})
            if record is None or record.get("file_id") != doc["_id"]:
                await self._delete_file(doc["_id"])
                deleted += 1
        return deleted

    async def _delete_file(self, file_id: Any) -> None:
        with contextlib.suppress(NoFile):
            await self.bucket.delete(file_id)
