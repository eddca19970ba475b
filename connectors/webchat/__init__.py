"""The web chat channel: widget, demo page and socket protocol."""

from connectors.webchat.connector import WebchatConfig, WebchatConnector

__all__ = ["WebchatConfig", "WebchatConnector"]
