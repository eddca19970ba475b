"""The web chat widget in headless Chromium, against a real gateway.

pytest-playwright's fixtures are synchronous, so the gateway runs on its own event loop in
a background thread. Playwright's sync API marks its loop as running in the main thread
while it is alive; so that the async tests that run after this module still can start
their loops, Playwright lives for this module only (the fixtures below replace
pytest-playwright's session-scoped ones) and is stopped when the module ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from playwright.sync_api import (
    Browser,
    BrowserType,
    ConsoleMessage,
    Page,
    Playwright,
    expect,
    sync_playwright,
)
from playwright.sync_api import Error as PlaywrightError

from gateway.app import create_app
from gateway.keys import AGENTS
from gateway.settings import Settings
from gateway.store import Store
from tests.conftest import need

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
WAIT = 15_000  # ms, for every expectation on the page
T = TypeVar("T")
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))

MSG = '[data-og="msg"]'
BUTTON = '[data-og="button"]'
MENU = ["Opening hours", "Shipping costs", "Returns", "Order status", "Start a return",
        "Talk to a human"]


# ------------------------------------------------------------------ browser fixtures


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    if not Path(CHROMIUM).exists():
        need("Chromium", "apt-get install -y chromium")
    return {
        **browser_type_launch_args,
        "executable_path": CHROMIUM,
        "args": ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"],
    }


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="module")
def browser_type(playwright: Playwright) -> BrowserType:
    return playwright.chromium


@pytest.fixture(scope="module")
def browser_context_args() -> dict[str, Any]:
    return {}


@pytest.fixture(scope="module")
def launch_browser(
    browser_type_launch_args: dict[str, Any], browser_type: BrowserType
) -> Callable[..., Browser]:
    def launch(**kwargs: Any) -> Browser:
        return browser_type.launch(**{**browser_type_launch_args, **kwargs})

    return launch


@pytest.fixture(scope="module")
def browser(launch_browser: Callable[..., Browser]) -> Iterator[Browser]:
    browser = launch_browser()
    yield browser
    browser.close()


# ------------------------------------------------------------------ the gateway


class ThreadedGateway:
    """The whole gateway app on 127.0.0.1, served by an event loop in its own thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="gateway-loop", daemon=True)
        self.app: web.Application | None = None
        self.runner: web.AppRunner | None = None
        self.url = ""

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)  # this thread only
        try:
            self.loop.run_forever()
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self.thread.start()
        self.call(self._start())

    async def _start(self) -> None:
        self.app = create_app(self.settings)
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    def stop(self) -> None:
        try:
            self.call(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(15)
        assert not self.thread.is_alive(), "the gateway loop did not stop"

    async def _stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        assert self.settings.mongodb_uri is not None
        cleanup = Store.connect(self.settings.mongodb_uri, self.settings.mongodb_db)
        await cleanup.client.drop_database(self.settings.mongodb_db)
        await cleanup.close()

    def add_agent(self, name: str) -> dict[str, str]:
        assert self.app is not None
        _, token = self.call(self.app[AGENTS].add(name))
        return {"Authorization": f"Bearer {token}"}

    def api(self, method: str, path: str, headers: dict[str, str],
            body: dict[str, Any] | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + "/api/v1" + path, data=data, method=method,
            headers={**headers, "Content-Type": "application/json"},
        )
        try:
            with NO_PROXY.open(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")


@pytest.fixture
def live_gateway(mongo_uri: str, tmp_path: Path) -> Iterator[ThreadedGateway]:
    settings = Settings(
        mongodb_uri=mongo_uri, mongodb_db=f"t_{uuid.uuid4().hex[:16]}",
        data_dir=tmp_path / "data", outbox_sweep_seconds=0.2,
    )
    gw = ThreadedGateway(settings)
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()


class Problems:
    """Console errors, uncaught page errors and CSP violations seen by a page."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.add_init_script(
            "window.__cspViolations = [];"
            "document.addEventListener('securitypolicyviolation', (e) =>"
            " window.__cspViolations.push(e.violatedDirective + ' ' + e.blockedURI), true);"
        )

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text}")

    def check(self) -> None:
        violations = self.page.evaluate("window.__cspViolations")
        assert violations == [], violations
        assert self.errors == [], self.errors


def open_chat(page: Page, gw: ThreadedGateway) -> None:
    page.goto(gw.url + "/")
    expect(page.locator('[data-og="status"]')).to_have_attribute("data-state", "online",
                                                                   timeout=WAIT)


def say(page: Page, text: str) -> None:
    box = page.locator('[data-og="input"]')
    box.fill(text)
    box.press("Enter")
    expect(box).to_have_value("")


def message(page: Page, role: str, text: str) -> Any:
    return page.locator(f'{MSG}[data-role="{role}"]', has_text=text)


def settled_seqs(page: Page) -> list[int]:
    """Every message's seq, once no send is pending any more."""
    expect(page.locator(f"{MSG}[data-pending]")).to_have_count(0, timeout=WAIT)
    expect(page.locator(f"{MSG}:not([data-seq])")).to_have_count(0, timeout=WAIT)
    seqs = page.locator(MSG).evaluate_all("els => els.map(e => Number(e.dataset.seq))")
    return [int(s) for s in seqs]


def wait_for(condition: Callable[[], T], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.1)
    return value


# ------------------------------------------------------------------ tests


def test_demo_page_loads_cleanly_with_the_chat_open(
    live_gateway: ThreadedGateway, page: Page
) -> None:
    problems = Problems(page)
    response = page.goto(live_gateway.url + "/")
    assert response is not None and response.ok
    assert "default-src 'self'" in response.headers["content-security-policy"]
    expect(page).to_have_title("Omnigate: try the web chat")
    expect(page.locator('[data-og="status"]')).to_have_attribute("data-state", "online",
                                                                   timeout=WAIT)
    expect(page.locator('[data-og="panel"]')).to_be_visible()  # data-open="true" on the tag
    expect(page.locator('[data-og="launcher"]')).to_have_attribute("aria-expanded", "true")
    expect(page.locator('[data-og="input"]')).to_be_editable()
    expect(page.locator(MSG)).to_have_count(0)  # a new visitor: nothing yet
    assert page.evaluate("localStorage.getItem('omnigate.token')")
    problems.check()


def test_greeting_menu_and_an_answer(live_gateway: ThreadedGateway, page: Page) -> None:
    problems = Problems(page)
    open_chat(page, live_gateway)
    say(page, "hello")
    expect(message(page, "customer", "hello")).to_have_count(1, timeout=WAIT)
    expect(message(page, "bot", "Omnigate demo bot")).to_be_visible(timeout=WAIT)
    buttons = page.locator(BUTTON)
    expect(buttons).to_have_text(MENU, timeout=WAIT)

    buttons.filter(has_text="Opening hours").click()
    expect(message(page, "customer", "Opening hours")).to_have_count(1, timeout=WAIT)
    expect(message(page, "bot", "Monday to Friday")).to_be_visible(timeout=WAIT)
    expect(buttons).to_have_text(MENU, timeout=WAIT)  # the menu again, on the newest only
    assert page.locator(f"{MSG}[data-role='customer']").all_inner_texts()[0].strip() == "hello"
    problems.check()


def test_handoff_and_the_agents_reply(live_gateway: ThreadedGateway, page: Page) -> None:
    problems = Problems(page)
    open_chat(page, live_gateway)
    say(page, "talk to a human")
    expect(page.locator(f'{MSG}[data-event="handoff"]')).to_be_visible(timeout=WAIT)

    alice = live_gateway.add_agent("Alice")
    queue = wait_for(lambda: live_gateway.api("GET", "/conversations", alice)[1]["items"], 15,
                     "the conversation is queued")
    assert len(queue) == 1 and queue[0]["owner"] == "queued"
    cid = queue[0]["id"]
    status, claimed = live_gateway.api("POST", f"/conversations/{cid}/claim", alice)
    assert status == 200, claimed
    expect(page.locator(f'{MSG}[data-event="assigned"]')).to_contain_text("Alice", timeout=WAIT)

    status, _ = live_gateway.api("POST", f"/conversations/{cid}/messages", alice,
                                 {"text": "Hi, Alice here. How can I help?"})
    assert status == 201
    reply = message(page, "agent", "Hi, Alice here. How can I help?")
    expect(reply).to_have_count(1, timeout=WAIT)
    expect(reply.locator(".og-sender")).to_have_text("Alice")

    # the customer answers; the agent reads it in the API
    say(page, "my order 1234 is late")
    expect(message(page, "customer", "my order 1234 is late")).to_have_count(1, timeout=WAIT)
    def customer_answers() -> list[str]:
        items = live_gateway.api("GET", f"/conversations/{cid}/messages", alice)[1]["items"]
        return [i["text"] for i in items if i["text"] == "my order 1234 is late"]

    texts = wait_for(customer_answers, 15, "the agent sees the customer's answer")
    assert texts == ["my order 1234 is late"]
    problems.check()


def test_reload_shows_the_history_once(live_gateway: ThreadedGateway, page: Page) -> None:
    problems = Problems(page)
    open_chat(page, live_gateway)
    say(page, "hello")
    page.locator(BUTTON).filter(has_text="Shipping costs").click()
    expect(message(page, "bot", "Shipping is free")).to_be_visible(timeout=WAIT)
    expect(page.locator(BUTTON)).to_have_text(MENU, timeout=WAIT)
    before = settled_seqs(page)
    assert before == list(range(1, len(before) + 1)) and len(before) >= 5
    texts = page.locator(MSG).all_inner_texts()
    token = page.evaluate("localStorage.getItem('omnigate.token')")
    assert token

    page.reload()
    expect(page.locator('[data-og="status"]')).to_have_attribute("data-state", "online",
                                                                   timeout=WAIT)
    expect(page.locator(MSG)).to_have_count(len(before), timeout=WAIT)
    after = settled_seqs(page)
    assert after == before and len(set(after)) == len(after)
    assert page.locator(MSG).all_inner_texts() == texts
    assert page.evaluate("localStorage.getItem('omnigate.token')") == token
    expect(page.locator(BUTTON)).to_have_text(MENU)  # the newest message's menu is back

    # the same conversation continues after the reload
    say(page, "returns")
    expect(message(page, "bot", "within 30 days")).to_be_visible(timeout=WAIT)
    seqs = settled_seqs(page)
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) > len(before)
    with contextlib.suppress(PlaywrightError):  # optional, never committed (gitignored)
        out = Path(__file__).resolve().parent.parent / "test-results"
        out.mkdir(exist_ok=True)
        page.screenshot(path=str(out / "webchat-after-reload.png"))
    problems.check()
