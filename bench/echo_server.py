"""Baseline: a bare aiohttp WebSocket server that answers every frame at once.

It speaks just enough of the web chat protocol (hello → welcome + synced, message →
ack + a reply) that the same load generator drives it and the gateway, so the ratio
between the two is the cost of everything Omnigate adds: store, bot, outbox.
"""

from __future__ import annotations

import json
import sys

from aiohttp import WSMsgType, web


async def socket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    seq = 0
    async for msg in ws:
        if msg.type is not WSMsgType.TEXT:
            continue
        frame = json.loads(msg.data)
        if frame["type"] == "hello":
            await ws.send_json({"type": "welcome", "token": "t", "visitor_id": "v"})
            await ws.send_json({"type": "synced", "watermark": 0})
        elif frame["type"] == "message":
            seq += 1
            await ws.send_json({"type": "ack", "client_id": frame["client_id"], "seq": seq})
            seq += 1
            await ws.send_json({"type": "message", "seq": seq, "role": "bot",
                                "text": "echo: " + frame["text"]})
    return ws


def main() -> None:
    app = web.Application()
    app.router.add_get("/webchat/ws", socket)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
