"""Group commit: every write of the message path, from every conversation, in few commands.

Each gateway process has one ``Writer``. Callers submit a ``Unit``: new items of one
conversation (messages, events, notes) and/or conditional updates (a turn's bot state,
a delivery status, ...). The writer takes whatever units are waiting and writes them
together: one ``insert`` command for every new item of every unit, one ``update`` command
per collection, inside one transaction when any unit has updates (so a turn's replies,
its bot state and its processed mark are all written or none), a single plain
``insert`` when the batch has only new items. While one batch is in flight the next one
gathers, so under load many conversations share each round trip and with one visitor
nothing waits (the first unit goes at once).

Sequence numbers without a round trip. Every item of a conversation gets the next
``seq`` and every item of a contact the next ``contact_seq``. The writer remembers the
last of each (``top``) for the conversations and contacts it writes to, so it numbers
items without asking the store; the unique indexes ``(conversation_id, seq)`` and
``(contact_id, contact_seq)`` are the check. If another process appended in the
meantime, the insert fails on that index, the writer reads what it missed (items above
its ``top``: an index range), hands those items to ``on_foreign`` and numbers again. A
seq is only ever taken after the one below it is committed, so seqs stay contiguous
and become visible in order, on any number of processes: web chat's exact watermark and
history paging by ``seq`` range hold as before.

Item ids come from their idempotency key (``item_id``), so storing the same inbound
message or the same reply twice collides on ``_id``: the unit fails with ``Duplicate``
and the caller reads the stored one. That also makes a batch whose commit outcome is
unknown (the store went away mid-commit) safe to retry: what was committed collides.

Fences. A unit may carry ``fence``: the last seq of its conversation that what it
writes was decided on (a bot turn: everything up to there was seen by it). It is
written only if nothing but inbound items (customers' messages) was appended after that
seq, else it fails with ``Precondition`` and nothing of it is written. The writer knows
the last non-inbound seq (``barrier``) of each conversation it numbers: from the items
it stored, and from the items it reads when its top was stale or not known (another
process appended: the insert hit the seq index, so the check is as atomic as the
numbering; below the seq hint it assumes the worst). Every owner change appends its
event in the same unit, so a fenced bot turn is never stored after a change it did not
see (gateway/store/turn_records.py).

The conversation's ``seq`` field and the contact's ``seq`` field are hints (a lower
bound of the last seq), kept close by ``$max`` in the same batches: with any update of
the unit to the conversation, else once the hint lags by ``HINT_EVERY`` items (a turn's
commit writes the turn state, not the conversation); readers that need the exact top
probe above the hint (``Store.top_seq``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bson import ObjectId
from pymongo import UpdateOne
from pymongo.errors import BulkWriteError, ConnectionFailure, OperationFailure, PyMongoError

if TYPE_CHECKING:
    from gateway.store.mongo import Store

log = logging.getLogger(__name__)

Doc = dict[str, Any]

MAX_ITEMS = 256  # items per batch
MAX_OPS = 512  # updates per batch
ATTEMPTS = 16  # a batch retried this often (write conflicts, stale tops) before units fail
BACKOFF = 0.002  # first retry waits up to this (s), doubling per attempt ...
BACKOFF_CAP = 0.25  # ... up to this: ~2 s in all before "too many conflicts"
CACHE = 50_000  # conversations and contacts whose top is remembered
HINT_EVERY = 32  # a conversation's and a contact's seq hint: written every this many items
CONVERSATION_SEQ = "conversation_id_1_seq_1"  # index names: which unique key an insert hit
CONTACT_SEQ = "contact_id_1_contact_seq_1"


def item_id(idem_key: str) -> str:
    """The ``_id`` of an item with this idempotency key: 24 hex digits, like an ObjectId."""
    return hashlib.sha256(idem_key.encode()).hexdigest()[:24]


def new_id() -> str:
    return str(ObjectId())


class Duplicate(Exception):
    """An item of the unit is stored already (same id): nothing of the unit was written
    (in a batch without updates, the unit's items before it were)."""

    def __init__(self, doc_id: str) -> None:
        super().__init__(f"item {doc_id} is stored already")
        self.doc_id = doc_id


class Precondition(Exception):
    """A required update of the unit matched nothing: nothing of the unit was written."""


class Missing(Exception):
    """The conversation (or its contact) the unit's items belong to does not exist."""


@dataclass(eq=False)
class Op:
    """An ``update_one``. ``required``: the unit is written only if it matches;
    ``upsert``: inserted if nothing matches (never required)."""

    collection: str
    filter: Doc
    update: Doc
    required: bool = False
    upsert: bool = False

    def request(self) -> UpdateOne:
        return UpdateOne(self.filter, self.update, upsert=self.upsert)


@dataclass(eq=False)
class Unit:
    """Items of one conversation to append (in order) and updates, written together."""

    conversation_id: str | None
    items: list[Doc] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    future: asyncio.Future[list[Doc]] | None = None
    # written only if nothing but inbound items came after this seq (module doc)
    fence: int | None = None

    @property
    def atomic(self) -> bool:
        return bool(self.ops) or len(self.items) > 1


@dataclass
class _Top:
    seq: int
    contact_id: str
    hint: int = 0  # the seq hint last written (or read) on the conversation
    barrier: int = 0  # the last seq of an item that was not inbound (as far as known)


def _barrier(docs: list[Doc]) -> int:
    """The last seq of the items that are not inbound (0: none)."""
    return max((int(d["seq"]) for d in docs if d.get("direction") != "in"), default=0)


class _Lru(OrderedDict[str, Any]):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key: str, value: Any) -> None:
        self[key] = value
        self.move_to_end(key)
        if len(self) > self.size:
            self.popitem(last=False)


class _Retry(Exception):
    """Write the (remaining) batch again: a top was stale or a transaction conflicted."""


def _transient(exc: PyMongoError) -> bool:
    return isinstance(exc, OperationFailure | ConnectionFailure) and (
        exc.has_error_label("TransientTransactionError"))


class Writer:
    """The process's group-commit writer (see the module doc). Owned by the ``Store``."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._queue: deque[Unit] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tops: _Lru = _Lru(CACHE)  # conversation id -> _Top
        self._contacts: _Lru = _Lru(CACHE)  # contact id -> [top, hint written]
        # items another process appended, found when numbering (see the module doc)
        self.on_foreign: Callable[[list[Doc]], None] | None = None
        # every item this process stored (the pipeline tracks which seqs it has seen)
        self.on_stored: Callable[[list[Doc]], None] | None = None
        self.batches = 0  # how many batches were written (tests, benchmarks)

    # ------------------------------------------------------------------ public

    async def submit(self, unit: Unit) -> list[Doc]:
        """Write the unit with the next batch; returns its items as stored (seqs set).

        Raises ``Duplicate``, ``Precondition``, ``Missing`` or the store's error."""
        if not unit.items and not unit.ops:
            return []
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="store-writer")
        unit.future = asyncio.get_running_loop().create_future()
        self._queue.append(unit)
        self._wake.set()
        return await unit.future

    def forget(self, conversation_id: str, contact_id: str | None = None) -> None:
        """Drop what is remembered of a conversation (it moved to another contact, ...)."""
        self._tops.pop(conversation_id, None)
        if contact_id is not None:
            self._contacts.pop(contact_id, None)

    async def known_top(self, conversation_id: str) -> int:
        """The conversation's last seq as this writer knows it (read if not known): a
        fence for what is decided on what is read after this call (Unit.fence)."""
        top = self._tops.get(conversation_id)
        if top is None:
            top = await self._load_conversation(conversation_id)
        return int(top.seq)

    def top(self, conversation_id: str) -> int | None:
        """The last seq this process knows for the conversation (None: not remembered)."""
        known = self._tops.get(conversation_id)
        return None if known is None else int(known.seq)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while self._queue:
            unit = self._queue.popleft()
            if unit.future is not None and not unit.future.done():
                unit.future.set_exception(ConnectionFailure("the store was closed"))

    # -------------------------------------------------------------------- loop

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch: list[Unit] = []
            items = ops = 0
            while self._queue and (not batch or (
                    items + len(self._queue[0].items) <= MAX_ITEMS
                    and ops + len(self._queue[0].ops) <= MAX_OPS)):
                unit = self._queue.popleft()
                batch.append(unit)
                items += len(unit.items)
                ops += len(unit.ops)
            try:
                await self._write(batch)
            except asyncio.CancelledError:
                for unit in batch:
                    _fail(unit, ConnectionFailure("the store writer stopped"))
                raise
            except Exception as exc:  # a bug must not stop every write of the process
                log.exception("store writer: unexpected error")
                for unit in batch:
                    _fail(unit, exc)

    async def _write(self, batch: list[Unit]) -> None:
        self.batches += 1
        isolate = False
        attempts = 0
        while attempts < ATTEMPTS:
            pending = [u for u in batch if u.future is not None and not u.future.done()]
            if not pending:
                return
            attempts += 1
            try:
                if isolate and len(pending) > 1:
                    for unit in pending:  # find the unit whose precondition failed
                        await self._write_once([unit], exact=True)
                else:
                    await self._write_once(pending, exact=isolate)
                return
            except _Retry:
                if sum(1 for u in pending if not u.future or not u.future.done()) < len(pending):
                    attempts -= 1  # a unit got its answer (a duplicate): that is progress
                else:  # another process writes the same conversation: let it pass
                    # exponential backoff with full jitter, so that two processes
                    # appending to one conversation in bursts do not keep colliding
                    delay = min(BACKOFF_CAP, BACKOFF * 2 ** (attempts - 1))
                    await asyncio.sleep(random.uniform(0, delay))  # noqa: S311 (jitter)
                continue
            except _Isolate:
                isolate = True
                continue
            except PyMongoError as exc:
                for unit in pending:
                    self._forget_unit(unit)  # the outcome may be unknown: read afresh
                    _fail(unit, exc)
                return
        for unit in batch:
            _fail(unit, OperationFailure("store writer: too many conflicts; try again"))

    async def _write_once(self, units: list[Unit], *, exact: bool) -> None:
        units = [u for u in units if u.future is not None and not u.future.done()]
        if not units:
            return
        await self._load_tops(units)
        units = self._fenced_out(
            [u for u in units if u.future is not None and not u.future.done()])
        if not units:
            return
        staged = self._number(units)
        ops = [o for u in units for o in u.ops]
        if len(ops) == 1 and not ops[0].required and not any(u.items for u in units):
            # one update alone is atomic as it is: no transaction (one command)
            await self.store.db[ops[0].collection].update_one(
                ops[0].filter, ops[0].update, upsert=ops[0].upsert)
            for unit in units:
                _done(unit)
            return
        if any(u.atomic for u in units):
            await self._transaction(units, staged, exact=exact)
        else:
            await self._plain(units, staged)

    # ---------------------------------------------------------------- numbering

    async def _load_tops(self, units: list[Unit]) -> None:
        for unit in units:
            cid = unit.conversation_id
            if cid is None or not (unit.items or unit.fence is not None):
                continue
            top = self._tops.get(cid)
            if top is None:
                try:
                    top = await self._load_conversation(cid)
                except Missing as exc:
                    _fail(unit, exc)
                    continue
            if top.contact_id not in self._contacts:
                await self._load_contact(top.contact_id)

    async def _load_conversation(self, cid: str) -> _Top:
        doc = await self.store.conversations.find_one({"_id": cid}, {"seq": 1, "contact_id": 1})
        if doc is None:
            raise Missing(f"conversation {cid} does not exist")
        hint = int(doc.get("seq") or 0)
        above = await self.store.messages.find(
            {"conversation_id": cid, "seq": {"$gt": hint}}).to_list()
        seq = max([hint, *(int(d["seq"]) for d in above)])
        # what is at or below the hint was not read: any of it may be a barrier
        top = _Top(seq, str(doc["contact_id"]), hint, max(hint, _barrier(above)))
        self._tops.put(cid, top)
        if above and self.on_foreign is not None:
            self.on_foreign(sorted(above, key=lambda d: int(d["seq"])))
        return top

    async def _load_contact(self, contact_id: str) -> None:
        doc = await self.store.contacts.find_one({"_id": contact_id}, {"seq": 1})
        hint = int(doc.get("seq") or 0) if doc is not None else 0
        above = await self.store.messages.find(
            {"contact_id": contact_id, "contact_seq": {"$gt": hint}},
            {"contact_seq": 1}).to_list()
        seq = max([hint, *(int(d["contact_seq"]) for d in above)])
        self._contacts.put(contact_id, [seq, hint])

    def _fenced_out(self, units: list[Unit]) -> list[Unit]:
        """Fail the fenced units that something not inbound came after (an earlier unit
        of the batch included); the others, to write."""
        barriers: dict[str, int] = {}
        kept: list[Unit] = []
        for unit in units:
            cid = unit.conversation_id
            if cid is not None and unit.fence is not None:
                top = self._tops.get(cid)
                barrier = max(barriers.get(cid, 0), top.barrier if top is not None else 0)
                if top is None or barrier > unit.fence:
                    _fail(unit, Precondition(
                        f"conversation {cid}: an item not inbound came after seq {unit.fence}"))
                    continue
            kept.append(unit)
            if cid is not None and any(d.get("direction") != "in" for d in unit.items):
                barriers[cid] = 1 << 62  # numbered below: after any fence of the batch
        return kept

    def _number(self, units: list[Unit]) -> dict[str, tuple[int, int]]:
        """Give every item its seq and contact_seq (staged: the caches move on only when
        the write succeeds). Returns the staged tops: conversation id and "c:" contact id
        -> (seq, hint written)."""
        staged: dict[str, tuple[int, int]] = {}
        for unit in units:
            if not unit.items or unit.conversation_id is None:
                continue
            cid = unit.conversation_id
            top: _Top = self._tops[cid]
            seq, conversation_hint = staged.get(cid, (top.seq, top.hint))
            contact = self._contacts.get(top.contact_id) or [0, 0]
            cseq, hint = staged.get("c:" + top.contact_id, (contact[0], contact[1]))
            for doc in unit.items:
                seq += 1
                cseq += 1
                doc["conversation_id"] = cid
                doc["contact_id"] = top.contact_id
                doc["seq"] = seq
                doc["contact_seq"] = cseq
            for op in unit.ops:  # the unit writes its conversation anyway: keep the hint
                if op.collection == "conversations" and op.filter.get("_id") == cid:
                    op.update.setdefault("$max", {})["seq"] = seq
                    conversation_hint = seq
            staged[cid] = (seq, conversation_hint)
            staged["c:" + top.contact_id] = (cseq, hint)
        return staged

    def _hint_ops(self, staged: Mapping[str, tuple[int, int]]) -> list[Op]:
        """Conversations and contacts whose seq hint lags by HINT_EVERY items get it
        written."""
        return [Op("contacts", {"_id": key[2:]}, {"$max": {"seq": seq}}) if key[:2] == "c:"
                else Op("conversations", {"_id": key}, {"$max": {"seq": seq}})
                for key, (seq, hint) in staged.items() if seq - hint >= HINT_EVERY]


    def _advance(self, unit: Unit) -> None:
        """The unit's items are stored: remember their seqs."""
        if unit.items and self.on_stored is not None:
            self.on_stored(unit.items)
        for doc in unit.items:
            top = self._tops.get(str(doc["conversation_id"]))
            if top is not None:
                top.seq = max(top.seq, int(doc["seq"]))
                if doc.get("direction") != "in":
                    top.barrier = max(top.barrier, int(doc["seq"]))
            contact = self._contacts.get(str(doc["contact_id"]))
            if contact is not None:
                contact[0] = max(contact[0], int(doc["contact_seq"]))

    def _advance_hints(self, staged: Mapping[str, tuple[int, int]], hints: list[Op]) -> None:
        """The batch is stored and wrote ``hints`` (and the hints its units' own updates
        of their conversations carried, ``_number``): remember them."""
        written = {("c:" if o.collection == "contacts" else "") + str(o.filter["_id"])
                   for o in hints}
        for key, (seq, hint) in staged.items():
            if key[:2] == "c:":
                contact = self._contacts.get(key[2:])
                if key in written and contact is not None:
                    contact[1] = max(contact[1], seq)
            elif (key in written or seq == hint) and (top := self._tops.get(key)) is not None:
                top.hint = max(top.hint, seq)

    def _forget_unit(self, unit: Unit) -> None:
        for doc in unit.items:
            self._tops.pop(str(doc.get("conversation_id")), None)
            self._contacts.pop(str(doc.get("contact_id")), None)

    def _stale(self, error: Mapping[str, Any], unit: Unit | None) -> bool:
        """An insert failed: on a stale top (forget it) True; a duplicate id or any other
        error fails the unit (False)."""
        if error.get("code") not in (11000, 11001):
            if unit is not None:
                _fail(unit, OperationFailure(str(error.get("errmsg", "insert failed")),
                                             error.get("code")))
            return False
        pattern = dict(error.get("keyPattern") or {})
        message = str(error.get("errmsg", ""))
        op = dict(error.get("op") or {})
        if ("seq" in pattern or "contact_seq" in pattern
                or f"index: {CONVERSATION_SEQ}" in message
                or f"index: {CONTACT_SEQ}" in message):
            # another process appended: to the conversation and so to its contact too
            # (both are read again, in one go, rather than one conflict after the other)
            self._tops.pop(str(op.get("conversation_id")), None)
            self._contacts.pop(str(op.get("contact_id")), None)
            return True
        if unit is not None:
            _fail(unit, Duplicate(str(op.get("_id"))))
        return False

    # ------------------------------------------------------------------ writing

    async def _plain(self, units: list[Unit], staged: Mapping[str, tuple[int, int]]) -> None:
        """Only single new items: one ordered insert, no transaction (each insert is
        atomic). On an error, the items before it are stored, the rest are written again."""
        docs = [u.items[0] for u in units]
        try:
            await self.store.messages.insert_many(docs, ordered=True)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors") or [{}]
            stored = int(exc.details.get("nInserted", 0))
            for unit in units[:stored]:
                self._advance(unit)
                _done(unit)
            index = int(errors[0].get("index", stored))
            failing = units[index] if index < len(units) else None
            if self._stale(errors[0], failing) or index + 1 < len(units):
                raise _Retry from exc
            return
        for unit in units:
            self._advance(unit)
            _done(unit)
        hints = self._hint_ops(staged)
        if hints:  # every HINT_EVERY items: not worth holding the answer for
            written: list[Op] = []
            for name in ("conversations", "contacts"):
                mine = [o for o in hints if o.collection == name]
                if mine:
                    with contextlib.suppress(PyMongoError):
                        await self.store.db[name].bulk_write(
                            [o.request() for o in mine], ordered=False)
                        written += mine
            self._advance_hints(staged, written)

    async def _transaction(self, units: list[Unit], staged: Mapping[str, tuple[int, int]],
                           *, exact: bool) -> None:
        docs = [d for u in units for d in u.items]
        owners = [u for u in units for _ in u.items]
        hints = self._hint_ops(staged)
        required: defaultdict[str, list[Op]] = defaultdict(list)
        optional: defaultdict[str, list[Op]] = defaultdict(list)
        for op in [o for u in units for o in u.ops] + hints:
            (required if op.required else optional)[op.collection].append(op)
        async with self.store.client.start_session() as session:
            await session.start_transaction()
            try:
                outcome = await self._statements(
                    session, units, docs=docs, owners=owners, required=required,
                    optional=optional, exact=exact)
                if outcome is None:
                    await session.commit_transaction()
            except PyMongoError as exc:
                await _abort(session)
                if _transient(exc):
                    raise _Retry from exc
                raise
            if outcome is not None:
                await _abort(session)
                if outcome == "retry":
                    raise _Retry
                if outcome == "isolate":
                    raise _Isolate
                return  # "final": every unit has its answer (a failed precondition)
        for unit in units:
            self._advance(unit)
            _done(unit)
        self._advance_hints(staged, hints)


    async def _statements(
        self, session: Any, units: list[Unit], *, docs: list[Doc], owners: list[Unit],
        required: Mapping[str, list[Op]], optional: Mapping[str, list[Op]], exact: bool,
    ) -> str | None:
        """The batch's statements in the open transaction: None if all went well, else
        what to do instead of committing ("retry", "isolate", "final")."""
        if docs:
            try:
                await self.store.messages.insert_many(docs, ordered=True, session=session)
            except BulkWriteError as exc:
                error = (exc.details.get("writeErrors") or [{}])[0]
                index = int(error.get("index", 0))
                self._stale(error, owners[index] if index < len(owners) else None)
                return "retry"
        for name, ops in required.items():
            result = await self.store.db[name].bulk_write(
                [o.request() for o in ops], ordered=True, session=session)
            if result.matched_count < len(ops):
                if not exact and len(units) > 1:
                    return "isolate"
                for unit in units:
                    _fail(unit, Precondition("a required update matched nothing"))
                return "final"
        for name, ops in optional.items():
            await self.store.db[name].bulk_write(
                [o.request() for o in ops], ordered=False, session=session)
        return None


class _Isolate(Exception):
    """A required update failed in a batch of several units: write them one by one."""


async def _abort(session: Any) -> None:
    if session.in_transaction:
        with contextlib.suppress(PyMongoError):
            await session.abort_transaction()


def _done(unit: Unit) -> None:
    if unit.future is not None and not unit.future.done():
        unit.future.set_result(unit.items)


def _fail(unit: Unit, exc: BaseException) -> None:
    if unit.future is not None and not unit.future.done():
        unit.future.set_exception(exc)
