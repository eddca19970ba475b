"""The Slack channel: Events API (HTTP or Socket Mode) in, chat.postMessage out."""

from connectors.slack.connector import SlackConnector

__all__ = ["SlackConnector"]
