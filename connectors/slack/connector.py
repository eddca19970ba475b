"""Slack: a slack-bolt ``AsyncApp`` behind aiohttp (Events API over HTTP, or Socket Mode).

Routes: ``POST /webhooks/slack/events`` (Events API) and ``POST /webhooks/slack/interactive``
(button presses). Bolt's own middleware checks the signature (and rejects timestamps more
than 300 s off), answers ``url_verification`` and drops the bot's own events. The app runs
with ``process_before_response=True``: a listener returns only after ``context.ingest``
stored the message, so Slack gets its 200 only for what is stored, and a 503 (it retries)
when the store fails. Slack's retries carry the same message, whose external id
(``<channel>:<ts>``) is stored once.

Conversations: one per direct message channel (thread key: the DM's channel id), and one
per thread for mentions in a channel (thread key ``<channel>:<thread ts>``); replies go
into that thread. Sending: ``chat.postMessage`` through a client whose only retry is
slack_sdk's 429 handler (a 429 never posted anything); every post carries the item's id
in its metadata, and a retried delivery first looks for it, so a message that reached
Slack before an error is never posted again.

Files (connectors/slack/files.py): a message's files are listed as pending attachments
and downloaded later by the gateway's fetcher through ``fetch`` (the bot token only to
Slack's file hosts); an item's stored files are uploaded into the DM or thread, each once.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web
from pydantic import ValidationError
from pymongo.errors import PyMongoError
from slack_bolt.adapter.aiohttp import to_aiohttp_response
from slack_bolt.app.async_app import AsyncApp
from slack_bolt.authorization import AuthorizeResult
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.response import BoltResponse
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncConnectionErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient

from connectors.base import (
    Connector,
    ConnectorContext,
    DeliveryError,
    DeliveryResult,
    FetchError,
)
from connectors.slack.bolt import SlackUnavailable, SocketModeAcker, WorkspaceAuthorize
from connectors.slack.files import SlackFiles, stored_files
from connectors.slack.inbound import (
    CHANNEL,
    SIGNATURE_HEADER,
    SPOKEN_SUBTYPES,
    TIMESTAMP_HEADER,
    BlockActions,
    MessageEnvelope,
    MessageEvent,
    envelope_problem,
    incoming_files,
    slack_time,
    split_thread_key,
    strip_mention,
    thread_key_for,
)
from connectors.slack.outbound import (
    AUTH_ERRORS,
    METADATA_EVENT,
    Part,
    ShortRateLimitRetry,
    classify,
    render_event,
    render_message,
)
from gateway.channel_settings import SlackSettings
from gateway.model import (
    Activity,
    ActivityType,
    Attachment,
    Conversation,
    DeliveryStatus,
    InboundMessage,
    Party,
    Role,
)
from gateway.store.contacts import is_link_payload
from gateway.store.mongo import from_doc

log = logging.getLogger(__name__)

LINK_TEXT = "(a link code)"  # what the history shows for a pasted link code
EVENTS_PATH = "/webhooks/slack/events"
INTERACTIVE_PATH = "/webhooks/slack/interactive"
LOOKUP_TIMEOUT = 2.0  # users.info while Slack waits for our answer (3 s)
SEND_TIMEOUT = 15.0
INLINE_RATE_LIMIT_WAIT = 10.0  # wait out shorter 429s in place; longer ones: outbox retry
HISTORY_PAGES = 5
NAME_CACHE = 10_000
CUSTOMIZE_SCOPE = "chat:write.customize"


def _json(status: int, error: str, message: str) -> web.Response:
    return web.json_response({"error": error, "message": message}, status=status)


def _bolt_error(status: int, error: str, message: str) -> BoltResponse:
    return BoltResponse(status=status, body={"error": error, "message": message})


class SlackConnector(Connector):
    channel = CHANNEL

    def __init__(self, settings: SlackSettings) -> None:
        self.settings = settings
        self.api_url = settings.api_url.rstrip("/") + "/"
        # slack_sdk's 429 handler for posts; its max_wait is how long a 429 is waited out
        # in place (longer Retry-After values go back to the outbox)
        self.rate_limit_retry = ShortRateLimitRetry(INLINE_RATE_LIMIT_WAIT)
        self._context: ConnectorContext | None = None
        self._session: aiohttp.ClientSession | None = None
        self._reader: AsyncWebClient | None = None  # reads: retried on connection errors
        self._writer: AsyncWebClient | None = None  # posts: retried on 429 only
        self._files: SlackFiles | None = None  # downloads and uploads (files.py)
        self._bolt: AsyncApp | None = None
        self._socket: SocketModeAcker | None = None
        self._socket_task: asyncio.Task[None] | None = None
        self._auth: AuthorizeResult | None = None
        self._auth_lock = asyncio.Lock()
        self._names: dict[str, str | None] = {}

    # ------------------------------------------------------------------- wiring

    def setup(self, app: web.Application) -> None:
        app.router.add_post(EVENTS_PATH, self.handle_http)
        app.router.add_post(INTERACTIVE_PATH, self.handle_http)

    async def start(self, context: ConnectorContext) -> None:
        self._context = context
        self._session = aiohttp.ClientSession()
        common: dict[str, Any] = {"base_url": self.api_url, "session": self._session}
        self._reader = AsyncWebClient(
            token=self.settings.bot_token, timeout=int(LOOKUP_TIMEOUT * 5), **common,
            retry_handlers=[AsyncConnectionErrorRetryHandler(),
                            ShortRateLimitRetry(INLINE_RATE_LIMIT_WAIT)],
        )
        self._writer = AsyncWebClient(
            token=self.settings.bot_token, timeout=int(SEND_TIMEOUT), **common,
            retry_handlers=[self.rate_limit_retry],
        )
        self._files = SlackFiles(
            token=self.settings.bot_token, api_url=self.api_url, session=self._session,
            reader=self._reader, writer=self._writer, context=context)
        bolt = AsyncApp(
            name="omnigate-slack",
            logger=logging.getLogger("connectors.slack.bolt"),
            client=AsyncWebClient(timeout=int(LOOKUP_TIMEOUT * 5), **common),
            signing_secret=self.settings.signing_secret or "",
            authorize=WorkspaceAuthorize(self.identity),
            process_before_response=True,
            # we use neither say()/assistant helpers nor custom functions
            attaching_conversation_kwargs_enabled=False,
            attaching_function_token_enabled=False,
        )
        bolt.use(self._app_rate_limited)
        bolt.event("message")(self._on_message)
        bolt.event("app_mention")(self._on_message)
        bolt.event(re.compile(".*"))(self._on_other_event)
        bolt.block_action(re.compile(".*"))(self._on_action)
        self._bolt = bolt
        try:
            auth = await self.identity()
            log.info("slack: connected as bot user %s (bot %s) in team %s",
                     auth.bot_user_id, auth.bot_id, auth.team_id)
        except SlackUnavailable as exc:
            log.error("slack: %s; events are refused (Slack retries them) until it works", exc)
        if self.settings.app_token:
            self._socket = SocketModeAcker(
                bolt, app_token=self.settings.app_token,
                logger=logging.getLogger("connectors.slack.socket"),
                web_client=bolt.client, ping_interval=10,
            )
            self._socket_task = asyncio.create_task(
                self._socket.connect_async(),  # type: ignore[no-untyped-call]
                name="slack-socket-mode"
            )

    async def stop(self) -> None:
        if self._socket is not None:
            await self._socket.close_async()  # type: ignore[no-untyped-call]
        if self._socket_task is not None:
            self._socket_task.cancel()
            await asyncio.gather(self._socket_task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    @property
    def context(self) -> ConnectorContext:
        if self._context is None:
            raise RuntimeError("SlackConnector.start() was not called")
        return self._context

    async def identity(self) -> AuthorizeResult:
        """Who we are in Slack (auth.test), asked once and then kept."""
        if self._auth is not None:
            return self._auth
        async with self._auth_lock:
            if self._auth is None:
                if self._reader is None:
                    raise SlackUnavailable("the Slack connector is not started")
                try:
                    response = await self._reader.auth_test()
                except SlackApiError as exc:
                    raise SlackUnavailable(f"auth.test failed: {classify(exc).code}") from exc
                except (aiohttp.ClientError, TimeoutError) as exc:
                    raise SlackUnavailable(f"auth.test failed: {exc!r}") from exc
                scopes = response.headers.get("x-oauth-scopes") if response.headers else None
                self._auth = AuthorizeResult.from_auth_test_response(
                    auth_test_response=response, bot_token=self.settings.bot_token,
                    bot_scopes=scopes if isinstance(scopes, str) else None,
                )
            return self._auth

    # ------------------------------------------------------------- deep links

    link_by_code = True  # no Slack link carries a payload: the customer sends the code

    async def deep_link(self, payload: str) -> str:
        """Opens the direct message with our app (the code is sent there by hand)."""
        auth = await self.identity()
        return (f"https://slack.com/app_redirect?channel={quote(auth.bot_user_id or '')}"
                f"&team={quote(auth.team_id or '')}")

    # ------------------------------------------------------------------ inbound

    async def handle_http(self, request: web.Request) -> web.StreamResponse:
        """Both Slack routes: checked here for shape, then bolt's middleware and listeners."""
        if self._bolt is None:
            return _json(503, "not_ready", "the Slack connector is starting")
        if not self.settings.signing_secret:
            return _json(404, "http_events_off", "this gateway receives Slack events over "
                         "Socket Mode; set OMNIGATE_SLACK_SIGNING_SECRET for HTTP events")
        raw = await request.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return _json(400, "bad_request", "the body is not UTF-8")
        timestamp = request.headers.get("X-Slack-Request-Timestamp", "")
        signature = request.headers.get("X-Slack-Signature", "")
        if not TIMESTAMP_HEADER.fullmatch(timestamp) or not SIGNATURE_HEADER.fullmatch(signature):
            return _json(401, "invalid_request", "missing or malformed Slack signature headers")
        headers: dict[str, str | Sequence[str]] = {
            name: request.headers.getall(name) for name in request.headers}
        try:
            bolt_request = AsyncBoltRequest(body=text, query=request.query_string, headers=headers)
        except (ValueError, TypeError, AttributeError, KeyError, IndexError, RecursionError):
            return _json(400, "bad_request", "the body is not a Slack payload")
        problem = envelope_problem(bolt_request.body)
        if problem is not None:
            return _json(400, "bad_request", problem)
        response = await self._bolt.async_dispatch(bolt_request)
        if response.status >= 500:
            log.warning("slack: answered %d to a %s request (Slack will retry)",
                        response.status, bolt_request.body.get("type"))
        return await to_aiohttp_response(response)

    async def _app_rate_limited(
        self, body: dict[str, Any], next: Callable[[], Awaitable[BoltResponse]]
    ) -> BoltResponse | None:
        if body.get("type") == "app_rate_limited":
            log.warning("slack: Slack is dropping our events (app_rate_limited): %s",
                        body.get("minute_rate_limited"))
            return BoltResponse(status=200, body="")
        return await next()

    async def _on_other_event(self, ack: AsyncAck) -> None:
        await ack()  # subscribed but not ours to handle: acknowledged, nothing stored

    async def _on_message(self, ack: AsyncAck, body: dict[str, Any]) -> BoltResponse | None:
        try:
            event = MessageEnvelope.model_validate(body).event
        except ValidationError as exc:
            return _bolt_error(400, "bad_event", _first_error(exc))
        try:
            message = await self._message_from(event, body)
            if message is not None:
                await self.context.ingest(message)
        except ValidationError as exc:
            return _bolt_error(400, "bad_event", _first_error(exc))
        except PyMongoError as exc:
            log.warning("slack: could not store event %s: %s", body.get("event_id"), exc)
            return _bolt_error(503, "store_unavailable", "not stored; please retry")
        await ack()
        return None

    async def _message_from(
        self, event: MessageEvent, body: dict[str, Any]
    ) -> InboundMessage | None:
        """The event as an inbound message, or None when it is not one for us."""
        if event.subtype == "message_changed":
            await self._edited(event)
            return None
        if event.from_bot or event.user is None:
            return None  # another bot (our own were dropped by bolt), or a system message
        if event.subtype is not None and event.subtype not in SPOKEN_SUBTYPES:
            return None
        store = self.context.store
        if event.type == "message" and event.channel_type == "im":
            thread_key = event.channel  # one conversation per direct message channel
        elif event.type == "app_mention":
            thread_key = thread_key_for(event.channel, event.thread_ts, event.ts)
        elif event.thread_ts and await store.find_conversation(
            CHANNEL, key := thread_key_for(event.channel, event.thread_ts, event.ts)
        ):
            thread_key = key  # a follow-up in a thread the bot was mentioned in
        else:
            return None  # channel chatter that is not addressed to us
        auth = self._auth
        text = strip_mention(event.text, auth.bot_user_id if auth else None)
        direct = event.type == "message" and event.channel_type == "im"
        # a link code pasted in a DM (offered on another channel: LinkOffer.code)
        deep_link = text.strip() if direct and text and is_link_payload(text.strip()) else None
        # Slack waits for our answer: the name is time-boxed; files are fetched later
        name = await self._user_name(event.user)
        return InboundMessage(
            channel=CHANNEL,
            external_id=f"{event.channel}:{event.ts}",  # the same on every Slack retry
            thread_key=thread_key,
            sender=Party(role=Role.CUSTOMER, id=event.user, name=name),
            sender_external_id=event.user,
            timestamp=slack_time(event.ts),
            text=LINK_TEXT if deep_link else text or None,
            deep_link=deep_link,
            files=incoming_files(event.files),
            channel_data={
                "event_id": body.get("event_id") if isinstance(body.get("event_id"), str) else None,
                "event_type": event.type, "channel": event.channel,
                "channel_type": event.channel_type, "ts": event.ts,
                "thread_ts": event.thread_ts, "client_msg_id": event.client_msg_id,
                "team": event.team, "files": [f.id for f in event.files],
                "one_to_one": direct,  # a DM: only the person and us
            },
        )

    async def _edited(self, event: MessageEvent) -> None:
        edited = event.message
        if edited is None or edited.bot_id is not None:
            return
        auth = self._auth
        text = strip_mention(edited.text, auth.bot_user_id if auth else None)
        await self.context.store.edit_inbound(
            CHANNEL, f"{event.channel}:{edited.ts}", text or None, {"ts": event.ts}
        )

    async def _on_action(self, ack: AsyncAck, body: dict[str, Any]) -> BoltResponse | None:
        """A button press: the customer's choice, in the conversation the buttons were in."""
        try:
            payload = BlockActions.model_validate(body)
        except ValidationError as exc:
            return _bolt_error(400, "bad_action", _first_error(exc))
        action = payload.actions[0]
        channel = payload.channel_id
        if action.value is None or channel is None:
            await ack()  # not one of our buttons (they all carry a value)
            return None
        try:
            conversation = await self._conversation_of(channel, payload.thread_ts)
            if conversation is None:
                log.info("slack: a button pressed in %s belongs to no conversation", channel)
                await ack()
                return None
            # a DM that continues another channel's conversation: the press comes from
            # the DM (the pipeline finds that conversation, as for a message there)
            direct = conversation.channel != CHANNEL
            thread_key = channel if direct else conversation.thread_key
            user = payload.user
            name = await self._user_name(user.id) or user.name or user.username
            await self.context.ingest(InboundMessage(
                channel=CHANNEL,
                external_id=f"action:{channel}:{action.action_ts}",
                thread_key=thread_key,
                sender=Party(role=Role.CUSTOMER, id=user.id, name=name),
                sender_external_id=user.id,
                timestamp=slack_time(action.action_ts),
                text=action.text.text if action.text else action.value,
                value=action.value,
                channel_data={"action_id": action.action_id, "block_id": action.block_id,
                              "channel": channel, "message_ts": payload.message_ts,
                              "trigger_id": payload.trigger_id, "one_to_one": direct},
            ))
        except ValidationError as exc:
            return _bolt_error(400, "bad_action", _first_error(exc))
        except PyMongoError as exc:
            log.warning("slack: could not store a button press in %s: %s", channel, exc)
            return _bolt_error(503, "store_unavailable", "not stored; please retry")
        await ack()
        return None

    async def _conversation_of(self, channel: str, thread_ts: str | None) -> Conversation | None:
        store = self.context.store
        if thread_ts:
            found = await store.find_conversation(CHANNEL, f"{channel}:{thread_ts}")
            if found is not None:
                return found
        return await store.find_conversation(CHANNEL, channel) or await self._continued_in(
            channel)

    async def _continued_in(self, channel: str) -> Conversation | None:
        """The conversation of another channel that this DM continues (channel switch:
        its replies come here, ``Conversation.routes``)."""
        doc = await self.context.store.conversations.find_one(
            {f"routes.{CHANNEL}": channel}, sort=[("updated_at", -1)])
        return None if doc is None else from_doc(Conversation, doc)

    async def _user_name(self, user_id: str) -> str | None:
        """The person's display name (users.info), cached; None if Slack does not say."""
        if user_id in self._names:
            return self._names[user_id]
        name: str | None = None
        try:
            assert self._reader is not None
            async with asyncio.timeout(LOOKUP_TIMEOUT):
                user = (await self._reader.users_info(user=user_id)).get("user") or {}
            profile = user.get("profile") or {}
            for candidate in (profile.get("display_name"), profile.get("real_name"),
                              user.get("real_name"), user.get("name")):
                if isinstance(candidate, str) and candidate.strip():
                    name = candidate.strip()[:200]
                    break
        except Exception as exc:  # best effort: a name never costs the message
            log.info("slack: users.info %s failed: %r", user_id, exc)
            return None  # not cached: asked again next time
        if len(self._names) >= NAME_CACHE:
            self._names.clear()
        self._names[user_id] = name
        return name

    async def fetch(self, ref: Mapping[str, Any]) -> bytes:
        """A customer's file for the attachment store (the fetcher calls this)."""
        if self._files is None:
            raise FetchError("the Slack connector is not started")
        return await self._files.fetch(ref)

    # ----------------------------------------------------------------- outbound

    async def send(self, conversation: Conversation, item: Activity) -> DeliveryResult:
        """Post one item (in parts if long); never a part twice, whatever failed before.

        An item with stored files: its text's parts are posted as usual except the last,
        which becomes the files' ``initial_comment`` (unless it carries buttons: Slack
        shows no blocks on a file share, so it is posted too and the files follow without
        a comment); then the files are uploaded and shared (files.py), each uploaded once.
        """
        if self._writer is None or self._reader is None or self._files is None:
            raise DeliveryError("the Slack connector is not started")
        channel, thread_ts = split_thread_key(conversation.thread_key)
        files = stored_files(item) if item.type is ActivityType.MESSAGE else []
        username: str | None = None
        if item.type is ActivityType.EVENT:
            parts = render_event(item)
        elif item.sender.role is Role.AGENT and item.sender.name:
            if self._can_customize() and not files:
                username = item.sender.name[:80]
                parts = render_message(item)
            else:  # (a file share always shows the app's name)
                parts = render_message(item, author=item.sender.name)
        else:
            parts = render_message(item)
        comment: str | None = None
        if files:
            await self._files.check(files)
            if parts and parts[-1].blocks is None:
                comment = parts.pop().text
        elif not parts:
            return DeliveryResult(DeliveryStatus.SKIPPED)
        delivery = item.delivery
        first = delivery.parts_sent if delivery is not None else 0
        retrying = delivery is not None and delivery.attempts > 1
        ts: str | None = None
        for index in range(first, len(parts)):
            key = f"{item.id}:{index}"
            # an earlier attempt may have reached Slack before it failed: look first
            found = await self._posted(conversation, channel, thread_ts, key, item) if (
                retrying) else None
            ts = found if found is not None else await self._post(
                conversation, parts[index], channel=channel, thread_ts=thread_ts, key=key,
                username=username)
            if index + 1 < len(parts) or files:
                await self.context.store.set_parts_sent(item.id, index + 1)
        if files:
            ts = await self._share(conversation, item, files, channel=channel,
                                   thread_ts=thread_ts, comment=comment)
        return DeliveryResult(DeliveryStatus.DELIVERED, external_id=ts)

    async def _share(
        self, conversation: Conversation, item: Activity, files: list[Attachment], *,
        channel: str, thread_ts: str | None, comment: str | None,
    ) -> str:
        """Upload and share the item's files; the first Slack file id."""
        assert self._files is not None
        try:
            return await self._files.share(item, files, channel=channel,
                                           thread_ts=thread_ts, comment=comment)
        except SlackApiError as exc:
            raise await self._failed(conversation, exc, "a file upload") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DeliveryError(f"slack: a file upload went unanswered: {exc!r}") from exc

    def _can_customize(self) -> bool:
        """May we set ``username`` (chat:write.customize)? Unknown scopes: assume so."""
        auth = self._auth
        return auth is None or auth.bot_scopes is None or CUSTOMIZE_SCOPE in auth.bot_scopes

    async def _post(
        self, conversation: Conversation, part: Part, *, channel: str, thread_ts: str | None,
        key: str, username: str | None,
    ) -> str:
        assert self._writer is not None
        try:
            response = await self._writer.chat_postMessage(
                channel=channel, thread_ts=thread_ts, text=part.text, blocks=part.blocks,
                username=username, unfurl_links=False,
                metadata={"event_type": METADATA_EVENT, "event_payload": {"key": key}},
            )
        except SlackApiError as exc:
            raise await self._failed(conversation, exc, "chat.postMessage") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DeliveryError(f"slack: chat.postMessage unanswered: {exc!r}") from exc
        return str(response.get("ts") or "")

    async def _posted(
        self, conversation: Conversation, channel: str, thread_ts: str | None, key: str,
        item: Activity,
    ) -> str | None:
        """The ts of the message an earlier attempt posted for ``key``, if there is one."""
        assert self._reader is not None
        oldest = f"{item.created_at.timestamp() - 120:.6f}"
        cursor: str | None = None
        try:
            for _page in range(HISTORY_PAGES):
                if thread_ts:
                    response = await self._reader.conversations_replies(
                        channel=channel, ts=thread_ts, oldest=oldest, limit=200,
                        include_all_metadata=True, cursor=cursor)
                else:
                    response = await self._reader.conversations_history(
                        channel=channel, oldest=oldest, limit=200,
                        include_all_metadata=True, cursor=cursor)
                for message in response.get("messages") or []:
                    metadata = message.get("metadata") or {}
                    payload = metadata.get("event_payload") or {}
                    if metadata.get("event_type") == METADATA_EVENT and payload.get("key") == key:
                        return str(message.get("ts") or "")
                cursor = (response.get("response_metadata") or {}).get("next_cursor")
                if not cursor:
                    return None
        except SlackApiError as exc:
            raise await self._failed(conversation, exc, "checking for an earlier post") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DeliveryError(f"slack: could not check for an earlier post: {exc!r}") from exc
        return None

    async def _failed(
        self, conversation: Conversation, exc: SlackApiError, what: str
    ) -> DeliveryError:
        failure = classify(exc)
        if failure.code in AUTH_ERRORS:
            log.error("slack: %s refused the bot token (%s): fix the token or its scopes",
                      what, failure.code)
        if failure.unreachable:
            try:
                contact = await self.context.store.get_contact(conversation.contact_id)
                for identity in contact.identities if contact else []:
                    if identity.channel == CHANNEL:
                        await self.context.store.set_identity_reachable(
                            CHANNEL, identity.external_id, False, failure.code)
            except PyMongoError as store_error:
                log.warning("slack: could not mark %s unreachable: %s",
                            conversation.contact_id, store_error)
        return failure.error


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error.get("loc", ()))
    return f"{where}: {error.get('msg', 'invalid')}"[:300]
