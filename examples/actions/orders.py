"""``action_check_order``: look an order up and tell the flow where it is."""

from __future__ import annotations

from typing import Any

from rasa_sdk import Action, Tracker
from rasa_sdk.events import SlotSet
from rasa_sdk.executor import CollectingDispatcher

# A stand-in for the shop's order system.
ORDERS: dict[str, dict[str, str]] = {
    "10045": {"status": "shipped", "eta": "Thursday, 3 December"},
    "10046": {"status": "processing", "eta": "within 5 working days"},
}


def order_key(value: Any) -> str | None:
    """An order number as the customer may give it (``#10045``, ``10045``, 10045.0)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip().lstrip("#").strip()
    return text or None


class ActionCheckOrder(Action):
    """Sets ``order_status`` (shipped, processing or not_found) and ``order_eta``."""

    def name(self) -> str:
        return "action_check_order"

    def run(
        self,
        dispatcher: CollectingDispatcher,
        tracker: Tracker,
        domain: dict[str, Any],
    ) -> list[dict[str, Any]]:
        key = order_key(tracker.get_slot("order_number"))
        order = ORDERS.get(key) if key else None
        if order is None:
            return [SlotSet("order_status", "not_found"), SlotSet("order_eta", None)]
        return [SlotSet("order_status", order["status"]), SlotSet("order_eta", order["eta"])]
