"""Outbound mail: an ``EmailMessage`` built with ``email.policy.default``.

Every header value is checked for CR/LF first (``HeaderInjection``: never sent); bot mail
carries ``Auto-Submitted: auto-replied`` (RFC 3834); replies carry In-Reply-To and
References; the body is plain text plus an HTML alternative made only of escaped text
(and cleaned by nh3 once more). Buttons become a numbered list in both. Files go along
as MIME attachments (``multipart/mixed``) with their stored name and content type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate
from html import escape

from connectors.email.text import sanitize_html, text_to_html
from gateway.model import Button

MAX_REFERENCES = 20
CHOICE_HINT = "Reply with the number or the name of your choice."
_TOKEN = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,126}$")


class HeaderInjection(ValueError):
    """A header value would contain a line break: refused, nothing is sent."""


def checked(name: str, value: str) -> str:
    if "\r" in value or "\n" in value or "\x00" in value:
        raise HeaderInjection(f"{name}: header value contains a line break or NUL")
    return value


@dataclass(frozen=True, slots=True)
class OutgoingFile:
    """A file to attach: its bytes, name and content type as the attachment store has them."""

    name: str
    content_type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Outgoing:
    from_address: str
    from_name: str | None
    to_address: str
    to_name: str | None
    subject: str
    message_id: str
    in_reply_to: str | None
    references: list[str]
    text: str
    buttons: list[Button]
    automatic: bool  # bot mail: Auto-Submitted: auto-replied
    files: list[OutgoingFile] = field(default_factory=list)


def reply_subject(subject: str, token: str) -> str:
    """'Re: <subject> [#token]', without piling up 'Re:' or tokens."""
    base = re.sub(r"\s*\[#[a-z2-7]{12}\]", "", subject, flags=re.IGNORECASE).strip()
    base = re.sub(r"^((re|aw|sv|fwd?|wg)\s*:\s*)+", "", base, flags=re.IGNORECASE).strip()
    base = base or "Your message"
    return f"Re: {base[:200]} [#{token}]"


def trimmed_references(references: list[str]) -> list[str]:
    """RFC 5322 allows trimming: keep the first id and the newest ones."""
    if len(references) <= MAX_REFERENCES:
        return references
    return [references[0], *references[-(MAX_REFERENCES - 1):]]


def body_text(text: str, buttons: list[Button]) -> str:
    if not buttons:
        return text
    lines = [f"{n}. {b.title}" for n, b in enumerate(buttons, 1)]
    lead = f"{text}\n\n" if text else ""
    return lead + "\n".join(lines) + f"\n\n{CHOICE_HINT}"


def body_html(text: str, buttons: list[Button]) -> str:
    parts = [text_to_html(text)]
    if buttons:
        items = "".join(f"<li>{escape(b.title)}</li>" for b in buttons)
        parts.append(f"<ol>{items}</ol><p>{escape(CHOICE_HINT)}</p>")
    page = "".join(parts)
    return f'<!DOCTYPE html><html><body><div dir="auto">{sanitize_html(page)}</div></body></html>'


def build(mail: Outgoing) -> EmailMessage:
    """The message to send. Raises ``HeaderInjection`` for a line break in any header."""
    for name, value in (
        ("From", mail.from_address), ("From", mail.from_name or ""),
        ("To", mail.to_address), ("To", mail.to_name or ""), ("Subject", mail.subject),
        ("Message-ID", mail.message_id), ("In-Reply-To", mail.in_reply_to or ""),
        *(("References", r) for r in mail.references),
    ):
        checked(name, value)
    message = EmailMessage(policy=policy.default)
    try:
        message["From"] = Address(display_name=mail.from_name or "", addr_spec=mail.from_address)
        message["To"] = Address(display_name=mail.to_name or "", addr_spec=mail.to_address)
    except (ValueError, IndexError) as exc:  # an address the header registry cannot express
        raise HeaderInjection(f"address: {exc}") from None
    message["Subject"] = mail.subject
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = mail.message_id
    if mail.in_reply_to:
        message["In-Reply-To"] = mail.in_reply_to
    references = trimmed_references(mail.references)
    if references:
        message["References"] = " ".join(references)
    if mail.automatic:
        message["Auto-Submitted"] = "auto-replied"
    # Ask Exchange/Outlook not to send out-of-office or read receipts back (loops).
    message["X-Auto-Response-Suppress"] = "All"
    message.set_content(body_text(mail.text, mail.buttons))
    message.add_alternative(body_html(mail.text, mail.buttons), subtype="html")
    for file in mail.files:
        attach(message, file)
    return message


def attach(message: EmailMessage, file: OutgoingFile) -> None:
    """Add ``file`` as an attachment (the message becomes multipart/mixed), base64. A
    content type that cannot be carried so goes as application/octet-stream: a malformed
    one, multipart/*, and message/* (RFC 2046 allows it no base64, and stored bytes are
    not known to be a well-formed 7-bit mail)."""
    checked("filename", file.name)
    maintype, _, subtype = file.content_type.partition(";")[0].strip().lower().partition("/")
    if not _TOKEN.match(maintype) or not _TOKEN.match(subtype) or \
            maintype in ("multipart", "message"):
        maintype, subtype = "application", "octet-stream"
    try:
        message.add_attachment(file.data, maintype=maintype, subtype=subtype,
                               filename=file.name)
    except (ValueError, TypeError):
        message.add_attachment(file.data, maintype="application", subtype="octet-stream",
                               filename=file.name)
