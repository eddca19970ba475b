"""The ``omnigate`` command as a user runs it: real subprocesses, real ports, real data dirs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, need, secantus_executable

SCRIPT = Path(sys.executable).with_name("omnigate")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "gateway"]
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any OMNIGATE_* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIGATE_")}
    env.update(extra)
    return env


def omnigate(
    *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args], env=dict(env or clean_env()), cwd=cwd, capture_output=True,
        text=True, timeout=timeout, check=False,
    )


def get(url: str, headers: Mapping[str, str] | None = None) -> tuple[int, Any, bytes]:
    """(status, headers, body); HTTP errors are answers too. Raises OSError if nobody listens."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with NO_PROXY.open(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def pid_running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.05)


class Serve:
    """``omnigate serve`` in its own process group, killed (with its store) when done."""

    def __init__(self, args: list[str], env: Mapping[str, str], cwd: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = cwd / f"serve-{port}-{time.monotonic_ns()}.log"
        self.store_pids: list[int] = []
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [*COMMAND, "serve", *args], env=dict(env), cwd=cwd, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_http(self, path: str, timeout: float = 60) -> tuple[int, Any, bytes]:
        """The first answer to GET ``path`` once the server listens."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"serve exited early:\n{self.log()}"
            with contextlib.suppress(OSError):
                return get(self.url + path)
            assert time.monotonic() < deadline, f"serve not answering in {timeout} s:\n{self.log()}"
            time.sleep(0.1)

    def terminate(self, timeout: float = 15) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve did not exit within {timeout} s of SIGTERM:\n{self.log()[-3000:]}")

    def kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for pid in self.store_pids:  # the store runs in its own session
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                if b"secantus" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def serving(args: list[str], env: Mapping[str, str], cwd: Path, port: int) -> Iterator[Serve]:
    serve = Serve(args, env, cwd, port)
    try:
        yield serve
    finally:
        serve.kill()


@pytest.fixture
def embedded_store() -> None:
    if secantus_executable() is None:
        need("SecantusDB (secantusd-py)", "pip install --pre 'secantusdb' (or omnigate[test])")


def token_of(output: str) -> str:
    token = output.strip().splitlines()[-1]
    assert token.startswith("og_"), output
    return token


# ---------------------------------------------------------------------------- help


def test_help_and_version(tmp_path: Path) -> None:
    top = omnigate("--help", cwd=tmp_path)
    assert top.returncode == 0, top.stderr
    for word in ("serve", "agents", "openapi", "OMNIGATE_"):
        assert word in top.stdout

    serve = omnigate("serve", "--help", cwd=tmp_path)
    assert serve.returncode == 0, serve.stderr
    for option in ("--host", "--port", "--data-dir", "--mongodb-uri", "OMNIGATE_PORT"):
        assert option in serve.stdout

    add = omnigate("agents", "add", "--help", cwd=tmp_path)
    assert add.returncode == 0 and "--name" in add.stdout and "--data-dir" in add.stdout

    version = omnigate("--version", cwd=tmp_path)
    assert version.returncode == 0
    assert version.stdout.startswith("omnigate ") and version.stdout.split()[1][0].isdigit()


def test_openapi_command_prints_the_spec(tmp_path: Path) -> None:
    result = omnigate("openapi", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    spec = json.loads(result.stdout)
    assert spec["openapi"].startswith("3.") and "/api/v1/me" in spec["paths"]


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path: Path) -> None:
    """``omnigate openapi | head``: the spec is larger than a pipe holds, head closes it."""
    process = subprocess.Popen(
        [*COMMAND, "openapi"], env=clean_env(), cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.read(10).startswith(b"{")
    process.stdout.close()  # what head does after its lines
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141  # as a shell reports a command ended by SIGPIPE
    assert stderr == ""  # no "Broken pipe", no traceback


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OMNIGATE_PORT", "abc"),
        ("OMNIGATE_PORT", "70000"),
        ("OMNIGATE_WEBCHAT_ALLOWED_ORIGINS", "shop.example.com"),
        ("OMNIGATE_MONGODB_URI", "postgres://db.example.com/omnigate"),
        ("OMNIGATE_FLOWS_DIR", "/nonexistent/omnigate-flows"),
        ("OMNIGATE_LOG_LEVEL", "CHATTY"),
    ],
)
def test_bad_setting_is_named_with_exit_code_2(tmp_path: Path, name: str, value: str) -> None:
    env = clean_env(OMNIGATE_PORT=str(free_port()), OMNIGATE_DATA_DIR=str(tmp_path / "data"))
    env[name] = value
    result = omnigate("serve", env=env, cwd=tmp_path, timeout=30)
    assert result.returncode == 2, result.stderr
    assert name in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()  # nothing was started


def test_bad_flag_is_a_usage_error(tmp_path: Path) -> None:
    result = omnigate("serve", "--port", "abc", cwd=tmp_path)
    assert result.returncode == 2 and "--port" in result.stderr


def test_unreachable_store_is_a_clear_error(tmp_path: Path) -> None:
    uri = f"mongodb://127.0.0.1:{free_port()}/?directConnection=true"
    result = omnigate("agents", "list", "--mongodb-uri", uri, cwd=tmp_path)
    assert result.returncode == 1
    assert "omnigate:" in result.stderr and "unreachable" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- serve


@pytest.mark.usefixtures("embedded_store")
def test_serve_agents_stop_and_restart(tmp_path: Path) -> None:
    data, port, env = tmp_path / "data", free_port(), clean_env()
    args = ["--port", str(port), "--data-dir", str(data)]
    with serving(args, env, tmp_path, port) as serve:
        status, _, body = serve.wait_http("/readyz")
        assert (status, json.loads(body)["status"]) == (200, "ok")
        info = json.loads((data / "store.json").read_text())
        store_pid = info["pid"]
        serve.store_pids.append(store_pid)
        assert pid_running(store_pid)

        status, headers, body = get(serve.url + "/")
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert "default-src 'self'" in headers["Content-Security-Policy"]
        assert b"/webchat/widget.js" in body
        status, headers, body = get(serve.url + "/webchat/widget.js")
        assert status == 200 and headers["Content-Type"].startswith("text/javascript")
        assert b"OmnigateWebchat" in body
        status, _, body = get(serve.url + "/api/openapi.json")
        assert status == 200 and "/api/v1/me" in json.loads(body)["paths"]

        # a second command while serve runs: attaches to its store
        added = omnigate("agents", "add", "--name", "Alice", "--data-dir", str(data), env=env)
        assert added.returncode == 0, added.stderr
        assert "Alice" in added.stdout
        token = token_of(added.stdout)
        assert json.loads((data / "store.json").read_text()) == info  # same server
        assert pid_running(store_pid)

        auth = {"Authorization": f"Bearer {token}"}
        status, _, body = get(serve.url + "/api/v1/me", auth)
        assert status == 200 and json.loads(body)["name"] == "Alice"
        assert get(serve.url + "/api/v1/me", {"Authorization": "Bearer og_wrong"})[0] == 401

        listed = omnigate("agents", "list", "--data-dir", str(data), env=env)
        assert listed.returncode == 0 and "Alice" in listed.stdout

        started = time.monotonic()
        assert serve.terminate(15) == 0
        assert time.monotonic() - started < 15
        log = serve.log()
        # the shipped actions named once, in one line (not rasa-sdk's line per action, twice)
        assert log.count("custom actions from examples.actions: action_check_order") == 1
        assert "Registered function" not in log and "gateway.app: custom actions" not in log
        assert "stopping: closing connections" in log
        assert log.rstrip().endswith("Omnigate stopped")  # after the store stopped
        wait_until(lambda: not pid_running(store_pid), 5, "the store process exits")
        assert not (data / "store.json").exists()

    # data survived: the agent and its token are still there
    with serving(args, env, tmp_path, port) as again:
        assert again.wait_http("/readyz")[0] == 200
        again.store_pids.append(json.loads((data / "store.json").read_text())["pid"])
        status, _, body = get(again.url + "/api/v1/me", auth)
        assert status == 200 and json.loads(body)["name"] == "Alice"
        assert again.terminate(15) == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_a_port_in_use_stops_serve_before_anything_starts(tmp_path: Path, workers: int) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = omnigate("serve", "--port", str(port), "--workers", str(workers),
                          "--data-dir", str(tmp_path / "data"), cwd=tmp_path, timeout=30)
    assert result.returncode == 1, result.stderr
    assert (f"omnigate: cannot listen on 127.0.0.1:{port}: address already in use"
            in result.stderr), result.stderr
    assert "--port or OMNIGATE_PORT" in result.stderr
    # nothing announced or started first: no demo URL, no channel, no store
    for promise in ("demo page", "channel webchat: on", "embedded store started", "worker 1"):
        assert promise not in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "data").exists()


@pytest.mark.usefixtures("embedded_store")
def test_agents_add_refuses_a_taken_email_and_warns_of_a_repeated_name(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "data")]

    def add(*args: str, password: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([*COMMAND, "agents", "add", *args, *data], env=clean_env(),
                              cwd=tmp_path, input=password, capture_output=True, text=True,
                              timeout=60, check=False)

    first = add("Alice", "--team", "support")  # README step 2
    assert first.returncode == 0 and "note:" not in first.stderr, first.stderr
    # README's console step, for the same person: allowed (names may repeat, as in Zendesk
    # or Chatwoot, where the email tells people apart), but said
    second = add("alice ", "--email", "alice@example.com", "--password-stdin",
                 password="correct horse battery\n")
    assert second.returncode == 0, second.stderr
    first_id = first.stdout.split("(id ")[1].split(",")[0]
    assert (f"note: another agent is named Alice too (id {first_id}, no email)"
            in second.stderr), second.stderr
    # the email is the sign-in key: never twice, in any case
    third = add("Alicia", "--email", "ALICE@example.com")
    assert third.returncode == 1
    assert "omnigate: another agent already signs in with ALICE@example.com" in third.stderr
    # the password minimum is said at once, before the store starts
    short = add("Bob", "--email", "bob@example.com", "--password-stdin", password="short\n")
    assert short.returncode == 1 and "a password has 10 to 1024 characters" in short.stderr
    assert "embedded store started" not in short.stderr
    listed = omnigate("agents", "list", *data, cwd=tmp_path)
    assert [line.split("  ")[1] for line in listed.stdout.splitlines()] == ["Alice", "alice"]


@pytest.mark.usefixtures("embedded_store")
def test_settings_from_the_environment(tmp_path: Path) -> None:
    data, port = tmp_path / "env-data", free_port()
    env = clean_env(OMNIGATE_HOST="127.0.0.1", OMNIGATE_PORT=str(port),
                    OMNIGATE_DATA_DIR=str(data))
    with serving([], env, tmp_path, port) as serve:
        status, _, body = serve.wait_http("/readyz")
        assert (status, json.loads(body)["status"]) == (200, "ok")
        serve.store_pids.append(json.loads((data / "store.json").read_text())["pid"])
        assert not (tmp_path / ".omnigate").exists()  # the default dir was not used

        added = omnigate("agents", "add", "--name", "Bob", env=env, cwd=tmp_path)
        assert added.returncode == 0, added.stderr
        status, _, body = get(serve.url + "/api/v1/me",
                              {"Authorization": f"Bearer {token_of(added.stdout)}"})
        assert status == 200 and json.loads(body)["name"] == "Bob"
        assert serve.terminate(15) == 0


@pytest.mark.usefixtures("embedded_store")
def test_flags_override_the_environment(tmp_path: Path) -> None:
    data, port = tmp_path / "flag-data", free_port()
    env = clean_env(OMNIGATE_PORT=str(free_port()), OMNIGATE_DATA_DIR=str(tmp_path / "unused"))
    with serving(["--port", str(port), "--data-dir", str(data)], env, tmp_path, port) as serve:
        assert serve.wait_http("/readyz")[0] == 200
        serve.store_pids.append(json.loads((data / "store.json").read_text())["pid"])
        assert not (tmp_path / "unused").exists()
        assert serve.terminate(15) == 0


def test_readyz_is_503_while_the_store_is_unreachable_and_healthz_stays_200(
    tmp_path: Path,
) -> None:
    port, closed = free_port(), free_port()
    env = clean_env(OMNIGATE_MONGODB_URI=f"mongodb://127.0.0.1:{closed}/"
                    "?directConnection=true&serverSelectionTimeoutMS=500")
    with serving(["--port", str(port)], env, tmp_path, port) as serve:
        status, headers, body = serve.wait_http("/readyz", timeout=60)
        assert status == 503 and headers["Content-Type"].startswith("application/json")
        answer = json.loads(body)
        assert answer["status"] == "unavailable"
        assert answer["store"] in ("starting", "unreachable")
        # liveness: the process answers at once, whatever the store does
        status, _, body = get(serve.url + "/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        status, headers, body = get(serve.url + "/")
        assert status == 200 and b"/webchat/widget.js" in body
        assert get(serve.url + "/readyz")[0] == 503  # still down, still serving
        assert serve.process.poll() is None
        assert not (tmp_path / ".omnigate").exists()  # no embedded store with a URI
        assert serve.terminate(15) == 0
