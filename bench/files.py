"""A 5 MB file through the gateway, against writing it straight to GridFS on the same store.

    python -m bench.files [--mb 5] [--rounds 10]

The gateway runs as a child process on its embedded store (fsync per commit, as by
default), started like bench/webchat.py. A web chat visitor (a real socket for the token
and the item frames) uploads the file ``--rounds`` times (``POST /webchat/upload``: the
multipart body read, the type detected, the bytes kept in GridFS, the message stored, the
ack), one after the other, then downloads it as often by the signed link its item frame
carries (``GET /webchat/files/{id}``). The baseline, in the same run and on the same
embedded store: pymongo's ``AsyncGridFSBucket.upload_from_stream`` and
``open_download_stream().read()`` of the same bytes, from this process. Figures are MB/s
(medians of the rounds) and their ratio to the baseline; every download is compared with
what was sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from gridfs import AsyncGridFSBucket
from pymongo import AsyncMongoClient

from bench.webchat import ROOT, free_port, start, stop, wait_ready


async def through_gateway(url: str, data: bytes, rounds: int) -> tuple[list[float], list[float]]:
    """(upload seconds, download seconds) per round."""
    ups: list[float] = []
    downs: list[float] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(
            url.replace("http", "ws") + "/webchat/ws") as ws:
        await ws.send_json({"type": "hello", "token": None, "watermark": None})
        token = ""
        while True:
            frame = await ws.receive_json()
            if frame["type"] == "welcome":
                token = frame["token"]
            if frame["type"] == "synced":
                break
        links: list[str] = []
        for _ in range(rounds):
            form = aiohttp.FormData()
            form.add_field("client_id", uuid.uuid4().hex[:16])
            form.add_field("file", data, filename="big.bin")
            started = time.perf_counter()
            async with http.post(url + "/webchat/upload", data=form,
                                 headers={"Authorization": f"Bearer {token}"}) as response:
                ack = await response.json()
                assert response.status == 200, ack
            ups.append(time.perf_counter() - started)
            while True:  # the item frame with the file's link
                frame = await asyncio.wait_for(ws.receive_json(), 30)
                if frame.get("id") == ack["id"]:
                    links.append(frame["attachments"][0]["url"])
                    break
        for link in links:
            started = time.perf_counter()
            async with http.get(url + link) as response:
                body = await response.read()
            downs.append(time.perf_counter() - started)
            assert body == data, "the download differs from the upload"
    return ups, downs


async def straight(uri: str, data: bytes, rounds: int) -> tuple[list[float], list[float]]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
    bucket = AsyncGridFSBucket(client["bench_files"], bucket_name="direct")
    ups: list[float] = []
    downs: list[float] = []
    ids = []
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            ids.append(await bucket.upload_from_stream("big.bin", data))
            ups.append(time.perf_counter() - started)
        for file_id in ids:
            started = time.perf_counter()
            stream = await bucket.open_download_stream(file_id)
            body = await stream.read()
            downs.append(time.perf_counter() - started)
            assert body == data
    finally:
        await client.close()
    return ups, downs


def rate(mb: float, seconds: list[float]) -> float:
    return mb / statistics.median(seconds)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    data = os.urandom(int(args.mb * 1024 * 1024))
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIGATE_")}
        env.update(OMNIGATE_PORT=str(port), OMNIGATE_DATA_DIR=str(tmp / "data"),
                   OMNIGATE_LOG_LEVEL="WARNING", OMNIGATE_WEBCHAT_MESSAGES_PER_MINUTE="0")
        process = start([sys.executable, "-m", "gateway", "serve"], env, tmp / "gw.log",
                        cwd=ROOT)
        try:
            url = f"http://127.0.0.1:{port}"
            await wait_ready(url + "/readyz")
            uri = json.loads((tmp / "data" / "store.json").read_text())["uri"]
            direct = await straight(uri, data, args.rounds)
            gateway = await through_gateway(url, data, args.rounds)
        finally:
            stop(process)
    mb = len(data) / (1024 * 1024)
    print(f"{mb:g} MB file, {args.rounds} rounds each, {os.cpu_count()} cores, embedded store "
          "(fsync per commit)\n")
    print("| path | upload MB/s | download MB/s |")
    print("|---|---|---|")
    print(f"| GridFS straight (AsyncGridFSBucket, baseline) | {rate(mb, direct[0]):.1f} "
          f"| {rate(mb, direct[1]):.1f} |")
    print(f"| through the gateway (POST /webchat/upload, GET /webchat/files) "
          f"| {rate(mb, gateway[0]):.1f} | {rate(mb, gateway[1]):.1f} |")
    print(f"\ngateway / straight: upload x{rate(mb, gateway[0]) / rate(mb, direct[0]):.2f}, "
          f"download x{rate(mb, gateway[1]) / rate(mb, direct[1]):.2f}")


if __name__ == "__main__":
    asyncio.run(main())
