"""Files both ways through the Bot API, with aiogram's client.

Inbound, a customer's file is only named while its update is handled (a reference:
``IncomingFile.ref``, connectors/telegram/inbound.py); the gateway's fetcher downloads
it later, in the background, through ``download``: getFile, then the file itself with
``Bot.download_file`` (the download URL carries the bot token: it is built and used
here, never stored or shown). Outbound, ``upload`` sends one stored file as a multipart
upload (never by URL: the gateway need not be reachable from Telegram): photos with
sendPhoto, OGG/Opus voice with sendVoice, everything else with sendDocument.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiogram import Bot
from aiogram.exceptions import AiogramError, TelegramBadRequest
from aiogram.types import (
    BufferedInputFile,
    InlineKeyboardMarkup,
    Message,
    MessageEntity,
    ReplyParameters,
)
from aiohttp import ClientError, ClientResponseError

from connectors.base import FetchError
from connectors.telegram.outbound import refused_as, upload_method
from gateway.files import FileTooLarge, StoredFile

if TYPE_CHECKING:
    from typing_extensions import Buffer

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT = 20  # seconds for getFile
DOWNLOAD_TIMEOUT = 90  # seconds for one file's bytes (the fetcher's lease is 120 s)


class Capped(io.BytesIO):
    """A download buffer that refuses to grow beyond ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def write(self, buffer: Buffer, /) -> int:
        size = self.tell() + memoryview(buffer).nbytes
        if size > self.limit:
            raise FileTooLarge(size, self.limit)
        return super().write(buffer)


def _redacted(text: str, bot: Bot) -> str:
    """An error's text without the bot token (a download URL contains it)."""
    return text.replace(bot.token, "<token>")


async def download(bot: Bot, ref: Mapping[str, Any], limit: int) -> bytes:
    """A file's bytes by its reference. Raises ``FetchError`` (permanent: Telegram will
    never hand it out, e.g. "file is too big" or an invalid file id; else it is worth
    another try: network, 5xx, 429) or ``FileTooLarge`` (over ``limit`` bytes)."""
    file_id = ref.get("file_id")
    if not isinstance(file_id, str) or not file_id:
        raise FetchError("no Telegram file_id in the file's reference", permanent=True)
    try:
        found = await bot.get_file(file_id, request_timeout=LOOKUP_TIMEOUT)
    except TelegramBadRequest as exc:  # "file is too big", "invalid file_id", ...
        if "too big" in exc.message.lower():  # over the Bot API's download limit
            raise FileTooLarge(None, limit) from exc
        # ("wrong file_id or the file is temporarily unavailable": worth another try)
        temporary = "temporarily" in exc.message.lower()
        raise FetchError(f"Telegram: {_redacted(exc.message, bot)}",
                         permanent=not temporary) from exc
    except AiogramError as exc:  # network, 5xx, 429, undecodable answers
        raise FetchError(f"Telegram: {_redacted(str(exc), bot)}") from exc
    if found.file_size is not None and found.file_size > limit:
        raise FileTooLarge(found.file_size, limit)
    if not found.file_path:
        raise FetchError("Telegram gave no file_path for the file")
    sink = Capped(limit)
    try:
        await bot.download_file(found.file_path, destination=sink, timeout=DOWNLOAD_TIMEOUT)
    except ClientResponseError as exc:  # the file path expired, 5xx...: getFile again
        raise FetchError(f"download failed: HTTP {exc.status} {exc.message}") from None
    except (ClientError, TimeoutError, AiogramError) as exc:
        reason = _redacted(str(exc), bot) or type(exc).__name__
        raise FetchError(f"download failed: {reason}") from None
    return sink.getvalue()


async def upload(
    bot: Bot, chat_id: int, file: StoredFile, *, caption: str | None,
    caption_entities: list[MessageEntity] | None, markup: InlineKeyboardMarkup | None,
    reply: ReplyParameters | None,
) -> Message:
    """Send one stored file (the caption, keyboard and quoted message with it). A photo
    or voice note Telegram refuses as such (dimensions, voice messages forbidden by the
    user's privacy settings) goes as a document instead. Raises aiogram's errors."""
    method = upload_method(file.content_type, file.data)
    extra: dict[str, Any] = {"caption": caption, "caption_entities": caption_entities,
                             "reply_markup": markup, "reply_parameters": reply}
    if method == "photo":
        try:
            return await bot.send_photo(chat_id, _input(file), **extra)
        except TelegramBadRequest as exc:
            if not refused_as(method, exc.message):
                raise
            log.info("telegram: %s refused as a photo (%s): sent as a document",
                     file.name, exc.message)
    elif method == "voice":
        try:
            return await bot.send_voice(chat_id, _input(file), **extra)
        except TelegramBadRequest as exc:
            if not refused_as(method, exc.message):
                raise
            log.info("telegram: %s refused as a voice note (%s): sent as a document",
                     file.name, exc.message)
    return await bot.send_document(chat_id, _input(file), **extra)


def _input(file: StoredFile) -> BufferedInputFile:
    return BufferedInputFile(file.data, filename=file.name)
