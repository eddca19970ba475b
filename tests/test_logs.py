"""Logs: JSON lines with request and conversation ids, X-Request-ID, the access log, the
log settings. The format and access log are checked on a real ``omnigate serve``."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.logs import (
    REQUEST_ID_HEADER,
    ContextFilter,
    JsonFormatter,
    bind_conversation,
    configure_logging,
)
from gateway.settings import Settings, SettingsError, load_settings
from tests.conftest import Gateway
from tests.processes import ServeProcess

HEX_ID = re.compile(r"[0-9a-f]{32}")


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "nothing was logged"
    parsed = []
    for line in lines:
        record = json.loads(line)  # every line is one JSON object
        assert isinstance(record, dict)
        assert {"time", "level", "logger", "message"} <= set(record), record
        parsed.append(record)
    return parsed


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, put back as it was (configure_logging replaces its handlers)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


def capture(logger: logging.Logger) -> io.StringIO:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return out


async def test_json_logs_and_the_access_log_of_a_real_gateway(
    settings: Settings, tmp_path: Path
) -> None:
    serve = ServeProcess(settings, tmp_path, "json", {
        "OMNIGATE_LOG_FORMAT": "json", "OMNIGATE_ACCESS_LOG": "true",
        "OMNIGATE_LOG_LEVEL": "debug"})
    try:
        async with aiohttp.ClientSession() as http:
            await serve.ready(http)
            async with http.get(serve.url + "/readyz",
                                headers={REQUEST_ID_HEADER: "req-42.abc:1"}) as response:
                assert response.status == 200
                assert response.headers[REQUEST_ID_HEADER] == "req-42.abc:1"
            for bad in ("has spaces", "x" * 129, "semi;colon", "ünï"):
                async with http.get(serve.url + "/healthz",
                                    headers={REQUEST_ID_HEADER: bad}) as response:
                    assert HEX_ID.fullmatch(response.headers[REQUEST_ID_HEADER]), bad
            async with http.get(serve.url + "/no/such/page") as response:
                assert response.status == 404
                missing_id = response.headers[REQUEST_ID_HEADER]
                assert HEX_ID.fullmatch(missing_id)
    finally:
        assert serve.stop() == 0
    records = json_lines(serve.log_path.read_text())
    assert {"DEBUG", "INFO"} <= {r["level"] for r in records}  # "debug" was accepted
    access = [r for r in records if r["logger"] == "omnigate.access"]
    [health] = [r for r in access if r.get("request_id") == "req-42.abc:1"]
    assert health["method"] == "GET" and health["path"] == "/readyz"
    assert health["status"] == 200 and health["remote"] == "127.0.0.1"
    assert isinstance(health["duration_ms"], float) and health["duration_ms"] >= 0
    [missing] = [r for r in access if r["path"] == "/no/such/page"]
    assert missing["status"] == 404 and missing["request_id"] == missing_id
    # what the gateway logged while answering carries the request's id: the store
    # client's own debug line for the /readyz ping
    during = [r for r in records if r.get("request_id") == "req-42.abc:1"
              and r["logger"] != "omnigate.access"]
    assert any(r["logger"].startswith("pymongo") for r in during), during


async def test_log_lines_inside_a_request_carry_its_id_and_the_bound_conversation(
    settings: Settings
) -> None:
    probe = logging.getLogger("tests.probe")
    out = capture(probe)

    async def handler(request: web.Request) -> web.Response:
        probe.info("in the request")
        with bind_conversation("conv-1"):
            probe.warning("in the turn")
        return web.Response(text="ok")

    app = create_app(settings)
    app.router.add_get("/probe", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(server.make_url("/probe"),
                                headers={REQUEST_ID_HEADER: "abc-1"}) as response:
                assert response.headers[REQUEST_ID_HEADER] == "abc-1"
            async with http.get(server.make_url("/probe")) as response:
                generated = response.headers[REQUEST_ID_HEADER]
    finally:
        await server.close()
        probe.handlers.clear()
    probe.info("after")
    first, turn, second, turn_again = json_lines(out.getvalue())
    assert first["request_id"] == "abc-1" and "conversation_id" not in first
    assert turn["request_id"] == "abc-1" and turn["conversation_id"] == "conv-1"
    assert second["request_id"] == generated != "abc-1"
    assert turn_again["conversation_id"] == "conv-1"


async def test_request_id_on_every_kind_of_response(gateway: Gateway) -> None:
    async with gateway.http.get(gateway.url + "/api/v1/conversations") as response:
        assert response.status == 401  # an error page from the agent API's sub-app
        assert HEX_ID.fullmatch(response.headers[REQUEST_ID_HEADER])
    async with gateway.http.post(gateway.url + "/webhooks/telegram",
                                 headers={REQUEST_ID_HEADER: "t-1"}) as response:
        assert response.status == 404  # telegram is off here
        assert response.headers[REQUEST_ID_HEADER] == "t-1"
    ws = await gateway.socket(headers={REQUEST_ID_HEADER: "ws-1"})
    try:
        await ws.send_json({"type": "hello", "token": None, "watermark": None})
        assert (await ws.receive_json(timeout=10))["type"] == "welcome"
    finally:
        await ws.close()


def test_json_formatter_fields_and_exceptions() -> None:
    logger = logging.getLogger("tests.formatter")
    out = capture(logger)
    try:
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            logger.exception("it broke: %s", "badly", extra={"attempt": 3})
        with bind_conversation("c-9"):
            logger.error("bound", extra={"conversation_id": "c-explicit"})
    finally:
        logger.handlers.clear()
    broke, bound = json_lines(out.getvalue())
    assert broke["message"] == "it broke: badly" and broke["level"] == "ERROR"
    assert broke["logger"] == "tests.formatter" and broke["attempt"] == 3
    assert broke["exc_info"].startswith("Traceback") and "ZeroDivisionError" in broke["exc_info"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", broke["time"])
    assert "request_id" not in broke and "conversation_id" not in broke
    assert bound["conversation_id"] == "c-explicit"  # extra= wins over the bound one


def test_text_format_is_the_classic_line(settings: Settings, root_logger: logging.Logger,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(settings.model_copy(update={"log_level": "INFO", "log_format": "text"}))
    logging.getLogger("tests.text").info("hello %s", "there")
    logging.getLogger("tests.text").debug("not shown")
    err = capsys.readouterr().err.splitlines()
    assert any(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO tests.text: hello there",
                            line) for line in err), err
    assert not any("not shown" in line for line in err)


def test_log_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OMNIGATE_LOG_LEVEL", "debug")
    monkeypatch.setenv("OMNIGATE_LOG_FORMAT", "JSON")
    monkeypatch.setenv("OMNIGATE_ACCESS_LOG", "true")
    given = load_settings(data_dir=tmp_path)
    assert (given.log_level, given.log_format, given.access_log) == ("DEBUG", "json", True)
    assert given.metrics is True and given.metrics_token is None
    monkeypatch.setenv("OMNIGATE_LOG_LEVEL", "loud")
    monkeypatch.setenv("OMNIGATE_LOG_FORMAT", "xml")
    monkeypatch.setenv("OMNIGATE_METRICS_TOKEN", "short-secret")
    with pytest.raises(SettingsError) as failed:
        load_settings(data_dir=tmp_path)
    text = str(failed.value)
    assert "OMNIGATE_LOG_LEVEL" in text and "OMNIGATE_LOG_FORMAT" in text
    assert "OMNIGATE_METRICS_TOKEN" in text and "short-secret" not in text
