"""Telegram: a bot account, through aiogram 3's Bot API client.

Inbound, by webhook (``POST /webhooks/telegram``, the secret header is mandatory and
compared in constant time) or by long polling (``getUpdates`` in a background task, the
offset kept in the store; with several gateway processes on one store only the holder of
the lease ``telegram:polling:<bot id>`` polls, gateway/leases.py). Either way an update
is parsed with aiogram's types, turned into an ``InboundMessage`` and ingested; only then
is it acknowledged (200 to the webhook, the next ``getUpdates`` offset in polling).
A message's files are only named then (by reference); the gateway's fetcher downloads
them later through ``fetch`` (connectors/telegram/files.py), so the webhook answers fast.
Outbound, ``send`` renders a stored item: long texts in parts of 4096, buttons as an
inline keyboard, agents as "Name: text", events as an italic note, files uploaded from
the attachment store (the text as the first one's caption when it fits). The setup for
real is in docs/channels/telegram.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from collections.abc import Coroutine, Mapping
from typing import Any

from aiogram import Bot
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import (
    AiogramError,
    TelegramBadRequest,
    TelegramConflictError,
    TelegramEntityTooLarge,
    TelegramForbiddenError,
    TelegramMigrateToChat,
    TelegramRetryAfter,
)
from aiogram.types import (
    CallbackQuery,
    ChatMemberUpdated,
    Message,
    ReplyParameters,
    Update,
)
from aiohttp import ClientError, web
from pydantic import ValidationError
from pymongo.errors import PyMongoError

from connectors.base import Connector, ConnectorContext, DeliveryError, DeliveryResult
from connectors.telegram.files import download, upload
from connectors.telegram.inbound import (
    CALLBACK_PREFIX,
    CHANNEL,
    BotUser,
    addressed_to_bot,
    button_title,
    chat_of,
    display_name,
    incoming_files,
    is_group,
    location_attachment,
    message_key,
    parse_update,
    start_payload,
    text_and_entities,
    thread_key,
    without_bot_mentions,
)
from connectors.telegram.outbound import (
    LONG_VALUE_PREFIX,
    entities,
    keyboard,
    needs_mapping,
    opens_here,
    plan,
    render,
    short_key,
)
from gateway.aio import raise_if_cancelled
from gateway.channel_settings import TelegramSettings
from gateway.files import DEFAULT_MAX_BYTES, StoredFile
from gateway.leases import Singleton
from gateway.model import (
    Activity,
    Attachment,
    AttachmentState,
    Conversation,
    DeliveryStatus,
    InboundMessage,
    Party,
    Role,
)
from gateway.store import StoreError

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/webhooks/telegram"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"  # noqa: S105 - a header name
ALLOWED_UPDATES = ["message", "edited_message", "callback_query", "my_chat_member"]
POLL_STATE = "polling"  # channel_state key: {"offset": next update_id to ask for}
STARTUP_TIMEOUT = 10  # seconds for getMe / setWebhook at start
MAX_RETRY_DELAY = 30.0
STOP_GRACE = 5.0
ExpectedFailure = (PyMongoError, StoreError, AiogramError)


def _problem(status: int, error: str, message: str) -> web.Response:
    return web.json_response({"ok": False, "error": error, "message": message}, status=status)


class TelegramConnector(Connector):
    channel = CHANNEL

    def __init__(
        self,
        settings: TelegramSettings,
        *,
        poll_timeout: int = 25,
    ) -> None:
        self.settings = settings
        self.poll_timeout = poll_timeout
        self.bot = Bot(
            settings.token,
            session=AiohttpSession(api=TelegramAPIServer.from_base(settings.api_url)),
        )
        self._context: ConnectorContext | None = None
        self._me: BotUser | None = None
        # polling mode: the getUpdates loop (under the lease when the core lends leases)
        self._poller: asyncio.Task[None] | Singleton | None = None
        self._registrar: asyncio.Task[None] | None = None  # setWebhook retries
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = False

    @property
    def context(self) -> ConnectorContext:
        if self._context is None:
            raise RuntimeError("TelegramConnector.start() was not called")
        return self._context

    # ------------------------------------------------------------------- wiring

    def setup(self, app: web.Application) -> None:
        app.router.add_post(WEBHOOK_PATH, self.handle_webhook)

    async def start(self, context: ConnectorContext) -> None:
        self._context = context
        self._stopped = False
        try:
            await self.bot_user()
        except AiogramError as exc:  # learnt later, when a group message needs it
            log.warning("telegram: getMe failed at start (%s); will retry when needed", exc)
        if self.settings.mode == "polling":
            if context.leases is not None:  # one process of many polls (Telegram: 409)
                self._poller = Singleton(context.leases, self.lease_name, self._poll)
                self._poller.start()
            else:
                self._poller = asyncio.create_task(self._poll(), name="telegram-polling")
        elif self.settings.webhook_url and not await self._set_webhook():
            self._registrar = asyncio.create_task(self._keep_registering(),
                                                  name="telegram-set-webhook")

    @property
    def lease_name(self) -> str:
        """The polling lease: one per bot (the token's bot id; else a hash of it)."""
        bot_id = self.settings.token.partition(":")[0]
        if not bot_id.isdigit():
            bot_id = hashlib.sha256(self.settings.token.encode()).hexdigest()[:16]
        return f"telegram:polling:{bot_id}"

    async def stop(self) -> None:
        self._stopped = True
        if isinstance(self._poller, Singleton):
            await self._poller.stop()  # stops polling and releases the lease
            self._poller = None
        for loop in (self._poller, self._registrar):
            if loop is not None:
                loop.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop
        self._poller = self._registrar = None
        if self._tasks:  # button answers in flight
            _, pending = await asyncio.wait(set(self._tasks), timeout=STOP_GRACE)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.bot.session.close()

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keep_registering(self) -> None:
        delay = 1.0
        while not await self._set_webhook():
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_DELAY)

    async def _set_webhook(self) -> bool:
        url = self.settings.webhook_url
        assert url is not None
        try:
            await self.bot.set_webhook(
                url,
                secret_token=self.settings.webhook_secret,
                allowed_updates=ALLOWED_UPDATES,
                drop_pending_updates=False,
                request_timeout=STARTUP_TIMEOUT,
            )
        except AiogramError as exc:
            log.error("telegram: setWebhook(%s) failed: %s; retrying", url, exc)
            return False
        log.info("telegram: webhook set to %s", url)
        return True

    async def bot_user(self) -> BotUser:
        """The bot's own account (getMe, once)."""
        if self._me is None:
            user = await self.bot.get_me(request_timeout=STARTUP_TIMEOUT)
            self._me = BotUser(user.id, user.username)
        return self._me

    async def deep_link(self, payload: str) -> str:
        """A link that opens a private chat with the bot and sends ``/start <payload>``
        (the bot's username from getMe)."""
        me = await self.bot_user()
        if not me.username:
            raise RuntimeError("the bot has no username (getMe)")
        return f"https://t.me/{me.username}?start={payload}"

    # ------------------------------------------------------------------ webhook

    def secret_ok(self, given: str | None) -> bool:
        """The webhook's secret header, compared in constant time; mandatory."""
        expected = self.settings.webhook_secret
        if not expected or given is None:
            return False
        return secrets.compare_digest(
            given.encode("utf-8", "surrogateescape"), expected.encode("utf-8")
        )

    async def handle_webhook(self, request: web.Request) -> web.StreamResponse:
        if self.settings.mode != "webhook":
            return _problem(404, "not_found", "this gateway polls Telegram (mode=polling)")
        if not self.secret_ok(request.headers.get(SECRET_HEADER)):
            log.info("telegram: webhook call with a missing or wrong secret refused")
            return _problem(403, "forbidden", f"missing or wrong {SECRET_HEADER}")
        if self._context is None or self._stopped:
            return _problem(503, "unavailable", "not started, or stopping")
        update = parse_update(await request.read(), self.bot)
        if isinstance(update, str):
            return _problem(400, "bad_update", update)
        try:
            outcome = await self.handle_update(update)
        except ValidationError as exc:
            return _problem(400, "bad_update", f"cannot be normalised: {exc.error_count()} "
                                               "error(s)")
        except (PyMongoError, StoreError) as exc:
            log.warning("telegram: update %d not stored (%s); Telegram will redeliver",
                        update.update_id, exc)
            return _problem(500, "store_unavailable", "not stored; redeliver")
        except AiogramError as exc:
            log.warning("telegram: update %d: Bot API call failed (%s)", update.update_id, exc)
            return _problem(503, "telegram_unavailable", "Bot API call failed; redeliver")
        return web.json_response({"ok": True, "outcome": outcome})

    # ------------------------------------------------------------------ polling

    async def _poll(self) -> None:
        """Long polling: ask from the stored offset; store the batch, then the new offset."""
        store = self.context.store
        offset: int | None = None
        loaded = webhook_cleared = False
        delay = 1.0
        while True:
            try:
                if not webhook_cleared:  # getUpdates is refused while a webhook is set
                    await self.bot.delete_webhook(drop_pending_updates=False)
                    webhook_cleared = True
                if not loaded:
                    state = await store.get_state(CHANNEL, POLL_STATE)
                    offset = int(state["offset"]) if state and "offset" in state else None
                    loaded = True
                updates = await self.bot.get_updates(
                    offset=offset,
                    timeout=self.poll_timeout,
                    allowed_updates=ALLOWED_UPDATES,
                    request_timeout=self.poll_timeout + 15,
                )
                for update in updates:
                    await self._handle_polled(update)
                if updates:
                    offset = updates[-1].update_id + 1
                    await store.put_state(CHANNEL, POLL_STATE, {"offset": offset})
                delay = 1.0
            except TelegramRetryAfter as exc:
                await asyncio.sleep(exc.retry_after)
            except ExpectedFailure as exc:
                raise_if_cancelled()
                if isinstance(exc, TelegramConflictError):
                    webhook_cleared = False
                log.warning("telegram: polling failed (%s); retrying in %.0f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)

    async def _handle_polled(self, update: Update) -> None:
        """One polled update; store or Bot API failures propagate (the batch is retried)."""
        try:
            await self.handle_update(update)
        except ExpectedFailure:
            raise
        except Exception:  # a bad update or a bug must not stop the channel: skip it
            log.exception("telegram: update %d skipped", update.update_id)

    # ------------------------------------------------------------------ inbound

    async def handle_update(self, update: Update) -> str:
        """Ingest one update. Returns stored, duplicate, edited or ignored."""
        if update.message is not None:
            return await self._on_message(update.update_id, update.message)
        if update.edited_message is not None:
            return await self._on_edit(update.update_id, update.edited_message)
        if update.callback_query is not None:
            return await self._on_callback(update.update_id, update.callback_query)
        if update.my_chat_member is not None:
            return await self._on_member(update.my_chat_member)
        return "ignored"

    async def _on_message(self, update_id: int, message: Message) -> str:
        user, chat = message.from_user, message.chat
        if user is None or user.is_bot:
            return "ignored"
        me = self._me
        if is_group(chat):
            me = await self.bot_user()
            if not addressed_to_bot(message, me):
                return "ignored"
        elif chat.type != "private":
            return "ignored"
        text, found = text_and_entities(message)
        deep_link: str | None = None
        if text is not None:
            text = without_bot_mentions(text, found, me)
            is_start, deep_link = start_payload(text) if message.text else (False, None)
            if is_start:
                text = "/start"  # the payload goes to deep_link, not into the visible text
        files = incoming_files(message)  # fetched later, in the background
        location = location_attachment(message)
        if not text and not files and location is None:
            return "ignored"  # polls, contacts, service messages...
        reply = message.reply_to_message
        result = await self.context.ingest(
            InboundMessage(
                channel=CHANNEL,
                external_id=message_key(chat.id, message.message_id),
                thread_key=thread_key(chat, user),
                sender=Party(role=Role.CUSTOMER, id=str(user.id), name=display_name(user)),
                sender_external_id=str(user.id),
                timestamp=message.date,
                text=text or None,
                deep_link=deep_link,
                attachments=[location] if location is not None else [],
                files=files,
                reply_to_external_id=message_key(chat.id, reply.message_id) if reply else None,
                channel_data={
                    "update_id": update_id,
                    "chat": {"id": chat.id, "type": chat.type, "title": chat.title},
                    "message_id": message.message_id,
                    "username": user.username,
                    "language_code": user.language_code,
                },
            )
        )
        return "duplicate" if result.duplicate else "stored"

    async def fetch(self, ref: Mapping[str, Any]) -> bytes:
        """A customer's file for the attachment store (getFile, then the download),
        at most the store's limit. Raises ``FetchError`` or ``FileTooLarge``."""
        files = self.context.files
        limit = files.max_bytes if files is not None else DEFAULT_MAX_BYTES
        return await download(self.bot, ref, limit)

    async def _on_edit(self, update_id: int, message: Message) -> str:
        """An edited message updates the stored one (the store keeps the old text)."""
        if message.from_user is None:
            return "ignored"
        external_id = message_key(message.chat.id, message.message_id)
        store = self.context.store
        current = await store.find_by_external_id(CHANNEL, external_id)
        if current is None:
            return "ignored"  # never stored (e.g. a group message not for the bot)
        last = current.channel_data.get("edited")
        if isinstance(last, dict) and int(last.get("update_id", -1)) >= update_id:
            return "duplicate"  # this edit (or a newer one) is already stored
        text, found = text_and_entities(message)
        if text is not None:
            text = without_bot_mentions(text, found, self._me)
        await store.edit_inbound(CHANNEL, external_id, text or None,
                                 {"update_id": update_id, "edit_date": message.edit_date})
        return "edited"

    async def _on_callback(self, update_id: int, query: CallbackQuery) -> str:
        """A pressed inline button: the customer's choice, then answerCallbackQuery."""
        message, user = query.message, query.from_user
        if query.data is None or message is None or user.is_bot:
            self._answer(query.id)
            return "ignored"
        value = await self._button_value(query.data)
        if value is None:
            self._answer(query.id, "This button is no longer available.")
            return "ignored"
        shown = message if isinstance(message, Message) else None
        result = await self.context.ingest(
            InboundMessage(
                channel=CHANNEL,
                external_id=CALLBACK_PREFIX + query.id,
                thread_key=thread_key(message.chat, user),
                sender=Party(role=Role.CUSTOMER, id=str(user.id), name=display_name(user)),
                sender_external_id=str(user.id),
                text=button_title(shown, query.data) or value,
                value=value,
                channel_data={
                    "update_id": update_id,
                    "chat": {"id": message.chat.id, "type": message.chat.type},
                    "callback_query_id": query.id,
                    "message_id": message.message_id,
                    "username": user.username,
                },
            )
        )
        if result.duplicate:
            return "duplicate"
        self._answer(query.id)
        return "stored"

    def _answer(self, query_id: str, text: str | None = None) -> None:
        """Answer a button press (stops the client's spinner), after it is stored."""

        async def answer() -> None:
            try:
                await self.bot.answer_callback_query(query_id, text=text)
            except AiogramError as exc:
                log.info("telegram: answerCallbackQuery %s failed: %s", query_id, exc)

        self._spawn(answer(), f"telegram-answer:{query_id}")

    async def _button_value(self, data: str) -> str | None:
        if not data.startswith(LONG_VALUE_PREFIX):
            return data
        state = await self.context.store.get_state(CHANNEL, "button:" + data)
        return str(state["value"]) if state and "value" in state else None

    async def _on_member(self, update: ChatMemberUpdated) -> str:
        """In a private chat: the user blocked (kicked) or restarted the bot."""
        if update.chat.type != "private":
            return "ignored"
        status = str(update.new_chat_member.status)
        blocked = status == "kicked"
        await self.context.store.set_identity_reachable(
            CHANNEL, str(update.from_user.id), not blocked,
            "the user blocked the bot" if blocked else None,
        )
        return "reachability"

    # ------------------------------------------------------------------ outbound

    async def show_typing(self, thread_key: str, on: bool, name: str | None) -> int:
        """An agent is typing: Telegram shows "typing…" for 5 s or until our next message
        (there is no "stopped typing"). Returns how many chats were told (0 or 1)."""
        if not on or self._stopped:
            return 0
        try:
            await self.bot.send_chat_action(chat_id=chat_of(thread_key), action="typing",
                                            request_timeout=5)
        except (AiogramError, ClientError, TimeoutError) as exc:
            log.info("telegram: typing to %s not shown: %s", thread_key, exc)
            return 0
        return 1

    async def send(self, conversation: Conversation, item: Activity) -> DeliveryResult:
        if self._stopped or self._context is None:
            raise DeliveryError("telegram connector is not running")
        files = [a for a in item.attachments if a.id and a.state is AttachmentState.STORED]
        rendered = render(item, with_files=bool(files))
        steps = plan(rendered, len(files))  # text parts and files, in order
        if not steps:
            return DeliveryResult(DeliveryStatus.SKIPPED)
        chat_id = chat_of(conversation.thread_key)
        markup = await self._keyboard(item) if item.buttons else None
        reply = await self._reply_target(conversation, item)
        done = item.delivery.parts_sent if item.delivery else 0
        last: Message | None = None
        for index in range(done, len(steps)):
            step, final = steps[index], index == len(steps) - 1
            keys, quote = markup if final else None, reply if index == 0 else None
            if step.file is None:
                text = step.text or ""
                last = await self._deliver(conversation, self.bot.send_message(
                    chat_id, text, entities=entities(rendered, text, step.part)
                    if rendered else None, reply_markup=keys, reply_parameters=quote))
            else:
                caption = step.text
                styled = entities(rendered, caption, 0) if rendered and caption else None
                last = await self._deliver(conversation, upload(
                    self.bot, chat_id, await self._load(files[step.file]), caption=caption,
                    caption_entities=styled, markup=keys, reply=quote))
            if not final:  # a retry after a failure goes on from the next step
                await self.context.store.set_parts_sent(item.id, index + 1)
        external = message_key(chat_id, last.message_id) if last else None
        return DeliveryResult(DeliveryStatus.DELIVERED, external_id=external)

    async def _load(self, attachment: Attachment) -> StoredFile:
        files = self.context.files
        found = await files.load(attachment.id) if files is not None and attachment.id else None
        if found is None:
            raise DeliveryError(f"attachment {attachment.name or attachment.id} is not in "
                                "the attachment store", permanent=True)
        return found

    async def _deliver(self, conversation: Conversation,
                       call: Coroutine[Any, Any, Message]) -> Message:
        """One Bot API send; its failure as a ``DeliveryError`` (permanent or not)."""
        try:
            return await call
        except TelegramRetryAfter as exc:
            raise DeliveryError(str(exc), retry_after=float(exc.retry_after)) from exc
        except TelegramForbiddenError as exc:  # blocked by the user, kicked from the group
            await self._unreachable(conversation, exc.message)
            raise DeliveryError(str(exc), permanent=True) from exc
        except TelegramBadRequest as exc:
            if "chat not found" in exc.message.lower():
                await self._unreachable(conversation, exc.message)
            raise DeliveryError(str(exc), permanent=True) from exc
        except (TelegramMigrateToChat, TelegramEntityTooLarge) as exc:
            raise DeliveryError(str(exc), permanent=True) from exc
        except AiogramError as exc:  # network, 5xx, undecodable answers: retried
            raise DeliveryError(str(exc)) from exc

    async def _unreachable(self, conversation: Conversation, reason: str) -> None:
        """A private chat that refuses the bot: its person's identity is unreachable.

        (In a group it is the group that refuses; the person may still be reachable.)
        """
        if ":" not in conversation.thread_key:
            await self.context.store.set_identity_reachable(
                CHANNEL, conversation.thread_key, False, reason
            )

    async def _keyboard(self, item: Activity) -> Any:
        rows: list[tuple[str, str]] = []
        links: list[tuple[str, str]] = []
        for button in item.buttons:
            if button.url is not None:  # opens a link (offers to continue elsewhere)
                if opens_here(button.url):
                    links.append((button.title, button.url))
                continue
            data = button.value
            if needs_mapping(data):
                data = short_key(button.value)
                await self.context.store.put_state(CHANNEL, "button:" + data,
                                                   {"value": button.value})
            rows.append((button.title, data))
        return keyboard(rows, links) if rows or links else None

    async def _reply_target(
        self, conversation: Conversation, item: Activity
    ) -> ReplyParameters | None:
        """In a group, a bot reply quotes the message it answers (so it is clear whom)."""
        if ":" not in conversation.thread_key or item.reply_to_id is None:
            return None
        parent = await self.context.store.get_message(item.reply_to_id)
        if parent is None or not parent.external_id or ":" not in parent.external_id:
            return None
        if parent.external_id.startswith(CALLBACK_PREFIX):
            return None
        message_id = int(parent.external_id.rsplit(":", 1)[1])
        return ReplyParameters(message_id=message_id, allow_sending_without_reply=True)
