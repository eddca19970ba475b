"""The flow engine: runs a flows directory's domain, one customer message at a time.

It implements ``flows.bot.Bot``: the pipeline calls ``respond`` with the conversation's
memory (``FlowState``, in ``bot_state``) and gets replies, the new memory, profile changes,
and maybe a handoff or a resolve. It never touches the store or a channel.

One turn:

1. A button press (``message.value``): ``flow:<name>`` or a flow's ``when.button`` starts
   that flow; a Rasa payload ``/intent`` or ``/intent{"entity": "value"}`` is understood as
   that intent and those entities; any other value answers the pending question. Otherwise
   the text is understood (intent, entities) and entities fill the slots that name them.
2. A global intent (talk to a human, start over, cancel, menu, a flow) works anywhere.
3. Else a pending ``ask`` takes the message as its answer (validated; re-prompted; after
   ``attempts`` wrong answers, ``on_fail``). An answer that is not valid but clearly asks
   for another flow starts that flow.
4. Else a flow whose ``when.intent`` matches starts; else the first message of a
   conversation is greeted (greeting and menu); else it is a miss: ``fallback.say`` with
   the menu, and after ``fallback.max_misses`` misses in a row, ``fallback.handoff``.

Steps run until an ``ask`` waits for the customer, or the flow ends (its last message then
carries the menu's buttons, unless it has buttons of its own), hands off or resolves.

Decisions worth knowing:
* Versions: a flow runs to its end on the flows version it started on (hot reload never
  changes a flow under a customer's feet); each new flow starts on the current version
  (also one a ``goto`` or an action's FollowupAction moves on to).
  After a restart, a version no longer in memory falls back to the current one if the
  conversation's position still exists there, else the flow is dropped.
* A custom action that fails or times out: the customer gets ``ACTION_FAILED_TEXT`` and
  the flow goes on at the next step (the slots the action would have set stay unset, so
  the flow can branch on them, e.g. ``if: order_status == None`` → hand off). Logged.
* What a custom action returns: its responses are said (text, buttons, a custom payload's
  text, image/attachment URLs; a named ``utter_`` response is skipped and logged: flows
  have no named responses). SlotSet sets a slot (an undeclared one is ignored and logged; a
  profile slot goes on the contact); AllSlotsReset forgets the conversation's slots, not
  the contact's profile; Restarted forgets the slots and ends the flow; ConversationPaused
  hands off; FollowupAction runs that action next (at most ``MAX_FOLLOWUPS`` in a row) or
  starts that flow.
* An ``http`` step that fails runs its ``on_error`` steps; without them the customer gets
  ``HTTP_FAILED_TEXT`` and the flow goes on at the next step.
* A turn runs at most ``MAX_STEPS`` steps (a ``goto`` loop hands off instead of hanging)
  and its calls share ``TURN_BUDGET`` seconds, inside the pipeline's own bot timeout.
* The menu's order (``order_by_history``) is fixed at the start of a conversation, from
  the options this contact chose in earlier ones, so buttons do not move mid-conversation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from typing import Any

from flows.actions import ActionEffects, interpret, parse_data, rasa_domain
from flows.bot import BotTurn, HandoffRequest, Reply, TurnContext
from flows.dsl import (
    Action,
    Ask,
    ButtonSpec,
    Domain,
    Flow,
    GlobalIntent,
    Goto,
    Handoff,
    Http,
    If,
    Resolve,
    Say,
    SetSlots,
    Slot,
)
from flows.expr import ExpressionError, evaluate, render
from flows.menu import MENU_COUNTS, counted_choice, menu_buttons, menu_order
from flows.ports import ActionCall, ActionError, ActionRunner, Understanding
from flows.registry import FlowSource, LoadedFlows
from flows.state import (
    EVENT_LOG_CAP,
    FlowState,
    Path,
    advance,
    enter,
    find_step,
    step_at,
    unique_replies,
)
from flows.steps import (
    call_http,
    coerce,
    intent_payload,
    profile_entry,
    read_profile,
    render_json,
    storable,
    typed,
)
from gateway.model import Button, utcnow

log = logging.getLogger(__name__)

MAX_STEPS = 100  # per turn
TURN_BUDGET = 18.0  # seconds for a turn's actions and HTTP calls (the pipeline allows 20)
MAX_FOLLOWUPS = 5

ACTION_FAILED_TEXT = "Sorry, I couldn't complete that just now."
HTTP_FAILED_TEXT = "Sorry, I couldn't look that up just now."
MISS_TEXT = "Sorry, I didn't get that."
CANCELLED_TEXT = "OK, I've stopped that. What else can I do for you?"
ASK_FAILED_TEXT = "Sorry, I still couldn't make sense of that. Let me bring in a human."
LOOP_TEXT = "Sorry, something went wrong on my side. Let me bring in a human."


class FlowEngine:
    """Implements ``flows.bot.Bot`` over a ``FlowSource`` (a registry or static flows)."""

    def __init__(
        self,
        source: FlowSource,
        actions: ActionRunner | None = None,
        *,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self.source = source
        self.actions = actions
        self.now = now
        self._rasa_domains: OrderedDict[str, dict[str, Any]] = OrderedDict()

    async def respond(self, turn: TurnContext) -> BotTurn:
        return await _Turn(self, turn).run()

    def rasa_domain(self, flows: LoadedFlows) -> dict[str, Any]:
        """The domain as custom actions see it (cached per version)."""
        cached = self._rasa_domains.get(flows.version)
        if cached is None:
            cached = self._rasa_domains[flows.version] = rasa_domain(flows.domain)
            while len(self._rasa_domains) > 8:
                self._rasa_domains.popitem(last=False)
        return cached


class _Turn:
    """One customer message: the engine's working memory while it answers."""

    def __init__(self, engine: FlowEngine, turn: TurnContext) -> None:
        self.engine = engine
        self.turn = turn
        self.now = engine.now()
        self.state = FlowState.load(turn.state)
        self.out = BotTurn()
        self.earlier: list[dict[str, Any]] | None = None  # earlier turns' events (on demand)
        contact = turn.contact
        self.profile: dict[str, Any] = dict(contact.profile) if contact is not None else {}
        self.contact_name = contact.name if contact is not None else None
        self.understanding = Understanding(text="", intent=None, confidence=0.0)
        self.deadline = time.monotonic() + TURN_BUDGET
        self.steps_left = MAX_STEPS
        self.latest = engine.source.current()  # one snapshot per turn, even mid-reload
        self.flows = self._flows_for_state()

    @property
    def domain(self) -> Domain:
        return self.flows.domain

    # ------------------------------------------------------------------ versions

    def _flows_for_state(self) -> LoadedFlows:
        source, state = self.engine.source, self.state
        if state.flow is None:
            return self.latest
        if state.version is not None:
            pinned = source.get(state.version)
            if pinned is not None:
                return pinned
        current = self.latest
        flow = current.domain.flows.get(state.flow)
        step = step_at(flow, state.pos) if flow is not None and state.pos else None
        if step is None or (state.ask is not None and not (
                isinstance(step, Ask) and step.ask == state.ask["slot"])):
            log.info("flows: version %s of flow %s is gone; the conversation starts afresh",
                     state.version, state.flow)
            state.end_flow()
        state.version = current.version
        return current

    # ---------------------------------------------------------------------- turn

    async def run(self) -> BotTurn:
        message = self.turn.message
        value = (message.value or "").strip()
        text = (message.text or "").strip()
        if self.state.menu is None:
            self.state.menu = menu_order(self.domain.menu, self.profile)
        if value and await self._on_value(value, text):
            return self._finish()
        self.understanding = intent_payload(value) or self._understand(text or value)
        self._log_user()
        self._fill_from_entities()
        intent = self.understanding.intent
        special = next((g for g in self.domain.globals_ if g.intent == intent), None)
        if special is not None:
            await self._do_global(special)
        elif self.state.ask is not None:
            await self._answer(self._answer_from_text(text or value))
        elif (flow := self._triggered(intent)) is not None:
            await self._start(flow)
        elif not self.state.greeted:
            self._greet()
        else:
            self._miss()
        return self._finish()

    def _understand(self, text: str) -> Understanding:
        if not text:
            return Understanding(text="", intent=None, confidence=0.0)
        return self.flows.understander.parse(text)

    async def _on_value(self, value: str, text: str) -> bool:
        """A button press; False if the value means nothing here (then the text counts)."""
        current = self.latest.domain
        target = value.removeprefix("flow:") if value.startswith("flow:") else None
        if target is None:
            target = next((name for name, flow in current.flows.items()
                           if flow.when is not None and flow.when.button == value), None)
        if target is not None and target in current.flows:
            self.understanding = Understanding(text=text or value, intent=None, confidence=1.0)
            self._log_user()
            await self._start(target)
            return True
        if self.state.ask is not None and intent_payload(value) is None:
            self.understanding = Understanding(text=text or value, intent=None, confidence=1.0)
            self._log_user()
            await self._answer(value)
            return True
        return False

    def _finish(self) -> BotTurn:
        self.state.greeted = True
        self.out.state = self.state.dump()
        self.out.events = self.state.events[-EVENT_LOG_CAP:]
        self.out.intent = self.understanding.intent
        return self.out

    async def _event_log(self) -> list[dict[str, Any]]:
        """The conversation so far as Rasa events: earlier turns' (from the pipeline) and
        this one's, the last EVENT_LOG_CAP of them."""
        if self.earlier is None:  # read once per turn, when the first action runs
            self.earlier = await self.turn.history() if self.turn.history is not None else []
        return [*self.earlier, *self.state.events][-EVENT_LOG_CAP:]

    # -------------------------------------------------------------- what to do

    def _triggered(self, intent: str | None) -> str | None:
        if intent is None:
            return None
        current = self.latest.domain
        return next((name for name, flow in current.flows.items()
                     if flow.when is not None and flow.when.intent == intent), None)

    async def _do_global(self, special: GlobalIntent) -> None:
        self.state.misses = 0
        state = self.state
        if special.do == "handoff":
            self._handoff(special.reason or "customer asked for a human", special.skill,
                          special.priority, special.say, special.team)
        elif special.do == "restart":
            self.state = state.restarted(self._ts())
            if special.say:
                self._say(special.say)
            self._greet()
        elif special.do == "cancel":
            state.end_flow()
            self._reply(Reply(self._render(special.say or CANCELLED_TEXT), self._menu_buttons()))
        elif special.do == "menu":
            state.end_flow()
            if not state.greeted:
                self._greet()
            else:
                if special.say:
                    self._say(special.say)
                self._menu()
        else:
            await self._start(special.do)

    def _greet(self) -> None:
        self.state.misses = 0
        if self.domain.greeting:
            self._say(self.domain.greeting)
        self._menu()

    def _miss(self) -> None:
        self.state.misses += 1
        fallback = self.domain.fallback
        if fallback is not None and self.state.misses >= fallback.max_misses:
            self.state.misses = 0
            spec = fallback.handoff
            self._handoff(spec.reason, spec.skill, spec.priority, spec.say, spec.team)
            return
        text = fallback.say if fallback is not None else MISS_TEXT
        self._reply(Reply(self._render(text), self._menu_buttons()))

    def _handoff(self, reason: str, skill: str | None, priority: str, say: str | None,
                 team: str | None = None) -> None:
        if say:
            self._say(say)
        self.out.handoff = HandoffRequest(self._render(reason) or reason, skill, priority, team,
                                          self.state.flow)
        self.state.end_flow()

    # --------------------------------------------------------------------- menu

    def _menu_buttons(self) -> list[Button]:
        return menu_buttons(self.domain.menu, self.state.menu, self._render)

    def _menu(self) -> None:
        menu = self.domain.menu
        if menu is not None:
            self._reply(Reply(self._render(menu.say), self._menu_buttons()))

    def _count_choice(self, flow: str) -> None:
        """Count a menu option once per conversation (``chosen``): the history says in how
        many conversations the contact chose it, and a turn that picks it again writes
        nothing to the contact."""
        if flow in self.state.chosen:
            return
        counts = counted_choice(self.domain.menu, self.profile, flow)
        if counts is not None:
            self.profile[MENU_COUNTS] = self.out.profile[MENU_COUNTS] = counts
            self.state.chosen.append(flow)

    # -------------------------------------------------------------------- slots

    def _values(self) -> dict[str, Any]:
        """Every slot's value (None when unset): conversation slots and valid profile ones."""
        values: dict[str, Any] = dict.fromkeys(self.domain.slots)
        values.update(self.state.slots)
        for name, slot in self.domain.slots.items():
            if slot.profile:
                found = read_profile(self.profile.get(name), self.now)
                values[name] = found.value if found is not None else None
        return values

    def _template_values(self) -> dict[str, Any]:
        values = self._values()
        for key, entry in self.profile.items():
            if not key.startswith("_"):
                found = read_profile(entry, self.now)
                values[f"profile.{key}"] = found.value if found is not None else None
        values["contact.name"] = self.contact_name
        return values

    def _render(self, text: str) -> str:
        return render(text, self._template_values())

    def _slot(self, name: str) -> Slot:
        return self.domain.slots.get(name) or Slot()

    def _set(self, name: str, value: Any, source: str) -> None:
        slot = self.domain.slots.get(name)
        if slot is None:
            log.warning("flows: %s set the undeclared slot %r; ignored", source, name)
            return
        value = typed(slot, value)  # "42" set into a number slot is 42
        if not storable(value):
            log.warning("flows: %s gave slot %r a value that cannot be stored; ignored",
                        source, name)
            return
        if slot.profile:
            entry = None if value is None else profile_entry(slot, value, self.now)
            self.out.profile[name] = entry
            if entry is None:
                self.profile.pop(name, None)
            else:
                self.profile[name] = entry
        elif value is None:
            self.state.slots.pop(name, None)
        else:
            self.state.slots[name] = value
        self.state.log({"event": "slot", "timestamp": self._ts(), "name": name, "value": value})

    def _has_valid(self, name: str) -> bool:
        value = self._values().get(name)
        return value is not None and coerce(self._slot(name), value)[0]

    def _fill_from_entities(self) -> None:
        for match in self.understanding.entities:
            for name, slot in self.domain.slots.items():
                if slot.entity == match.entity:
                    valid, value = coerce(slot, match.value)
                    if valid:
                        self._set(name, value, f"entity {match.entity}")

    def _answer_from_text(self, text: str) -> Any:
        ask = self.state.ask
        slot = self._slot(ask["slot"]) if ask is not None else Slot()
        for match in self.understanding.entities:
            if slot.entity is not None and match.entity == slot.entity:
                return match.value
        return text

    # ------------------------------------------------------------------- events

    def _ts(self) -> float:
        return self.now.timestamp()

    def _log_user(self) -> None:
        self.state.log({
            "event": "user", "timestamp": self._ts(), "text": self.understanding.text,
            "parse_data": parse_data(self.understanding),
            "input_channel": self.turn.message.channel,
        })

    def _reply(self, reply: Reply) -> None:
        self.out.replies.append(reply)
        self.state.log({
            "event": "bot", "timestamp": self._ts(), "text": reply.text,
            "data": {"buttons": [{"title": b.title, "payload": b.value} for b in reply.buttons]},
        })

    def _say(self, text: str, buttons: list[ButtonSpec] | None = None) -> None:
        rendered = self._render(text).strip()
        shown = [self._button(spec) for spec in buttons or []]
        if rendered or shown:
            self._reply(Reply(rendered or text, shown))

    def _button(self, spec: ButtonSpec) -> Button:
        value = spec.value or (f"flow:{spec.flow}" if spec.flow else spec.title)
        return Button(title=self._render(spec.title)[:200] or spec.title, value=value[:200])

    # -------------------------------------------------------------------- flows

    async def _start(self, name: str) -> None:
        """Start flow ``name`` on the current version (ending any active flow)."""
        if not self._switch(name, self.latest):
            log.error("flows: flow %r does not exist (version %s)", name, self.latest.version)
            self._miss()
            return
        self.state.misses = 0
        self._count_choice(name)
        await self._continue()

    def _switch(self, name: str, *sources: LoadedFlows) -> bool:
        """Go to the start of flow ``name``: a new flow, so on the first of ``sources`` (the
        current version first) that has it. False if none has it."""
        for flows in sources:
            if name in flows.domain.flows:
                self.flows, self.state.version = flows, flows.version
                self.state.flow, self.state.pos, self.state.ask = name, [0], None
                return True
        return False

    def _flow(self) -> Flow | None:
        name = self.state.flow
        return self.domain.flows.get(name) if name is not None else None

    def _next(self, flow: Flow, pos: Path) -> None:
        self.state.pos = advance(flow, pos)

    def _flow_done(self) -> None:
        """The flow ran off its end: its last message offers the menu."""
        self.state.end_flow()
        buttons = self._menu_buttons()
        replies = self.out.replies
        if replies and not replies[-1].buttons:
            replies[-1] = Reply(replies[-1].text, buttons)
        elif not replies:
            self._menu()

    async def _continue(self) -> None:
        """Run steps from the current position until the flow waits or ends."""
        while self.state.flow is not None:
            flow = self._flow()
            pos = self.state.pos
            step = step_at(flow, pos) if flow is not None and pos else None
            if flow is None or pos is None or step is None:
                self._flow_done()
                return
            self.steps_left -= 1
            if self.steps_left < 0:
                log.error("flows: flow %s ran %d steps without waiting for the customer",
                          self.state.flow, MAX_STEPS)
                self.out.replies = unique_replies(self.out.replies)  # not 50 times "..."
                self._handoff(f"the flow {self.state.flow} looped", None, "normal", LOOP_TEXT)
                return
            if isinstance(step, Ask):
                if self._ask(step):
                    return  # waiting for the answer
                self._next(flow, pos)
            elif isinstance(step, Say):
                self._say(step.say, step.buttons)
                self._next(flow, pos)
            elif isinstance(step, SetSlots):
                values = self._template_values()
                for name, raw in step.set.items():
                    self._set(name, render_json(raw, values), f"flow {self.state.flow}")
                self._next(flow, pos)
            elif isinstance(step, If):
                if self._condition(step.if_):
                    self.state.pos = enter(pos, "then")
                elif step.else_:
                    self.state.pos = enter(pos, "else")
                else:
                    self._next(flow, pos)
            elif isinstance(step, Action):
                await self._action(step, flow, pos)
            elif isinstance(step, Http):
                await self._http(step, flow, pos)
            elif isinstance(step, Handoff):
                spec = step.handoff
                self._handoff(spec.reason, spec.skill, spec.priority, spec.say, spec.team)
                return
            elif isinstance(step, Resolve):
                if isinstance(step.resolve, str):
                    self._say(step.resolve)
                self.out.resolve = True
                self.state.end_flow()
                return
            elif isinstance(step, Goto):
                self._goto(step.goto, flow)

    def _goto(self, target: str, flow: Flow) -> None:
        found = find_step(flow, target)
        if found is not None:
            self.state.pos, self.state.ask = found, None
        elif not self._switch(target, self.latest, self.flows):
            log.error("flows: goto %r: no such step or flow in %s", target, self.state.flow)
            self._flow_done()

    def _condition(self, expression: str) -> bool:
        try:
            return evaluate(expression, self._values())
        except ExpressionError as exc:
            log.warning("flows: in flow %s: %s (taken as false)", self.state.flow, exc)
            return False

    # ---------------------------------------------------------------------- ask

    def _ask_buttons(self, step: Ask) -> list[ButtonSpec]:
        if step.buttons:
            return list(step.buttons)
        slot = self._slot(step.ask)
        if slot.type == "choice" and slot.choices and len(slot.choices) <= 10:
            return [ButtonSpec(title=c[:80], value=c) for c in slot.choices]
        return []

    def _ask(self, step: Ask) -> bool:
        """Ask the question (True: now waiting), or skip it (the slot is already valid)."""
        if not step.force and self._has_valid(step.ask):
            self.state.ask = None
            return False
        if self.state.ask is None or self.state.ask.get("slot") != step.ask:
            self.state.ask = {"slot": step.ask, "attempts": 0}
        self._say(step.say, self._ask_buttons(step))
        return True

    async def _answer(self, raw: Any) -> None:
        flow, pos, ask = self._flow(), self.state.pos, self.state.ask
        step = step_at(flow, pos) if flow is not None and pos else None
        if flow is None or pos is None or ask is None or not isinstance(step, Ask):
            self.state.end_flow()
            self._miss()
            return
        valid, value = coerce(self._slot(step.ask), raw)
        if valid:
            self.state.misses = 0
            self._set(step.ask, value, f"the answer to {step.ask}")
            self.state.ask = None
            self._next(flow, pos)
            await self._continue()
            return
        other = self._triggered(self.understanding.intent)
        if other is not None and other != self.state.flow:
            await self._start(other)  # not an answer: the customer wants something else
            return
        attempts = int(ask.get("attempts", 0)) + 1
        if attempts < step.attempts:
            self.state.ask = {"slot": step.ask, "attempts": attempts}
            self._say(step.reprompt or step.say, self._ask_buttons(step))
            return
        self.state.ask = None
        log.info("flows: no valid %s after %d attempts; on_fail %s", step.ask, attempts,
                 step.on_fail)
        if step.on_fail == "handoff":
            self._handoff(f"the customer could not answer the question for {step.ask}",
                          None, "normal", ASK_FAILED_TEXT)
        elif step.on_fail == "cancel":
            self.state.end_flow()
            self._reply(Reply(self._render(CANCELLED_TEXT), self._menu_buttons()))
        else:
            self._goto(step.on_fail, flow)
            await self._continue()

    # ---------------------------------------------------------- actions and http

    def _remaining(self) -> float:
        return max(0.1, self.deadline - time.monotonic())

    async def _action(self, step: Action, flow: Flow, pos: Path) -> None:
        name, followups = step.action, 0
        while True:
            effects = await self._run_action(name, step.timeout)
            if effects is None:
                self._say(ACTION_FAILED_TEXT)
                break
            if effects.reset_slots:  # the conversation's slots (the contact's profile stays)
                self.state.slots.clear()
                self.state.log({"event": "reset_slots", "timestamp": self._ts()})
            for slot, value in effects.slots.items():
                self._set(slot, value, f"action {name}")
            for reply in effects.replies:
                self._reply(reply)
            if effects.restart:
                self.state = self.state.restarted(self._ts())
                self._flow_done()
                return
            if effects.pause:
                self._handoff(f"the custom action {name} handed the conversation to a human",
                              None, "normal", None)
                return
            if not (followup := effects.followup) or followup == "action_listen":
                break
            if self._switch(followup, self.latest, self.flows):
                return
            followups += 1
            if followups > MAX_FOLLOWUPS:
                log.error("flows: action %s: more than %d followups; stopped", name,
                          MAX_FOLLOWUPS)
                break
            name = followup
        if self.state.flow is not None and self.state.pos == pos:
            self._next(flow, pos)

    async def _run_action(self, name: str, seconds: float) -> ActionEffects | None:
        runner = self.engine.actions
        if runner is None:
            log.error("flows: flow %s calls action %s, but no action runner is configured "
                      "(OMNIGATE_ACTIONS_PACKAGE or OMNIGATE_ACTION_SERVER_URL)",
                      self.state.flow, name)
            return None
        limit = min(seconds, self._remaining())
        call = ActionCall(
            action=name,
            sender_id=self.turn.conversation.contact_id,
            slots=self._values(),
            latest_message=parse_data(self.understanding),
            events=await self._event_log(),
            domain=self.engine.rasa_domain(self.flows),
        )
        self.state.log({"event": "action", "timestamp": self._ts(), "name": name})
        try:
            async with asyncio.timeout(limit + 1.0):  # in case the runner overstays
                outcome = await runner.run(call, limit)
        except (ActionError, TimeoutError) as exc:
            log.warning("flows: action %s failed in conversation %s: %s", name,
                        self.turn.conversation.id, exc or "timed out")
            return None
        effects = interpret(outcome)
        if effects.ignored:
            log.info("flows: action %s: not applied: %s", name, "; ".join(effects.ignored))
        return effects

    async def _http(self, step: Http, flow: Flow, pos: Path) -> None:
        result = await call_http(step, self._template_values(), self._remaining())
        if result.ok:
            for slot, value in result.saved.items():
                self._set(slot, value, f"http {step.http}")
            self._next(flow, pos)
            return
        log.warning("flows: http step of flow %s failed: %s", self.state.flow, result.error)
        if step.on_error:
            self.state.pos = enter(pos, "on_error")
        else:
            self._say(HTTP_FAILED_TEXT)
            self._next(flow, pos)
