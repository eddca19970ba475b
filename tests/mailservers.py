"""Real mail servers for the email tests: a throwaway Dovecot (IMAP) and an aiosmtpd sink.

Dovecot runs in the foreground (``dovecot -F -c CONF``) on a free high port, stopped with
SIGTERM; ``running_dovecot(name, extra)`` takes extra config lines (e.g. a capability list
without IDLE, for the polling fallback). Each test gets its own mailbox user from a pool
written to the passwd-file before start, so tests never see each other's mail.

Also the harness the email tests share: ``MailRig`` (the whole gateway with email on,
started and stopped like a deployment, so a test can restart it), mail builders, and
waits on conditions with deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import imaplib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestServer
from aiosmtpd.smtp import SMTP, Envelope, Session

from connectors.email import EmailConnector, EmailOptions, ImapOptions
from gateway.app import create_app
from gateway.keys import CONNECTORS
from gateway.model import Activity, Conversation
from gateway.settings import Settings
from gateway.store import Store
from gateway.store.mongo import from_doc
from tests.conftest import Gateway, free_port, need

PASSWORD = "secret"
NOBODY = 65534
USERS = 100  # mailbox users per instance (one per test)

CONF = """\
protocols = imap
listen = 127.0.0.1
base_dir = {d}/run
state_dir = {d}/state
instance_name = dovecot-test-{name}
log_path = {d}/dovecot.log
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:{d}/mail/%u
first_valid_uid = 1
{extra}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {d}/users
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imaps_port}
  }}
}}
"""


@dataclass
class Dovecot:
    """One running Dovecot instance."""

    directory: Path
    port: int
    process: subprocess.Popen[bytes]
    users: list[str]
    imaps_port: int = 0  # with TLS: the implicit-TLS port (``port`` then offers STARTTLS)
    ca_file: Path | None = None  # with TLS: the self-signed certificate to trust

    def new_user(self) -> str:
        """A fresh mailbox user (empty INBOX) for one test, from the pool made at start
        (users added later would depend on Dovecot noticing the passwd-file changed)."""
        return self.users.pop()

    def imap(self, user: str) -> imaplib.IMAP4:
        """A plain (blocking) IMAP client, logged in: the test's own view of the mailbox."""
        client = imaplib.IMAP4("127.0.0.1", self.port, timeout=10)
        client.login(user, PASSWORD)
        return client

    def append(self, user: str, raw: bytes | EmailMessage, flags: str = "") -> None:
        data = raw if isinstance(raw, bytes) else raw.as_bytes(policy=policy.SMTP)
        client = self.imap(user)
        try:
            status, _ = client.append("INBOX", f"({flags})" if flags else None, None, data)
            assert status == "OK"
        finally:
            client.logout()

    def flags(self, user: str) -> dict[int, set[str]]:
        """UID -> flags of every message in the user's INBOX."""
        client = self.imap(user)
        try:
            client.select("INBOX", readonly=True)
            status, lines = client.uid("FETCH", "1:*", "(FLAGS)")
            assert status == "OK"
            found: dict[int, set[str]] = {}
            for line in lines:
                if not isinstance(line, bytes):
                    continue
                match = re.search(rb"UID (\d+) FLAGS \(([^)]*)\)", line) or re.search(
                    rb"FLAGS \(([^)]*)\) UID (\d+)", line)
                if match is None:
                    continue
                a, b = match.groups()
                uid, names = (a, b) if a.isdigit() else (b, a)
                found[int(uid)] = set(names.decode().split())
            return found
        finally:
            client.logout()

    async def aappend(self, user: str, raw: bytes | EmailMessage, flags: str = "") -> None:
        await asyncio.to_thread(self.append, user, raw, flags)

    async def aflags(self, user: str) -> dict[int, set[str]]:
        return await asyncio.to_thread(self.flags, user)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1/localhost, and its key (openssl: dovecot-core depends
    on it, so it is there wherever Dovecot is)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True)
    return cert, key


def _start_dovecot(directory: Path, name: str, extra: str = "", *, tls: bool = False) -> Dovecot:
    executable = shutil.which("dovecot") or (
        "/usr/sbin/dovecot" if Path("/usr/sbin/dovecot").exists() else None)
    if executable is None:
        need("Dovecot (dovecot-imapd)", "apt-get install -y dovecot-imapd")
    assert executable is not None
    for sub in ("run", "state", "mail"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    users = [f"u{uuid.uuid4().hex[:12]}" for _ in range(USERS)]
    (directory / "users").write_text("".join(
        f"{user}:{{PLAIN}}{PASSWORD}:{NOBODY}:{NOBODY}::{directory / 'mail' / user}\n"
        for user in users))
    if os.geteuid() == 0:
        os.chown(directory / "mail", NOBODY, NOBODY)
    port = free_port()
    imaps_port = free_port() if tls else 0
    ssl_conf, ca_file = "ssl = no", None
    if tls:
        ca_file, key = self_signed(directory)
        ssl_conf = f"ssl = yes\nssl_cert = <{ca_file}\nssl_key = <{key}"
    conf = directory / "dovecot.conf"
    conf.write_text(CONF.format(d=directory, name=name, port=port, extra=extra, ssl=ssl_conf,
                                imaps_port=imaps_port))
    log = (directory / "stdout.log").open("wb")
    process = subprocess.Popen([executable, "-F", "-c", str(conf)], stdout=log, stderr=log)
    log.close()
    deadline = time.monotonic() + 15
    while True:
        if process.poll() is not None:
            text = (directory / "stdout.log").read_text(errors="replace")
            dovecot_log = directory / "dovecot.log"
            if dovecot_log.exists():
                text += dovecot_log.read_text(errors="replace")
            raise RuntimeError(f"dovecot exited with {process.returncode}: {text[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5) as s:
            s.settimeout(2)
            if s.recv(100).startswith(b"* OK"):
                break
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("dovecot did not greet within 15 s")
        time.sleep(0.05)
    return Dovecot(directory, port, process, users, imaps_port, ca_file)


def _stop(server: Dovecot) -> None:
    server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@contextlib.contextmanager
def running_dovecot(name: str, extra: str = "", *, tls: bool = False) -> Iterator[Dovecot]:
    # Not pytest's tmp_path: Dovecot's auth process (user dovecot) must traverse the
    # directory, and pytest makes its temporary directories 0700.
    directory = Path(tempfile.mkdtemp(prefix=f"omnigate-dovecot-{name}-"))
    directory.chmod(0o755)
    try:
        server = _start_dovecot(directory, name, extra, tls=tls)
        try:
            yield server
        finally:
            _stop(server)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ------------------------------------------------------------------ SMTP sink


@dataclass
class Received:
    mail_from: str | None
    rcpt_tos: list[str]
    raw: bytes
    message: EmailMessage
    tls: bool  # the session had switched to TLS (STARTTLS) before DATA


@dataclass
class Sink:
    """An aiosmtpd handler that keeps every message it is given."""

    messages: list[Received] = field(default_factory=list)
    refuse: dict[str, str] = field(default_factory=dict)  # recipient -> SMTP reply
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        parsed: Any = email.message_from_bytes(raw, policy=policy.default)
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos), raw, parsed,
                                      session.ssl is not None))
        self.arrived.set()
        return "250 Message accepted for delivery"

    async def wait_for(self, count: int, timeout: float = 15.0) -> list[Received]:
        """Wait until at least ``count`` messages arrived (a deadline, not a sleep)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.messages) < count:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(
                    f"{len(self.messages)} message(s) at the SMTP sink, wanted {count}: "
                    f"{[m.message['Subject'] for m in self.messages]}")
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), remaining)
        return self.messages


@dataclass
class SmtpSink:
    sink: Sink
    port: int
    server: asyncio.AbstractServer


async def start_sink(tls: ssl.SSLContext | None = None) -> SmtpSink:
    """The sink on a free port; with ``tls``, it offers (and requires) STARTTLS."""
    loop = asyncio.get_running_loop()
    sink = Sink()
    server = await loop.create_server(
        lambda: SMTP(sink, hostname="sink.test", loop=loop, tls_context=tls,
                     require_starttls=tls is not None), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return SmtpSink(sink, port, server)


async def stop_sink(sink: SmtpSink) -> None:
    sink.server.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(sink.server.wait_closed(), 5)


# ------------------------------------------------------------------ the gateway with email on

OURS = "support@omnigate.test"
ALICE = "alice@customer.test"
MALLORY = "mallory@elsewhere.test"




def mail(sender: str = ALICE, body: str = "Hello", *, subject: str = "A question",
         in_reply_to: str | None = None, references: str | None = None,
         name: str | None = "Alice", **headers: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = f"{name} <{sender}>" if name else sender
    message["To"] = OURS
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain="customer.test")
    message["Date"] = "Mon, 23 Nov 2026 10:00:00 +0000"
    if in_reply_to:
        message["In-Reply-To"] = in_reply_to
    if references:
        message["References"] = references
    for key, value in headers.items():
        message[key.replace("_", "-")] = value
    message.set_content(body)
    return message


def reply_to(bot_mail: EmailMessage, body: str, sender: str = ALICE) -> EmailMessage:
    """The customer's reply to one of our mails, threaded as mail clients do."""
    parent = str(bot_mail["Message-ID"])
    references = f"{bot_mail.get('References', '')} {parent}".strip()
    return mail(sender, body, subject=str(bot_mail["Subject"]), in_reply_to=parent,
                references=references)


async def until(check: Callable[[], Awaitable[Any]], timeout: float = 15.0,
                what: str = "condition") -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def inbound(store: Store) -> list[Activity]:
    docs = await store.messages.find({"channel": "email", "direction": "in"}).sort(
        "created_at", 1).to_list()
    return [from_doc(Activity, d) for d in docs]


async def inbound_count(store: Store, n: int, timeout: float = 15.0) -> list[Activity]:
    async def enough() -> list[Activity] | None:
        items = await inbound(store)
        return items if len(items) >= n else None
    return await until(enough, timeout, f"{n} inbound mail(s) stored")


async def conversation_of(store: Store, item: Activity) -> Conversation:
    conversation = await store.get_conversation(item.conversation_id)
    assert conversation is not None
    return conversation


def text_part(message: EmailMessage) -> str:
    part = message.get_body(("plain",))
    assert part is not None
    return str(part.get_content())


def html_part(message: EmailMessage) -> str:
    part = message.get_body(("html",))
    assert part is not None
    return str(part.get_content())


class MailRig:
    """The gateway with email on, its mailbox (Dovecot user) and the SMTP sink."""

    def __init__(self, settings: Settings, dovecot: Dovecot, user: str, sink: SmtpSink,
                 options: EmailOptions) -> None:
        self.settings, self.dovecot, self.user, self.sink = settings, dovecot, user, sink
        self.options = options
        self.gateway: Gateway | None = None

    @property
    def gw(self) -> Gateway:
        assert self.gateway is not None
        return self.gateway

    @property
    def connector(self) -> EmailConnector:
        connector = self.gw.app[CONNECTORS]["email"]
        assert isinstance(connector, EmailConnector)
        return connector

    async def start(self) -> Gateway:
        app = create_app(self.settings)
        connector = app[CONNECTORS]["email"]
        assert isinstance(connector, EmailConnector)
        connector.options = self.options
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        self.gateway = Gateway(server, app)
        if self.settings.imap_host:
            assert connector.imap is not None
            await asyncio.wait_for(connector.imap.waiting.wait(), 15)
        return self.gateway

    async def stop(self) -> None:
        if self.gateway is not None:
            await self.gateway.close()
            await self.gateway.server.close()
            self.gateway = None

    async def append(self, message: EmailMessage | bytes, flags: str = "") -> None:
        await self.dovecot.aappend(self.user, message, flags)

    async def sent(self, n: int, timeout: float = 15.0) -> list[EmailMessage]:
        return [r.message for r in await self.sink.sink.wait_for(n, timeout)]


def email_settings(settings: Settings, dovecot: Dovecot | None, user: str | None,
                   sink: SmtpSink, listen: int | None = None) -> Settings:
    update: dict[str, Any] = {
        "email_address": OURS, "smtp_host": "127.0.0.1", "smtp_port": sink.port,
        "smtp_tls": "none",
    }
    if dovecot is not None:
        update |= {"imap_host": "127.0.0.1", "imap_port": dovecot.port, "imap_user": user,
                   "imap_password": PASSWORD, "imap_tls": "none"}
    if listen is not None:
        update["smtp_listen"] = f"127.0.0.1:{listen}"
    return settings.model_copy(update=update)


async def drop(settings: Settings) -> None:
    assert settings.mongodb_uri is not None
    cleanup = Store.connect(settings.mongodb_uri, settings.mongodb_db)
    await cleanup.client.drop_database(settings.mongodb_db)
    await cleanup.close()


@contextlib.asynccontextmanager
async def rig_for(settings: Settings, dovecot: Dovecot | None, sink: SmtpSink,
                  options: EmailOptions, listen: int | None = None) -> AsyncIterator[MailRig]:
    user = dovecot.new_user() if dovecot is not None else None
    rig = MailRig(email_settings(settings, dovecot, user, sink, listen), dovecot,  # type: ignore[arg-type]
                  user or "", sink, options)
    try:
        yield rig
    finally:
        await rig.stop()
        await drop(settings)


# IDLE: polling is made so slow (and IDLE so long) that only IDLE can wake the connector.
IDLE_ONLY = EmailOptions(imap=ImapOptions(poll_seconds=300, idle_seconds=300, timeout=10))
POLLING = EmailOptions(imap=ImapOptions(poll_seconds=0.2, idle_seconds=300, timeout=10))


