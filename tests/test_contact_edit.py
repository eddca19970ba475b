"""Agents edit what they know of a customer (PATCH /api/v1/contacts/{id}): the name, and
the email, phone and notes in the profile, where the bot and canned responses read them
too; search finds the contact by them. Real gateway, real HTTP."""

from __future__ import annotations

from gateway.keys import AGENTS, PIPELINE
from gateway.model import AgentRole
from tests.conftest import Gateway
from tests.test_identity import call
from tests.test_search import message, processed


async def test_an_agent_edits_a_contact(gateway: Gateway) -> None:
    gw = gateway
    _, token = await gw.app[AGENTS].add("Ann", role=AgentRole.AGENT)
    ann = {"Authorization": f"Bearer {token}"}
    _, designer_token = await gw.app[AGENTS].add("Dee", role=AgentRole.DESIGNER)
    result = await gw.app[PIPELINE].ingest(message("v_ed", "hello", name="Visitor 1"))
    await processed(gw)
    path = f"/contacts/{result.conversation.contact_id}"

    status, out = await call(gw, "PATCH", path, ann, json={
        "name": " Ada Lovelace ", "email": "Ada@Example.ORG", "phone": "+44 20 7946 0958",
        "notes": "Prefers email. VIP since 2024."})
    assert status == 200, out
    assert out["name"] == "Ada Lovelace"
    assert out["profile"]["email"]["value"] == "ada@example.org"
    assert out["profile"]["phone"]["value"] == "+44 20 7946 0958"
    assert out["profile"]["notes"]["value"] == "Prefers email. VIP since 2024."
    assert {e["set_by"] for e in out["profile"].values()} == {out["profile"]["email"]["set_by"]}

    # only the fields sent change; null clears one
    status, out = await call(gw, "PATCH", path, ann, json={"phone": None})
    assert status == 200 and "phone" not in out["profile"] and out["name"] == "Ada Lovelace"
    assert out["profile"]["email"]["value"] == "ada@example.org"

    # a canned response's placeholder reads it, and search finds the contact by it
    _, admin_token = await gw.app[AGENTS].add("Adm", role=AgentRole.ADMIN)
    admin = {"Authorization": f"Bearer {admin_token}"}
    status, canned = await call(gw, "POST", "/canned", admin, json={
        "shortcode": "mail", "title": "Mail", "text": "We wrote to {contact.email}."})
    assert status == 201, canned
    status, rendered = await call(gw, "GET", f"/canned/{canned['id']}/render", ann,
                                  params={"conversation_id": result.conversation.id})
    assert status == 200 and rendered["text"] == "We wrote to ada@example.org."
    status, found = await call(gw, "GET", "/search/contacts", ann, params={"q": "ada@exa"})
    assert [c["id"] for c in found["items"]] == [result.conversation.contact_id]

    # bad input, unknown contact, a designer
    for body in ({"email": "not an address"}, {"phone": "call me"}, {"name": "  "},
                 {"colour": "red"}):
        status, bad = await call(gw, "PATCH", path, ann, json=body)
        assert status == 400, (body, bad)
    status, _ = await call(gw, "PATCH", "/contacts/nobody", ann, json={"name": "X"})
    assert status == 404
    status, _ = await call(gw, "PATCH", path, {"Authorization": f"Bearer {designer_token}"},
                           json={"name": "X"})
    assert status == 403


async def test_a_merged_contact_says_where_it_lives_and_is_not_edited(gateway: Gateway) -> None:
    gw = gateway
    _, token = await gw.app[AGENTS].add("Ann", role=AgentRole.AGENT)
    ann = {"Authorization": f"Bearer {token}"}
    kept = await gw.app[PIPELINE].ingest(message("v_keep", "hi", name="Kim"))
    gone = await gw.app[PIPELINE].ingest(message("v_gone", "hi again", name="Kim 2"))
    await processed(gw)
    survivor, merged = kept.conversation.contact_id, gone.conversation.contact_id
    status, _ = await call(gw, "POST", f"/contacts/{survivor}/merge", ann,
                           json={"contact_id": merged})
    assert status == 201
    status, out = await call(gw, "GET", f"/contacts/{merged}", ann)
    assert status == 200 and out["merged_into"] == survivor
    status, refused = await call(gw, "PATCH", f"/contacts/{merged}", ann, json={"name": "X"})
    assert status == 409 and survivor in refused["message"]
    status, out = await call(gw, "GET", f"/contacts/{survivor}", ann)
    assert out["merged_into"] is None and out["name"] == "Kim"
