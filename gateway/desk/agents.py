"""Agents: role, teams, skills, capacity, API token and (optionally) a console password.

API tokens are random; the store keeps only their SHA-256. Passwords are argon2id hashes.
An agent signs in to the console with its email, which is unique (case-insensitive) among
agents; agents without an email use their API token only.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable
from typing import Any

from argon2 import PasswordHasher
from pymongo.errors import DuplicateKeyError

from gateway.desk.auth import (
    BadInput,
    LoginGuard,
    LoginPolicy,
    Passwords,
    SessionPolicy,
    Sessions,
    Taken,
    check_password_rules,
)
from gateway.model import Agent, AgentRole, utcnow
from gateway.store import Store
from gateway.store.mongo import new_id

TOKEN_PREFIX = "og_"  # noqa: S105 - a prefix, not a secret
HIDDEN = ("_id", "token_hash", "password_hash", "email_key")
EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}$")
LABEL = re.compile(r"^[\w.-]{1,64}$")  # a team or skill name
# The same rules as JSON Schema patterns for the API's spec (ECMA 262 and Python agree on
# these explicit classes; str.strip() removes exactly SPACE).
CONTROL = "\\x00-\\x1f\\x7f-\\x9f"
SPACE = ("\\t\\n\\x0b\\x0c\\r\\x1c-\\x1f \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028"
         "\\u2029\\u202f\\u205f\\u3000")
NAME_PATTERN = (f"^[{SPACE}]*[^{CONTROL}{SPACE}]([^{CONTROL}]*[^{CONTROL}{SPACE}])?"
                f"[{SPACE}]*$")  # stripped: not empty, no control characters
BLANK = "\\u0020\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"  # no control
EMAIL_PATTERN = (f"^[{BLANK}]*[^@{CONTROL}{SPACE}]{{1,64}}@[^@{CONTROL}{SPACE}]{{1,255}}"
                 f"[{BLANK}]*$")
LABEL_PATTERN = f"^[{SPACE}]*[\\w.-]{{1,64}}[{SPACE}]*$"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def email_key(email: str) -> str:
    return email.strip().lower()


def _agent(doc: dict[str, Any]) -> Agent:
    data = {k: v for k, v in doc.items() if k not in HIDDEN}
    return Agent.model_validate({"id": doc["_id"], **data})


def _check_text(name: str, email: str | None) -> None:
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in name + (email or "")):  # C0, C1
        raise BadInput("an agent's name and email cannot contain control characters")


def _check_email(email: str) -> str:
    email = email.strip()
    if not EMAIL.match(email):
        raise BadInput(f"{email!r} is not an email address")
    return email


def _labels(kind: str, values: Iterable[str]) -> list[str]:
    out: list[str] = []
    for raw in values:
        value = raw.strip()
        if not LABEL.match(value):
            raise BadInput(f"a {kind} name is 1-64 letters, digits, '_', '.' or '-' "
                           f"(got {value!r})")
        if value not in out:
            out.append(value)
    return out


class Agents:
    """The agents collection, with the access services that belong to it."""

    def __init__(
        self,
        store: Store,
        *,
        hasher: PasswordHasher | None = None,
        session_policy: SessionPolicy | None = None,
        login_policy: LoginPolicy | None = None,
    ) -> None:
        self.store = store
        self.passwords = Passwords(hasher)
        self.sessions = Sessions(store, session_policy)
        self.guard = LoginGuard(store, login_policy or LoginPolicy())

    async def add(
        self,
        name: str,
        email: str | None = None,
        *,
        role: AgentRole = AgentRole.AGENT,
        teams: Iterable[str] = (),
        skills: Iterable[str] = (),
        capacity: int = 3,
        password: str | None = None,
    ) -> tuple[Agent, str]:
        """Create an agent; returns it and its API token (shown once, never stored)."""
        name = name.strip()
        if not name:
            raise ValueError("an agent needs a name")
        _check_text(name, email)
        if email is not None:
            email = _check_email(email)
        if password is not None:
            if email is None:
                raise BadInput("an agent with a password needs an email to sign in with")
            check_password_rules(password)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        agent = Agent(
            id=new_id(), name=name, email=email, created_at=utcnow(), role=role,
            teams=_labels("team", teams), skills=_labels("skill", skills), capacity=capacity,
        )
        doc = agent.model_dump(mode="python")
        doc["_id"] = doc.pop("id")
        doc["token_hash"] = hash_token(token)
        if email is not None:
            doc["email_key"] = email_key(email)
        if password is not None:
            doc["password_hash"] = await self.passwords.hash(password)
        try:
            await self.store.agents.insert_one(doc)
        except DuplicateKeyError:
            raise Taken(f"another agent already signs in with {email}") from None
        return agent, token

    async def update(self, agent_id: str, changes: dict[str, Any]) -> Agent | None:
        """Change the given fields (name, email, role, teams, skills, capacity, active,
        password). A new password or a deactivation ends the agent's sessions."""
        doc = await self.store.agents.find_one({"_id": agent_id})
        if doc is None:
            return None
        update: dict[str, Any] = {}
        if "name" in changes:
            name = str(changes["name"]).strip()
            if not name:
                raise BadInput("an agent needs a name")
            _check_text(name, None)
            update["name"] = name
        if "email" in changes:
            email = changes["email"]
            if email is None:
                if doc.get("password_hash"):
                    raise BadInput("an agent with a password needs an email to sign in with")
                update["email"] = None
            else:
                _check_text("", email)
                update["email"] = _check_email(email)
                update["email_key"] = email_key(update["email"])
        if "role" in changes:
            update["role"] = AgentRole(changes["role"]).value
        for kind in ("teams", "skills"):
            if kind in changes:
                update[kind] = _labels(kind[:-1], changes[kind])
        if "capacity" in changes:
            update["capacity"] = int(changes["capacity"])
            if not 0 <= update["capacity"] <= 100:
                raise BadInput("capacity is 0 to 100 conversations")
        if "active" in changes:
            update["active"] = bool(changes["active"])
        if changes.get("password") is not None:
            if not (update.get("email") or doc.get("email")):
                raise BadInput("an agent with a password needs an email to sign in with")
            update["password_hash"] = await self.passwords.hash(
                check_password_rules(changes["password"])
            )
        final_email = update["email"] if "email" in update else doc.get("email")
        if update and final_email:  # also gives agents from before sign-in their login key
            update["email_key"] = email_key(final_email)
        operation: dict[str, Any] = {"$set": update}
        if "email" in changes and changes["email"] is None:
            operation["$unset"] = {"email_key": ""}
        if update:
            try:
                await self.store.agents.update_one({"_id": agent_id}, operation)
            except DuplicateKeyError:
                raise Taken(f"another agent already signs in with {changes['email']}") from None
        if "password_hash" in update or update.get("active") is False:
            await self.sessions.end_all(agent_id)
        return await self.get(agent_id)

    async def get(self, agent_id: str) -> Agent | None:
        doc = await self.store.agents.find_one({"_id": agent_id})
        return None if doc is None else _agent(doc)

    async def authenticate(self, token: str) -> Agent | None:
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        doc = await self.store.agents.find_one({"token_hash": hash_token(token), "active": True})
        return None if doc is None else _agent(doc)

    async def check_password(self, email: str, password: str) -> Agent | None:
        """The active agent with this email and password, else None.

        Exactly one argon2 verification whatever the outcome (an unknown email is checked
        against a dummy hash), so the answer's timing does not tell whether the account
        exists. A hash made with older parameters is replaced (conditional on it being
        unchanged, so a concurrent password change wins).
        """
        key = email_key(email)
        doc = await self.store.agents.find_one({"email_key": key}) if key else None
        stored = doc.get("password_hash") if doc is not None else None
        if not await self.passwords.verify(stored, password) or doc is None or stored is None:
            return None
        if not doc.get("active", True):
            return None
        if self.passwords.needs_rehash(stored):
            fresh = await self.passwords.hash(password)
            await self.store.agents.update_one(
                {"_id": doc["_id"], "password_hash": stored}, {"$set": {"password_hash": fresh}}
            )
        return _agent(doc)

    async def list(self) -> list[Agent]:
        return [_agent(doc) async for doc in self.store.agents.find().sort("created_at", 1)]

    async def count(self) -> int:
        return await self.store.agents.count_documents({})
