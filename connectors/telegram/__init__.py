"""The Telegram channel (aiogram 3): webhook or long polling in, Bot API out."""

from connectors.telegram.connector import TelegramConnector

__all__ = ["TelegramConnector"]
