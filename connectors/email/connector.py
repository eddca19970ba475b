"""Email: IMAP in (IDLE / polling), SMTP out, and optionally an SMTP server for direct mail.

Inbound, every mail (from IMAP or the SMTP server) takes one road, ``take_in``: parse →
dedupe by Message-ID → find its conversation (threads.py) → keep the raw bytes → ingest.
Mail that is itself automatic (Auto-Submitted, Precedence bulk/list/junk, mailer-daemon,
bounces, lists) and mail that was not unpacked (MIME bombs, too large) is stored for
agents and its conversation is put in the agents' queue before it is stored, so the bot
never answers it: no mail loops.

Outbound, ``send`` renders one stored item as one mail (render.py), remembers its
Message-ID for threading, and sends it (smtp_out.py). Events (handoff, assigned, ...)
are not mailed.

Agents fetch the raw message and its attachments with their API token:
``GET /email/raw/{digest}`` and ``GET /email/raw/{digest}/parts/{n}``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from aiohttp import web
from bson import Binary
from pymongo.errors import PyMongoError

from connectors.base import Connector, ConnectorContext, DeliveryError, DeliveryResult
from connectors.email import verify
from connectors.email.imap import ImapInbox, ImapOptions, Outcome
from connectors.email.parse import Limits, ParsedMail, Rejected, leaves, parse_bytes, parse_mail
from connectors.email.render import HeaderInjection, Outgoing, build, reply_subject
from connectors.email.smtp_in import InboundHandler, SmtpListener
from connectors.email.smtp_out import RecipientRefused, SmtpSender
from connectors.email.threads import (
    CHANNEL,
    Thread,
    Threads,
    choice,
    id_key,
    thread_state_key,
)
from gateway.channel_settings import EmailSettings
from gateway.keys import AGENTS
from gateway.leases import Singleton
from gateway.model import (
    Activity,
    ActivityType,
    Conversation,
    DeliveryStatus,
    Direction,
    InboundMessage,
    Party,
    Role,
)

log = logging.getLogger(__name__)

NOT_UNPACKED = "This mail was not unpacked ({problem}). The original is kept for agents."


@dataclass(frozen=True, slots=True)
class EmailOptions:
    """Tuning that is not in the OMNIGATE_* settings (defaults suit production)."""

    limits: Limits = field(default_factory=Limits)
    imap: ImapOptions = field(default_factory=ImapOptions)
    smtp_timeout: float = 60.0


def inbound_message(parsed: ParsedMail, thread: Thread, source: str, kept: int) -> InboundMessage:
    """The normalised message for one parsed mail (the bot reads ``text``; agents also
    get the whole original in ``channel_data``)."""
    no_reply = bool(parsed.automatic or parsed.problem)
    text = parsed.text
    if parsed.problem is not None:
        text = NOT_UNPACKED.format(problem=parsed.problem)
    elif text is None and not thread.joined:
        text = parsed.subject or None  # a new mail with only a subject
    return InboundMessage(
        channel=CHANNEL,
        external_id=parsed.external_id,
        thread_key=thread.thread_key,
        sender=Party(role=Role.CUSTOMER, id=parsed.sender, name=parsed.sender_name),
        sender_external_id=parsed.sender,
        timestamp=parsed.date,
        text=text,
        value=None if no_reply else choice(parsed.text, thread.buttons),
        attachments=parsed.attachments,
        reply_to_external_id=parsed.in_reply_to[0] if parsed.in_reply_to else None,
        channel_data={
            "source": source,
            "message_id": parsed.message_id,
            "from": parsed.sender,
            "from_name": parsed.sender_name,
            "to": parsed.recipients[:20],
            "subject": parsed.subject,
            "in_reply_to": parsed.in_reply_to[:5],
            "references": parsed.references,
            "threaded_by": thread.via,
            "full_text": parsed.full_text,  # the whole body, quotes and signature included
            "html": parsed.html,  # sanitised with nh3
            "raw_digest": parsed.digest,
            "raw_url": f"/email/raw/{parsed.digest}",
            "raw_size": parsed.raw_size,
            "raw_kept": kept,
            "automatic": parsed.automatic,
            "problem": parsed.problem,
            "no_reply": no_reply,
        },
    )


def raw_key(digest: str) -> str:
    return f"raw:{digest}"


class EmailConnector(Connector):
    channel = CHANNEL

    def __init__(self, settings: EmailSettings, options: EmailOptions | None = None) -> None:
        self.settings = settings
        self.options = options or EmailOptions()
        self.address = settings.address.lower()
        self.domain = self.address.partition("@")[2]
        self.imap: ImapInbox | None = None
        self.imap_lease: Singleton | None = None  # several processes: one reads the mailbox
        self.listener: SmtpListener | None = None
        self._context: ConnectorContext | None = None

    @property
    def context(self) -> ConnectorContext:
        if self._context is None:
            raise RuntimeError("EmailConnector.start() was not called")
        return self._context

    # ------------------------------------------------------------------- wiring

    def setup(self, app: web.Application) -> None:
        sub = web.Application()
        sub.router.add_get("/raw/{digest}", self.handle_raw)
        sub.router.add_get("/raw/{digest}/parts/{number}", self.handle_part)
        app.add_subapp("/email", sub)

    async def start(self, context: ConnectorContext) -> None:
        self._context = context
        limits = self.options.limits
        if self.settings.imap is not None:
            imap_options = self.options.imap
            if imap_options.max_bytes != limits.max_bytes:
                imap_options = replace(imap_options, max_bytes=limits.max_bytes)
            self.imap = ImapInbox(self.settings.imap, context.store, self._from_imap,
                                  imap_options)
            if context.leases is not None:
                self.imap_lease = Singleton(context.leases, f"email:{self.imap.state_key}",
                                            self.imap.run)
                self.imap_lease.start()
            else:
                self.imap.start()
        if self.settings.smtp_listen is not None:
            host, port = self.settings.smtp_listen
            handler = InboundHandler(self.address, self._from_smtp)
            self.listener = SmtpListener(host, port, handler, hostname=self.domain,
                                         max_bytes=limits.max_bytes,
                                         reuse_port=self.settings.share_listen)
            await self.listener.start()

    async def stop(self) -> None:
        if self.listener is not None:
            await self.listener.stop()
        if self.imap_lease is not None:
            await self.imap_lease.stop()  # stops reading and releases the lease
            self.imap_lease = None
        if self.imap is not None:
            await self.imap.stop()

    # ------------------------------------------------------------------- inbound

    async def _from_imap(self, raw: bytes, size: int) -> Outcome:
        try:
            return await self.take_in(raw, size=size, source="imap")
        except Rejected as exc:
            log.warning("email: IMAP mail not taken in: %s", exc)
            return Outcome.REJECTED

    async def _from_smtp(self, raw: bytes, envelope_from: str | None) -> Outcome:
        return await self.take_in(raw, envelope_from=envelope_from, source="smtp")

    async def take_in(self, raw: bytes, *, size: int | None = None,
                      envelope_from: str | None = None, source: str = "imap") -> Outcome:
        """Store one inbound mail durably (once). Raises ``Rejected`` for a mail we refuse,
        ``PyMongoError`` when the store could not take it (the caller must retry)."""
        store = self.context.store
        parsed = parse_mail(raw, self.options.limits, envelope_from=envelope_from, size=size)
        if parsed.sender == self.address:
            raise Rejected("mail from our own address (a loop)")
        if await store.find_by_external_id(CHANNEL, parsed.external_id) is not None:
            return Outcome.DUPLICATE
        thread = await Threads(store, self.address).resolve(parsed)
        no_reply = parsed.automatic or parsed.problem
        if parsed.problem is not None:
            log.warning("email: mail %s from %s kept for agents, not unpacked: %s",
                        parsed.external_id, parsed.sender, parsed.problem)
        elif parsed.automatic is not None:
            log.info("email: mail %s from %s is automatic (%s): stored, not answered",
                     parsed.external_id, parsed.sender, parsed.automatic)
        kept = raw[: self.options.limits.max_bytes]
        await store.put_state(CHANNEL, raw_key(parsed.digest), {
            "raw": Binary(kept), "size": parsed.raw_size, "truncated": len(kept) < len(raw)
            or parsed.raw_size > len(raw)})
        if not thread.joined:
            await store.put_state(CHANNEL, thread_state_key(thread.thread_key), {
                "address": parsed.sender, "name": parsed.sender_name,
                "subject": parsed.subject, "buttons": []})
        message = inbound_message(parsed, thread, source, len(kept))
        if no_reply:  # the bot never answers it: the pipeline queues it for a human
            message.channel_data["needs_human"] = f"mail not answered by the bot: {no_reply}"
        # to us alone: may continue the sender's open conversation on another channel
        message.channel_data["one_to_one"] = set(parsed.recipients) == {self.address}
        result = await self.context.ingest(message)
        return Outcome.DUPLICATE if result.duplicate else Outcome.STORED

    # ------------------------------------------------------------------ outbound

    def verifiable(self, address: str) -> str | None:
        """An address a verification code may be mailed to (normalised), or None."""
        return verify.verifiable(address, self.address)

    async def send_code(self, address: str, code: str, minutes: int) -> None:
        """Mail a verification code (gateway/identity.py); raises DeliveryError."""
        sender = SmtpSender(self.settings.smtp, self.options.smtp_timeout)
        await verify.send_code(sender, self.address, address, code, minutes)

    async def send(self, conversation: Conversation, item: Activity) -> DeliveryResult:
        if item.type is ActivityType.EVENT or not (item.text or item.buttons):
            return DeliveryResult(DeliveryStatus.SKIPPED)  # no mail for events
        store = self.context.store
        key = conversation.thread_key
        thread = await store.get_state(CHANNEL, thread_state_key(key))
        if not thread or not thread.get("address"):
            raise DeliveryError(f"no email address known for thread {key}", permanent=True)
        parent = await self._parent(conversation, item)
        if item.sender.role is Role.BOT and parent is not None and \
                parent.channel_data.get("no_reply"):
            log.info("email: not answering automatic mail %s", parent.external_id)
            return DeliveryResult(DeliveryStatus.SKIPPED)
        in_reply_to = parent.channel_data.get("message_id") if parent is not None else None
        references: list[str] = []
        if parent is not None and in_reply_to:
            references = [*parent.channel_data.get("references", []), in_reply_to]
        message_id = f"<omnigate.{item.id}@{self.domain}>"  # the same on every retry
        default_name = "Support" if item.sender.role is Role.BOT else None
        try:
            message = build(Outgoing(
                from_address=self.address,
                from_name=item.sender.name or default_name,
                to_address=str(thread["address"]),
                to_name=thread.get("name"),
                subject=reply_subject(str(thread.get("subject") or ""), key),
                message_id=message_id,
                in_reply_to=in_reply_to,
                references=references,
                text=item.text or "",
                buttons=item.buttons,
                automatic=item.sender.role is Role.BOT,
            ))
        except HeaderInjection as exc:
            log.warning("email: refusing to send %s: %s", item.id, exc)
            raise DeliveryError(f"refused: {exc}", permanent=True) from None
        buttons = [b.model_dump() for b in item.buttons]
        await store.put_state(CHANNEL, id_key(message_id), {
            "thread_key": key, "conversation_id": conversation.id, "buttons": buttons})
        await store.put_state(CHANNEL, thread_state_key(key), {"buttons": buttons})
        sender = SmtpSender(self.settings.smtp, self.options.smtp_timeout)
        try:
            await sender.send(message, self.address, str(thread["address"]))
        except RecipientRefused as exc:
            await store.set_identity_reachable(CHANNEL, str(thread["address"]), False, str(exc))
            raise
        return DeliveryResult(DeliveryStatus.DELIVERED, external_id=message_id)

    async def _parent(self, conversation: Conversation, item: Activity) -> Activity | None:
        """The customer's mail this item answers: its reply_to, else their latest mail."""
        store = self.context.store
        if item.reply_to_id is not None:
            parent = await store.get_message(item.reply_to_id)
            if parent is not None and parent.direction is Direction.INBOUND:
                return parent
        items, _ = await store.history(conversation.id, before=item.seq, limit=50)
        return next((i for i in items if i.direction is Direction.INBOUND
                     and i.channel_data.get("message_id")), None)

    # -------------------------------------------------------- agents: raw mail

    async def _raw_for_agent(self, request: web.Request) -> bytes:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        agent = None
        try:
            if scheme.lower() == "bearer" and self._context is not None:
                agent = await request.config_dict[AGENTS].authenticate(token.strip())
            if agent is None:
                raise web.HTTPUnauthorized(
                    text="send Authorization: Bearer <agent token>",
                    headers={"WWW-Authenticate": 'Bearer realm="omnigate"'})
            digest = request.match_info["digest"]
            if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
                raise web.HTTPNotFound(text="no such message")
            state = await self.context.store.get_state(CHANNEL, raw_key(digest))
        except PyMongoError:
            raise web.HTTPServiceUnavailable(text="the store is unavailable") from None
        if state is None or "raw" not in state:
            raise web.HTTPNotFound(text="no such message")
        return bytes(state["raw"])

    async def handle_raw(self, request: web.Request) -> web.StreamResponse:
        raw = await self._raw_for_agent(request)
        return web.Response(body=raw, content_type="message/rfc822", headers=_DOWNLOAD)

    async def handle_part(self, request: web.Request) -> web.StreamResponse:
        raw = await self._raw_for_agent(request)
        number = request.match_info["number"]
        if not number.isdigit():
            raise web.HTTPNotFound(text="no such part")
        try:
            message = parse_bytes(raw)
            part = next((p for n, p in leaves(message, self.options.limits)
                         if n == int(number)), None)
            body = part.get_payload(decode=True) if part is not None else None
        except Exception:
            body = None
        if not isinstance(body, bytes):
            raise web.HTTPNotFound(text="no such part")
        return web.Response(body=body, content_type="application/octet-stream",
                            headers=_DOWNLOAD)


_DOWNLOAD = {
    "Content-Disposition": "attachment",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
    "Cache-Control": "private, no-store",
}

