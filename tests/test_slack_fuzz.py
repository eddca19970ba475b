"""Fuzzing what Slack can send us: every body, signed or not, gets a 2xx or a 4xx.

Bodies are signed with the real secret (so they get past bolt's verification and reach
its middleware, its matchers and our listeners), built both from raw bytes and from
near-Slack shapes with arbitrary values in every field. A 5xx would tell Slack to retry
something that can never work; the gateway must also keep serving afterwards.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from gateway.settings import Settings
from tests.conftest import Gateway
from tests.fakes.slack_api import (
    BOT_ID,
    BOT_TOKEN,
    BOT_USER_ID,
    SIGNING_SECRET,
    FakeSlack,
    SlackSender,
    dm,
)

FUZZ = hypothesis_settings(
    max_examples=150, deadline=None, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
EVENTS, INTERACTIVE = "/webhooks/slack/events", "/webhooks/slack/interactive"
FORM = "application/x-www-form-urlencoded"


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    fake = await FakeSlack().start()
    fake.add_user("U0000ADA", "Ada Lovelace", display_name="ada")
    yield fake
    await fake.close()


@pytest.fixture
def settings(settings: Settings, slack: FakeSlack) -> Settings:
    return settings.model_copy(update={
        "slack_bot_token": BOT_TOKEN, "slack_signing_secret": SIGNING_SECRET,
        "slack_api_url": slack.api_url,
    })


@pytest.fixture
def sender(gateway: Gateway) -> SlackSender:
    return SlackSender(gateway.http, gateway.url)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=10,
)


def mutated(valid: st.SearchStrategy[dict[str, Any]], keys: list[str]
            ) -> st.SearchStrategy[dict[str, Any]]:
    """A valid shape with up to two fields set to anything and one dropped (or none)."""
    changes = st.dictionaries(st.sampled_from(keys), json_values, max_size=2)
    drops = st.lists(st.sampled_from(keys), max_size=1)

    def apply(args: tuple[dict[str, Any], dict[str, Any], list[str]]) -> dict[str, Any]:
        value, change, drop = args
        value = {**value, **change}
        for key in drop:
            value.pop(key, None)
        return value

    return st.tuples(valid, changes, drops).map(apply)


ts = st.from_regex(r"1[0-9]{9}\.[0-9]{6}", fullmatch=True)
users = st.sampled_from(["U0000ADA", BOT_USER_ID, "U0000NEW"])
channels = st.sampled_from(["D0000USER1", "C0000SUPPORT", "X0000GONE"])
texts = st.text(max_size=40) | st.sampled_from(["hello", "human", f"<@{BOT_USER_ID}> hi"])
files = st.lists(mutated(st.fixed_dictionaries(
    {"id": st.sampled_from(["F0000A", "F0000B"])},
    optional={"name": st.text(max_size=20), "size": st.integers(0, 10**9),
              "mimetype": st.just("image/png"), "file_access": st.just("check_file_info"),
              "url_private": st.just("https://files.slack.com/x")},
), ["id", "name", "size", "mimetype", "file_access", "url_private"]), max_size=2)
EVENT_KEYS = ["type", "channel", "channel_type", "user", "text", "ts", "thread_ts", "bot_id",
              "subtype", "files", "message", "client_msg_id", "team", "item", "tab"]
events = mutated(st.fixed_dictionaries(
    {"type": st.sampled_from(["message", "app_mention", "reaction_added", "app_home_opened",
                              "assistant_thread_started"]),
     "channel": channels, "ts": ts, "user": users, "text": texts},
    optional={
        "channel_type": st.sampled_from(["im", "channel", "mpim"]), "thread_ts": ts,
        "bot_id": st.sampled_from([BOT_ID, "B0OTHER"]), "files": files,
        "subtype": st.sampled_from(["file_share", "bot_message", "message_changed",
                                    "thread_broadcast", "channel_join", "message_deleted"]),
        "message": mutated(st.fixed_dictionaries({"ts": ts, "text": texts, "user": users}),
                           ["ts", "text", "user", "bot_id"]),
        "client_msg_id": st.uuids().map(str), "assistant_thread": json_values,
    },
), EVENT_KEYS)
ENVELOPE_KEYS = ["type", "event", "event_id", "team_id", "challenge", "authorizations",
                 "enterprise", "team", "user", "channel", "is_ext_shared_channel",
                 "response_url", "response_urls", "ssl_check"]
envelopes = mutated(st.fixed_dictionaries(
    {"type": st.sampled_from(["event_callback"] * 3 + ["url_verification",
                                                       "app_rate_limited"]),
     "event": events, "event_id": st.text(max_size=12), "team_id": st.just("T0001")},
    optional={"challenge": st.text(max_size=10), "is_ext_shared_channel": st.booleans()},
), ENVELOPE_KEYS)
ACTION_KEYS = ["action_id", "value", "action_ts", "block_id", "text", "type"]
ACTIONS_KEYS = ["type", "user", "actions", "channel", "container", "message", "trigger_id",
                "team", "response_urls", "view", "enterprise", "is_enterprise_install"]
actions = mutated(st.fixed_dictionaries(
    {"type": st.just("block_actions"),
     "user": mutated(st.fixed_dictionaries({"id": users}), ["id", "name"]),
     "actions": st.lists(mutated(st.fixed_dictionaries(
         {"action_id": st.sampled_from(["omnigate:0", "omnigate:1"]), "action_ts": ts,
          "value": st.sampled_from(["faq:hours", "handoff", "faq:nope"])},
         optional={"block_id": st.just("omnigate:buttons:0"),
                   "text": st.fixed_dictionaries({"type": st.just("plain_text"),
                                                  "text": st.text(max_size=20)})},
     ), ACTION_KEYS), min_size=1, max_size=2),
     "channel": st.fixed_dictionaries({"id": channels})},
    optional={"container": mutated(st.fixed_dictionaries(
        {"type": st.just("message"), "channel_id": channels, "message_ts": ts},
        optional={"thread_ts": ts}), ["channel_id", "message_ts", "thread_ts"]),
        "trigger_id": st.text(max_size=10)},
), ACTIONS_KEYS)


async def still_serving(gateway: Gateway, sender: SlackSender) -> None:
    status, _ = await sender.event(dm("U0000ADA", "hello"))
    assert status == 200


@FUZZ
@given(body=st.binary(max_size=600),
       content_type=st.sampled_from(["application/json", FORM, "text/plain"]),
       path=st.sampled_from([EVENTS, INTERACTIVE]), signed=st.booleans())
async def test_fuzz_raw_bodies(gateway: Gateway, sender: SlackSender, body: bytes,
                               content_type: str, path: str, signed: bool) -> None:
    status, text = await sender.post(path, body, content_type=content_type,
                                     signature=None if signed else "v0=" + "ab" * 32)
    assert 200 <= status < 500, (status, text)
    if not signed:  # refused: as not a Slack payload (400) or as unsigned (401)
        assert status in (400, 401), (status, text)


@FUZZ
@given(envelope=envelopes)
async def test_fuzz_events(gateway: Gateway, sender: SlackSender, envelope: dict[str, Any]
                           ) -> None:
    status, text = await sender.post(EVENTS, json.dumps(envelope).encode())
    assert 200 <= status < 500, (status, text, envelope)


@FUZZ
@given(payload=st.one_of(actions, envelopes, json_values))
async def test_fuzz_interactive(gateway: Gateway, sender: SlackSender, payload: Any) -> None:
    body = urlencode({"payload": json.dumps(payload)}).encode()
    status, text = await sender.post(INTERACTIVE, body, content_type=FORM)
    assert 200 <= status < 500, (status, text, payload)


async def test_still_serving_after_fuzzing(gateway: Gateway, slack: FakeSlack,
                                           sender: SlackSender) -> None:
    # one pass of each fuzzer's worst cases, then a normal conversation still works
    for body in (b"{" * 3000, b'{"type": "event_callback", "event": {"type": "message"}}',
                 json.dumps({"type": "event_callback", "event": {
                     "type": "message", "channel": "D1", "channel_type": "im", "user": "U1",
                     "ts": "1700000000.000100", "files": [{"id": "F1",
                                                           "file_access": "check_file_info"}]},
                 }).encode()):
        status, _ = await sender.post(EVENTS, body)
        assert status < 500
    await still_serving(gateway, sender)
    await slack.until(lambda: slack.posts("D0000USER1"), what="the bot's reply")
