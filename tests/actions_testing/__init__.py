"""Test-only rasa-sdk actions (tests/test_actions.py), kept out of the shipped examples.

misbehaving.py: an action that raises, one that sleeps (async) and one that blocks (sync)
past any sensible limit, and one that returns something that is not JSON.
probes.py: one that reports the tracker it received, one that returns every event kind
and every kind of response the bridge renders.
effects.py: what the engine must apply (tests/test_engine_effects.py): every response kind,
handoff, followups, restarts, slot resets, undeclared and profile slots, junk returns.
"""
