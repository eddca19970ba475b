"""Optional inbound SMTP server (aiosmtpd) for direct delivery (``OMNIGATE_SMTP_LISTEN``).

Accepts mail only for our own address (and its plus addresses). A message is answered
``250`` only after it is durably stored; ``451`` (try again later) when the store could not
take it, so the sending server keeps it and retries; ``550`` for a mail we refuse on
purpose (no sender); ``552`` above the size limit (aiosmtpd's own check).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from aiosmtpd.smtp import SMTP, Envelope, Session
from pymongo.errors import PyMongoError

from connectors.email.imap import Outcome
from connectors.email.parse import Rejected, normalise_address

log = logging.getLogger(__name__)

# (raw bytes, envelope sender) -> outcome; raises Rejected or PyMongoError
Deliver = Callable[[bytes, str | None], Awaitable[Outcome]]


class InboundHandler:
    """aiosmtpd handler hooks (``handle_RCPT``, ``handle_DATA``)."""

    def __init__(self, own_address: str, deliver: Deliver) -> None:
        local, _, domain = own_address.lower().partition("@")
        self.local, self.domain = local, domain
        self.deliver = deliver

    def ours(self, address: str) -> bool:
        normal = normalise_address(address)
        if normal is None:
            return False
        local, _, domain = normal.partition("@")
        return domain == self.domain and local.partition("+")[0] == self.local

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        if not self.ours(address):
            return "550 5.1.1 no such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(
        self, server: SMTP, session: Session, envelope: Envelope,
    ) -> str:
        raw = envelope.original_content
        if raw is None:
            raw = envelope.content if isinstance(envelope.content, bytes) else b""
        try:
            outcome = await self.deliver(raw, envelope.mail_from)
        except Rejected as exc:
            log.info("email: SMTP refused a mail from %s: %s", envelope.mail_from, exc)
            return f"550 5.6.0 {str(exc)[:200]}"
        except PyMongoError as exc:
            log.warning("email: SMTP mail from %s not stored (store unavailable): %s",
                        envelope.mail_from, exc)
            return "451 4.3.0 cannot store the message now, please try again later"
        except Exception:
            log.exception("email: SMTP mail from %s failed", envelope.mail_from)
            return "451 4.3.0 internal error, please try again later"
        if outcome is Outcome.REJECTED:
            return "550 5.7.1 message refused"
        return "250 2.0.0 OK: stored"


class SmtpListener:
    def __init__(self, host: str, port: int, handler: InboundHandler, *, hostname: str,
                 max_bytes: int, reuse_port: bool = False) -> None:
        self.host, self.port = host, port
        self.reuse_port = reuse_port  # several workers of one gateway share the port
        self.handler = handler
        self.hostname = hostname
        self.max_bytes = max_bytes
        self.server: asyncio.Server | None = None

    @property
    def bound_port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: SMTP(self.handler, hostname=self.hostname, ident="Omnigate",
                         data_size_limit=self.max_bytes, enable_SMTPUTF8=True,
                         decode_data=False, timeout=120, loop=loop),
            self.host, self.port, reuse_port=self.reuse_port or None)
        log.info("email: accepting mail by SMTP on %s:%s", self.host, self.bound_port)

    async def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5.0)
