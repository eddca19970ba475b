"""Agents and their API tokens. Tokens are random; the store keeps only their SHA-256."""

from __future__ import annotations

import hashlib
import secrets

from gateway.model import Agent, utcnow
from gateway.store import Store
from gateway.store.mongo import new_id

TOKEN_PREFIX = "og_"  # noqa: S105 - a prefix, not a secret


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _agent(doc: dict[str, object]) -> Agent:
    data = {k: v for k, v in doc.items() if k not in ("_id", "token_hash")}
    return Agent.model_validate({"id": doc["_id"], **data})


class Agents:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def add(self, name: str, email: str | None = None) -> tuple[Agent, str]:
        """Create an agent; returns it and its API token (shown once, never stored)."""
        name = name.strip()
        if not name:
            raise ValueError("an agent needs a name")
        if any(ord(c) < 32 or ord(c) == 127 for c in name + (email or "")):
            raise ValueError("an agent's name and email cannot contain control characters")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        agent = Agent(id=new_id(), name=name, email=email, created_at=utcnow())
        doc = agent.model_dump(mode="python")
        doc["_id"] = doc.pop("id")
        doc["token_hash"] = hash_token(token)
        await self.store.agents.insert_one(doc)
        return agent, token

    async def authenticate(self, token: str) -> Agent | None:
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        doc = await self.store.agents.find_one({"token_hash": hash_token(token), "active": True})
        return None if doc is None else _agent(doc)

    async def list(self) -> list[Agent]:
        return [_agent(doc) async for doc in self.store.agents.find().sort("created_at", 1)]

    async def count(self) -> int:
        return await self.store.agents.count_documents({})
