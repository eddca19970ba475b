"""Sending one message over SMTP (aiosmtplib), with errors mapped for the outbox.

5xx answers are permanent (never retried); a refused recipient is also reported so the
identity can be marked unreachable. 4xx answers, timeouts, refused connections and
authentication failures (a configuration being fixed) are transient.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import EmailMessage

import aiosmtplib

from connectors.base import DeliveryError
from gateway.channel_settings import MailServer

SEND_TIMEOUT = 60.0
AUTH_RETRY_AFTER = 60.0


class RecipientRefused(DeliveryError):
    """The server permanently refused the customer's address."""


@dataclass(frozen=True, slots=True)
class SmtpSender:
    server: MailServer
    timeout: float = SEND_TIMEOUT

    async def send(self, message: EmailMessage, sender: str, recipient: str) -> None:
        server = self.server
        try:
            await aiosmtplib.send(
                message,
                sender=sender,
                recipients=[recipient],
                hostname=server.host,
                port=server.port,
                username=server.user,
                password=server.password,
                use_tls=server.tls == "ssl",
                start_tls=server.tls == "starttls",
                timeout=self.timeout,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            text = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
            if codes and all(code >= 500 for code in codes):
                raise RecipientRefused(f"recipient refused: {text}", permanent=True) from None
            raise DeliveryError(f"recipient deferred: {text}") from None
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise DeliveryError(f"SMTP authentication failed: {exc.code} {exc.message}",
                                retry_after=AUTH_RETRY_AFTER) from None
        except aiosmtplib.SMTPResponseException as exc:
            raise DeliveryError(f"SMTP {exc.code} {exc.message}",
                                permanent=exc.code >= 500) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise DeliveryError(f"SMTP server unreachable: {exc!r}") from None
