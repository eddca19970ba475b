"""Actions that fail in the ways a real action fails."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from rasa_sdk import Action, Tracker
from rasa_sdk.events import SlotSet
from rasa_sdk.executor import CollectingDispatcher

SLEEP_SECONDS = 30.0  # far past any limit a test uses; a test that waits for it fails
BLOCK_SECONDS = 1.0  # a sync action blocks its thread (in-process) or the server's loop


class ActionRaises(Action):
    def name(self) -> str:
        return "action_raises"

    def run(self, dispatcher: CollectingDispatcher, tracker: Tracker,
            domain: dict[str, Any]) -> list[dict[str, Any]]:
        raise RuntimeError("the order system is down")


class ActionSleeps(Action):
    def name(self) -> str:
        return "action_sleeps"

    async def run(self, dispatcher: CollectingDispatcher, tracker: Tracker,
                  domain: dict[str, Any]) -> list[dict[str, Any]]:
        await asyncio.sleep(SLEEP_SECONDS)
        return [SlotSet("slept", True)]


class ActionBlocks(Action):
    def name(self) -> str:
        return "action_blocks"

    def run(self, dispatcher: CollectingDispatcher, tracker: Tracker,
            domain: dict[str, Any]) -> list[dict[str, Any]]:
        time.sleep(BLOCK_SECONDS)
        return [SlotSet("blocked", True)]


class ActionNotJson(Action):
    def name(self) -> str:
        return "action_not_json"

    def run(self, dispatcher: CollectingDispatcher, tracker: Tracker,
            domain: dict[str, Any]) -> list[dict[str, Any]]:
        return [SlotSet("tags", {"a", "b"})]  # a set: no JSON for it
