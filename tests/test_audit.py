"""The audit log: every change made through the agent API is recorded with who, what,
the object, the client's address and the fields (no secrets, no message text); sign-ins
and failed sign-ins too; admins read it. Real gateway, real HTTP."""

from __future__ import annotations

import pytest

from gateway.model import AgentRole
from tests.conftest import Gateway
from tests.test_auth import PASSWORD, hasher, person, queued, request, sign_in

__all__ = ["hasher"]  # the fast password hasher fixture of tests/test_auth.py


async def audit(gateway: Gateway, headers: dict[str, str], **query: str) -> list[dict]:
    status, body, _ = await request(gateway, "GET", "/audit", headers, params=query)
    assert status == 200, body
    return list(body["items"])


@pytest.mark.usefixtures("hasher")
async def test_who_did_what_when_and_from_where(gateway: Gateway) -> None:
    ada, admin = await person(gateway, "Ada", AgentRole.ADMIN)
    ann, agent = await person(gateway, "Ann")

    # sign-ins, a failed one with the email tried (never the password)
    assert (await sign_in(gateway, "ann@example.com", "not the password"))[0] == 401
    assert (await sign_in(gateway, "ann@example.com", PASSWORD,
                          **{"User-Agent": "TestBrowser/1"}))[0] == 200
    failed, signed = await audit(gateway, admin, action="sign_in_failed"), \
        await audit(gateway, admin, action="sign_in")
    assert [(e["target"], e["who"], e["ip"]) for e in failed] == [
        ("ann@example.com", None, "127.0.0.1")]
    assert [(e["who"], e["user_agent"]) for e in signed] == [
        ({"id": ann.id, "name": "Ann"}, "TestBrowser/1")]
    assert all("password" not in e["details"] for e in failed + signed)

    # an agent's work on a conversation: claim, resolve; the reply is not an audit entry
    conversation_id = await queued(gateway)
    for path in ("claim", "messages", "resolve"):
        body = {"text": "All done"} if path == "messages" else None
        status, answer, _ = await request(gateway, "POST",
                                          f"/conversations/{conversation_id}/{path}",
                                          agent, json=body)
        assert status in (200, 201), answer
    about = await audit(gateway, admin, target=conversation_id)
    assert [(e["action"], e["who"]["name"]) for e in about] == [("resolve", "Ann"),
                                                                 ("claim", "Ann")]
    assert about[0]["at"] >= about[1]["at"]

    # an admin changes an agent: the fields are there, a password is not
    status, _, _ = await request(gateway, "PATCH", f"/agents/{ann.id}", admin,
                                 json={"capacity": 7, "password": "another-password-1"})
    assert status == 200
    [change] = await audit(gateway, admin, action="update_agent")
    assert (change["who"]["id"], change["target"]) == (ada.id, ann.id)
    assert change["details"] == {"capacity": 7}
    # a refused change is no entry (it changed nothing)
    status, _, _ = await request(gateway, "PATCH", f"/agents/{ann.id}", admin,
                                 json={"capacity": -1})
    assert status == 400
    assert len(await audit(gateway, admin, action="update_agent")) == 1

    # only admins read it; by agent, and paged
    status, _, _ = await request(gateway, "GET", "/audit", agent)
    assert status == 403
    by_ann = await audit(gateway, admin, who=ann.id)
    assert {e["action"] for e in by_ann} == {"sign_in", "claim", "resolve"}
    everything = await audit(gateway, admin, limit="200")
    pages: list[dict] = []
    cursor = None
    while True:  # two at a time: every entry once, in order, none skipped
        status, page, _ = await request(gateway, "GET", "/audit", admin, params={
            "limit": "2", **({"cursor": cursor} if cursor else {})})
        assert status == 200
        pages += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [e["id"] for e in pages] == [e["id"] for e in everything]
