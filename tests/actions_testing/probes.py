"""Actions that show what the bridge sends and how it reads what comes back."""

from __future__ import annotations

import datetime
from typing import Any

from rasa_sdk import Action, Tracker
from rasa_sdk.events import (
    AllSlotsReset,
    BotUttered,
    ConversationPaused,
    FollowupAction,
    ReminderScheduled,
    Restarted,
    SlotSet,
)
from rasa_sdk.executor import CollectingDispatcher


class ActionEchoTracker(Action):
    """Sets ``seen`` to what the tracker told it, through rasa-sdk's own Tracker API."""

    def name(self) -> str:
        return "action_echo_tracker"

    def run(self, dispatcher: CollectingDispatcher, tracker: Tracker,
            domain: dict[str, Any]) -> list[dict[str, Any]]:
        seen = {
            "sender_id": tracker.sender_id,
            "slots": dict(tracker.current_slot_values()),
            "order_number": tracker.get_slot("order_number"),
            "text": tracker.latest_message.get("text"),
            "intent": tracker.get_intent_of_latest_message(),
            "entities": list(tracker.get_latest_entity_values("order_number")),
            "channel": tracker.get_latest_input_channel(),
            "events": [e["event"] for e in tracker.events],
            "said": [e.get("text") for e in tracker.events if e["event"] == "user"],
            "latest_action_name": tracker.latest_action_name,
            "paused": tracker.is_paused(),
            "active_loop": tracker.active_loop_name,
            "domain_slots": sorted(domain["slots"]),
        }
        tracker.slots["scribbled"] = True  # must not leak into the caller's slots
        return [SlotSet("seen", seen)]


class ActionEveryKind(Action):
    """Every event the bridge applies or ignores, and every kind of response."""

    def name(self) -> str:
        return "action_every_kind"

    def run(self, dispatcher: CollectingDispatcher, tracker: Tracker,
            domain: dict[str, Any]) -> list[dict[str, Any]]:
        dispatcher.utter_message(text="Pick one", buttons=[
            {"title": "Yes", "payload": "/affirm"}, {"title": "No", "payload": "/deny"}])
        dispatcher.utter_message(json_message={"text": "A custom hello"})
        dispatcher.utter_message(json_message={"blocks": [{"type": "divider"}]})
        dispatcher.utter_message(response="utter_known")
        dispatcher.utter_message(response="utter_unknown")
        dispatcher.utter_message(image="https://shop.example/shoe.png")
        dispatcher.utter_message(attachment="https://shop.example/label.pdf")
        dispatcher.utter_message(elements=[{"title": "Shoe", "subtitle": "size 42",
                                            "buttons": [{"title": "Buy", "payload": "buy"}]}])
        dispatcher.utter_message(buttons=[{"title": "Only a button", "payload": "only"}])
        return [
            SlotSet("a", 1),
            SlotSet("b", "two"),
            AllSlotsReset(),
            SlotSet("c", 3),
            SlotSet("c", [4, "four"]),
            SlotSet("d", None),
            FollowupAction("action_check_order"),
            ConversationPaused(),
            Restarted(),
            ReminderScheduled("remind_me", datetime.datetime(2030, 1, 1, 9, 0)),
            BotUttered("said by the action"),
        ]
