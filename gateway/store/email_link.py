"""Store side of email-code linking: one-time codes and their rate limits.

A customer in the web chat gives an email address; a 6-digit code is mailed there; the
customer sends it back. The code is random (``secrets``), stored only as a salted SHA-256
(a leaked store does not show live codes; it is still only a 6-digit secret, which is why
it lives 15 minutes and allows 5 tries), and bound to the requester (the web chat visitor)
and the address.

Every document is found by its ``_id``; the only other indexes are TTL ones that let the
server drop expired documents a day later (``ensure_indexes``):

- ``email_codes``: ``_id`` = the requester (``webchat:<visitor id>``): one live challenge
  per requester; asking again replaces it (and its attempt count starts again, which the
  request rate limit bounds).
- ``email_code_limits``: ``_id`` = ``<kind>:<key>:<hour>``, a counter per requester and
  per address per clock hour, incremented atomically (``$inc``): of concurrent requests
  over the limit none slips through.

A try is counted before the code is compared, by one conditional update
(``attempts < MAX_ATTEMPTS``, unused, unexpired): at most 5 comparisons per code, across
processes. The right code is consumed by another conditional update: exactly one winner.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime, timedelta
from enum import StrEnum

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.collection import AsyncCollection

from gateway.model import utcnow
from gateway.store.mongo import Doc, Store

CODE_TTL = timedelta(minutes=15)
MAX_ATTEMPTS = 5
PER_REQUESTER_PER_HOUR = 5  # codes a visitor may ask for in one clock hour
PER_ADDRESS_PER_HOUR = 3  # codes mailed to one address in one clock hour (anti-spam)


class CodeState(StrEnum):
    RIGHT = "right"  # the right code: consumed now (or by this requester before)
    WRONG = "wrong"
    EXPIRED = "expired"
    TOO_MANY = "too_many_attempts"
    NONE = "no_code"  # nothing asked for (or already used)


class RateLimited(Exception):
    """Too many codes asked for; the message says for what."""


def code_hash(salt: str, code: str) -> str:
    return hashlib.sha256(f"{salt}:{code}".encode()).hexdigest()


def new_code() -> str:
    return f"{secrets.randbelow(10**6):06d}"


class EmailCodes:
    def __init__(self, store: Store) -> None:
        self.codes: AsyncCollection[Doc] = store.db["email_codes"]
        self.limits: AsyncCollection[Doc] = store.db["email_code_limits"]

    async def _count(self, kind: str, key: str, now: datetime, limit: int) -> bool:
        """Count one more request for (kind, key) this hour; False if over ``limit``."""
        bucket = f"{kind}:{key}:{now:%Y%m%d%H}"
        await self.limits.update_one(
            {"_id": bucket}, {"$inc": {"n": 1}, "$setOnInsert": {"created_at": now}},
            upsert=True)
        doc = await self.limits.find_one({"_id": bucket}, {"n": 1})
        return doc is not None and int(doc["n"]) <= limit

    async def issue(
        self, requester: str, contact_id: str, address: str,
        conversation_id: str | None = None, *, ttl: timedelta = CODE_TTL,
    ) -> tuple[str, datetime]:
        """A new code for ``requester`` to prove ``address``: (code, expires at).
        Raises RateLimited (nothing issued) over a limit."""
        now = utcnow()
        if not await self._count("requester", requester, now, PER_REQUESTER_PER_HOUR):
            raise RateLimited("too many codes asked for; try again in an hour")
        if not await self._count("address", address, now, PER_ADDRESS_PER_HOUR):
            raise RateLimited("too many codes sent to this address; try again in an hour")
        code, salt = new_code(), secrets.token_hex(16)
        expires = now + ttl
        await self.codes.replace_one({"_id": requester}, {
            "contact_id": contact_id, "conversation_id": conversation_id, "address": address,
            "salt": salt, "code_hash": code_hash(salt, code), "attempts": 0,
            "created_at": now, "expires_at": expires, "used_at": None}, upsert=True)
        return code, expires

    async def check(self, requester: str, code: str) -> tuple[CodeState, Doc | None, int]:
        """Try ``code``: (state, the challenge, tries left). Only RIGHT links anything."""
        now = utcnow()
        counted = await self.codes.update_one(
            {"_id": requester, "used_at": None, "attempts": {"$lt": MAX_ATTEMPTS},
             "expires_at": {"$gt": now}},
            {"$inc": {"attempts": 1}})
        doc = await self.codes.find_one({"_id": requester})
        if doc is None or doc.get("used_at") is not None:
            return CodeState.NONE, doc, 0
        left = MAX_ATTEMPTS - int(doc["attempts"])
        if counted.matched_count != 1:
            if doc["expires_at"] <= now:
                return CodeState.EXPIRED, doc, left
            return CodeState.TOO_MANY, doc, 0
        if not hmac.compare_digest(code_hash(str(doc["salt"]), code), str(doc["code_hash"])):
            return (CodeState.WRONG if left > 0 else CodeState.TOO_MANY), doc, left
        won = await self.codes.update_one(
            {"_id": requester, "used_at": None, "code_hash": doc["code_hash"]},
            {"$set": {"used_at": now}})
        if won.matched_count != 1:  # a concurrent try with the same code won: fine, once
            return CodeState.NONE, doc, 0
        return CodeState.RIGHT, doc, left


async def ensure_indexes(store: Store) -> None:
    """Expired link codes, tokens and rate counters are removed by the server a day after
    they stop mattering (TTL indexes; lookups stay by ``_id``)."""
    day = 24 * 3600
    await store.db["email_codes"].create_indexes(
        [IndexModel([("expires_at", ASCENDING)], expireAfterSeconds=day, name="codes_ttl")])
    await store.db["email_code_limits"].create_indexes(
        [IndexModel([("created_at", ASCENDING)], expireAfterSeconds=day, name="limits_ttl")])
    await store.db["link_tokens"].create_indexes(
        [IndexModel([("expires_at", ASCENDING)], expireAfterSeconds=day, name="tokens_ttl")])
