"""Web chat frames for linking an email address by a code (docs/webchat-protocol.md).

``email_link`` mails a one-time code to the address the visitor typed; ``email_verify``
sends the code back; on the right code the address becomes an identity of the visitor's
contact (gateway/identity.py decides everything; this module only speaks frames).
"""

from __future__ import annotations

from typing import Any

from connectors.webchat.frames import EmailLinkRequest, EmailVerify, ErrorCode, error
from connectors.webchat.sockets import CHANNEL, VisitorSocket
from gateway.store import Store

REFUSED = {
    "wrong": ErrorCode.WRONG_CODE,
    "expired": ErrorCode.CODE_EXPIRED,
    "too_many_attempts": ErrorCode.TOO_MANY_ATTEMPTS,
    "no_code": ErrorCode.NO_CODE,
    "already_linked": ErrorCode.ALREADY_LINKED,
}


def requester(socket: VisitorSocket) -> str:
    return f"{CHANNEL}:{socket.visitor_id}"


async def ask_code(socket: VisitorSocket, frame: EmailLinkRequest, store: Store,
                   outbox: Any) -> None:
    # The identity service lives in the core; imported where it is used (as in _link).
    from gateway.identity import (  # noqa: PLC0415
        Identity,
        InvalidAddress,
        LinkUnavailable,
        RateLimited,
    )

    identity = await store.resolve_identity(CHANNEL, socket.visitor_id)
    try:
        address, expires = await Identity(store, outbox).request_email_code(
            requester(socket), identity.contact_id, frame.address,
            await socket.find_conversation())
    except InvalidAddress as exc:
        await socket.send(error(ErrorCode.INVALID_ADDRESS, str(exc)))
    except RateLimited as exc:
        await socket.send(error(ErrorCode.RATE_LIMITED, str(exc)))
    except LinkUnavailable as exc:
        await socket.send(error(ErrorCode.LINK_UNAVAILABLE, str(exc)))
    else:
        await socket.send({"type": "email_code_sent", "address": address,
                           "expires_at": expires.isoformat()})


async def confirm_code(socket: VisitorSocket, frame: EmailVerify, store: Store,
                       outbox: Any) -> None:
    from gateway.identity import EmailLink, Identity  # noqa: PLC0415

    result = await Identity(store, outbox).confirm_email_code(requester(socket), frame.digits)
    if result.state is EmailLink.LINKED:
        await socket.send({"type": "email_linked", "address": result.address,
                           "message": result.message})
        return
    refused = error(REFUSED[result.state.value], result.message)
    refused["attempts_left"] = result.attempts_left
    await socket.send(refused)
