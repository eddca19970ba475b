"""The menu: its order for one conversation (options this contact chose before first, when
``order_by_history``), its buttons, and the choice counts kept on the contact's profile."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flows.dsl import Menu
from gateway.model import Button

# profile key: flow name -> in how many conversations this contact chose it (counted once
# per conversation, however often it is chosen there: FlowState.chosen)
MENU_COUNTS = "_menu_counts"


def menu_order(menu: Menu | None, profile: Mapping[str, Any]) -> list[str]:
    """The options' flows in the order this conversation shows them (fixed at its start, so
    buttons do not move mid-conversation)."""
    if menu is None:
        return []
    names = [option.flow for option in menu.options]
    if menu.order_by_history:
        counts = profile.get(MENU_COUNTS)
        counts = counts if isinstance(counts, dict) else {}
        chosen = {n: c for n in names if isinstance(c := counts.get(n), int) and c > 0}
        names.sort(key=lambda n: -chosen.get(n, 0))  # stable: the rest keep their order
    return names


def menu_buttons(menu: Menu | None, order: list[str] | None,
                 render: Callable[[str], str]) -> list[Button]:
    """The menu's buttons in the conversation's ``order`` (options added since go last)."""
    if menu is None:
        return []
    options = {option.flow: option for option in menu.options}
    names = [o.flow for o in menu.options]
    if menu.order_by_history and order:
        names = [n for n in order if n in options] + [n for n in names if n not in order]
    return [Button(title=render(options[n].title)[:200] or options[n].title,
                   value=f"flow:{n}") for n in names]


def counted_choice(menu: Menu | None, profile: Mapping[str, Any],
                   flow: str) -> dict[str, Any] | None:
    """The profile's new choice counts once the customer chose ``flow`` (None: not an
    option of the menu, nothing to count)."""
    if menu is None or flow not in {o.flow for o in menu.options}:
        return None
    counts = profile.get(MENU_COUNTS)
    counts = dict(counts) if isinstance(counts, dict) else {}
    previous = counts.get(flow)
    counts[flow] = (previous if isinstance(previous, int) else 0) + 1
    return counts
