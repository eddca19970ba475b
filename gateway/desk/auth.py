"""Who may do what: passwords, console sessions, CSRF, login rate limits, roles.

- Passwords are argon2id hashes (argon2-cffi ``PasswordHasher``); a hash made with older
  parameters is replaced at the next successful login.
- The console signs in with email + password and gets a session cookie (HttpOnly,
  SameSite=Strict, Path=/, Secure over https). The cookie holds a random id; the store
  keeps only its SHA-256. A session ends when idle too long or at its absolute expiry.
- Requests authenticated by the cookie that change state must carry ``X-CSRF-Token`` (the
  session's synchronizer token); any cookie request from another site (``Origin`` or
  ``Sec-Fetch-Site``) is refused. Integrations use bearer API tokens: no cookie, no CSRF.
- Failed logins are counted in the store (so every process sees them) on three keys: the
  account from this client address (the pair), the client address (IPv6: its /64), and
  the account from everywhere. The pair and the address lock after too many failures in
  a window, for longer each time (429 with ``Retry-After``), even for the right password.
  The account-wide count only slows guessing spread over many addresses: past its limit
  the account locks for at most a minute, and only for addresses that have failed for it
  recently. So someone who knows an agent's email can lock out their own address, not
  the agent: the right password from an address that has not failed always gets in
  (unless that address shares the attacker's, e.g. one office NAT). An unknown email
  costs one argon2 verification too and gets the same answer.
- ``authorize(agent, roles)`` is the one role check: every API route calls it through the
  middleware, and the console socket will call it for every message.

Behind a reverse proxy: ``Secure`` follows ``request.secure`` and the client address is
``request.remote``; both are the client's when the proxy is in ``OMNIGATE_TRUSTED_PROXIES``
(gateway/proxies.py), else the proxy's.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import secrets
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from ipaddress import IPv6Address, IPv6Network
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from aiohttp import web
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from gateway.model import Agent, AgentRole, utcnow
from gateway.proxies import parse_address
from gateway.store import Store
from gateway.store.access import AttemptStore, SessionRecord, SessionStore, digest

if TYPE_CHECKING:
    from gateway.desk.agents import Agents

COOKIE = "omnigate_session"
CSRF_HEADER = "X-CSRF-Token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
ALL_ROLES: frozenset[AgentRole] = frozenset(AgentRole)
STAFF: frozenset[AgentRole] = frozenset({AgentRole.ADMIN, AgentRole.AGENT})
ADMIN_ONLY: frozenset[AgentRole] = frozenset({AgentRole.ADMIN})
MAX_PASSWORD = 1024  # characters: argon2 of a megabyte is a denial of service
MIN_PASSWORD = 10


# --------------------------------------------------------------------------- errors


class AccessError(Exception):
    """A refusal with its HTTP status; the API middleware turns it into a JSON error."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.headers = headers or {}


class NotAuthenticated(AccessError):
    status, code = 401, "unauthorized"


class Forbidden(AccessError):
    status, code = 403, "forbidden"


class TooManyAttempts(AccessError):
    status, code = 429, "too_many_attempts"

    def __init__(self, retry_after: float) -> None:
        self.retry_after = max(1, math.ceil(retry_after))
        super().__init__(
            f"too many failed sign-ins; try again in {self.retry_after} s",
            {"Retry-After": str(self.retry_after)},
        )


class BadInput(AccessError, ValueError):
    status, code = 400, "bad_request"


class Taken(AccessError, ValueError):
    status, code = 409, "conflict"


class NoSuchAgent(AccessError):
    status, code = 404, "not_found"


BAD_LOGIN = "wrong email or password"


# ---------------------------------------------------------------------------- roles


def authorize(agent: Agent | None, roles: Collection[AgentRole]) -> Agent:
    """The agent, if it may do something that needs one of ``roles``.

    Raises ``NotAuthenticated`` (no agent, or a deactivated one) or ``Forbidden`` (the
    agent's role is not among ``roles``; an empty ``roles`` forbids everyone).
    """
    if agent is None or not agent.active:
        raise NotAuthenticated("sign in first")
    if agent.role not in roles:
        allowed = ", ".join(sorted(r.value for r in roles)) or "nobody"
        raise Forbidden(f"role {agent.role.value} may not do this (allowed: {allowed})")
    return agent


# ------------------------------------------------------------------------ passwords


def check_password_rules(password: str) -> str:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise BadInput(f"a password has {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    return password


class Passwords:
    """argon2id hashing off the event loop, plus a dummy hash for unknown accounts."""

    def __init__(self, hasher: PasswordHasher | None = None) -> None:
        self.hasher = hasher or PasswordHasher()
        self._dummy: str | None = None

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(self.hasher.hash, password)

    async def verify(self, stored: str | None, password: str) -> bool:
        """True if ``password`` matches ``stored``. ``None`` (no such account, or no
        password) is checked against a dummy hash with the same parameters, so it takes
        as long as a real check, and is always False."""
        # Made before any first check (not only an unknown account's), with the current
        # parameters: the first check of each kind costs the same too.
        if self._dummy is None or self.hasher.check_needs_rehash(self._dummy):
            self._dummy = await self.hash(secrets.token_urlsafe(16))
        target = self._dummy if stored is None else stored
        try:
            await asyncio.to_thread(self.hasher.verify, target, password[:MAX_PASSWORD])
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
        return stored is not None

    def needs_rehash(self, stored: str) -> bool:
        try:
            return self.hasher.check_needs_rehash(stored)
        except InvalidHashError:
            return True


# ------------------------------------------------------------------------- sessions


@dataclass(frozen=True)
class SessionPolicy:
    idle: timedelta = timedelta(hours=2)
    absolute: timedelta = timedelta(hours=12)
    touch_every: timedelta = timedelta(minutes=1)  # write idle_until at most this often


@dataclass(frozen=True)
class NewSession:
    cookie: str  # the random id: goes to the browser, never to the store
    record: SessionRecord


class Sessions:
    def __init__(self, store: Store, policy: SessionPolicy | None = None) -> None:
        self.records = SessionStore(store)
        self.policy = policy or SessionPolicy()

    async def create(self, agent: Agent) -> NewSession:
        now = utcnow()
        cookie = secrets.token_urlsafe(32)
        expires = now + self.policy.absolute
        record = SessionRecord(
            id_hash=digest(cookie),
            agent_id=agent.id,
            csrf=secrets.token_urlsafe(32),
            created_at=now,
            expires_at=expires,
            idle_until=min(now + self.policy.idle, expires),
        )
        await self.records.create(record)
        return NewSession(cookie, record)

    async def resolve(self, cookie: str) -> SessionRecord | None:
        """The live session for a cookie value (its idle expiry slid forward), or None."""
        if not cookie or len(cookie) > 100:
            return None
        record = await self.records.get(digest(cookie))
        if record is None:
            return None
        now = utcnow()
        if now >= record.idle_until or now >= record.expires_at:
            await self.records.delete(record.id_hash)
            return None
        idle_until = min(now + self.policy.idle, record.expires_at)
        if idle_until - record.idle_until >= self.policy.touch_every:
            await self.records.extend(record, idle_until)
        return record

    async def end(self, cookie: str) -> bool:
        return await self.records.delete(digest(cookie))

    async def end_all(self, agent_id: str) -> int:
        return await self.records.delete_agent(agent_id)


# ---------------------------------------------------------------------- rate limits


@dataclass(frozen=True)
class LoginPolicy:
    window: timedelta = timedelta(minutes=15)
    pair_failures: int = 5  # per account from one client address in a window
    ip_failures: int = 20  # per client address in a window, whatever the accounts
    account_failures: int = 20  # per account from every address in a window: slows down
    first_lock: timedelta = timedelta(seconds=30)  # doubled at each further lock
    longest_lock: timedelta = timedelta(hours=1)
    longest_account_lock: timedelta = timedelta(minutes=1)  # the account-wide one
    forget: timedelta = timedelta(days=1)  # a quiet key forgets its lockouts


@dataclass(frozen=True)
class LoginKeys:
    account: str  # the account from every address: only slows down
    address: str  # the client address, whatever the account
    pair: str  # the account from this address

    def all(self) -> tuple[str, str, str]:
        return self.pair, self.address, self.account


def address_key(ip: str | None) -> str:
    """The throttled unit of a client address: itself, or for IPv6 its /64 (one host or
    one customer's network usually has a whole /64 to pick addresses from)."""
    address = parse_address(ip) if ip else None
    if address is None:
        return ip or "unknown"
    if isinstance(address, IPv6Address):
        return str(IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)


@dataclass
class LoginGuard:
    store: Store
    policy: LoginPolicy = field(default_factory=LoginPolicy)

    def __post_init__(self) -> None:
        self.attempts = AttemptStore(self.store)

    @staticmethod
    def keys(email: str, ip: str | None) -> LoginKeys:
        account, address = email.strip().lower()[:320], address_key(ip)
        return LoginKeys(f"account:{account}", f"ip:{address}", f"pair:{address}|{account}")

    async def locked_for(self, keys: LoginKeys) -> float:
        """Seconds until this address may try this account (0: now)."""
        now, wait = utcnow(), 0.0
        pair = await self.attempts.get(keys.pair)
        docs = [pair, await self.attempts.get(keys.address)]
        # the account-wide lock holds back only addresses that failed for it lately
        if pair is not None and pair["last_failure_at"] > now - self.policy.window:
            docs.append(await self.attempts.get(keys.account))
        for doc in docs:
            if doc is not None and doc.get("locked_until") and doc["locked_until"] > now:
                wait = max(wait, (doc["locked_until"] - now).total_seconds())
        return wait

    def _limit(self, key: str) -> int:
        if key.startswith("pair:"):
            return self.policy.pair_failures
        if key.startswith("ip:"):
            return self.policy.ip_failures
        return self.policy.account_failures

    def _lock_length(self, key: str, lockouts: int) -> timedelta:
        longest = (self.policy.longest_account_lock if key.startswith("account:")
                   else self.policy.longest_lock)
        length: timedelta = self.policy.first_lock * (2 ** min(lockouts, 20))
        return min(length, longest)

    async def failed(self, keys: LoginKeys) -> float:
        """Count a failure on every key; seconds of lockout it caused here (0: none)."""
        policy, wait = self.policy, 0.0
        for key in keys.all():
            now = utcnow()
            doc = await self.attempts.count_failure(key, now, policy.window, policy.forget)
            for _ in range(8):
                if doc["failures"] < self._limit(key):
                    break
                until = now + self._lock_length(key, doc["lockouts"])
                if await self.attempts.lock(doc, now, until):
                    wait = max(wait, (until - now).total_seconds())
                    break
                again = await self.attempts.get(key)  # another process counted or locked
                if again is None:
                    break
                doc = again
                if doc.get("locked_until") and doc["locked_until"] > now:
                    wait = max(wait, (doc["locked_until"] - now).total_seconds())
                    break
        return wait

    async def succeeded(self, keys: LoginKeys) -> None:
        # Only the pair forgets. The address keeps counting (one valid account must not
        # reset the counter of an address that guesses at others), and so does the
        # account (a sign-in must not reset guessing spread over many addresses).
        await self.attempts.clear(keys.pair)


# -------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Principal:
    agent: Agent
    session: SessionRecord | None  # None: an API token


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def cross_site(request: web.Request) -> bool:
    """Did a browser send this from another site? (``Sec-Fetch-Site`` or ``Origin``)"""
    if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
        return True
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    if origin == "null":
        return True
    return urlsplit(origin).netloc.lower() != (request.host or "").lower()


async def authenticate(request: web.Request, agents: Agents) -> Principal:
    """Who sent the request: a bearer token first (if one is sent, it alone counts), else
    the session cookie. A cookie request from another site, or one that changes state
    without the session's CSRF token, is refused."""
    token = bearer(request)
    if token is not None:
        agent = await agents.authenticate(token)
        if agent is None:
            raise NotAuthenticated("the bearer token is invalid, revoked or its agent inactive")
        return Principal(agent, None)
    cookie = request.cookies.get(COOKIE)
    if not cookie:
        raise NotAuthenticated(
            "sign in (POST /api/v1/session) or send Authorization: Bearer <agent token>"
        )
    if cross_site(request):
        raise Forbidden("cross-site request refused")
    record = await agents.sessions.resolve(cookie)
    agent = None if record is None else await agents.get(record.agent_id)
    if record is None or agent is None or not agent.active:
        raise NotAuthenticated("the session has expired or ended; sign in again")
    if request.method in UNSAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(sent.encode(), record.csrf.encode()):
            raise Forbidden(
                f"missing or wrong {CSRF_HEADER} header: send the csrf_token from "
                "GET /api/v1/session with every POST, PUT, PATCH and DELETE"
            )
    return Principal(agent, record)


async def login(
    agents: Agents, email: str, password: str, ip: str | None
) -> tuple[Agent, NewSession]:
    """Check the credentials under the rate limits; a new session for the agent."""
    guard = agents.guard
    keys = guard.keys(email, ip)
    wait = await guard.locked_for(keys)
    if wait > 0:
        raise TooManyAttempts(wait)
    agent = await agents.check_password(email, password)
    if agent is None:
        wait = await guard.failed(keys)
        if wait > 0:
            raise TooManyAttempts(wait)
        raise NotAuthenticated(BAD_LOGIN)
    await guard.succeeded(keys)
    return agent, await agents.sessions.create(agent)


def set_cookie(request: web.Request, response: web.StreamResponse, session: NewSession) -> None:
    response.set_cookie(
        COOKIE,
        session.cookie,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )


def clear_cookie(request: web.Request, response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE, path="/", httponly=True, samesite="Strict",
                        secure=request.secure)


def session_expiry(record: SessionRecord) -> tuple[datetime, datetime]:
    return record.idle_until, record.expires_at
