"""The two places the connector plugs into slack-bolt: authorization and Socket Mode acks."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.adapter.socket_mode.async_internals import (
    run_async_bolt_app,
    send_async_response,
)
from slack_bolt.authorization import AuthorizeResult
from slack_bolt.authorization.async_authorize import AsyncAuthorize
from slack_bolt.context.async_context import AsyncBoltContext
from slack_sdk.socket_mode.aiohttp import SocketModeClient
from slack_sdk.socket_mode.request import SocketModeRequest
from slack_sdk.socket_mode.response import SocketModeResponse

from connectors.slack.inbound import envelope_problem

log = logging.getLogger(__name__)


class SlackUnavailable(Exception):
    """auth.test failed: we cannot tell our own events apart, so we do not take any."""


class WorkspaceAuthorize(AsyncAuthorize):
    """Single workspace: the bot token's auth.test, cached (and retried until it works).

    Raising (instead of returning None) makes bolt answer 500, so Slack retries the event
    later; bolt's built-in single-team authorization would answer 200 and drop it.
    """

    def __init__(self, identity: Callable[[], Awaitable[AuthorizeResult]]) -> None:
        self._identity = identity

    async def __call__(
        self,
        *,
        context: AsyncBoltContext,
        enterprise_id: str | None,
        team_id: str | None,
        user_id: str | None,
        actor_enterprise_id: str | None = None,
        actor_team_id: str | None = None,
        actor_user_id: str | None = None,
    ) -> AuthorizeResult:
        return await self._identity()


class SocketModeAcker(AsyncSocketModeHandler):
    """Bolt's Socket Mode handler, acknowledging as the HTTP path answers.

    200: acknowledged. 5xx (the store failed): not acknowledged, so Slack delivers the
    envelope again. Anything else (a payload we cannot use): acknowledged and dropped, as
    a redelivery would fail the same way.
    """

    async def handle(self, client: SocketModeClient, req: SocketModeRequest) -> None:  # type: ignore[override]
        started = time.time()
        problem = envelope_problem(req.payload)
        if problem is None:
            response = await run_async_bolt_app(self.app, req)
            if response.status == 200:
                await send_async_response(client, req, response, started)
                return
            if response.status >= 500:
                log.warning("slack: not acknowledging envelope %s (%d); Slack redelivers it",
                            req.envelope_id, response.status)
                return
            problem = f"{response.status} {response.body}"
        log.warning("slack: dropped a Socket Mode %s envelope: %s", req.type, problem)
        await client.send_socket_mode_response(SocketModeResponse(req.envelope_id))
