"""Custom actions are plain rasa-sdk actions: the bridge that runs them, two ways.

* :class:`InProcessActions` loads a package of ``rasa_sdk.Action`` classes with rasa-sdk's
  own ``ActionExecutor`` (``register_package``) and runs them in the gateway's process.
* :class:`RemoteActions` calls a rasa-sdk action server (``python -m rasa_sdk --actions
  my_actions``) over its standard ``POST /webhook`` protocol.

Both send the same request (:func:`build_payload`: ``next_action, sender_id, tracker,
domain, version``, the tracker as Rasa dumps it) and give the same
:class:`~flows.ports.ActionOutcome` (``events``, ``responses``) for the same call: existing
Rasa action code runs unchanged. Every failure (the action raised, took longer than the
limit, is not registered, the server is unreachable or answered an error) is an
:class:`~flows.ports.ActionError` whose message names the action and the reason.
:func:`interpret` turns an outcome into what the engine applies (:class:`ActionEffects`).

rasa-sdk (and Sanic, which it imports) is loaded only when an in-process runner is built.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from pydantic import ValidationError

from flows.bot import Reply
from flows.ports import ActionCall, ActionError, ActionOutcome, Understanding
from gateway.model import Button

if TYPE_CHECKING:
    from flows.dsl import Domain, Slot, Step

log = logging.getLogger(__name__)

ACTION_LISTEN = "action_listen"
# What rasa-sdk's DomainDict requires; a call's own domain keys win.
EMPTY_DOMAIN: dict[str, Any] = {
    "intents": [], "entities": [], "slots": {}, "responses": {}, "actions": [], "forms": {},
}
# A response with buttons but no text still needs something to show above them.
BUTTONS_ONLY_TEXT = "Please choose:"


def rasa_version() -> str:
    """The version sent in every request: the installed rasa-sdk's, so its check passes."""
    try:
        return importlib.metadata.version("rasa-sdk")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a dependency
        return "3.0.0"


# ---------------------------------------------------------------------- the request


def parse_data(understanding: Understanding) -> dict[str, Any]:
    """A message as Rasa's ``parse_data`` (the tracker's ``latest_message``)."""
    intent: dict[str, Any] = {"name": understanding.intent,
                              "confidence": understanding.confidence}
    ranking: list[dict[str, Any]] = [{"name": name, "confidence": score}
                                     for name, score in understanding.ranking]
    if not ranking and understanding.intent is not None:
        ranking = [intent]
    return {
        "text": understanding.text,
        "intent": intent,
        "intent_ranking": ranking,
        "entities": [
            {"entity": e.entity, "value": e.value, "start": e.start, "end": e.end,
             "text": e.text, "extractor": "omnigate"}
            for e in understanding.entities
        ],
    }


def _rasa_slot(slot: Slot) -> dict[str, Any]:
    kind = {"text": "text", "email": "text", "number": "float", "bool": "bool",
            "choice": "categorical"}[slot.type]
    rasa: dict[str, Any] = {"type": kind, "influence_conversation": False,
                            "mappings": [{"type": "custom"}]}
    if kind == "categorical":
        rasa["values"] = list(slot.choices or [])
    return rasa


def _step_actions(steps: list[Step]) -> list[str]:
    found: list[str] = []
    for step in steps:
        name = getattr(step, "action", None)
        if isinstance(name, str):
            found.append(name)
        for nested in ("then", "else_", "on_error"):
            found.extend(_step_actions(getattr(step, nested, None) or []))
    return found


def rasa_domain(domain: Domain) -> dict[str, Any]:
    """An Omnigate domain in the shape of Rasa's domain dump (what actions receive)."""
    actions: list[str] = []
    for flow in domain.flows.values():
        actions.extend(a for a in _step_actions(list(flow.steps)) if a not in actions)
    return {
        "intents": [{name: {"use_entities": True}} for name in domain.intents],
        "entities": list(domain.entities),
        "slots": {name: _rasa_slot(slot) for name, slot in domain.slots.items()},
        "responses": {},
        "actions": actions,
        "forms": {},
    }


def _latest_message(message: Mapping[str, Any]) -> dict[str, Any]:
    latest = dict(message)
    latest.setdefault("text", None)
    latest.setdefault("entities", [])
    intent = latest.get("intent")
    if not isinstance(intent, dict):
        intent = {"name": intent, "confidence": 1.0} if isinstance(intent, str) else {}
        latest["intent"] = intent
    if "intent_ranking" not in latest:
        latest["intent_ranking"] = [intent] if intent.get("name") else []
    return latest


def build_payload(call: ActionCall) -> dict[str, Any]:
    """The rasa-sdk ``/webhook`` request for ``call`` (a deep, JSON-clean copy)."""
    events = list(call.events)
    latest_action = next((e.get("name") for e in reversed(events)
                          if isinstance(e, dict) and e.get("event") == "action"), None)
    channel = next((e.get("input_channel") for e in reversed(events)
                    if isinstance(e, dict) and e.get("event") == "user"), None)
    tracker: dict[str, Any] = {
        "sender_id": call.sender_id,
        "slots": dict(call.slots),
        "latest_message": _latest_message(call.latest_message),
        "latest_event_time": events[-1].get("timestamp") if events else None,
        "followup_action": None,
        "paused": False,  # actions run only while the bot owns the conversation
        "events": events,
        "latest_input_channel": channel,
        "active_loop": {},
        "active_form": {},  # deprecated twin of active_loop, still in rasa-sdk's TrackerState
        "latest_action": {"action_name": latest_action} if latest_action else {},
        "latest_action_name": latest_action,
        "stack": [],
        "user_id": None,
    }
    payload = {
        "next_action": call.action,
        "sender_id": call.sender_id,
        "tracker": tracker,
        "domain": {**EMPTY_DOMAIN, **call.domain},
        "version": rasa_version(),
    }
    try:  # both modes see exactly what travels over HTTP, and the engine's data stays its own
        copied: dict[str, Any] = json.loads(json.dumps(payload))
    except (TypeError, ValueError) as exc:
        raise ActionError(f"action {call.action!r}: the tracker is not JSON: {exc}") from exc
    return copied


def _outcome(action: str, body: Any) -> ActionOutcome:
    """Check an answer's shape (``{"events": [...], "responses": [...]}``)."""
    if not isinstance(body, dict):
        raise ActionError(f"action {action!r} answered {type(body).__name__}, not an object")
    events, responses = body.get("events") or [], body.get("responses") or []
    if not (isinstance(events, list) and all(isinstance(e, dict) for e in events)):
        raise ActionError(f"action {action!r} answered malformed events: {events!r:.200}")
    if not (isinstance(responses, list) and all(isinstance(r, dict) for r in responses)):
        raise ActionError(f"action {action!r} answered malformed responses: {responses!r:.200}")
    return ActionOutcome(events=events, responses=responses)


# ------------------------------------------------------------------- in-process


def _importable(package: str) -> None:
    """Import ``package`` as ``python -m rasa_sdk`` would: the working directory counts."""
    def load() -> None:
        importlib.import_module(package)

    try:
        try:
            load()
        except ModuleNotFoundError as exc:
            cwd = os.getcwd()
            missing = exc.name or ""
            if cwd in sys.path or not (package == missing or package.startswith(missing + ".")):
                raise
            sys.path.append(cwd)  # after everything installed: never shadows a real package
            importlib.invalidate_caches()
            load()
    except Exception as exc:
        raise ActionError(
            f"cannot import the custom actions package {package!r}: "
            f"{type(exc).__name__}: {exc} (it must be importable from the working directory "
            "or PYTHONPATH)") from exc


def _belongs(cls: type, package: str) -> bool:
    """Whether an Action class is part of ``package``: defined in it, or imported into it."""
    def inside(name: str) -> bool:
        return name == package or name.startswith(package + ".")

    if inside(cls.__module__):
        return True
    return any(inside(name) and any(value is cls for value in vars(module).values())
               for name, module in list(sys.modules.items()) if module is not None)


class InProcessActions:
    """Run the actions of a Python package in this process, with rasa-sdk's executor.

    ``register_package`` registers every ``Action`` subclass imported in the process; this
    runner keeps those of ``package`` (defined in it or imported into it), as an action
    server started with ``--actions package`` would. Async actions run in this event loop
    under ``asyncio.timeout``; plain (sync) ``run`` methods, often doing blocking I/O, run in
    a small thread pool so they cannot freeze the gateway, and the limit still applies.
    """

    def __init__(self, package: str, *, threads: int = 8) -> None:
        _importable(package)
        # rasa-sdk imports Sanic (~0.4 s): only a deployment with in-process actions pays.
        from rasa_sdk import utils as rasa_utils  # noqa: PLC0415
        from rasa_sdk.executor import ActionExecutor  # noqa: PLC0415
        from rasa_sdk.interfaces import Action, ActionExecutionRejection  # noqa: PLC0415

        self.package = package
        self._rejection: type[Exception] = ActionExecutionRejection
        self._executor = ActionExecutor()
        # rasa-sdk logs "Registered function for ..." per action, and every action is
        # registered twice here: the one line below names them instead.
        rasa_log = logging.getLogger("rasa_sdk.executor")
        level = rasa_log.level
        rasa_log.setLevel(max(rasa_log.getEffectiveLevel(), logging.WARNING))
        try:
            self._executor.register_package(package)
        except (SystemExit, Exception) as exc:  # rasa-sdk exits on an ImportError
            cause = exc.__context__ if isinstance(exc, SystemExit) and exc.__context__ else exc
            raise ActionError(f"cannot load the custom actions of {package!r}: "
                              f"{type(cause).__name__}: {cause}") from exc
        else:
            self._executor.actions.clear()
            for cls in rasa_utils.all_subclasses(Action):
                if (not cls.__module__.startswith(("rasa.", "rasa_core.", "rasa_sdk."))
                        and not inspect.isabstract(cls) and _belongs(cls, package)):
                    self._executor.register_action(cls)
        finally:
            rasa_log.setLevel(level)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="omnigate-action")
        for name, function in list(self._executor.actions.items()):
            if not inspect.iscoroutinefunction(function):
                self._executor.actions[name] = self._threaded(function)
        log.info("custom actions from %s: %s", package,
                 ", ".join(sorted(self.registered())) or "none registered")

    def _threaded(self, function: Callable[..., Any]) -> Callable[..., Any]:
        async def run(dispatcher: Any, tracker: Any, domain: Any) -> Any:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._pool, functools.partial(function, dispatcher, tracker, domain))

        return run

    def registered(self) -> set[str]:
        return set(self._executor.actions)

    async def run(self, call: ActionCall, limit: float) -> ActionOutcome:
        name = call.action
        if name not in self._executor.actions:
            raise ActionError(
                f"action {name!r} is not registered in {self.package!r} "
                f"(registered: {', '.join(sorted(self.registered())) or 'none'})")
        payload = build_payload(call)
        try:
            async with asyncio.timeout(limit):
                result = await self._executor.run(payload)
        except TimeoutError:
            log.warning("custom action %s timed out after %g s", name, limit)
            raise ActionError(f"action {name!r} timed out after {limit:g} s") from None
        except self._rejection as exc:
            raise ActionError(f"action {name!r} rejected the call: {exc}") from exc
        except (SystemExit, Exception) as exc:
            log.warning("custom action %s raised", name, exc_info=True)
            raise ActionError(f"action {name!r} raised {type(exc).__name__}: {exc}") from exc
        dumped = result.model_dump() if hasattr(result, "model_dump") else result
        try:  # what a server would send: JSON, or a 500
            body = json.loads(json.dumps(dumped))
        except (TypeError, ValueError) as exc:
            raise ActionError(f"action {name!r} returned something that is not JSON: {exc}"
                              ) from exc
        return _outcome(name, body)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------ remote


class RemoteActions:
    """Call a rasa-sdk action server: ``POST <url>/webhook`` with the same payload."""

    def __init__(self, url: str, *, session: aiohttp.ClientSession | None = None) -> None:
        base = url.rstrip("/")
        base = base.removesuffix("/webhook")
        self.url = base
        self.webhook_url = base + "/webhook"
        self._session = session
        self._owns_session = session is None
        self._known: set[str] | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
            self._owns_session = True
        return self._session

    def registered(self) -> set[str] | None:
        """The names the server listed at the last :meth:`fetch_registered`, else None."""
        return None if self._known is None else set(self._known)

    async def fetch_registered(self, limit: float = 5.0) -> set[str] | None:
        """Ask the server (``GET /actions``); None if it cannot tell."""
        try:
            async with asyncio.timeout(limit), self._http().get(self.url + "/actions") as resp:
                body = await resp.json(content_type=None) if resp.status == 200 else None
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            log.warning("action server %s: cannot list its actions: %s", self.url, exc)
            return None
        if not isinstance(body, list):
            return None
        self._known = {item["name"] for item in body
                       if isinstance(item, dict) and isinstance(item.get("name"), str)}
        return set(self._known)

    async def run(self, call: ActionCall, limit: float) -> ActionOutcome:
        name = call.action
        payload = build_payload(call)
        where = f"action server {self.url}"
        try:
            async with asyncio.timeout(limit), self._http().post(
                    self.webhook_url, json=payload) as resp:
                status, raw = resp.status, await resp.read()
        except TimeoutError:
            log.warning("custom action %s timed out after %g s (%s)", name, limit, where)
            raise ActionError(f"action {name!r} timed out after {limit:g} s ({where})") from None
        except aiohttp.ClientConnectionError as exc:
            log.warning("custom action %s: %s unreachable: %s", name, where, exc)
            raise ActionError(f"action {name!r}: {where} is unreachable: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise ActionError(f"action {name!r}: {where} failed: {exc}") from exc
        try:
            body: Any = json.loads(raw) if raw else None
        except (ValueError, RecursionError):
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        error = error or raw[:200].decode("utf-8", "replace")
        if status == 200:
            if body is None:
                raise ActionError(f"action {name!r}: {where} answered no JSON: {error!r}")
            if self._known is not None:
                self._known.add(name)
            return _outcome(name, body)
        log.warning("custom action %s: %s answered %s: %s", name, where, status, error)
        if status == 404:
            if self._known is not None:
                self._known.discard(name)
            raise ActionError(f"action {name!r} is not registered on the {where}")
        if status == 449:
            raise ActionError(f"action {name!r}: the {where} wants the domain: {error}")
        if status == 400:
            raise ActionError(f"action {name!r} rejected the call ({where}): {error}")
        if status == 500:
            raise ActionError(f"action {name!r} failed on the {where}: {error}")
        raise ActionError(f"action {name!r}: the {where} answered HTTP {status}: {error}")

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None


def make_runner(package: str | None, server_url: str | None, *,
                session: aiohttp.ClientSession | None = None,
                ) -> InProcessActions | RemoteActions | None:
    """The runner a deployment configured (``OMNIGATE_ACTIONS_PACKAGE`` or
    ``OMNIGATE_ACTION_SERVER_URL``), or None when it uses no custom actions."""
    if package and server_url:
        raise ValueError("set OMNIGATE_ACTIONS_PACKAGE (in-process) or "
                         "OMNIGATE_ACTION_SERVER_URL (remote action server), not both")
    if package:
        return InProcessActions(package)
    if server_url:
        return RemoteActions(server_url, session=session)
    return None


# ------------------------------------------------------------------ the effects


@dataclass(slots=True)
class ActionEffects:
    """What an action's outcome asks the engine to do.

    Apply in this order: if ``reset_slots``, forget every slot; then set ``slots`` (a None
    value unsets); say ``replies``; then ``restart`` / ``pause`` (hand off) / ``followup``.
    """

    slots: dict[str, Any] = field(default_factory=dict)  # SlotSet, in order (last wins)
    reset_slots: bool = False  # AllSlotsReset; slots set after it are in ``slots``
    followup: str | None = None  # FollowupAction: the action (or flow) to run next
    pause: bool = False  # ConversationPaused: the engine hands off to a human
    restart: bool = False  # Restarted: forget the conversation's state
    replies: list[Reply] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # for the log: what was not applied


def _button(raw: Any) -> Button | None:
    if not isinstance(raw, dict):
        return None
    title = str(raw.get("title") or "").strip()
    value = str(raw.get("payload") or raw.get("value") or title).strip()
    try:
        return Button(title=title[:200], value=value[:200])
    except ValidationError:
        return None


def _reply(text: str | None, buttons: Any) -> Reply | None:
    parsed = [b for b in map(_button, buttons if isinstance(buttons, list) else []) if b]
    text = text.strip() if isinstance(text, str) else ""
    if not text and not parsed:
        return None
    return Reply(text=text or BUTTONS_ONLY_TEXT, buttons=parsed)


def _render(response: Mapping[str, Any], templates: Mapping[str, Any],
            effects: ActionEffects) -> None:
    """One dispatcher message as replies, falling back to text as Rasa's channels do."""
    before = len(effects.replies), len(effects.ignored)
    add = effects.replies.append
    name = response.get("response") or response.get("template")
    if isinstance(name, str) and name:
        variants = templates.get(name)
        variant = variants[0] if isinstance(variants, list) and variants else None
        if isinstance(variant, dict) and (reply := _reply(variant.get("text"),
                                                          variant.get("buttons"))):
            add(reply)
        else:
            effects.ignored.append(f"response {name!r}: not in the domain's responses")
    if reply := _reply(response.get("text"), response.get("buttons")):
        add(reply)
    custom = response.get("custom") or response.get("json_message")
    if isinstance(custom, dict) and custom:
        text = next((custom[k] for k in ("text", "message", "title")
                     if isinstance(custom.get(k), str)), None)
        buttons = custom.get("buttons") or custom.get("quick_replies")
        if reply := _reply(text, buttons):
            add(reply)
        else:
            effects.ignored.append(f"custom payload without text: {sorted(custom)}")
    for element in response.get("elements") or []:
        if isinstance(element, dict):
            line = " : ".join(str(element[k]) for k in ("title", "subtitle") if element.get(k))
            if reply := _reply(line, element.get("buttons")):
                add(reply)
    for key, label in (("image", "Image"), ("attachment", "Attachment")):
        if isinstance(response.get(key), str) and response[key]:
            add(Reply(text=f"{label}: {response[key]}"))
    if (len(effects.replies), len(effects.ignored)) == before:
        effects.ignored.append(f"response with nothing to show: {sorted(response)}")


def interpret(outcome: ActionOutcome, *,
              responses: Mapping[str, Any] | None = None) -> ActionEffects:
    """The effects of an outcome. ``responses``: the domain's named responses (Rasa's
    ``utter_*``), used when an action dispatches one by name."""
    effects = ActionEffects()
    for event in outcome.events:
        kind = event.get("event")
        if kind == "slot" and isinstance(event.get("name"), str):
            effects.slots[event["name"]] = event.get("value")
        elif kind == "reset_slots":
            effects.reset_slots = True
            effects.slots.clear()
        elif kind == "followup" and isinstance(event.get("name"), str):
            effects.followup = event["name"]
        elif kind == "pause":
            effects.pause = True
        elif kind == "resume":
            effects.pause = False
        elif kind == "restart":
            effects.restart = True
        else:
            effects.ignored.append(f"event {kind!r}")
    for response in outcome.responses:
        _render(response, responses or {}, effects)
    return effects
