"""Raw RFC 5322 bytes → ``ParsedMail``: one place that reads untrusted mail, defensively.

``parse_mail`` never raises for bad input except ``Rejected`` (no usable sender address):
malformed headers, unknown charsets and broken MIME degrade to what can be read. MIME
bombs (too many parts, nesting too deep, too large) are not unpacked: the result carries
a ``problem`` note, the headers, and no text for the bot; the raw bytes are kept (up to
the size limit) so an agent can still look at the message.

Attachment parts and inline images become ``files`` (``IncomingFile`` with the decoded
bytes, keyed by the part's number): the pipeline keeps them in the attachment store.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesParser
from email.utils import getaddresses, parsedate_to_datetime

from connectors.email.text import html_to_text, sanitize_html, strip_reply
from gateway.model import IncomingFile

MAX_HEADER_CHARS = 998  # RFC 5322 line limit: longer decoded values are cut
MAX_IDS = 50  # Message-IDs read from References / In-Reply-To
MAX_TEXT_CHARS = 200_000  # the full text kept for agents
MAX_BOT_TEXT_CHARS = 20_000  # what the bot reads
_MSGID = re.compile(r"<([^<>\s]{1,500})>")
_ADDRESS = re.compile(r"^[^@\s<>()\[\],;:\"\\]{1,64}@[A-Za-z0-9.-]{1,253}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
AUTOMATIC_SENDERS = ("mailer-daemon", "postmaster-noreply", "noreply-dmarc-support")


@dataclass(frozen=True, slots=True)
class Limits:
    """What an inbound mail may be; beyond it, it is kept for agents and not unpacked."""

    max_bytes: int = 10 * 1024 * 1024  # whole message (also the raw copy kept)
    max_parts: int = 100  # MIME parts in all
    max_depth: int = 8  # multipart nesting
    max_attachments: int = 20


class Rejected(Exception):
    """The mail cannot be taken in at all (said to the sender where there is one)."""


@dataclass(slots=True)
class ParsedMail:
    external_id: str  # the Message-ID, or "sha256:<hex>" of the raw bytes when there is none
    message_id: str | None  # "<id@host>" as in the header
    sender: str  # lower-cased address
    sender_name: str | None
    recipients: list[str]  # To and Cc addresses, lower-cased
    subject: str
    date: datetime | None
    in_reply_to: list[str]
    references: list[str]
    full_text: str  # the whole body as text, for agents
    text: str | None  # what the customer wrote (quotes and signature stripped), for the bot
    html: str | None  # the HTML body, sanitised
    files: list[IncomingFile] = field(default_factory=list)  # attachments, inline images
    automatic: str | None = None  # why this mail must not be answered
    problem: str | None = None  # why it was not unpacked (MIME bomb, too large, ...)
    raw_size: int = 0
    digest: str = ""  # sha256 hex of the raw bytes


def _decode_header(value: str) -> str:
    try:
        decoded = str(make_header(decode_header(value)))
    except Exception:
        decoded = value
    decoded = _CONTROL.sub(" ", decoded)  # never CR/LF (or NUL) in a header value we keep
    return re.sub(r"\s+", " ", decoded).strip()[:MAX_HEADER_CHARS]


def _raw_headers(message: Message) -> dict[str, list[str]]:
    """Every header as sent (unfolded, not decoded), by lower-cased name; read without
    the header registry, which can raise on malformed values."""
    found: dict[str, list[str]] = {}
    try:
        items = list(message.raw_items())
    except Exception:
        items = []
    for name, value in items[:500]:
        unfolded = _CONTROL.sub(" ", str(value)).strip()[: MAX_HEADER_CHARS * 4]
        found.setdefault(str(name).strip().lower(), []).append(unfolded)
    return found


def _decoded(raw: dict[str, list[str]]) -> dict[str, list[str]]:
    return {name: [_decode_header(v) for v in values] for name, values in raw.items()}


def _first(headers: dict[str, list[str]], name: str) -> str | None:
    values = headers.get(name)
    return values[0] if values else None


def normalise_address(value: str) -> str | None:
    # Raw 8-bit header bytes arrive surrogate-escaped: read them as UTF-8 (RFC 6532);
    # an address that is not valid UTF-8 or holds control characters is no address.
    if any("\udc80" <= c <= "\udcff" for c in value):
        try:
            value = value.encode("utf-8", "surrogateescape").decode("utf-8")
        except UnicodeError:
            return None
    address = value.strip().strip("<>").strip().lower()
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in address):
        return None
    return address if _ADDRESS.match(address) and ".." not in address else None


def _addresses(raw: dict[str, list[str]], *names: str) -> list[tuple[str | None, str]]:
    """(display name, address) pairs, parsed from the raw header: an encoded-word in a
    display name is decoded only after parsing, so it can never smuggle in an address."""
    values = [v for name in names for v in raw.get(name, [])]
    try:
        pairs = getaddresses(values)
    except Exception:
        return []
    found = []
    for name, address in pairs[:100]:
        normal = normalise_address(address)
        if normal is not None:
            display = _decode_header(name or "")[:200] if name else ""
            found.append((display or None, normal))
    return found


def message_ids(value: str | None) -> list[str]:
    if not value:
        return []
    return ["<" + m + ">" for m in _MSGID.findall(value)][-MAX_IDS:]


def automatic_reason(headers: dict[str, list[str]], sender: str, return_path: str | None,
                     content_type: str) -> str | None:
    """Why a mail is itself automatic (RFC 3834 and common practice), or None."""
    auto = (_first(headers, "auto-submitted") or "").split(";")[0].strip().lower()
    if auto and auto != "no":
        return f"Auto-Submitted: {auto}"
    precedence = (_first(headers, "precedence") or "").strip().lower()
    if precedence in ("bulk", "list", "junk"):
        return f"Precedence: {precedence}"
    local = sender.split("@", 1)[0]
    if local in AUTOMATIC_SENDERS:
        return f"sender {local}"
    if return_path is not None and return_path.strip() in ("<>", ""):
        return "null return path (a bounce)"
    for name in ("x-autoreply", "x-autorespond", "x-auto-response-suppress-loop"):
        if name in headers:
            return name
    if "list-id" in headers or "list-unsubscribe" in headers:
        return "mailing list"
    if content_type == "multipart/report":
        return "delivery or read report"
    return None


def _walk(root: Message, limits: Limits) -> tuple[list[tuple[Message, int]], str | None]:
    """Every part with its depth, breadth first, without recursion; or a bomb note."""
    parts: list[tuple[Message, int]] = []
    queue: list[tuple[Message, int]] = [(root, 0)]
    while queue:
        part, depth = queue.pop(0)
        if depth > limits.max_depth:
            return parts, f"MIME nesting deeper than {limits.max_depth}"
        parts.append((part, depth))
        if len(parts) > limits.max_parts:
            return parts, f"more than {limits.max_parts} MIME parts"
        payload = part.get_payload() if part.is_multipart() else None
        if isinstance(payload, list):
            queue.extend((child, depth + 1) for child in payload if isinstance(child, Message))
    return parts, None


def _text_of(part: Message) -> str:
    try:
        payload = part.get_payload(decode=True)
    except Exception:
        payload = None
    if not isinstance(payload, bytes):
        return ""
    charset = "utf-8"
    try:
        charset = part.get_content_charset() or "utf-8"
        return payload.decode(charset, errors="replace")
    except (LookupError, ValueError, TypeError):
        return payload.decode("utf-8", errors="replace")


def _filename(part: Message) -> str | None:
    """The part's file name as the sender's client wrote it, decoded (RFC 2231 and
    encoded-words); the attachment store keeps only its last path segment."""
    try:
        name = part.get_filename()
    except Exception:
        return None
    if not name:
        return None
    name = _decode_header(str(name)) if "=?" in str(name) else str(name)
    name = _CONTROL.sub("", name).strip()
    return name[:200] or None


def _part_bytes(part: Message) -> bytes:
    """A leaf part's content, transfer-decoded; what cannot be decoded is kept as sent."""
    try:
        payload = part.get_payload(decode=True)
    except Exception:
        payload = None
    if isinstance(payload, bytes):
        return payload
    try:
        raw = part.get_payload()
    except Exception:
        return b""
    return raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else b""


def parse_bytes(raw: bytes) -> Message:
    return BytesParser(policy=policy.default).parsebytes(raw)


def _header_block(raw: bytes) -> bytes:
    head = raw[: 256 * 1024]
    for separator in (b"\r\n\r\n", b"\n\n"):
        end = head.find(separator)
        if end != -1:
            return head[: end + len(separator)]
    return head


def _parse_whole(raw: bytes, limits: Limits) -> tuple[Message | None, str | None]:
    try:
        return parse_bytes(raw), None
    except RecursionError:
        return None, f"MIME nesting deeper than {limits.max_depth}"
    except Exception as exc:  # the stdlib parser is meant to be lenient; never crash here
        return None, f"unreadable MIME structure ({type(exc).__name__})"


def _parse_headers(raw: bytes) -> Message:
    try:
        return BytesParser(policy=policy.default).parsebytes(_header_block(raw), headersonly=True)
    except Exception:  # broken beyond reading: a message without headers
        return Message()


def parse_mail(raw: bytes, limits: Limits, *, envelope_from: str | None = None,
               size: int | None = None) -> ParsedMail:
    """Read one inbound mail. Raises ``Rejected`` only when there is no sender at all.

    ``size``: the whole message's size when ``raw`` is only its beginning.
    """
    digest = hashlib.sha256(raw).hexdigest()
    problem: str | None = None
    message: Message | None = None
    total = max(size or 0, len(raw))
    if total > limits.max_bytes:
        problem = f"message of {total} bytes is over the {limits.max_bytes} byte limit"
    elif raw.count(b"\n--") > limits.max_parts * 3 + 20:
        problem = f"more than {limits.max_parts} MIME parts"
    if problem is None:
        message, problem = _parse_whole(raw, limits)
    if message is None:  # headers only
        message = _parse_headers(raw)
    raw_headers = _raw_headers(message)
    headers = _decoded(raw_headers)

    senders = _addresses(raw_headers, "from") or _addresses(raw_headers, "sender", "reply-to")
    envelope = normalise_address(envelope_from) if envelope_from else None
    if not senders and envelope is not None:
        senders = [(None, envelope)]
    if not senders:
        raise Rejected("no valid sender address (From)")
    sender_name, sender = senders[0]
    recipients = [address for _, address in _addresses(raw_headers, "to", "cc")]

    message_id = next(iter(message_ids(_first(headers, "message-id"))), None)
    if message_id is not None and len(message_id) > 500:
        message_id = None
    date = None
    if (raw_date := _first(headers, "date")) is not None:
        try:
            date = parsedate_to_datetime(raw_date)
            date = date.replace(tzinfo=UTC) if date.tzinfo is None else date.astimezone(UTC)
        except (TypeError, ValueError, IndexError, OverflowError):
            date = None
    try:
        content_type = message.get_content_type()
    except Exception:
        content_type = "text/plain"
    return_path = _first(headers, "return-path")
    if envelope_from is not None and envelope_from.strip() in ("", "<>"):
        return_path = "<>"

    parsed = ParsedMail(
        external_id=message_id or f"sha256:{digest}",
        message_id=message_id,
        sender=sender,
        sender_name=sender_name,
        recipients=recipients,
        subject=_first(headers, "subject") or "",
        date=date,
        in_reply_to=message_ids(_first(headers, "in-reply-to")),
        references=message_ids(" ".join(headers.get("references", []))),
        full_text="",
        text=None,
        html=None,
        automatic=automatic_reason(headers, sender, return_path, content_type),
        problem=problem,
        raw_size=total,
        digest=digest,
    )
    if problem is None:
        _read_body(parsed, message, limits)
    return parsed


def _read_body(parsed: ParsedMail, message: Message, limits: Limits) -> None:
    parts, bomb = _walk(message, limits)
    if bomb is not None:
        parsed.problem = bomb
        return
    plain: str | None = None
    markup: str | None = None
    number = 0
    for part, _depth in parts:
        if part.is_multipart():
            continue
        number += 1
        try:
            content_type = part.get_content_type()
            disposition = part.get_content_disposition()
        except Exception:
            content_type, disposition = "application/octet-stream", "attachment"
        if disposition != "attachment" and content_type == "text/plain" and plain is None:
            plain = _text_of(part)
        elif disposition != "attachment" and content_type == "text/html" and markup is None:
            markup = _text_of(part)
        elif content_type not in ("text/plain", "text/html") or disposition == "attachment":
            if len(parsed.files) >= limits.max_attachments:
                parsed.problem = f"more than {limits.max_attachments} attachments"
                continue
            data = _part_bytes(part)
            parsed.files.append(IncomingFile(
                key=str(number), name=_filename(part), content_type=content_type[:200],
                size=len(data), data=data))
    if markup is not None:
        parsed.html = sanitize_html(markup)
    full = plain if plain is not None and plain.strip() else (
        html_to_text(markup) if markup is not None else "")
    parsed.full_text = full.replace("\r\n", "\n")[:MAX_TEXT_CHARS]
    stripped = strip_reply(parsed.full_text)[:MAX_BOT_TEXT_CHARS]
    parsed.text = stripped or None
