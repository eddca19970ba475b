"""``action_create_return``: register a return and confirm it to the customer."""

from __future__ import annotations

import hashlib
from typing import Any

from rasa_sdk import Action, Tracker
from rasa_sdk.events import SlotSet
from rasa_sdk.executor import CollectingDispatcher

from .orders import order_key


def return_id(order: str, reason: str, email: str) -> str:
    """The same return asked twice gets the same id (a real system would store it)."""
    digest = hashlib.sha256(f"{order}|{reason.strip().lower()}|{email.strip().lower()}"
                            .encode()).hexdigest()
    return f"R-{order}-{digest[:4].upper()}"


class ActionCreateReturn(Action):
    """Needs ``order_number``, ``return_reason`` and ``email``; sets ``return_id``."""

    def name(self) -> str:
        return "action_create_return"

    def run(
        self,
        dispatcher: CollectingDispatcher,
        tracker: Tracker,
        domain: dict[str, Any],
    ) -> list[dict[str, Any]]:
        order = order_key(tracker.get_slot("order_number"))
        reason = tracker.get_slot("return_reason")
        email = tracker.get_slot("email")
        if not order or not reason or not email:
            dispatcher.utter_message(
                text="I need the order number, the reason and your email to create a return.")
            return [SlotSet("return_id", None)]
        rid = return_id(order, str(reason), str(email))
        dispatcher.utter_message(
            text=f"Return {rid} is registered for order {order}. "
                 f"The return label is on its way to {email}.")
        return [SlotSet("return_id", rid)]
