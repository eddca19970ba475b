"""Example custom actions: plain rasa-sdk actions, exactly as a Rasa project writes them.

Omnigate runs them in-process (``OMNIGATE_ACTIONS_PACKAGE=examples.actions``) or on a
rasa-sdk action server (``python -m rasa_sdk --actions examples.actions``, then
``OMNIGATE_ACTION_SERVER_URL=http://127.0.0.1:5055``). The shipped example flows call:

* ``action_check_order`` (orders.py): sets ``order_status`` and ``order_eta``;
* ``action_create_return`` (returns.py): sets ``return_id`` and confirms the return.

The orders are a small sample data set in orders.py; a real shop would call its API.
"""
