"""Web chat visitor tokens: signed, so a new visitor costs the store nothing.

A token is ``v1.<visitor_id>.<mac>``: ``mac`` is the unpadded base64url HMAC-SHA256 of
``v1.<visitor_id>`` under a key derived from the gateway's secret. Whoever holds the token
is that visitor; nobody can make one for another visitor id without the secret. Nothing is
written when a token is issued: the visitor's contact, identity and conversation are
created by their first message (gateway/pipeline.py, from ``sender_external_id``).

The secret is ``OMNIGATE_SECRET_KEY`` if set, else a random one kept in the store
(``channel_state`` ``webchat:token_secret``), created once by an insert that tolerates
another process inserting it first, so every process on one store accepts every other's
tokens. Set the same ``OMNIGATE_SECRET_KEY`` on all processes or on none. Changing it (or
deleting that document) makes every issued signed token invalid: visitors start anew.

Tokens issued before (random strings whose SHA-256 is in ``channel_state`` as
``webchat:token:<sha256>``) keep working: they never contain a ``.``, so the two kinds
cannot be confused, and they are looked up as before.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import re
import secrets

from pymongo.errors import DuplicateKeyError

from gateway.model import utcnow
from gateway.store import Store

CHANNEL = "webchat"
VERSION = "v1"
SECRET_ID = f"{CHANNEL}:token_secret"  # channel_state document of the stored secret
VISITOR_ID = re.compile(r"^v_[A-Za-z0-9_-]{8,64}$")
CONTEXT = b"omnigate webchat visitor token"  # key derivation: this key signs nothing else


def new_visitor_id() -> str:
    return "v_" + secrets.token_urlsafe(12)


def legacy_key(token: str) -> str:
    """The ``channel_state`` key (after ``webchat:``) of a token stored by older versions."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()


class TokenSigner:
    """Signs and checks visitor tokens with one secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the token secret must have at least 16 bytes")
        self._key = hmac.new(secret, CONTEXT, hashlib.sha256).digest()

    def _mac(self, visitor_id: str) -> str:
        digest = hmac.new(self._key, f"{VERSION}.{visitor_id}".encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()

    def issue(self, visitor_id: str) -> str:
        return f"{VERSION}.{visitor_id}.{self._mac(visitor_id)}"

    def verify(self, token: str) -> str | None:
        """The visitor id a signed token binds, or None (garbled, forged, not signed).

        The MAC is compared as text, so a changed character is refused even where
        base64 would decode it to the same bytes."""
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != VERSION or not VISITOR_ID.match(parts[1]):
            return None
        expected = self._mac(parts[1]).encode()
        return parts[1] if hmac.compare_digest(expected, parts[2].encode()) else None


def is_signed(token: str) -> bool:
    """A token in the signed format (valid or not); older tokens never contain a dot."""
    return token.startswith(VERSION + ".")


async def load_secret(store: Store) -> bytes:
    """The store's token secret, created on first use (a concurrent creator may win: then
    its secret is the one everybody uses)."""
    doc = await store.channel_state.find_one({"_id": SECRET_ID})
    if doc is None:
        with contextlib.suppress(DuplicateKeyError):  # another process was first: fine
            await store.channel_state.insert_one(
                {"_id": SECRET_ID, "secret": secrets.token_hex(32), "created_at": utcnow()})
        doc = await store.channel_state.find_one({"_id": SECRET_ID})
    if doc is None or not isinstance(doc.get("secret"), str):
        raise RuntimeError(f"channel_state {SECRET_ID!r} has no usable secret")
    return bytes.fromhex(doc["secret"])
