"""Actions whose results the engine must apply (tests/test_engine_effects.py): responses
of every kind, handoff, followups, restarts, slot resets, undeclared and profile slots,
and returns that are not what rasa-sdk expects."""

from __future__ import annotations

from typing import Any

from rasa_sdk import Action, Tracker
from rasa_sdk.events import (
    AllSlotsReset,
    ConversationPaused,
    FollowupAction,
    Restarted,
    SlotSet,
)
from rasa_sdk.executor import CollectingDispatcher

SHOE_IMAGE = "https://shop.example/shoe.png"
SIZE_CHART = "https://shop.example/sizes.pdf"


class ActionOfferSizes(Action):
    """Every kind of response, a slot, and a followup to another action."""

    def name(self) -> str:
        return "action_offer_sizes"

    def run(self, dispatcher: CollectingDispatcher, tracker: Tracker,
            domain: dict[str, Any]) -> list[dict[str, Any]]:
        dispatcher.utter_message(text="We have this shoe in two sizes.")
        dispatcher.utter_message(text="Which size?", buttons=[
            {"title": "Small", "payload": "small"}, {"title": "Large", "payload": "large"}])
        dispatcher.utter_message(json_message={"text": "Free returns within 30 days."})
        dispatcher.utter_message(json_message={"blocks": [{"type": "divider"}]})  # no text
        dispatcher.utter_message(response="utter_size_help")  # Rasa's named responses
        dispatcher.utter_message(image=SHOE_IMAGE)
        dispatcher.utter_message(attachment=SIZE_CHART)
        return [SlotSet("note", "offered"), FollowupAction("action_count")]


class ActionCount(Action):
    """Counts its runs in ``count``; says what the slot ``note`` was when it ran."""

    def name(self) -> str:
        return "action_count"

    def run(self, dispatcher: CollectingDispatcher, tracker: Tracker,
            domain: dict[str, Any]) -> list[dict[str, Any]]:
        count = int(tracker.get_slot("count") or 0) + 1
        dispatcher.utter_message(text=f"Run {count}, note {tracker.get_slot('note')}.")
        return [SlotSet("count", count)]


class ActionChainForever(Action):
    """Asks for itself again, every time."""

    def name(self) -> str:
        return "action_chain_forever"

    def run(self, dispatcher: CollectingDispatcher, tracker: Tracker,
            domain: dict[str, Any]) -> list[dict[str, Any]]:
        count = int(tracker.get_slot("count") or 0) + 1
        return [SlotSet("count", count), FollowupAction("action_chain_forever")]


class ActionToFlow(Action):
    def name(self) -> str:
        return "action_to_flow"

    def run(self, dispatcher: CollectingDispatcher, tracker: Tracker,
            domain: dict[str, Any]) -> list[dict[str, Any]]:
        dispatcher.utter_message(text="Let me show you our returns.")
        return [SlotSet("note", "from the action"), FollowupAction("returns_info")]


class ActionPause(Action):
    def name(self) -> str:
        return "action_pause"

    def run(self, dispatcher: CollectingDispatcher, tracker: Tracker,
            domain: dict[str, Any]) -> list[dict[str, Any]]:
        dispatcher.utter_message(text="This needs a person.")
        return [SlotSet("note", "paused"), ConversationPaused()]


class ActionRestart(Action):
    def name(self) -> str:
        return "action_restart"

    def run(self, dispatcher: CollectingDispatcher, tracker: Tracker,
            domain: dict[str, Any]) -> list[dict[str, Any]]:
        dispatcher.utter_message(text="Starting afresh.")
        return [SlotSet("colour", "green"), Restarted()]


class ActionResetSlots(Action):
    def name(self) -> str:
        return "action_reset_slots"

    def run(self, dispatcher: CollectingDispatcher, tracker: Tracker,
            domain: dict[str, Any]) -> list[dict[str, Any]]:
        return [SlotSet("note", "lost"), AllSlotsReset(), SlotSet("colour", "after")]


class ActionSetOddSlots(Action):
    """An undeclared slot, then a profile slot."""

    def name(self) -> str:
        return "action_set_odd_slots"

    def run(self, dispatcher: CollectingDispatcher, tracker: Tracker,
            domain: dict[str, Any]) -> list[dict[str, Any]]:
        return [SlotSet("not_declared", "x"), SlotSet("email", "ana@shop.example"),
                SlotSet("note", "set")]


class ActionReturnsNumber(Action):
    """Not a list at all: rasa-sdk cannot read it (the action fails)."""

    def name(self) -> str:
        return "action_returns_number"

    def run(self, dispatcher: CollectingDispatcher, tracker: Tracker,
            domain: dict[str, Any]) -> Any:
        dispatcher.utter_message(text="Said before failing.")
        return 42


class ActionReturnsJunk(Action):
    """A list with things that are not events: rasa-sdk drops them, the rest counts."""

    def name(self) -> str:
        return "action_returns_junk"

    def run(self, dispatcher: CollectingDispatcher, tracker: Tracker,
            domain: dict[str, Any]) -> Any:
        return ["oops", {"name": "note", "value": "no event key"}, 7,
                SlotSet("colour", "kept")]


class ActionOfferByIntent(Action):
    """Buttons as Rasa bots write them: the payload names an intent (and entities)."""

    def name(self) -> str:
        return "action_offer_by_intent"

    def run(self, dispatcher: CollectingDispatcher, tracker: Tracker,
            domain: dict[str, Any]) -> list[dict[str, Any]]:
        dispatcher.utter_message(text="Which size, or shall I get a person?", buttons=[
            {"title": "Small", "payload": '/inform{"size": "small"}'},
            {"title": "Yes, a person", "payload": "/human"}])
        return []
