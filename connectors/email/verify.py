"""A one-off verification mail: the code that proves a web chat visitor owns an address.

Built like every outgoing mail (render.py: headers checked for CR/LF, plain text plus an
HTML alternative made of escaped text) and sent through the configured SMTP sender. It is
automatic mail that answers nothing, so it says ``Auto-Submitted: auto-generated``
(RFC 3834): well-behaved mailers do not auto-reply to it. It belongs to no thread.
"""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import make_msgid

from connectors.email.parse import normalise_address
from connectors.email.render import Outgoing, build
from connectors.email.smtp_out import SmtpSender

SUBJECT = "Your verification code: {code}"
TEXT = (
    "Your verification code is {code}\n\n"
    "Type it in the chat window to confirm that this address is yours. It is valid for "
    "{minutes} minutes.\n\n"
    "If you did not ask for it, ignore this mail: nothing happens without the code."
)


def verifiable(address: str, own_address: str) -> str | None:
    """The address as the email channel knows its senders (lower case), or None if it is
    no valid address, or our own (a loop)."""
    found = normalise_address(address) if len(address) <= 254 else None
    if found is None or found == own_address.lower():
        return None
    local, _, domain = found.partition("@")
    labels = domain.split(".")
    if len(local) > 64 or len(labels) < 2 or not all(labels):
        return None  # mail is not delivered to a bare host name
    return found


def code_mail(own_address: str, to_address: str, code: str, minutes: int) -> EmailMessage:
    domain = own_address.partition("@")[2] or "omnigate.invalid"
    message = build(Outgoing(
        from_address=own_address, from_name="Support", to_address=to_address, to_name=None,
        subject=SUBJECT.format(code=code), message_id=make_msgid("verify", domain=domain),
        in_reply_to=None, references=[], text=TEXT.format(code=code, minutes=minutes),
        buttons=[], automatic=True))
    message.replace_header("Auto-Submitted", "auto-generated")  # not a reply (RFC 3834)
    return message


async def send_code(sender: SmtpSender, own_address: str, to_address: str, code: str,
                    minutes: int) -> None:
    """Mail ``code``; raises DeliveryError (from SmtpSender) when it could not be sent."""
    await sender.send(code_mail(own_address, to_address, code, minutes), own_address,
                      to_address)
