"""The whole road over real sockets: web chat → store → bot → queue → agent → web chat."""

from __future__ import annotations

from gateway.keys import OUTBOX
from tests.conftest import Gateway, Visitor


def bot_with_buttons(item: dict) -> bool:
    return item["type"] == "message" and item["role"] == "bot" and bool(item["buttons"])


async def test_visitor_bot_agent_and_back(gateway: Gateway, visitor: Visitor) -> None:
    api = gateway.url + "/api/v1"
    http = gateway.http
    session = await visitor.connect()
    assert session["welcome"]["new"] is True
    assert session["synced"]["watermark"] == 0

    # hello → the bot greets and offers buttons
    ack = await visitor.say("hello")
    assert ack["seq"] == 1 and ack["duplicate"] is False
    menu = await visitor.until(bot_with_buttons)
    titles = [b["title"] for b in menu["buttons"]]
    assert "Opening hours" in titles

    # press a button → the FAQ answer
    hours = next(b for b in menu["buttons"] if b["value"] == "flow:hours")
    await visitor.press(hours)
    answer = await visitor.until(lambda i: i["type"] == "message" and i["role"] == "bot")
    assert "Monday to Friday" in answer["text"]

    # ask for a human → handed off, queued with a reason
    await visitor.say("I want to talk to a human please")
    handoff = await visitor.until(lambda i: i["type"] == "event")
    assert handoff["name"] == "handoff"
    await gateway.settle()

    agent_id, alice = await gateway.agent("Alice")
    queue = await (await http.get(api + "/conversations", headers=alice)).json()
    assert len(queue["items"]) == 1
    conversation = queue["items"][0]
    assert conversation["owner"] == "queued"
    assert conversation["handoff"]["reason"] == "customer asked for a human"
    cid = conversation["id"]

    # the agent claims and reads the full history
    claimed = await http.post(f"{api}/conversations/{cid}/claim", headers=alice)
    assert claimed.status == 200
    assert (await claimed.json())["assignee_id"] == agent_id
    joined = await visitor.until(lambda i: i["type"] == "event")
    assert joined["name"] == "assigned" and "Alice" in joined["text"]
    history = await (await http.get(f"{api}/conversations/{cid}/messages?limit=200",
                                    headers=alice)).json()
    texts = [i["text"] for i in reversed(history["items"])]
    assert texts[0] == "hello"
    assert "Opening hours" in texts
    assert "I want to talk to a human please" in texts
    assert [i["seq"] for i in history["items"]] == list(range(visitor.watermark, 0, -1))

    # the agent replies → the visitor receives it on the socket, with the agent's name
    reply = await http.post(f"{api}/conversations/{cid}/messages", headers=alice,
                            json={"text": "Hi, Alice here. How can I help?"})
    assert reply.status == 201
    got = await visitor.until(lambda i: i["type"] == "message" and i["role"] == "agent")
    assert got["text"] == "Hi, Alice here. How can I help?"
    assert got["sender"]["name"] == "Alice"

    # while the human owns it, the bot stays silent
    await visitor.say("my order 1234 never arrived")
    await gateway.settle()
    await visitor.say("hello?")  # would greet, if the bot were listening
    await visitor.until(lambda i: i.get("text") == "hello?")  # its echo
    await gateway.settle()
    seen = visitor.watermark

    # the visitor drops; meanwhile the agent writes twice
    await visitor.close()
    for text in ("I see order 1234, checking now.", "It ships tomorrow."):
        response = await http.post(f"{api}/conversations/{cid}/messages", headers=alice,
                                   json={"text": text})
        assert response.status == 201
    await gateway.settle()

    # reconnect with the watermark: exactly what was missed, nothing twice
    resumed = await visitor.connect()
    assert resumed["welcome"]["new"] is False
    assert resumed["welcome"]["conversation_id"] == cid
    missed = [i for i in visitor.items if i["seq"] > seen]
    assert [i["text"] for i in missed] == ["I see order 1234, checking now.",
                                           "It ships tomorrow."]
    assert resumed["synced"]["watermark"] == seen + 2
    roles = {i["role"] for i in visitor.items if i["type"] == "message" and i["seq"] > 9}
    assert "bot" not in roles  # the bot never answered while Alice owned it

    # hand back to the bot → the bot answers again
    back = await http.post(f"{api}/conversations/{cid}/handback", headers=alice)
    assert back.status == 200 and (await back.json())["owner"] == "bot"
    event = await visitor.until(lambda i: i["type"] == "event")
    assert event["name"] == "handback"
    await visitor.say("what are your opening hours?")
    answer = await visitor.until(lambda i: i["type"] == "message" and i["role"] == "bot")
    assert "Monday to Friday" in answer["text"]

    # the store recorded how far the visitor's sockets got: web chat items stay "stored"
    # (the socket reads them from the store) and the conversation's mark says what was seen
    await gateway.settle()
    await gateway.app[OUTBOX].marks.flush()
    statuses = await gateway.store.messages.distinct("delivery.status",
                                                     {"conversation_id": cid})
    assert statuses == ["stored"]
    state = await gateway.store.turn_state.find_one({"_id": cid})
    assert state is not None
    assert state["delivered_seq"] == answer["seq"]


async def test_second_tab_sees_the_same_conversation(gateway: Gateway) -> None:
    first, second = Visitor(gateway), Visitor(gateway)
    await first.connect()
    await first.say("hello")
    await first.until(bot_with_buttons)
    second.token = first.token
    synced = (await second.connect(resume=False))["synced"]
    assert [i["seq"] for i in second.items] == [i["seq"] for i in first.items]
    assert synced["watermark"] == first.watermark
    # a message from one tab reaches the other, as the customer's own
    await second.say("shipping costs")
    echoed = await first.until(lambda i: i["role"] == "customer")
    assert echoed["text"] == "shipping costs"
    await first.close()
    await second.close()
