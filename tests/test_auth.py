"""Agents and access over real HTTP: sign-in, cookies, CSRF, rate limits, roles on every route.

A real gateway on a real port, a real store. The role matrix iterates over the API's own
endpoint table, so a new route cannot slip through without a role check.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import ssl
import subprocess
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from argon2 import PasswordHasher
from bson import ObjectId

from gateway.app import create_app
from gateway.desk.agents import Agents
from gateway.desk.auth import (
    ADMIN_ONLY,
    ALL_ROLES,
    BAD_LOGIN,
    COOKIE,
    Forbidden,
    LoginPolicy,
    NotAuthenticated,
    authorize,
)
from gateway.desk.openapi import ENDPOINTS, Endpoint
from gateway.keys import AGENTS, ROUTING
from gateway.model import Agent, AgentRole, utcnow
from gateway.settings import Settings
from gateway.store import Store
from tests.conftest import Gateway
from tests.test_api import bot_conversation
from tests.test_cli import COMMAND, clean_env, omnigate

PASSWORD = "correct horse battery"


class CountingHasher(PasswordHasher):
    """A cheap argon2id hasher that counts verifications (each costs the same)."""

    def __init__(self, **params: Any) -> None:
        super().__init__(**({"time_cost": 1, "memory_cost": 8192, "parallelism": 1} | params))
        self.verified = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        self.verified += 1
        return super().verify(hash, password)


def agents_of(gateway: Gateway) -> Agents:
    return gateway.app[AGENTS]


@pytest.fixture
async def hasher(gateway: Gateway) -> CountingHasher:
    counting = CountingHasher()
    agents_of(gateway).passwords.hasher = counting
    return counting


async def person(
    gateway: Gateway, name: str, role: AgentRole = AgentRole.AGENT, *, password: bool = True
) -> tuple[Agent, dict[str, str]]:
    """An agent with an email (name@example.com) and, by default, PASSWORD."""
    agent, token = await agents_of(gateway).add(
        name, f"{name.lower()}@example.com", role=role, password=PASSWORD if password else None
    )
    return agent, {"Authorization": f"Bearer {token}"}


async def request(
    gateway: Gateway, method: str, path: str, headers: dict[str, str] | None = None, **kw: Any
) -> tuple[int, Any, aiohttp.ClientResponse]:
    """One request to /api/v1 (or an absolute /api path); (status, JSON or None, response)."""
    url = gateway.url + (path if path.startswith("/api/") else "/api/v1" + path)
    async with gateway.http.request(method, url, headers=headers or {}, **kw) as response:
        body = await response.json() if response.content_type == "application/json" else None
        return response.status, body, response


async def sign_in(
    gateway: Gateway, email: str, password: str = PASSWORD, **headers: str
) -> tuple[int, Any, aiohttp.ClientResponse]:
    return await request(
        gateway, "POST", "/session", headers, json={"email": email, "password": password}
    )


def session_cookie(response: aiohttp.ClientResponse) -> str:
    return response.cookies[COOKIE].value


def with_cookie(cookie: str, **headers: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE}={cookie}", **headers}


async def signed_in(gateway: Gateway, email: str) -> tuple[str, str]:
    """(cookie value, csrf token) of a new session."""
    status, body, response = await sign_in(gateway, email)
    assert status == 200, body
    return session_cookie(response), body["csrf_token"]


async def queued(gateway: Gateway, visitor: str = "v_auth") -> str:
    conversation_id = await bot_conversation(gateway, visitor)
    assert await gateway.app[ROUTING].handoff(conversation_id, "test: needs a human")
    return conversation_id


# ------------------------------------------------------------------- sessions


@pytest.mark.usefixtures("hasher")
async def test_sign_in_sets_a_strict_http_only_cookie_and_sign_out_ends_it(
    gateway: Gateway,
) -> None:
    alice, _ = await person(gateway, "Alice")
    status, body, response = await sign_in(gateway, "  ALICE@example.com ")
    assert status == 200, body
    assert (body["via"], body["agent"]["id"], body["agent"]["role"]) == (
        "session", alice.id, "agent")
    [raw] = response.headers.getall("Set-Cookie")
    attributes = {part.strip().split("=")[0].lower() for part in raw.split(";")}
    assert {"httponly", "path", "samesite"} <= attributes and "secure" not in attributes
    assert "SameSite=Strict" in raw and "Path=/" in raw
    cookie, csrf = session_cookie(response), body["csrf_token"]
    assert len(cookie) >= 40 and len(csrf) >= 40 and cookie != csrf

    # only the id's hash is stored, with an idle and an absolute expiry
    [doc] = await gateway.store.db["sessions"].find().to_list()
    assert doc["_id"] == hashlib.sha256(cookie.encode()).hexdigest()
    assert cookie not in json.dumps(doc, default=str)
    assert doc["created_at"] < doc["idle_until"] <= doc["expires_at"]
    assert doc["expires_at"] - doc["created_at"] == agents_of(gateway).sessions.policy.absolute

    status, me, _ = await request(gateway, "GET", "/me", with_cookie(cookie))
    assert (status, me["id"]) == (200, alice.id)
    status, again, _ = await request(gateway, "GET", "/session", with_cookie(cookie))
    assert (status, again["csrf_token"], again["via"]) == (200, csrf, "session")

    status, error, _ = await request(gateway, "DELETE", "/session", with_cookie(cookie))
    assert (status, error["error"]) == (403, "forbidden")  # sign-out needs the CSRF token too
    status, _, response = await request(
        gateway, "DELETE", "/session", with_cookie(cookie, **{"X-CSRF-Token": csrf}))
    assert status == 204
    [cleared] = response.headers.getall("Set-Cookie")
    assert cleared.startswith(f"{COOKIE}=") and "Max-Age=0" in cleared
    assert await gateway.store.db["sessions"].count_documents({}) == 0
    status, error, response = await request(gateway, "GET", "/me", with_cookie(cookie))
    assert (status, error["error"]) == (401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.usefixtures("hasher")
async def test_expired_sessions_are_refused(gateway: Gateway) -> None:
    await person(gateway, "Alice")
    idle_cookie, _ = await signed_in(gateway, "alice@example.com")
    old_cookie, _ = await signed_in(gateway, "alice@example.com")
    sessions = gateway.store.db["sessions"]
    past = utcnow() - timedelta(seconds=1)
    digest = hashlib.sha256(idle_cookie.encode()).hexdigest()
    await sessions.update_one({"_id": digest}, {"$set": {"idle_until": past}})
    digest = hashlib.sha256(old_cookie.encode()).hexdigest()
    await sessions.update_one({"_id": digest}, {"$set": {"expires_at": past}})
    for cookie in (idle_cookie, old_cookie):
        assert (await request(gateway, "GET", "/me", with_cookie(cookie)))[0] == 401
    assert await sessions.count_documents({}) == 0  # and they were removed


@pytest.mark.usefixtures("hasher")
async def test_signing_in_again_ends_the_browsers_previous_session(gateway: Gateway) -> None:
    await person(gateway, "Alice")
    first, _ = await signed_in(gateway, "alice@example.com")
    status, _, response = await sign_in(gateway, "alice@example.com", **with_cookie(first))
    assert status == 200 and session_cookie(response) != first
    assert (await request(gateway, "GET", "/me", with_cookie(first)))[0] == 401
    assert (await request(gateway, "GET", "/me", with_cookie(session_cookie(response))))[0] \
        == 200
    assert await gateway.store.db["sessions"].count_documents({}) == 1


async def test_secure_cookie_over_https(settings: Settings, tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    app = create_app(settings)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(ssl=context)
    try:
        await app[AGENTS].add("Alice", "alice@example.com", password=PASSWORD)
        async with aiohttp.ClientSession() as http:
            url = str(server.make_url("/api/v1/session"))
            assert url.startswith("https://")
            async with http.post(url, ssl=False, json={"email": "alice@example.com",
                                                       "password": PASSWORD}) as response:
                assert response.status == 200
                [raw] = response.headers.getall("Set-Cookie")
        assert re.search(r";\s*Secure", raw, re.IGNORECASE) and "HttpOnly" in raw
    finally:
        await server.close()


# ---------------------------------------------------------------- credentials


async def test_wrong_unknown_inactive_and_passwordless_look_the_same(
    gateway: Gateway, hasher: CountingHasher
) -> None:
    await person(gateway, "Alice")
    carol, _ = await person(gateway, "Carol")
    await agents_of(gateway).update(carol.id, {"active": False})
    await person(gateway, "Dave", password=False)
    answers = []
    for email, password in [
        ("alice@example.com", "wrong password!"),
        ("nobody@example.com", "wrong password!"),
        ("carol@example.com", PASSWORD),  # right password, deactivated
        ("dave@example.com", PASSWORD),  # has no password
        ("not an email", PASSWORD),
    ]:
        before = hasher.verified
        status, body, response = await sign_in(gateway, email, password)
        assert hasher.verified - before == 1, email  # one argon2 check, whoever it is
        assert COOKIE not in response.cookies
        answers.append((status, body))
    assert answers == [(401, {"error": "unauthorized", "message": BAD_LOGIN})] * 5
    assert await gateway.store.db["sessions"].count_documents({}) == 0
    for body in ({"email": "alice@example.com"}, {"email": "a", "password": "x" * 1025}, "x"):
        status, error, _ = await request(gateway, "POST", "/session", json=body)
        assert (status, error["error"]) == (400, "bad_request")


async def test_stored_password_is_an_argon2id_hash_and_is_rehashed(gateway: Gateway) -> None:
    agents = agents_of(gateway)
    agent, _ = await agents.add("Alice", "alice@example.com", password=PASSWORD)  # defaults
    doc = await gateway.store.agents.find_one({"_id": agent.id})
    assert doc is not None and doc["password_hash"].startswith("$argon2id$v=19$m=65536,t=3,")
    assert PASSWORD not in json.dumps(doc, default=str)
    assert PasswordHasher().verify(doc["password_hash"], PASSWORD)

    agents.passwords.hasher = CountingHasher()  # parameters changed: m=8192,t=1
    assert (await sign_in(gateway, "alice@example.com"))[0] == 200
    doc = await gateway.store.agents.find_one({"_id": agent.id})
    assert doc is not None and doc["password_hash"].startswith("$argon2id$v=19$m=8192,t=1,")
    assert (await sign_in(gateway, "alice@example.com"))[0] == 200  # the new hash works
    assert (await sign_in(gateway, "alice@example.com", "not the password"))[0] == 401


# ---------------------------------------------------------------- rate limits


async def second_gateway(settings: Settings) -> AsyncIterator[tuple[TestServer, str]]:
    app = create_app(settings)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield server, str(server.make_url("/api/v1/session"))
    finally:
        await server.close()


@pytest.mark.usefixtures("hasher")
async def test_failed_sign_ins_lock_the_account_from_that_address_for_longer_each_time(
    gateway: Gateway, settings: Settings
) -> None:
    agents = agents_of(gateway)
    agents.guard.policy = LoginPolicy(pair_failures=3, ip_failures=1000)
    await person(gateway, "Alice")
    for _ in range(2):
        assert (await sign_in(gateway, "alice@example.com", "guess guess"))[0] == 401
    status, error, response = await sign_in(gateway, "alice@example.com", "guess guess")
    assert (status, error["error"]) == (429, "too_many_attempts")
    assert response.headers["Retry-After"] == "30"
    # the right password is refused while locked, here and in another gateway process
    status, error, response = await sign_in(gateway, "alice@example.com")
    assert status == 429 and 1 <= int(response.headers["Retry-After"]) <= 30
    other = second_gateway(settings)
    _, url = await anext(other)
    try:
        async with aiohttp.ClientSession() as http, http.post(
            url, json={"email": "alice@example.com", "password": PASSWORD}
        ) as answer:
            assert answer.status == 429 and int(answer.headers["Retry-After"]) >= 1
    finally:
        await other.aclose()

    # the lock passes (time moved on in the store); three failures lock for twice as long
    attempts = gateway.store.db["login_attempts"]
    past = utcnow() - timedelta(seconds=1)
    pair = "pair:127.0.0.1|alice@example.com"  # this address's record for the account
    await attempts.update_one({"_id": pair}, {"$set": {"locked_until": past}})
    for _ in range(2):
        assert (await sign_in(gateway, "alice@example.com", "guess guess"))[0] == 401
    status, _, response = await sign_in(gateway, "alice@example.com", "guess guess")
    assert (status, response.headers["Retry-After"]) == (429, "60")

    # after the lock: the right password works and the pair's record is cleared
    await attempts.update_one({"_id": pair}, {"$set": {"locked_until": past}})
    assert (await sign_in(gateway, "alice@example.com"))[0] == 200
    assert await attempts.find_one({"_id": pair}) is None

    # an unknown account is locked exactly the same way (nothing to enumerate)
    answers = [await sign_in(gateway, "ghost@example.com", "guess guess") for _ in range(3)]
    assert [(a[0], a[1]["error"]) for a in answers] == [
        (401, "unauthorized"), (401, "unauthorized"), (429, "too_many_attempts")]
    assert answers[2][2].headers["Retry-After"] == "30"


@pytest.mark.usefixtures("hasher")
async def test_one_address_guessing_many_accounts_is_locked(gateway: Gateway) -> None:
    agents_of(gateway).guard.policy = LoginPolicy(pair_failures=100, ip_failures=4)
    await person(gateway, "Alice")
    statuses = [(await sign_in(gateway, f"user{n}@example.com", "guess guess"))[0]
                for n in range(4)]
    assert statuses == [401, 401, 401, 429]
    status, _, response = await sign_in(gateway, "alice@example.com")
    assert status == 429 and int(response.headers["Retry-After"]) >= 1
    doc = await gateway.store.db["login_attempts"].find_one({"_id": "ip:127.0.0.1"})
    assert doc is not None and doc["lockouts"] == 1


# ----------------------------------------------------------- CSRF and origins


@pytest.mark.usefixtures("hasher")
async def test_cookie_requests_that_change_state_need_the_csrf_token(gateway: Gateway) -> None:
    await person(gateway, "Alice")
    _, bob = await person(gateway, "Bob")
    cookie, csrf = await signed_in(gateway, "alice@example.com")
    _, other_csrf = await signed_in(gateway, "bob@example.com")
    first, second = await queued(gateway, "v_one"), await queued(gateway, "v_two")
    for headers in (with_cookie(cookie), with_cookie(cookie, **{"X-CSRF-Token": other_csrf}),
                    with_cookie(cookie, **{"X-CSRF-Token": ""})):
        status, error, _ = await request(gateway, "POST", f"/conversations/{first}/claim",
                                         headers)
        assert (status, error["error"]) == (403, "forbidden")
        assert "X-CSRF-Token" in error["message"]
    conversation = await gateway.store.get_conversation(first)
    assert conversation is not None and conversation.owner == "queued"  # nothing happened
    status, claimed, _ = await request(gateway, "POST", f"/conversations/{first}/claim",
                                       with_cookie(cookie, **{"X-CSRF-Token": csrf}))
    assert (status, claimed["owner"]) == (200, "agent")
    # reads need no token; bearer tokens are exempt
    assert (await request(gateway, "GET", f"/conversations/{first}", with_cookie(cookie)))[0] \
        == 200
    status, claimed, _ = await request(gateway, "POST", f"/conversations/{second}/claim", bob)
    assert (status, claimed["owner"]) == (200, "agent")


@pytest.mark.usefixtures("hasher")
async def test_cross_site_cookie_requests_are_refused(gateway: Gateway) -> None:
    _, token = await person(gateway, "Alice")
    cookie, _ = await signed_in(gateway, "alice@example.com")
    for cross in ({"Origin": "https://evil.example"}, {"Origin": "null"},
                  {"Sec-Fetch-Site": "cross-site"}):
        status, error, _ = await request(gateway, "GET", "/me", with_cookie(cookie, **cross))
        assert (status, error["error"]) == (403, "forbidden"), cross
        status, error, response = await sign_in(gateway, "alice@example.com", **cross)
        assert (status, error["error"]) == (403, "forbidden") and COOKIE not in response.cookies
        assert (await request(gateway, "GET", "/me", {**token, **cross}))[0] == 200
    same = {"Origin": gateway.url, "Sec-Fetch-Site": "same-origin"}
    assert (await request(gateway, "GET", "/me", with_cookie(cookie, **same)))[0] == 200
    assert (await sign_in(gateway, "alice@example.com", **same))[0] == 200


# ---------------------------------------------------------------------- roles


def test_authorize_is_the_one_role_check() -> None:
    now = utcnow()
    agent = Agent(id="a1", name="A", created_at=now, role=AgentRole.AGENT)
    designer = agent.model_copy(update={"role": AgentRole.DESIGNER})
    assert authorize(agent, {AgentRole.AGENT, AgentRole.ADMIN}) is agent
    assert authorize(designer, ALL_ROLES) is designer
    with pytest.raises(NotAuthenticated):
        authorize(None, ALL_ROLES)
    with pytest.raises(NotAuthenticated):
        authorize(agent.model_copy(update={"active": False}), ALL_ROLES)
    with pytest.raises(Forbidden, match="designer"):
        authorize(designer, {AgentRole.AGENT, AgentRole.ADMIN})
    with pytest.raises(Forbidden):
        authorize(agent, ADMIN_ONLY)
    with pytest.raises(Forbidden):
        authorize(agent, ())


SAMPLE_BODIES: dict[str, Any] = {
    "LoginIn": {"email": "agent@example.com", "password": PASSWORD},
    "ReplyIn": {"text": "hello"},
    "AgentCreate": {"name": "New", "role": "agent", "skills": ["billing"]},
    "AgentUpdate": {"skills": ["billing", "refunds"]},
}


def desk_endpoints(gateway: Gateway) -> list[Endpoint]:
    [table] = [app[ENDPOINTS] for app in gateway.app._subapps if ENDPOINTS in app]
    return list(table.values())


@pytest.mark.usefixtures("hasher")
async def test_every_route_checks_its_roles(gateway: Gateway) -> None:
    tokens = {role: (await person(gateway, role.value.title(), role))[1] for role in AgentRole}
    target, _ = await person(gateway, "Target")
    conversation_id = await queued(gateway, "v_matrix")
    conversation = await gateway.store.get_conversation(conversation_id)
    assert conversation is not None
    ids = {"/v1/conversations/": conversation_id, "/v1/contacts/": conversation.contact_id,
           "/v1/agents/": target.id}
    endpoints = desk_endpoints(gateway)
    assert len(endpoints) >= 18
    for ep in endpoints:
        assert ep.roles and set(ep.roles) <= set(AgentRole), ep.path
        if ep.tag in ("conversations", "contacts"):
            assert AgentRole.DESIGNER not in ep.roles, ep.path
        if ep.tag == "admin" or ep.path.startswith("/v1/agents"):
            assert ep.roles == ADMIN_ONLY, ep.path
    checked = 0
    for ep in endpoints:
        known = [v for prefix, v in ids.items() if ep.path.startswith(prefix)]
        path = ep.path.replace("{id}", known[0] if known else str(ObjectId())).replace(
            "{name}", "missing.js")
        body = SAMPLE_BODIES.get(ep.body.__name__, {}) if ep.body else None
        where = f"{ep.method} {ep.path}"
        status, answer, _ = await request(gateway, ep.method, "/api" + path, json=body)
        if not ep.auth:
            assert status not in (401, 403), where
            continue
        assert (status, answer["error"]) == (401, "unauthorized"), where
        for role, headers in tokens.items():
            status, answer, _ = await request(gateway, ep.method, "/api" + path, headers,
                                              json=body)
            if role in ep.roles:
                assert status < 500 and status not in (401, 403), (where, role, answer)
                if ep.method == "GET" and ("{id}" not in ep.path or known):
                    assert status == 200, (where, role, answer)
            else:
                assert (status, answer["error"]) == (403, "forbidden"), (where, role)
            checked += 1
    assert checked >= 3 * 16

    # unknown routes need a signed-in agent too, and say nothing about what exists
    assert (await request(gateway, "GET", "/nothing/here"))[0] == 401
    assert (await request(gateway, "GET", "/nothing/here", tokens[AgentRole.DESIGNER]))[0] \
        == 404


async def test_openapi_documents_roles_and_both_schemes(gateway: Gateway) -> None:
    status, spec, _ = await request(gateway, "GET", "/api/openapi.json")
    assert status == 200
    schemes = spec["components"]["securitySchemes"]
    assert schemes["agentToken"]["scheme"] == "bearer"
    assert (schemes["sessionCookie"]["in"], schemes["sessionCookie"]["name"]) == ("cookie",
                                                                                 COOKIE)
    assert {"agentToken": []} in spec["security"] and {"sessionCookie": []} in spec["security"]
    for ep in desk_endpoints(gateway):
        op = spec["paths"]["/api" + ep.path][ep.method.lower()]
        if not ep.auth:
            assert op["security"] == [] and "x-roles" not in op
            continue
        assert op["x-roles"] == sorted(r.value for r in ep.roles)
        assert {"401", "403"} <= set(op["responses"]) and "Roles:" in op["description"]
        csrf = [p for p in op["parameters"] if p["name"] == "X-CSRF-Token"]
        assert bool(csrf) == (ep.method != "GET"), ep.path
    assert "429" in spec["paths"]["/api/v1/session"]["post"]["responses"]


# --------------------------------------------------------------------- admins


@pytest.mark.usefixtures("hasher")
async def test_admins_manage_agents(gateway: Gateway) -> None:
    admin, admin_token = await person(gateway, "Root", AgentRole.ADMIN)
    status, created, _ = await request(gateway, "POST", "/agents", admin_token, json={
        "name": "Dana", "email": "Dana@Example.com", "role": "designer", "teams": ["flows"],
        "skills": ["billing", "billing"], "capacity": 0, "password": PASSWORD})
    assert status == 201, created
    dana = created["agent"]
    assert (dana["role"], dana["teams"], dana["skills"], dana["capacity"]) == (
        "designer", ["flows"], ["billing"], 0)
    dana_token = {"Authorization": f"Bearer {created['token']}"}
    assert (await request(gateway, "GET", "/me", dana_token))[1]["role"] == "designer"
    assert (await request(gateway, "GET", "/conversations", dana_token))[0] == 403
    cookie, _ = await signed_in(gateway, "dana@example.com")

    status, listed, _ = await request(gateway, "GET", "/agents", admin_token)
    assert status == 200 and [a["name"] for a in listed["items"]] == ["Root", "Dana"]
    assert all("password" not in json.dumps(a) and "token" not in a for a in listed["items"])

    # same email, any case: 409; bad input: 400; unknown agent: 404
    status, error, _ = await request(gateway, "POST", "/agents", admin_token, json={
        "name": "Dup", "email": "DANA@example.com"})
    assert (status, error["error"]) == (409, "conflict")
    for body in ({"capacity": 101}, {"role": "boss"}, {"teams": ["a b"]}, {"password": "short"},
                 {"name": None}, {"unknown": 1}):
        status, error, _ = await request(gateway, "PATCH", f"/agents/{dana['id']}",
                                         admin_token, json=body)
        assert (status, error["error"]) == (400, "bad_request"), body
    assert (await request(gateway, "PATCH", f"/agents/{ObjectId()}", admin_token,
                          json={"capacity": 2}))[0] == 404

    status, updated, _ = await request(gateway, "PATCH", f"/agents/{dana['id']}", admin_token,
                                       json={"role": "agent", "teams": ["support"],
                                             "skills": ["refunds"], "capacity": 4})
    assert status == 200
    assert (updated["role"], updated["teams"], updated["skills"], updated["capacity"]) == (
        "agent", ["support"], ["refunds"], 4)
    assert (await request(gateway, "GET", "/conversations", dana_token))[0] == 200
    assert (await request(gateway, "GET", "/me", with_cookie(cookie)))[0] == 200

    # a new password ends the agent's sessions; the old password stops working
    status, _, _ = await request(gateway, "PATCH", f"/agents/{dana['id']}", admin_token,
                                 json={"password": "a brand new password"})
    assert status == 200
    assert (await request(gateway, "GET", "/me", with_cookie(cookie)))[0] == 401
    assert (await sign_in(gateway, "dana@example.com"))[0] == 401
    assert (await sign_in(gateway, "dana@example.com", "a brand new password"))[0] == 200

    # an admin cannot lock themselves out
    for body in ({"active": False}, {"role": "agent"}):
        status, error, _ = await request(gateway, "PATCH", f"/agents/{admin.id}", admin_token,
                                         json=body)
        assert (status, error["error"]) == (409, "conflict")


@pytest.mark.usefixtures("hasher")
async def test_a_deactivated_agent_can_neither_sign_in_nor_use_a_token(gateway: Gateway) -> None:
    _, admin = await person(gateway, "Root", AgentRole.ADMIN)
    erin, erin_token = await person(gateway, "Erin")
    cookie, _ = await signed_in(gateway, "erin@example.com")
    status, updated, _ = await request(gateway, "PATCH", f"/agents/{erin.id}", admin,
                                       json={"active": False})
    assert (status, updated["active"]) == (200, False)
    assert (await request(gateway, "GET", "/me", erin_token))[0] == 401
    assert (await request(gateway, "GET", "/me", with_cookie(cookie)))[0] == 401
    status, error, _ = await sign_in(gateway, "erin@example.com")
    assert (status, error["message"]) == (401, BAD_LOGIN)
    assert await gateway.store.db["sessions"].count_documents({"agent_id": erin.id}) == 0
    await request(gateway, "PATCH", f"/agents/{erin.id}", admin, json={"active": True})
    assert (await request(gateway, "GET", "/me", erin_token))[0] == 200


# ------------------------------------------------------------------------ CLI


def test_cli_adds_an_agent_with_role_teams_skills_and_a_password(
    mongo_uri: str, db_name: str, tmp_path: Path
) -> None:
    env = clean_env(OMNIGATE_MONGODB_URI=mongo_uri, OMNIGATE_MONGODB_DB=db_name)
    result = subprocess.run(
        [*omnigate_command(), "agents", "add", "Carol", "--email", "carol@example.com",
         "--role", "admin", "--team", "support", "--skill", "billing", "--skill", "refunds,vip",
         "--capacity", "5", "--password-stdin"],
        input=PASSWORD + "\n", env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "role admin" in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("og_")
    listed = omnigate("agents", "list", env=env, cwd=tmp_path)
    assert "Carol" in listed.stdout and "admin" in listed.stdout

    again = subprocess.run(
        [*omnigate_command(), "agents", "add", "Other", "--email", "CAROL@example.com",
         "--password-stdin"], input="short\n", env=env, cwd=tmp_path, capture_output=True,
        text=True, timeout=60, check=False,
    )
    assert again.returncode == 1 and "password" in again.stderr  # too short
    again = omnigate("agents", "add", "Other", "--email", "CAROL@example.com", env=env,
                     cwd=tmp_path)
    assert again.returncode == 1 and "carol@example.com" in again.stderr.lower()
    bad = omnigate("agents", "add", "Other", "--role", "boss", env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "--role" in bad.stderr

    async def stored() -> dict[str, Any]:
        store = Store.connect(mongo_uri, db_name)
        try:
            doc = await store.agents.find_one({"name": "Carol"})
            assert doc is not None
            return doc
        finally:
            await store.client.drop_database(db_name)
            await store.close()

    doc = asyncio.run(stored())
    assert (doc["role"], doc["teams"], doc["skills"], doc["capacity"]) == (
        "admin", ["support"], ["billing", "refunds", "vip"], 5)
    assert doc["password_hash"].startswith("$argon2id$") and doc["email_key"] == (
        "carol@example.com")


def omnigate_command() -> list[str]:
    return list(COMMAND)
