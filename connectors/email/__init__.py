"""The email channel: IMAP in, SMTP out, optionally an SMTP server (docs/channels/email.md)."""

from connectors.email.connector import EmailConnector, EmailOptions
from connectors.email.imap import ImapOptions
from connectors.email.parse import Limits

__all__ = ["EmailConnector", "EmailOptions", "ImapOptions", "Limits"]
