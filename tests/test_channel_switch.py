"""The channel switch: a linked customer who writes on Telegram while their web chat
conversation is open goes on in THAT conversation (the agent's, or the bot's flow), and
replies go where they wrote last; the agent may pick another of their channels.

Real gateway, web chat through ``Visitor``, Telegram through the fake Bot API with the
real aiogram client, the agent API over real HTTP.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from gateway.model import Conversation, OwnerState, utcnow
from gateway.store import Store
from gateway.store.contacts import SWITCH_WINDOW, ContactStore
from gateway.store.mongo import from_doc
from gateway.store.turn_records import current as current_turn_state
from tests import test_identity as rig
from tests.conftest import Gateway, Visitor
from tests.fakes.telegram_api import FakeTelegram, People
from tests.test_identity import CONNECTED, GREETING, TelegramUser, call, linked_on_telegram

# the same gateway as tests/test_identity.py: web chat and Telegram (a fake Bot API)
settings, telegram, people = rig.settings, rig.telegram, rig.people

ASK_ORDER = "Which order would you like to return?"
ASK_REASON = "Why are you returning it?"
ASK_EMAIL = "Which email address should the return label go to?"
HANDOFF = "Sure, I'm bringing in a human agent."


def says(prefix: str) -> Any:
    return lambda i: i["type"] == "message" and (i.get("text") or "").startswith(prefix)


async def only_conversation(gateway: Gateway) -> Conversation:
    [conversation] = [from_doc(Conversation, d) async for d in gateway.store.conversations.find()]
    return conversation


async def channels_in_history(gateway: Gateway, conversation_id: str) -> list[tuple[str, str]]:
    items, _ = await gateway.store.history(conversation_id, limit=200)
    return [(i.channel, i.text or "") for i in reversed(items) if i.type.value == "message"]


async def agent_owns_web_chat(gateway: Gateway, visitor: Visitor) -> tuple[str, dict[str, str]]:
    """The visitor asks for a human; Alice claims the conversation. (id, Alice's auth)."""
    await visitor.connect()
    await visitor.say("I want a human")
    await visitor.until(says(HANDOFF))
    await gateway.settle()
    conversation = await only_conversation(gateway)
    assert conversation.owner is OwnerState.QUEUED
    _, auth = await gateway.agent("Alice")
    status, claimed = await call(gateway, "POST", f"/conversations/{conversation.id}/claim",
                                 auth)
    assert status == 200, claimed
    return conversation.id, auth


async def test_an_agent_conversation_goes_on_on_telegram_and_the_reply_follows(
    gateway: Gateway, visitor: Visitor, telegram: FakeTelegram, people: People
) -> None:
    conversation_id, auth = await agent_owns_web_chat(gateway, visitor)
    status, _ = await call(gateway, "POST", f"/conversations/{conversation_id}/messages", auth,
                           json={"text": "Hi, Alice here. How can I help?"})
    assert status == 201
    await visitor.until(says("Hi, Alice here."))

    # the customer takes the chat to their phone
    ann = TelegramUser(gateway, telegram, people, 7001)
    await linked_on_telegram(gateway, visitor, ann)
    await ann.say("I'm on my phone now. My order 10045 arrived broken.")
    await gateway.settle()
    conversation = await only_conversation(gateway)  # no new conversation
    assert (conversation.id, conversation.owner) == (conversation_id, OwnerState.AGENT)
    assert conversation.reply_channel == "telegram"
    assert ann.texts() == [CONNECTED]  # the bot stays silent: an agent has it

    # Alice sees it in the same conversation, and her reply goes to Telegram
    status, page = await call(gateway, "GET", f"/conversations/{conversation_id}/messages",
                              auth)
    assert status == 200
    newest = page["items"][0]
    assert (newest["channel"], newest["text"]) == (
        "telegram", "I'm on my phone now. My order 10045 arrived broken.")
    status, reply = await call(gateway, "POST", f"/conversations/{conversation_id}/messages",
                               auth, json={"text": "Sorry to hear! I'll send a new one."})
    assert status == 201 and reply["channel"] == "telegram"
    assert reply["conversation_ref"] == {"channel": "telegram", "thread_key": str(ann.id)}
    await ann.until("Alice: Sorry to hear! I'll send a new one.")
    await gateway.settle()
    stored = await gateway.store.get_message(reply["id"])
    assert stored is not None and stored.delivery is not None
    assert stored.delivery.status.value == "delivered"
    assert stored.delivery.external_id is not None
    assert stored.delivery.external_id.startswith(f"{ann.id}:")

    # back on the web chat: the next reply goes there again
    await visitor.say("Back on my laptop. Thanks!")
    await gateway.settle()
    status, reply = await call(gateway, "POST", f"/conversations/{conversation_id}/messages",
                               auth, json={"text": "You're welcome!"})
    assert status == 201 and reply["channel"] == "webchat"
    await visitor.until(says("You're welcome!"))
    # the history keeps where each message came from, in one conversation
    history = await channels_in_history(gateway, conversation_id)
    assert [c for c, t in history if t in (
        "I want a human", "I'm on my phone now. My order 10045 arrived broken.",
        "Sorry to hear! I'll send a new one.", "Back on my laptop. Thanks!",
        "You're welcome!")] == ["webchat", "telegram", "telegram", "webchat", "webchat"]
    assert not [t for t in ann.texts() if "welcome" in t]


async def test_the_bot_flow_goes_on_on_telegram_with_its_pending_question(
    gateway: Gateway, visitor: Visitor, telegram: FakeTelegram, people: People
) -> None:
    await visitor.connect()
    await visitor.say("I want to return something")
    await visitor.until(says(ASK_ORDER))
    ann = TelegramUser(gateway, telegram, people, 7002)
    await linked_on_telegram(gateway, visitor, ann)

    # the pending question (which order?) is answered on Telegram
    await ann.say("10045")
    await ann.until(ASK_REASON)
    await ann.press(ASK_REASON, "damaged")
    await ann.until(ASK_EMAIL)
    await gateway.settle()
    conversation = await only_conversation(gateway)
    assert conversation.channel == "webchat" and conversation.owner is OwnerState.BOT
    turn_state = await current_turn_state(gateway.store, conversation.id)
    assert turn_state is not None
    state = turn_state.bot_state
    assert state["flow"] == "start_return" and state["ask"]["slot"] == "email"
    assert state["slots"]["order_number"] == "10045"
    assert state["slots"]["return_reason"] == "damaged"
    # nothing of it went to the web chat's sockets as a new reply: the questions after the
    # switch were delivered on Telegram
    history = await channels_in_history(gateway, conversation.id)
    assert ("telegram", ASK_EMAIL) in history and ("webchat", ASK_EMAIL) not in history
    assert not [t for t in ann.texts() if t.startswith(GREETING)]


async def test_the_agent_can_send_on_another_of_the_contacts_channels(
    gateway: Gateway, visitor: Visitor, telegram: FakeTelegram, people: People
) -> None:
    conversation_id, auth = await agent_owns_web_chat(gateway, visitor)
    ann = TelegramUser(gateway, telegram, people, 7003)
    await linked_on_telegram(gateway, visitor, ann)
    await ann.say("still there?")
    await gateway.settle()
    path = f"/conversations/{conversation_id}/messages"

    # she wrote last on Telegram; Alice sends this one to the web chat anyway
    status, reply = await call(gateway, "POST", path, auth,
                               json={"text": "I've put the details in the web chat.",
                                     "channel": "webchat"})
    assert status == 201 and reply["channel"] == "webchat"
    await visitor.until(says("I've put the details in the web chat."))
    # the default is still where she wrote last
    status, reply = await call(gateway, "POST", path, auth, json={"text": "Anything else?"})
    assert status == 201 and reply["channel"] == "telegram"
    await ann.until("Alice: Anything else?")
    # and explicitly Telegram, after she wrote on the web chat
    await visitor.say("no, that's all")
    await gateway.settle()
    status, reply = await call(gateway, "POST", path, auth,
                               json={"text": "Your label, on your phone.", "channel": "telegram"})
    assert status == 201 and reply["channel"] == "telegram"
    await ann.until("Alice: Your label, on your phone.")
    # a channel she has no account on: refused, nothing stored
    before = await gateway.store.top_seq((await only_conversation(gateway)).id)
    status, refused = await call(gateway, "POST", path, auth,
                                 json={"text": "hello?", "channel": "slack"})
    assert (status, refused["error"]) == (404, "not_found")
    assert refused["message"] == "the contact has no slack account to send to"
    assert await gateway.store.top_seq((await only_conversation(gateway)).id) == before


async def test_a_group_message_never_continues_a_private_conversation(
    gateway: Gateway, visitor: Visitor, telegram: FakeTelegram, people: People
) -> None:
    conversation_id, _ = await agent_owns_web_chat(gateway, visitor)
    ann = TelegramUser(gateway, telegram, people, 7004)
    await linked_on_telegram(gateway, visitor, ann)
    group = people.group(-100500)
    await ann.post(people.message(ann.user, group, text="/help@omnigate_test_bot"))
    await gateway.settle()
    conversations = [from_doc(Conversation, d) async for d in
                     gateway.store.conversations.find()]
    assert len(conversations) == 2
    [in_group] = [c for c in conversations if c.id != conversation_id]
    assert in_group.channel == "telegram" and in_group.thread_key.startswith("-100500")
    web = await gateway.store.get_conversation(conversation_id)
    assert web is not None and web.routes == {"telegram": str(ann.id)}


async def test_web_chat_messages_stay_in_the_web_chats_conversation(
    gateway: Gateway, visitor: Visitor, telegram: FakeTelegram, people: People
) -> None:
    """The visitor links Telegram before writing; the chat starts on Telegram; then the
    visitor writes in the web chat: that is the web chat's own conversation (its socket
    follows one conversation), and the next Telegram message goes on there."""
    await visitor.connect()
    ann = TelegramUser(gateway, telegram, people, 7005)
    await linked_on_telegram(gateway, visitor, ann)
    await ann.say("what are your opening hours?")
    await ann.until("We're open")
    await visitor.say("hello")
    await visitor.until(says(GREETING))
    await gateway.settle()
    web = await gateway.store.find_conversation("webchat", await web_visitor_id(gateway))
    tg = await gateway.store.find_conversation("telegram", str(ann.id))
    assert web is not None and tg is not None and web.contact_id == tg.contact_id
    items, _ = await gateway.store.history(web.id)
    assert {i.channel for i in items} == {"webchat"}
    # Telegram now goes on in the conversation she used last
    await ann.say("I want a human")
    await ann.until(HANDOFF)
    await gateway.settle()
    web = await gateway.store.get_conversation(web.id)
    assert web is not None and web.owner is OwnerState.QUEUED
    assert web.reply_channel == "telegram"


async def web_visitor_id(gateway: Gateway) -> str:
    identity = await gateway.store.identities.find_one({"channel": "webchat"})
    assert identity is not None
    return str(identity["external_id"])


async def test_which_open_conversation_a_message_continues(store: Store) -> None:
    """Store-level rules: a human's conversation always, the bot's only if recent, the
    customer's own thread if it is the more recent, never from a shared thread."""
    contacts = ContactStore(store)
    web = await store.resolve_identity("webchat", "v_9")
    await store.link_identity("telegram", "9", web.contact_id)
    mine = await store.resolve_conversation("webchat", "v_9", web.contact_id)
    old = utcnow() - SWITCH_WINDOW - timedelta(minutes=1)

    async def continued(thread: str = "9", sender: str = "9") -> str | None:
        found = await contacts.conversation_to_continue("telegram", thread, web.contact_id,
                                                        sender)
        return None if found is None else found.id

    assert await continued() == mine.id  # the bot's, active just now
    await store.conversations.update_one({"_id": mine.id},
                                         {"$set": {"last_activity_at": old}})
    assert await continued() is None  # the bot's, idle for a day: Telegram starts anew
    await store.transition(mine.id, {OwnerState.BOT}, OwnerState.QUEUED)
    assert await continued() == mine.id  # waiting for a human: always
    assert await continued(thread="-100:9") is None  # a group chat: never
    # her own Telegram chat, more recent and open, wins over the older one
    own = await store.resolve_conversation("telegram", "9", web.contact_id)
    await store.transition(own.id, {OwnerState.BOT}, OwnerState.QUEUED)
    assert await continued() is None
    await store.transition(mine.id, {OwnerState.QUEUED}, OwnerState.RESOLVED)
    await store.transition(own.id, {OwnerState.QUEUED}, OwnerState.RESOLVED)
    assert await continued() is None  # nothing open: as before


async def test_the_agents_typing_shows_on_telegram_after_a_switch(
    gateway: Gateway, visitor: Visitor, telegram: FakeTelegram, people: People
) -> None:
    from tests.test_live import open_console

    conversation_id, auth = await agent_owns_web_chat(gateway, visitor)
    ann = TelegramUser(gateway, telegram, people, 7005)
    await linked_on_telegram(gateway, visitor, ann)
    await ann.say("Writing from my phone now.")
    await gateway.settle()
    console = await open_console(gateway, auth)
    try:
        await console.ask({"type": "subscribe", "conversation_id": conversation_id},
                          "subscribed")
        await console.ws.send_json({"type": "typing", "conversation_id": conversation_id,
                                    "on": True})
        await telegram.wait_for(lambda: telegram.of("sendChatAction"))
        [action] = telegram.of("sendChatAction")
        assert (action.params["chat_id"], action.params["action"]) == (ann.id, "typing")
    finally:
        await console.close()
