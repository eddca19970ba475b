"""Labels: admins define them, agents put them on conversations; the queue and search
filter by them; a deleted label comes off every conversation. Real gateway, real HTTP."""

from __future__ import annotations

import asyncio

from gateway.keys import AGENTS, PIPELINE, ROUTING
from gateway.model import AgentRole
from tests.conftest import Gateway
from tests.test_identity import call
from tests.test_search import message, processed


async def test_admins_define_labels_agents_set_them_and_lists_filter(gateway: Gateway) -> None:
    gw = gateway
    agents = gw.app[AGENTS]
    _, admin_token = await agents.add("Ada", role=AgentRole.ADMIN)
    _, agent_token = await agents.add("Ann", role=AgentRole.AGENT)
    ada = {"Authorization": f"Bearer {admin_token}"}
    ann = {"Authorization": f"Bearer {agent_token}"}

    status, vip = await call(gw, "POST", "/labels", ada, json={"name": "VIP",
                                                                "color": "#FF0000"})
    assert status == 201 and (vip["name"], vip["color"]) == ("VIP", "#ff0000")
    status, refund = await call(gw, "POST", "/labels", ada, json={"name": "refund"})
    assert status == 201 and refund["color"] == "#6b7280"
    status, taken = await call(gw, "POST", "/labels", ada, json={"name": " vip "})
    assert status == 409 and "exists" in taken["message"]
    status, _ = await call(gw, "POST", "/labels", ann, json={"name": "mine"})
    assert status == 403  # agents use labels, admins define them
    status, bad = await call(gw, "POST", "/labels", ada, json={"name": "x", "color": "red"})
    assert status == 400 and "color" in bad["message"]
    status, listed = await call(gw, "GET", "/labels", ann)
    assert status == 200 and [la["name"] for la in listed["items"]] == ["refund", "VIP"]

    first = await gw.app[PIPELINE].ingest(message("v_1", "I want my money back"))
    second = await gw.app[PIPELINE].ingest(message("v_2", "hello there"))
    await processed(gw)
    for result in (first, second):
        assert await gw.app[ROUTING].handoff(result.conversation.id, "help")
    path = f"/conversations/{first.conversation.id}/labels"
    status, out = await call(gw, "PUT", path, ann, json={"labels": [refund["id"], vip["id"],
                                                                      refund["id"]]})
    assert status == 200 and out["labels"] == [refund["id"], vip["id"]]
    status, unknown = await call(gw, "PUT", path, ann, json={"labels": ["nope"]})
    assert status == 400 and "no such label: nope" in unknown["message"]
    status, out = await call(gw, "GET", f"/conversations/{first.conversation.id}", ann)
    assert out["labels"] == [refund["id"], vip["id"]]  # the failed PUT changed nothing

    # the queue and search filter by a label
    status, queue = await call(gw, "GET", "/conversations", ann, params={"label": vip["id"]})
    assert status == 200 and [c["id"] for c in queue["items"]] == [first.conversation.id]
    status, queue = await call(gw, "GET", "/conversations", ann)
    assert {c["id"] for c in queue["items"]} == {first.conversation.id,
                                                 second.conversation.id}
    status, hits = await call(gw, "GET", "/search/conversations", ann,
                              params={"label": refund["id"]})
    assert [h["conversation"]["id"] for h in hits["items"]] == [first.conversation.id]

    # renamed and recoloured; deleted: off every conversation
    status, renamed = await call(gw, "PATCH", f"/labels/{vip['id']}", ada,
                                 json={"name": "Very important", "color": "#00AA00"})
    assert status == 200 and (renamed["name"], renamed["color"]) == ("Very important",
                                                                     "#00aa00")
    status, _ = await call(gw, "PATCH", f"/labels/{vip['id']}", ada, json={"name": "REFUND"})
    assert status == 409
    async with gw.http.delete(gw.url + f"/api/v1/labels/{refund['id']}",
                              headers=ada) as response:
        assert response.status == 204
    status, out = await call(gw, "GET", f"/conversations/{first.conversation.id}", ann)
    assert out["labels"] == [vip["id"]]
    status, _ = await call(gw, "PATCH", f"/labels/{refund['id']}", ada, json={"name": "x"})
    assert status == 404


async def test_a_label_change_reaches_the_console_live(gateway: Gateway) -> None:
    gw = gateway
    _, token = await gw.app[AGENTS].add("Ada", role=AgentRole.ADMIN)
    ada = {"Authorization": f"Bearer {token}"}
    result = await gw.app[PIPELINE].ingest(message("v_live", "hello"))
    await processed(gw)
    assert await gw.app[ROUTING].handoff(result.conversation.id, "help")
    status, label = await call(gw, "POST", "/labels", ada, json={"name": "urgent"})
    assert status == 201
    async with gw.http.ws_connect(gw.url + "/api/v1/live", headers=ada) as ws:
        await asyncio.sleep(0.3)  # subscribed to the feed
        status, _ = await call(gw, "PUT", f"/conversations/{result.conversation.id}/labels",
                               ada, json={"labels": [label["id"]]})
        assert status == 200
        while True:
            frame = await asyncio.wait_for(ws.receive_json(), 10)
            if frame.get("type") == "conversation" and frame["conversation"]["labels"]:
                assert frame["conversation"]["labels"] == [label["id"]]
                break
