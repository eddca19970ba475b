"""Slack files both ways: customers' files downloaded for the attachment store, agents'
files uploaded into the conversation's DM or thread.

In: a message's files are listed on the item as ``pending`` (connectors/slack/inbound.py,
``incoming_file``) and the gateway's fetcher calls ``SlackFiles.fetch`` later, in the
background. The download carries the bot token, so it is made only to Slack's own file
hosts (``download_refusal``): any other URL, also as the target of a redirect, is refused
for good without a request. A stub (``check_file_info``, Slack Connect) is completed with
files.info first. A web page where the file should be (Slack's sign-in page, when the
token may not read the file) is a failure, not the file.

Out: Slack's upload is three steps (files.getUploadURLExternal, a POST of the bytes to the
URL it names, files.completeUploadExternal, which shares the files into the channel or
thread). slack_sdk's ``files_upload_v2`` runs all three on every call, so a retry after a
failed completion would upload the bytes again; the steps are therefore called one by
one (with slack_sdk's own methods), and the Slack file id of every upload is recorded in
the store (``channel_state`` ``slack:upload:<item id>``) before the next step. A retry
uploads only what is not recorded, then completes. Slack allows files.completeUploadExternal
once per upload, so completing the same file ids again cannot share them twice; when an
earlier attempt may have completed (every upload recorded), files.info tells first
whether the files are already shared in the conversation's channel.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from pydantic import ValidationError
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from yarl import URL

from connectors.base import ConnectorContext, DeliveryError, FetchError
from connectors.slack.inbound import CHANNEL, SlackFile
from connectors.slack.outbound import api_error_code, classify
from gateway.files import DEFAULT_MAX_BYTES
from gateway.model import Activity, Attachment, AttachmentState

log = logging.getLogger(__name__)

# Where Slack serves files from (url_private, url_private_download), over HTTPS.
FILE_HOSTS = frozenset({"files.slack.com", "slack.com"})
DOWNLOAD_TIMEOUT = aiohttp.ClientTimeout(total=90, sock_connect=10)
MAX_REDIRECTS = 3
REDIRECTS = frozenset({301, 302, 303, 307, 308})
UPLOAD_STATE = "upload"  # channel_state "slack:upload:<item id>": {"files": {...}, "shared"}
STATUS_WORDS = {401: "the bot token was refused", 403: "forbidden", 404: "not found",
                410: "gone"}


def download_refusal(url: str, api_url: str) -> str | None:
    """Why the bot token must not be sent to ``url`` (None: it is one of Slack's file
    hosts: ``files.slack.com`` or ``slack.com`` over HTTPS, or the origin of the
    configured Web API, e.g. a local fake in tests)."""
    try:
        target, api = URL(url), URL(api_url)
    except (ValueError, TypeError):
        return "refusing a download from an unreadable URL"
    if not target.is_absolute() or target.host is None:
        return "refusing a download from something that is not an absolute URL"
    if target.user is not None or target.password is not None:
        return "refusing a download from a URL with credentials in it"
    if target.scheme == "https" and target.port == 443 and target.host in FILE_HOSTS | {
            f"files.{api.host}", str(api.host)}:
        return None
    if (target.scheme, target.host, target.port) == (api.scheme, api.host, api.port):
        return None
    return f"refusing to send the bot token to {target.origin()}: not one of Slack's file hosts"


def stored_files(item: Activity) -> list[Attachment]:
    """The item's files that are in the attachment store (what is uploaded to Slack)."""
    return [a for a in item.attachments if a.id and a.state is AttachmentState.STORED]


@dataclass(frozen=True, slots=True)
class SlackFiles:
    """Downloads and uploads through one workspace's bot token."""

    token: str
    api_url: str
    session: aiohttp.ClientSession
    reader: AsyncWebClient  # files.info (retried on connection errors)
    writer: AsyncWebClient  # uploads (retried on short 429s only)
    context: ConnectorContext

    # --------------------------------------------------------------- download

    async def fetch(self, ref: Mapping[str, Any]) -> bytes:
        """The bytes of the file ``ref`` names (``incoming_file``). Raises FetchError."""
        file_id = ref.get("file")
        if not isinstance(file_id, str) or not file_id:
            raise FetchError("not a Slack file reference", permanent=True)
        url, declared = ref.get("url"), ref.get("content_type")
        external, link = ref.get("external"), ref.get("link")
        if not isinstance(url, str) and not external:
            file = await self._info(file_id)
            url, declared = file.download_url, file.mimetype
            if file.is_external:
                external, link = file.external_type or "external", file.url_private
            elif url is None:
                mode = f" (mode {file.mode})" if file.mode else ""
                raise FetchError(f"Slack has no download for file {file_id}{mode}",
                                 permanent=True)
        if external:
            raise FetchError(f"an external file ({external}), not stored in Slack: "
                             f"{link or 'no link'}", permanent=True)
        return await self._download(str(url), declared if isinstance(declared, str) else None)

    async def _info(self, file_id: str) -> SlackFile:
        try:
            response = await self.reader.files_info(file=file_id)
        except SlackApiError as exc:
            failure = classify(exc)
            raise FetchError(f"files.info: {failure.code}",
                             permanent=failure.error.permanent) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise FetchError(f"files.info unanswered: {exc!r}") from exc
        try:
            return SlackFile.model_validate(response.get("file"))
        except ValidationError as exc:
            raise FetchError("files.info answered no usable file", permanent=True) from exc

    async def _download(self, url: str, declared: str | None) -> bytes:
        headers = {"Authorization": f"Bearer {self.token}"}
        for hop in range(MAX_REDIRECTS + 1):
            if self.session.closed:  # the gateway is stopping: another process or later
                raise FetchError("the Slack connector is stopped")
            refusal = download_refusal(url, self.api_url)
            if refusal is not None:
                raise FetchError(f"redirected: {refusal}" if hop else refusal, permanent=True)
            try:
                async with self.session.get(url, headers=headers, allow_redirects=False,
                                            timeout=DOWNLOAD_TIMEOUT) as response:
                    if response.status in REDIRECTS:
                        url = _location(response)
                        continue
                    _check(response, declared)
                    return await _read(response, self._max_bytes())
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise FetchError(f"download failed: {exc!r}") from exc
        raise FetchError(f"more than {MAX_REDIRECTS} redirects", permanent=True)

    def _max_bytes(self) -> int:
        files = self.context.files
        return files.max_bytes if files is not None else DEFAULT_MAX_BYTES

    # ----------------------------------------------------------------- upload

    async def check(self, attachments: list[Attachment]) -> None:
        """Every file is in the store (checked before anything of the item is posted)."""
        files = self.context.files
        if files is None:
            raise DeliveryError("slack: no attachment store to send files from",
                                permanent=True)
        for attachment in attachments:
            if attachment.id is None or await files.get(attachment.id) is None:
                raise DeliveryError(f"slack: attachment {attachment.id} ({attachment.name}) "
                                    "is not in the attachment store", permanent=True)

    async def share(self, item: Activity, attachments: list[Attachment], *, channel: str,
                    thread_ts: str | None, comment: str | None) -> str:
        """Upload ``attachments`` (each once, over all attempts) and share them into
        ``channel`` (and ``thread_ts``) with ``comment``; returns the first Slack file id.
        Raises SlackApiError, aiohttp errors or DeliveryError."""
        store, key = self.context.store, f"{UPLOAD_STATE}:{item.id}"
        state = await store.get_state(CHANNEL, key) or {}
        raw = state.get("files")
        uploaded = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
        wanted = [str(a.id) for a in attachments]
        if state.get("shared") and all(a in uploaded for a in wanted):
            return uploaded[wanted[0]]
        if all(a in uploaded for a in wanted) and await self._shared(uploaded[wanted[0]],
                                                                     channel):
            # an earlier attempt completed the upload; its answer was lost
            await store.put_state(CHANNEL, key, {"files": uploaded, "shared": True})
            return uploaded[wanted[0]]
        names: dict[str, str] = {}
        for attachment in attachments:
            attachment_id = str(attachment.id)
            names[attachment_id] = attachment.name or "file"
            if attachment_id in uploaded:
                continue  # its bytes are at Slack already (an earlier attempt)
            uploaded[attachment_id] = await self._upload(attachment)
            await store.put_state(CHANNEL, key, {"files": uploaded, "shared": False})
        await self.writer.files_completeUploadExternal(
            files=[{"id": uploaded[a], "title": names[a]} for a in wanted],
            channel_id=channel, thread_ts=thread_ts, initial_comment=comment)
        await store.put_state(CHANNEL, key, {"files": uploaded, "shared": True})
        return uploaded[wanted[0]]

    async def _upload(self, attachment: Attachment) -> str:
        """files.getUploadURLExternal and the POST of the bytes: the Slack file id."""
        files = self.context.files
        stored = await files.load(str(attachment.id)) if files is not None else None
        if stored is None:
            raise DeliveryError(f"slack: attachment {attachment.id} is not in the "
                                "attachment store", permanent=True)
        answer = await self.writer.files_getUploadURLExternal(
            filename=stored.name, length=len(stored.data))
        upload_url, file_id = answer.get("upload_url"), answer.get("file_id")
        if not isinstance(upload_url, str) or not isinstance(file_id, str):
            raise DeliveryError("slack: files.getUploadURLExternal named no upload URL")
        # the request files_upload_v2 makes for its second step (the bytes, no token)
        result = await self.writer._upload_file(
            url=upload_url, data=stored.data, logger=self.writer.logger,
            timeout=self.writer.timeout, proxy=self.writer.proxy, ssl=self.writer.ssl)
        if result.status != 200:
            raise DeliveryError(f"slack: uploading {stored.name} failed (HTTP {result.status})")
        log.debug("slack: uploaded %s as %s", attachment.id, file_id)
        return file_id

    async def _shared(self, file_id: str, channel: str) -> bool:
        """Is the file shared in ``channel`` (files.info)? Not found: not shared."""
        try:
            response = await self.reader.files_info(file=file_id)
        except SlackApiError as exc:
            if api_error_code(exc)[1] == "file_not_found":
                return False
            raise
        file = response.get("file")
        if not isinstance(file, dict):
            return False
        shares = file.get("shares")
        if isinstance(shares, dict) and any(
                isinstance(where, dict) and channel in where for where in shares.values()):
            return True
        return any(isinstance(ids, list) and channel in ids
                   for ids in (file.get("channels"), file.get("groups"), file.get("ims")))


def _location(response: aiohttp.ClientResponse) -> str:
    location = response.headers.get("Location")
    if not location:
        raise FetchError(f"download: HTTP {response.status} without a Location",
                         permanent=True)
    try:
        return str(response.url.join(URL(location)))
    except (ValueError, TypeError) as exc:
        raise FetchError("download: redirected to an unreadable URL", permanent=True) from exc


def _check(response: aiohttp.ClientResponse, declared: str | None) -> None:
    status = response.status
    if status == 429 or status >= 500:
        raise FetchError(f"download: HTTP {status}")  # Slack's side: tried again later
    if status != 200:
        words = STATUS_WORDS.get(status, "refused")
        raise FetchError(f"download: HTTP {status} ({words})", permanent=True)
    declared_type = (declared or "").split(";")[0].strip().lower()
    if response.content_type == "text/html" and declared_type != "text/html":
        raise FetchError("Slack answered with a web page, not the file (a sign-in page: "
                         "does the bot token have files:read?)", permanent=True)


async def _read(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, but at most ``limit`` + 1 bytes: a longer file is not read to its end
    (the attachment store then refuses it as too large, and the customer is told)."""
    data = bytearray()
    async for chunk in response.content.iter_chunked(65536):
        data += chunk
        if len(data) > limit:
            del data[limit + 1:]
            break
    return bytes(data)
