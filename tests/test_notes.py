"""Private notes (agents only, never to the customer) and canned responses, over real HTTP."""

from __future__ import annotations

from typing import Any

from connectors.base import DeliveryResult
from gateway.keys import AGENTS, CONNECTORS
from gateway.model import Activity, AgentRole, Conversation
from tests.conftest import Gateway, Visitor

PASSWORD = "correct horse battery"
NOTE = "PRIVATE: customer sounds angry, offer the 10% voucher"


class NoteVisitor(Visitor):
    """A visitor that also keeps every frame's raw text, to look for the note anywhere."""

    def __init__(self, gateway: Gateway) -> None:
        super().__init__(gateway)
        self.raw: list[str] = []

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        assert self.ws is not None
        while True:
            msg = await self.ws.receive(timeout=timeout)
            self.raw.append(str(msg.data))
            frame: dict[str, Any] = msg.json()
            if frame["type"] != "skip":
                break
            assert self.watermark is None or frame["seq"] == self.watermark + 1
            self.watermark = frame["seq"]
            self.skipped.append(frame["seq"])
        if frame["type"] in ("message", "event"):
            assert self.watermark is None or frame["seq"] == self.watermark + 1, (
                f"out of order or repeated: {frame['seq']} after {self.watermark}")
            self.watermark = frame["seq"]
            self.items.append(frame)
        else:
            self.frames.append(frame)
        return frame


async def person(gateway: Gateway, name: str, role: AgentRole = AgentRole.AGENT,
                 **profile: Any) -> tuple[str, dict[str, str]]:
    agent, token = await gateway.app[AGENTS].add(
        name, f"{name.lower()}@example.com", role=role, password=PASSWORD, **profile)
    return agent.id, {"Authorization": f"Bearer {token}"}


async def call(gateway: Gateway, method: str, path: str, headers: dict[str, str],
               **kw: Any) -> tuple[int, Any]:
    async with gateway.http.request(method, gateway.url + "/api/v1" + path, headers=headers,
                                    **kw) as response:
        body = await response.json() if response.content_type == "application/json" else None
        return response.status, body


async def test_a_note_is_in_the_agent_history_and_never_reaches_the_visitor(
    gateway: Gateway,
) -> None:
    sent: list[Activity] = []
    webchat = gateway.app[CONNECTORS]["webchat"]
    real_send = webchat.send

    async def recording_send(conversation: Conversation, item: Activity) -> DeliveryResult:
        sent.append(item)
        return await real_send(conversation, item)

    webchat.send = recording_send  # type: ignore[method-assign]
    visitor = NoteVisitor(gateway)
    try:
        await visitor.connect()
        await visitor.say("I want to talk to a human please")
        await visitor.until(lambda i: i["type"] == "event" and i["name"] == "handoff")
        [doc] = await gateway.store.conversations.find({"channel": "webchat"}).to_list()
        conversation_id = doc["_id"]
        before_note = visitor.watermark
        _, alice = await person(gateway, "Alice")
        status, note = await call(gateway, "POST", f"/conversations/{conversation_id}/notes",
                                  alice, json={"text": NOTE})
        assert status == 201, note
        assert (note["private"], note["direction"], note["sender"]["name"]) == (
            True, "internal", "Alice")
        assert note["delivery"] is None
        status, _ = await call(gateway, "POST", f"/conversations/{conversation_id}/claim",
                                     alice)
        assert status == 200
        status, reply = await call(gateway, "POST", f"/conversations/{conversation_id}/messages",
                                   alice, json={"text": "Hello, I am Alice"})
        assert status == 201
        # live: the visitor skips the note's seq and gets what follows, contiguous
        got = await visitor.until(lambda i: i.get("text") == "Hello, I am Alice")
        assert got["seq"] == reply["seq"] and note["seq"] in visitor.skipped
        # the agents' history has it, in order, marked private
        status, page = await call(gateway, "GET", f"/conversations/{conversation_id}/messages",
                                  alice)
        texts = [(i["seq"], i["text"], i["private"]) for i in reversed(page["items"])]
        assert (note["seq"], NOTE, True) in texts
        assert [t[0] for t in texts] == sorted(t[0] for t in texts)
        status, timeline = await call(gateway, "GET", f"/contacts/{doc['contact_id']}/timeline",
                                      alice)
        assert any(i["text"] == NOTE and i["private"] for i in timeline["items"])
        # reconnect resuming from before the note, then afresh, then ask for history
        await visitor.close()
        visitor.watermark = before_note
        await visitor.connect()
        assert visitor.watermark == reply["seq"]
        await visitor.close()
        visitor.watermark = None
        await visitor.connect(resume=False)
        assert visitor.ws is not None
        await visitor.ws.send_json({"type": "history", "before": reply["seq"] + 1})
        history = await visitor.next_frame("history")
        assert note["seq"] not in [i["seq"] for i in history["items"]]
        assert reply["seq"] in [i["seq"] for i in history["items"]]
        await gateway.settle()
        assert all(NOTE not in raw for raw in visitor.raw)
        assert all(NOTE not in str(i.get("text")) for i in visitor.items)
        assert note["id"] not in [i.id for i in sent] and reply["id"] in [i.id for i in sent]
        stored = await gateway.store.get_message(note["id"])
        assert stored is not None and stored.delivery is None
    finally:
        await visitor.close()


async def test_notes_need_an_agent_role_and_a_conversation(gateway: Gateway) -> None:
    _, designer = await person(gateway, "Dee", AgentRole.DESIGNER)
    _, alice = await person(gateway, "Alice")
    status, body = await call(gateway, "POST", "/conversations/nope/notes", alice,
                              json={"text": "x"})
    assert status == 404
    conversation = await gateway.store.resolve_conversation("webchat", "v_n", "c_n")
    status, body = await call(gateway, "POST", f"/conversations/{conversation.id}/notes",
                              designer, json={"text": "x"})
    assert (status, body["error"]) == (403, "forbidden")
    status, body = await call(gateway, "POST", f"/conversations/{conversation.id}/notes",
                              alice, json={"text": "   "})
    assert status == 400


async def test_canned_responses_crud_roles_and_placeholders(gateway: Gateway) -> None:
    _, admin = await person(gateway, "Ada", AgentRole.ADMIN)
    _, alice = await person(gateway, "Alice")
    _, designer = await person(gateway, "Dee", AgentRole.DESIGNER)
    text = ("Hi {contact.name}, I am {agent.name}. Order {contact.order_id}: "
            "{contact.nothing} {{ok}}")
    new = {"shortcode": "greet", "title": "Greeting", "text": text}
    status, body = await call(gateway, "POST", "/canned", alice, json=new)
    assert (status, body["error"]) == (403, "forbidden")
    status, created = await call(gateway, "POST", "/canned", admin, json=new)
    assert status == 201 and created["shortcode"] == "greet"
    status, body = await call(gateway, "POST", "/canned", admin, json=new)
    assert status == 409
    status, body = await call(gateway, "POST", "/canned", admin,
                              json={**new, "shortcode": "Bad Code"})
    assert status == 400
    await call(gateway, "POST", "/canned", admin,
               json={"shortcode": "bye", "title": "", "text": "Bye!"})
    status, listed = await call(gateway, "GET", "/canned", alice)
    assert [c["shortcode"] for c in listed["items"]] == ["bye", "greet"]
    status, listed = await call(gateway, "GET", "/canned?prefix=gr", alice)
    assert [c["shortcode"] for c in listed["items"]] == ["greet"]
    status, body = await call(gateway, "GET", "/canned", designer)
    assert status == 403
    # placeholders: the contact's name and profile, the agent asking
    identity = await gateway.store.resolve_identity("webchat", "v_c", "Carla")
    await gateway.store.update_profile(identity.contact_id, {"order_id": "A-77"})
    conversation = await gateway.store.resolve_conversation("webchat", "v_c",
                                                            identity.contact_id)
    status, rendered = await call(
        gateway, "GET", f"/canned/{created['id']}/render?conversation_id={conversation.id}",
        alice)
    assert status == 200
    assert rendered["text"] == "Hi Carla, I am Alice. Order A-77:  {ok}"
    assert rendered["missing"] == ["{contact.nothing}"]
    status, body = await call(gateway, "GET", f"/canned/{created['id']}/render", alice)
    assert status == 400
    # change and delete: admins only
    status, body = await call(gateway, "PATCH", f"/canned/{created['id']}", alice,
                              json={"text": "x"})
    assert status == 403
    status, changed = await call(gateway, "PATCH", f"/canned/{created['id']}", admin,
                                 json={"text": "Hello {contact.name}"})
    assert status == 200 and changed["text"] == "Hello {contact.name}"
    status, body = await call(gateway, "PATCH", f"/canned/{created['id']}", admin,
                              json={"shortcode": "bye"})
    assert status == 409
    status, body = await call(gateway, "DELETE", f"/canned/{created['id']}", alice)
    assert status == 403
    status, body = await call(gateway, "DELETE", f"/canned/{created['id']}", admin)
    assert status == 204
    status, body = await call(gateway, "DELETE", f"/canned/{created['id']}", admin)
    assert status == 404
    status, listed = await call(gateway, "GET", "/canned", alice)
    assert [c["shortcode"] for c in listed["items"]] == ["bye"]


def test_canned_placeholders_read_the_bots_profile_entries() -> None:
    from datetime import UTC, datetime

    from gateway.model import Agent, Contact
    from gateway.store.canned import render

    now = datetime.now(UTC)
    contact = Contact(id="c1", name="Carla", created_at=now, profile={
        "email": {"value": "carla@example.com", "set_at": now.isoformat(), "expires_at": None},
        "phone": {"value": "+4912345", "set_at": "2020-01-01T00:00:00+00:00",
                  "expires_at": "2020-04-01T00:00:00+00:00"},  # expired: as if unknown
        "tier": "gold",  # written by another system: a plain value
    })
    agent = Agent(id="a1", name="Alice", created_at=now)
    text, missing = render(
        "{contact.email} {contact.tier} {contact.phone} {agent.name}", contact, agent)
    assert text == "carla@example.com gold  Alice"
    assert missing == ["{contact.phone}"]
