"""Email: IMAP in (IDLE / polling), SMTP out, and optionally an SMTP server for direct mail.

Inbound, every mail (from IMAP or the SMTP server) takes one road, ``take_in``: parse →
dedupe by Message-ID → find its conversation (threads.py) → keep the raw bytes → ingest.
Its attachment parts and inline images go in as ``InboundMessage.files`` (the pipeline
keeps them in the attachment store); the raw mail itself is kept there too, as
``message.eml`` (``channel_data["raw_attachment_id"]``), so agents read both through
``GET /api/v1/attachments/{id}`` with the same access rules as every file.
Mail that is itself automatic (Auto-Submitted, Precedence bulk/list/junk, mailer-daemon,
bounces, lists) and mail that was not unpacked (MIME bombs, too large) is stored for
agents and its conversation is put in the agents' queue before it is stored, so the bot
never answers it: no mail loops.

Outbound, ``send`` renders one stored item as one mail (render.py), its files attached,
remembers its Message-ID for threading, and sends it (smtp_out.py). A bot turn's replies
go out as one mail (``combines_turns``: the outbox hands them to ``send_together``).
Events (handoff, assigned, ...) are not mailed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from urllib.parse import quote

from aiohttp import web
from bson import Binary
from gridfs.errors import NoFile

from connectors.base import Connector, ConnectorContext, DeliveryError, DeliveryResult
from connectors.email import verify
from connectors.email.imap import ImapInbox, ImapOptions, Outcome
from connectors.email.parse import Limits, ParsedMail, Rejected, parse_mail
from connectors.email.render import (
    HeaderInjection,
    Outgoing,
    OutgoingFile,
    build,
    reply_subject,
)
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
from gateway.files import Files, attachment_key
from gateway.leases import Singleton
from gateway.model import (
    Activity,
    ActivityType,
    AttachmentState,
    Conversation,
    DeliveryStatus,
    Direction,
    InboundMessage,
    Party,
    Role,
)
from gateway.store.contacts import is_link_payload

log = logging.getLogger(__name__)

NOT_UNPACKED = "This mail was not unpacked ({problem}). The original is kept for agents."
RAW_NAME = "message.eml"  # the raw mail in the attachment store
RAW_TYPE = "message/rfc822"
MAX_FILES = 100  # InboundMessage.files holds at most this many
LINK_IN_SUBJECT = re.compile(r"\[(link_[A-Za-z0-9_-]{1,59})\]")


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
        files=parsed.files[:MAX_FILES],
        reply_to_external_id=parsed.in_reply_to[0] if parsed.in_reply_to else None,
        deep_link=link_in(parsed.subject),
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
            "raw_attachment_id": raw_attachment_id(parsed.external_id),
            "raw_size": parsed.raw_size,
            "raw_kept": kept,
            "automatic": parsed.automatic,
            "problem": parsed.problem,
            "no_reply": no_reply,
        },
    )


def link_in(subject: str | None) -> str | None:
    """A link token in a subject (``EmailConnector.deep_link``'s mailto), if any."""
    found = LINK_IN_SUBJECT.search(subject or "")
    return found.group(1) if found and is_link_payload(found.group(1)) else None


def raw_key(digest: str) -> str:
    return f"raw:{digest}"


def raw_attachment_id(external_id: str) -> str:
    """The id of a mail's raw copy in the attachment store (one per Message-ID)."""
    return attachment_key(CHANNEL, external_id, RAW_NAME)


class EmailConnector(Connector):
    channel = CHANNEL
    combines_turns = True  # a bot turn's replies: one mail (send_together)

    def __init__(self, settings: EmailSettings, options: EmailOptions | None = None) -> None:
        self.settings = settings
        self.options = options or EmailOptions()
        self.address = settings.address.lower()
        self.domain = self.address.partition("@")[2]
        self.imap: ImapInbox | None = None
        self.imap_lease: Singleton | None = None  # several processes: one reads the mailbox
        self.listener: SmtpListener | None = None
        self._context: ConnectorContext | None = None
        self._own_files: Files | None = None

    @property
    def context(self) -> ConnectorContext:
        if self._context is None:
            raise RuntimeError("EmailConnector.start() was not called")
        return self._context

    # ------------------------------------------------------------------- wiring

    @property
    def files(self) -> Files:
        """The attachment store (the core's; one of our own if the context has none)."""
        if self.context.files is not None:
            return self.context.files
        if self._own_files is None:
            self._own_files = Files(self.context.store)
        return self._own_files

    def setup(self, app: web.Application) -> None:
        """No routes: agents read mail and its files through the agent API."""

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
        kept = raw[: self.options.limits.max_bytes]
        existing = await store.find_by_external_id(CHANNEL, parsed.external_id)
        if existing is not None:  # (its raw copy, if a crash came between the two)
            await self._keep_raw(existing, kept)
            return Outcome.DUPLICATE
        thread = await Threads(store, self.address).resolve(parsed)
        no_reply = parsed.automatic or parsed.problem
        if parsed.problem is not None:
            log.warning("email: mail %s from %s kept for agents, not unpacked: %s",
                        parsed.external_id, parsed.sender, parsed.problem)
        elif parsed.automatic is not None:
            log.info("email: mail %s from %s is automatic (%s): stored, not answered",
                     parsed.external_id, parsed.sender, parsed.automatic)
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
        await self._keep_raw(result.item, kept)
        return Outcome.DUPLICATE if result.duplicate else Outcome.STORED

    async def _keep_raw(self, item: Activity, kept: bytes) -> None:
        """The raw mail as an attachment of its conversation (``message.eml``), once.
        Written after the item (whose conversation it belongs to): a crash in between is
        mended when the mail comes again (IMAP: not yet \\Seen; SMTP: no 250 yet)."""
        attachment_id = item.channel_data.get("raw_attachment_id")
        if not isinstance(attachment_id, str):
            return  # stored before raw mail was kept as an attachment
        await self.files.store.put(
            attachment_id, kept, name=RAW_NAME, content_type=RAW_TYPE,
            conversation_id=item.conversation_id, contact_id=item.contact_id,
            sender=item.sender, channel=CHANNEL, direction=Direction.INBOUND, item_id=item.id)

    # ------------------------------------------------------------------ outbound

    async def deep_link(self, payload: str) -> str:
        """A new mail to us whose subject carries the link token (read back in
        ``inbound_message``): continuing by email from another channel."""
        subject = quote(f"Continue my conversation [{payload}]")
        return f"mailto:{self.address}?subject={subject}"

    def verifiable(self, address: str) -> str | None:
        """An address a verification code may be mailed to (normalised), or None."""
        return verify.verifiable(address, self.address)

    async def send_code(self, address: str, code: str, minutes: int) -> None:
        """Mail a verification code (gateway/identity.py); raises DeliveryError."""
        sender = SmtpSender(self.settings.smtp, self.options.smtp_timeout)
        await verify.send_code(sender, self.address, address, code, minutes)

    async def send(self, conversation: Conversation, item: Activity) -> DeliveryResult:
        return await self.send_together(conversation, [item])

    async def send_together(self, conversation: Conversation,
                            items: Sequence[Activity]) -> DeliveryResult:
        """One mail for ``items`` (one item, or a bot turn's replies): the texts in order,
        then every button as one numbered list, then every file attached. Its Message-ID
        is made from the first item's id, so a retry of the same items is the same mail."""
        said = [i for i in items if i.type is ActivityType.MESSAGE
                and (i.text or i.buttons or i.attachments)]
        if not said:
            return DeliveryResult(DeliveryStatus.SKIPPED)  # no mail for events
        first = said[0]
        store = self.context.store
        key = conversation.thread_key
        thread = await store.get_state(CHANNEL, thread_state_key(key))
        if not thread or not thread.get("address"):
            raise DeliveryError(f"no email address known for thread {key}", permanent=True)
        parent = await self._parent(conversation, first)
        bot = first.sender.role is Role.BOT
        if bot and parent is not None and parent.channel_data.get("no_reply"):
            log.info("email: not answering automatic mail %s", parent.external_id)
            return DeliveryResult(DeliveryStatus.SKIPPED)
        in_reply_to = parent.channel_data.get("message_id") if parent is not None else None
        references: list[str] = []
        if parent is not None and in_reply_to:
            references = [*parent.channel_data.get("references", []), in_reply_to]
        message_id = f"<omnigate.{first.id}@{self.domain}>"  # the same on every retry
        files, links = await self._files_of(said)
        buttons = [b for i in said for b in i.buttons if b.url is None]
        links += [f"{b.title}: {b.url}" for i in said for b in i.buttons if b.url is not None]
        links += await self._footer(conversation)
        try:
            message = build(Outgoing(
                from_address=self.address,
                from_name=first.sender.name or ("Support" if bot else None),
                to_address=str(thread["address"]),
                to_name=thread.get("name"),
                subject=reply_subject(str(thread.get("subject") or ""), key),
                message_id=message_id,
                in_reply_to=in_reply_to,
                references=references,
                text="\n\n".join([*(i.text for i in said if i.text), *links]),
                buttons=buttons,
                automatic=bot,
                files=files,
            ))
        except HeaderInjection as exc:
            log.warning("email: refusing to send %s: %s", first.id, exc)
            raise DeliveryError(f"refused: {exc}", permanent=True) from None
        choices = [b.model_dump() for b in buttons]
        await store.put_state(CHANNEL, id_key(message_id), {
            "thread_key": key, "conversation_id": conversation.id, "buttons": choices})
        await store.put_state(CHANNEL, thread_state_key(key), {"buttons": choices})
        sender = SmtpSender(self.settings.smtp, self.options.smtp_timeout)
        try:
            await sender.send(message, self.address, str(thread["address"]))
        except RecipientRefused as exc:
            await store.set_identity_reachable(CHANNEL, str(thread["address"]), False, str(exc))
            raise
        return DeliveryResult(DeliveryStatus.DELIVERED, external_id=message_id)

    async def _footer(self, conversation: Conversation) -> list[str]:
        """Links that continue this conversation on our other channels (a week long;
        gateway/identity.py). A mail goes without them rather than not at all, and a
        conversation begun with others on the mail (Cc) gets none: they would see them."""
        if not conversation.one_to_one:
            return []
        try:
            offers = await self.context.offers(conversation)
        except Exception as exc:  # the links are a courtesy; the mail is what matters
            log.warning("email: no continue links for %s: %s", conversation.id, exc)
            return []
        if not offers:
            return []
        return ["-- \nContinue this conversation elsewhere:\n" + "\n".join(
            o.line() for o in offers)]

    async def _files_of(self, items: Sequence[Activity]) -> tuple[list[OutgoingFile], list[str]]:
        """The items' files, read from the attachment store, and lines naming the files
        that exist only as a link (items from before the store). A file that cannot be
        read refuses the mail (permanently: trying again will not bring it back)."""
        files: list[OutgoingFile] = []
        links: list[str] = []
        for item in items:
            for a in item.attachments:
                if a.id is not None and a.state in (None, AttachmentState.STORED):
                    try:
                        stored = await self.files.load(a.id)
                    except NoFile:
                        stored = None
                    if stored is None:
                        raise DeliveryError(f"attachment {a.name or a.id} is not in the "
                                            "attachment store", permanent=True)
                    files.append(OutgoingFile(stored.name, stored.content_type, stored.data))
                elif a.url:
                    links.append(f"{a.name or 'file'}: {a.url}")
                else:
                    state = a.state.value if a.state is not None else "unknown"
                    raise DeliveryError(f"attachment {a.name or 'file'} cannot be sent "
                                        f"({state})", permanent=True)
        return files, links

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
