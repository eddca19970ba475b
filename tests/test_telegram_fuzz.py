"""Fuzzing the Telegram webhook: whatever the body, 200 (stored or ignored) or 400, never a
5xx, never a crash; and the gateway keeps serving afterwards."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from gateway.settings import Settings
from tests.conftest import Gateway
from tests.fakes.telegram_api import FakeTelegram, People

TOKEN = "777:FUZZ-token"
SECRET = "fuzz-secret"
HOOK = "/webhooks/telegram"
FUZZ = hypothesis_settings(
    max_examples=120, deadline=None, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture
async def telegram() -> AsyncIterator[FakeTelegram]:
    fake = FakeTelegram(token=TOKEN)
    fake.add_file("f1", 1000)
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
def settings(settings: Settings, telegram: FakeTelegram) -> Settings:
    return settings.model_copy(update={
        "telegram_token": TOKEN, "telegram_webhook_secret": SECRET,
        "telegram_api_url": telegram.url})


# Numbers as Telegram sends them, and the ones it never would (BSON has only 64 bits).
ints = st.one_of(st.integers(-(2**31), 2**31), st.integers(), st.sampled_from([0, -1, 2**63]))
texts = st.text(max_size=80) | st.sampled_from(
    ["/start", "/start abc", "/start@omnigate_test_bot x", "@omnigate_test_bot hi", "\ud800",
     "hello", "\x00", "🙂" * 3])
json_leaf = st.none() | st.booleans() | ints | st.floats(allow_nan=False) | texts
json_any = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=12)
users = st.fixed_dictionaries(
    {"id": ints, "is_bot": st.just(False) | st.booleans(), "first_name": texts},
    optional={"last_name": texts, "username": texts, "language_code": texts})
chats = st.fixed_dictionaries(
    {"id": ints, "type": st.sampled_from(["private", "private", "supergroup", "group",
                                          "channel", "x"])},
    optional={"title": texts})
entities = st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["mention", "bot_command", "text_mention", "bold", "url"]),
     "offset": st.integers(-3, 90), "length": st.integers(-3, 90)},
    optional={"user": users}), max_size=3)
files = st.fixed_dictionaries({"file_id": st.sampled_from(["f1", "nope", ""]) | texts,
                               "file_unique_id": texts},
                              optional={"file_size": ints, "file_name": texts,
                                        "mime_type": texts})
photo = st.lists(st.fixed_dictionaries({"file_id": st.sampled_from(["f1", "x"]),
                                        "file_unique_id": texts, "width": ints,
                                        "height": ints}, optional={"file_size": ints}),
                 max_size=2)
messages = st.fixed_dictionaries(
    {"message_id": ints, "date": st.integers(-10, 2**34), "chat": chats, "from": users},
    optional={"text": texts, "entities": entities, "caption": texts,
              "caption_entities": entities, "photo": photo, "document": files,
              "voice": files.map(lambda f: {**f, "duration": 1}),
              "location": st.fixed_dictionaries({"latitude": st.floats(-1e9, 1e9),
                                                 "longitude": st.floats(-1e9, 1e9)}),
              "edit_date": ints, "reply_to_message": json_any})
callbacks = st.fixed_dictionaries(
    {"id": texts, "from": users, "chat_instance": texts},
    optional={"data": texts, "message": messages | json_any})
updates = st.fixed_dictionaries(
    {"update_id": ints},
    optional={"message": messages, "edited_message": messages, "callback_query": callbacks,
              "my_chat_member": json_any, "channel_post": messages, "poll": json_any})


async def post(gateway: Gateway, body: bytes, secret: str = SECRET) -> int:
    headers = {"X-Telegram-Bot-Api-Secret-Token": secret, "Content-Type": "application/json"}
    async with gateway.http.post(gateway.url + HOOK, data=body, headers=headers) as response:
        await response.read()
        return response.status


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()  # ensure_ascii: lone surrogates travel as \\ud800


@FUZZ
@given(body=st.binary(max_size=600) | json_any.map(encode))
async def test_random_bytes_and_json_are_400_or_200(gateway: Gateway, body: bytes) -> None:
    assert await post(gateway, body) in (200, 400)


@FUZZ
@given(update=updates)
async def test_update_shaped_bodies_are_400_or_200(
    gateway: Gateway, telegram: FakeTelegram, update: dict[str, Any]
) -> None:
    assert await post(gateway, encode(update)) in (200, 400)


async def test_still_serving_after_garbage(gateway: Gateway, telegram: FakeTelegram) -> None:
    for body in (b"", b"{", b"[]", b"null", b'{"update_id": "x"}', b"\xff\xfe",
                 b'{"update_id": 1, "message": {"message_id": 1, "date": 1, '
                 b'"chat": {"id": 99, "type": "private"}, "text": "\\ud800",'
                 b'"from": {"id": 99, "is_bot": false, "first_name": "A"}}}',
                 b'{"update_id": 2, "message": {"message_id": 1, "date": 1, '
                 b'"chat": {"id": 99999999999999999999, "type": "private"}, "text": "x",'
                 b'"from": {"id": 99999999999999999999, "is_bot": false, "first_name": "A"}}}',
                 b"[" * 50000 + b"]" * 50000):
        assert await post(gateway, body) == 400, body[:80]
    people = People(telegram)
    good = people.message(people.user(4242), text="hello")
    assert await post(gateway, encode(good)) == 200
    await telegram.wait_for(lambda: telegram.texts(4242))
    assert await gateway.store.messages.count_documents({"direction": "in"}) == 1
