"""Trusted proxies (OMNIGATE_TRUSTED_PROXIES) and sign-in lockouts that cannot keep an agent
out.

The forwarded headers over real HTTP on a real gateway: the test client connects from
127.0.0.1, which is the trusted proxy in one gateway and an untrusted peer in the other, and
sends the same X-Forwarded-For/Proto to both. The lockout tests use the trusted gateway to
sign in from many client addresses.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from ipaddress import ip_network
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.desk.auth import LoginPolicy, address_key
from gateway.keys import AGENTS
from gateway.logs import AccessLogger, JsonFormatter
from gateway.model import utcnow
from gateway.proxies import Forwarded, parse_networks, resolve
from gateway.settings import Settings, SettingsError, load_settings
from gateway.store import Store
from tests.conftest import Gateway

PASSWORD = "correct horse battery"
ALICE = "alice@example.com"
CLIENT, OTHER = "203.0.113.5", "198.51.100.7"


# ------------------------------------------------------------------- the header rule


TRUSTED = parse_networks("10.0.0.0/8, 192.0.2.1, fd00::/8")


@pytest.mark.parametrize(("peer", "xff", "proto", "expected"), [
    # an untrusted peer: whatever it sends changes nothing
    ("203.0.113.9", ["198.51.100.1"], ["https"], None),
    ("198.51.100.1", [], [], None),
    (None, ["198.51.100.1"], [], None),
    # one trusted proxy: the address it appended, its scheme
    ("192.0.2.1", ["203.0.113.5"], ["https"], Forwarded("203.0.113.5", "https")),
    # what the client put in front is not believed
    ("192.0.2.1", ["6.6.6.6, 203.0.113.5"], ["https"], Forwarded("203.0.113.5", "https")),
    ("192.0.2.1", ["6.6.6.6", "203.0.113.5"], [], Forwarded("203.0.113.5", None)),
    # a client's forged proto, the proxy appending its own: the proxy's counts
    ("192.0.2.1", ["203.0.113.5"], ["https, http"], Forwarded("203.0.113.5", "http")),
    # two trusted hops: the first untrusted from the right; each hop appended its proto
    ("10.0.0.3", ["6.6.6.6, 203.0.113.5, 10.0.0.2"], ["https, http"],
     Forwarded("203.0.113.5", "https")),
    # ... or the edge's proto passed through
    ("10.0.0.3", ["203.0.113.5, 10.0.0.2"], ["HTTPS"], Forwarded("203.0.113.5", "https")),
    # every hop trusted: the leftmost
    ("10.0.0.3", ["10.9.9.9, 10.0.0.2"], [], Forwarded("10.9.9.9", None)),
    # no address in the header: the last trusted hop
    ("192.0.2.1", ["unknown"], ["https"], Forwarded("192.0.2.1", "https")),
    ("10.0.0.3", ["_hidden, 10.0.0.2"], [], Forwarded("10.0.0.2", None)),
    ("192.0.2.1", [], ["https"], Forwarded("192.0.2.1", "https")),
    # ports, brackets, IPv6, IPv4-mapped peers, unknown schemes
    ("192.0.2.1", ["203.0.113.5:4711"], ["gopher"], Forwarded("203.0.113.5", None)),
    ("fd00::1", ["[2001:db8::7]:443"], [], Forwarded("2001:db8::7", None)),
    ("::ffff:10.0.0.3", ["2001:db8::7"], [], Forwarded("2001:db8::7", None)),
])
def test_the_client_is_the_rightmost_address_no_trusted_proxy_wrote(
    peer: str | None, xff: list[str], proto: list[str], expected: Forwarded | None,
) -> None:
    assert resolve(peer, xff, proto, TRUSTED) == expected


def test_the_setting_takes_addresses_and_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMNIGATE_TRUSTED_PROXIES", " 10.1.2.3/8, 192.0.2.7,fd00::/8 ,")
    assert load_settings().trusted_proxies == [
        ip_network("10.0.0.0/8"), ip_network("192.0.2.7/32"), ip_network("fd00::/8")]
    monkeypatch.setenv("OMNIGATE_TRUSTED_PROXIES", "")
    assert load_settings().trusted_proxies == []
    monkeypatch.setenv("OMNIGATE_TRUSTED_PROXIES", "10.0.0.0/8, nginx")
    with pytest.raises(SettingsError, match=r"OMNIGATE_TRUSTED_PROXIES: .*'nginx' is not"):
        load_settings()


def test_ipv6_clients_are_throttled_by_their_64() -> None:
    assert address_key("2001:db8:1:2::1") == address_key("2001:db8:1:2:ffff::9")
    assert address_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("203.0.113.5") == "203.0.113.5"
    assert address_key(None) == "unknown"


# -------------------------------------------------------------- a real gateway


@asynccontextmanager
async def gateway_with(
    settings: Settings, trusted: str, **changes: Any
) -> AsyncIterator[tuple[Gateway, io.StringIO]]:
    """A gateway on a real port trusting ``trusted``, with its access log captured."""
    out = io.StringIO()
    logger = logging.getLogger(f"test.access.{settings.mongodb_db}")
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    changed = settings.model_copy(update={"trusted_proxies": parse_networks(trusted),
                                          **changes})
    app = create_app(changed)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(access_log=logger, access_log_class=AccessLogger)
    gateway = Gateway(server, app)
    try:
        await app[AGENTS].add("Alice", ALICE, password=PASSWORD)
        yield gateway, out
    finally:
        await gateway.close()
        await server.close()
        logger.removeHandler(handler)
        assert settings.mongodb_uri is not None
        cleanup = Store.connect(settings.mongodb_uri, settings.mongodb_db)
        await cleanup.client.drop_database(settings.mongodb_db)
        await cleanup.close()


def via(client: str, proto: str | None = None) -> dict[str, str]:
    """The headers a proxy adds for ``client`` (and the client's forgery in front)."""
    headers = {"X-Forwarded-For": f"6.6.6.6, {client}"}
    if proto is not None:
        headers["X-Forwarded-Proto"] = proto
    return headers


async def sign_in(gateway: Gateway, client: str, password: str = PASSWORD, *,
                  email: str = ALICE, proto: str | None = None
                  ) -> tuple[int, aiohttp.ClientResponse]:
    async with gateway.http.post(gateway.url + "/api/v1/session", headers=via(client, proto),
                                 json={"email": email, "password": password}) as response:
        await response.read()
        return response.status, response


async def webhook_statuses(gateway: Gateway, clients: list[str]) -> list[int]:
    statuses = []
    for client in clients:
        async with gateway.http.post(gateway.url + "/webhooks/nothing-here", json={},
                                     headers=via(client)) as response:
            statuses.append(response.status)
    return statuses


async def hello(gateway: Gateway, client: str) -> str:
    """The first frame's type (``welcome``) or error code (``rate_limited``)."""
    ws = await gateway.socket(headers=via(client))
    try:
        await ws.send_json({"type": "hello", "token": None, "watermark": None})
        frame = await ws.receive_json(timeout=10)
        return str(frame.get("code") or frame["type"])
    finally:
        await ws.close()


async def origin_status(gateway: Gateway, proto: str) -> int:
    """What the web chat socket answers a page on https://<the gateway's host>."""
    headers = {"Origin": "https://" + gateway.url.partition("://")[2],
               "X-Forwarded-Proto": proto}
    try:
        ws = await gateway.socket(headers=headers)
    except aiohttp.WSServerHandshakeError as refused:
        return refused.status
    await ws.close()
    return 101


def access_remotes(out: io.StringIO, path: str) -> set[str]:
    return {record["remote"] for record in map(json.loads, out.getvalue().splitlines())
            if record["path"] == path}


LIMITS = {"webhook_requests_per_second": 1, "webchat_connects_per_minute": 1}


async def test_behind_a_trusted_proxy_the_client_is_throttled_logged_and_gets_secure_cookies(
    settings: Settings,
) -> None:
    async with gateway_with(settings, "127.0.0.0/8", **LIMITS) as (gateway, log):
        agents = gateway.app[AGENTS]
        agents.guard.policy = LoginPolicy(ip_failures=2)
        # the cookie is Secure: the client spoke https to the proxy
        status, response = await sign_in(gateway, CLIENT, proto="https")
        assert status == 200
        assert re.search(r";\s*Secure", response.headers["Set-Cookie"], re.IGNORECASE)
        status, response = await sign_in(gateway, CLIENT, proto="http")
        assert status == 200 and "secure" not in response.headers["Set-Cookie"].lower()
        # failures count on the client's address, not the proxy's nor the forged one
        assert [(await sign_in(gateway, OTHER, email="ghost@example.com",
                               password="guess guess"))[0] for _ in range(2)] == [401, 429]
        assert (await sign_in(gateway, OTHER))[0] == 429  # OTHER is locked
        assert (await sign_in(gateway, CLIENT))[0] == 200  # CLIENT is not
        ids = {doc["_id"] async for doc in gateway.store.db["login_attempts"].find()}
        assert f"ip:{OTHER}" in ids and not {"ip:127.0.0.1", "ip:6.6.6.6"} & ids
        # webhooks (burst 2) and web chat hellos (burst 1): each client its own bucket
        assert await webhook_statuses(gateway, [CLIENT, OTHER] * 2) == [404] * 4
        assert (await webhook_statuses(gateway, [CLIENT] * 3))[-1] == 429
        assert [await hello(gateway, c) for c in (CLIENT, OTHER, CLIENT)] == [
            "welcome", "welcome", "rate_limited"]
        # the page on the gateway's own https origin may open the chat
        assert await origin_status(gateway, "https") == 101
        assert await origin_status(gateway, "http") == 403
    assert access_remotes(log, "/api/v1/session") == {CLIENT, OTHER}


async def test_forwarded_headers_from_an_untrusted_peer_change_nothing(
    settings: Settings,
) -> None:
    async with gateway_with(settings, "10.0.0.0/8, 192.0.2.1", **LIMITS) as (gateway, log):
        gateway.app[AGENTS].guard.policy = LoginPolicy(ip_failures=2)
        status, response = await sign_in(gateway, CLIENT, proto="https")
        assert status == 200 and "secure" not in response.headers["Set-Cookie"].lower()
        for _ in range(2):
            await sign_in(gateway, OTHER, email="ghost@example.com", password="guess guess")
        assert (await sign_in(gateway, CLIENT))[0] == 429  # one address: the peer's
        ids = {doc["_id"] async for doc in gateway.store.db["login_attempts"].find()}
        assert "ip:127.0.0.1" in ids and f"ip:{OTHER}" not in ids
        assert 429 in await webhook_statuses(gateway, [CLIENT, OTHER] * 2)
        assert [await hello(gateway, c) for c in (CLIENT, OTHER)] == [
            "welcome", "rate_limited"]
        assert await origin_status(gateway, "https") == 403
    assert access_remotes(log, "/api/v1/session") == {"127.0.0.1"}


# ------------------------------------------------------------------------ lockouts


async def test_an_attacker_who_knows_the_email_cannot_lock_the_agent_out(
    settings: Settings,
) -> None:
    async with gateway_with(settings, "127.0.0.1") as (gateway, _):
        attacker = "203.0.113.66"
        statuses = [(await sign_in(gateway, attacker, "guess guess"))[0] for _ in range(30)]
        assert statuses[:5] == [401] * 4 + [429] and set(statuses[5:]) == {429}
        # the pair is locked: even the right password from the attacker's address
        status, response = await sign_in(gateway, attacker)
        assert status == 429 and 1 <= int(response.headers["Retry-After"]) <= 30
        # Alice, from her address, gets in
        assert (await sign_in(gateway, CLIENT))[0] == 200
        # IPv6: the attacker's whole /64 is one address; another /64 is not
        for n in range(5):
            await sign_in(gateway, f"2001:db8:1:2::{n + 1}", "guess guess")
        assert (await sign_in(gateway, "2001:db8:1:2::99"))[0] == 429
        assert (await sign_in(gateway, "2001:db8:1:3::1"))[0] == 200


async def test_guessing_from_many_addresses_only_slows_down_those_addresses(
    settings: Settings,
) -> None:
    async with gateway_with(settings, "127.0.0.1") as (gateway, _):
        gateway.app[AGENTS].guard.policy = LoginPolicy(account_failures=6)
        guessers = [f"192.0.2.{n}" for n in range(1, 7)]
        statuses = [(await sign_in(gateway, g, "guess guess"))[0] for g in guessers]
        assert statuses == [401] * 5 + [429]  # the sixth failure locks the account...
        # ... for the addresses that failed for it (each once: their pairs are not locked)
        status, response = await sign_in(gateway, guessers[0])
        assert status == 429 and 1 <= int(response.headers["Retry-After"]) <= 30
        assert (await sign_in(gateway, CLIENT))[0] == 200  # a clean address gets in

        # the account-wide lock doubles, but never past a minute
        attempts = gateway.store.db["login_attempts"]
        await attempts.update_one({"_id": f"account:{ALICE}"},
                                  {"$set": {"lockouts": 12}})
        await attempts.update_one({"_id": f"account:{ALICE}"},
                                  {"$set": {"locked_until": utcnow() - timedelta(seconds=1)}})
        more = [f"192.0.2.{n}" for n in range(11, 17)]
        statuses = [(await sign_in(gateway, g, "guess guess"))[0] for g in more]
        assert statuses[-1] == 429
        status, response = await sign_in(gateway, more[0])
        assert status == 429 and 30 < int(response.headers["Retry-After"]) <= 60
        assert (await sign_in(gateway, OTHER))[0] == 200
