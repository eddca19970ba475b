"""A rig for browser tests of the agent console (gateway/desk/console/).

Import the fixtures into a test module (pytest collects fixtures from its globals):

    from tests.console_rig import (  # noqa: F401
        browser, browser_type, browser_type_launch_args, console_gateway_fixture,
        new_page_fixture, playwright)

(``console_gateway`` and ``new_page`` are registered under those names.)

The gateway runs in its own thread (tests/test_browser.py's ``ThreadedGateway``), as
pytest-playwright's fixtures are synchronous; Playwright lives for one module only (see
tests/test_browser.py for why). ``Desk`` drives the console page by its ``data-c`` hooks.
Screenshots go to ``$OMNIGATE_TEST_ARTIFACTS`` (default tests/artifacts/, git-ignored).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    expect,
)

from gateway.keys import AGENTS
from gateway.model import AgentRole
from gateway.settings import Settings
from tests.test_browser import (  # noqa: F401 - fixtures, collected from this module
    WAIT,
    ThreadedGateway,
    browser,
    browser_context_args,
    browser_type,
    browser_type_launch_args,
    launch_browser,
    playwright,
)

PASSWORD = "correct horse battery"
ARTIFACTS = Path(os.environ.get("OMNIGATE_TEST_ARTIFACTS")
                 or Path(__file__).resolve().parent / "artifacts")
# What a page that signs in logs by itself: the first GET /api/v1/session answers 401
# (nobody signed in yet), and a wrong password is a 401 too. Chromium logs each as an
# error; nothing else may be logged.
EXPECTED_401 = "Failed to load resource: the server responded with a status of 401"


@pytest.fixture(name="console_gateway")
def console_gateway_fixture(mongo_uri: str, tmp_path: Path) -> Iterator[ThreadedGateway]:
    """The whole gateway (CSAT on) on a real port, in its own thread."""
    settings = Settings(
        mongodb_uri=mongo_uri, mongodb_db=f"t_{uuid.uuid4().hex[:16]}",
        data_dir=tmp_path / "data", outbox_sweep_seconds=0.2, csat=True,
    )
    gw = ThreadedGateway(settings)
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()


@pytest.fixture(name="new_page")
def new_page_fixture(browser: Browser) -> Iterator[Callable[[], Page]]:  # noqa: F811
    """Pages in contexts of their own (own cookies and storage: an agent, a visitor)."""
    contexts: list[BrowserContext] = []
    expect.set_options(timeout=WAIT)  # every expectation of these tests (reset after)

    def make() -> Page:
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        context.set_default_timeout(WAIT)
        contexts.append(context)
        return context.new_page()

    try:
        yield make
    finally:
        expect.set_options(timeout=None)
        for context in contexts:
            context.close()

# ------------------------------------------------------------------ helpers


def add_agent(gw: ThreadedGateway, name: str, *, role: AgentRole = AgentRole.AGENT,
              teams: tuple[str, ...] = (), password: str = PASSWORD) -> tuple[str, str]:
    """An agent who can sign in; returns (agent id, email)."""
    assert gw.app is not None
    email = f"{name.lower()}@example.com"
    agent, _ = gw.call(gw.app[AGENTS].add(name, email, role=role, teams=teams,
                                          password=password))
    return agent.id, email


def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


class Watch:
    """Console errors, page errors, CSP violations and dialogs seen by a page."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("dialog", self._dialog)
        page.add_init_script(
            "window.__cspViolations = [];"
            "document.addEventListener('securitypolicyviolation', (e) =>"
            " window.__cspViolations.push(e.violatedDirective + ' ' + e.blockedURI), true);"
        )

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error" and not message.text.startswith(EXPECTED_401):
            self.errors.append(f"console: {message.text}")

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def check(self) -> None:
        assert self.page.evaluate("window.__cspViolations") == []
        assert self.errors == []
        assert self.dialogs == []


class Desk:
    """The console page, driven by its ``data-c`` hooks."""

    def __init__(self, page: Page, gw: ThreadedGateway) -> None:
        self.page = page
        self.gw = gw

    def c(self, name: str) -> Any:
        return self.page.locator(f'[data-c="{name}"]')

    def open(self) -> None:
        self.page.goto(self.gw.url + "/console/")
        expect(self.c("login")).to_be_visible()

    def sign_in(self, email: str, password: str = PASSWORD) -> None:
        self.c("email").fill(email)
        self.c("password").fill(password)
        self.c("sign-in").click()

    def signed_in(self, email: str, password: str = PASSWORD) -> None:
        self.open()
        self.sign_in(email, password)
        expect(self.c("app")).to_be_visible()
        expect(self.c("live")).to_have_attribute("data-state", "live")
        expect(self.c("presence")).to_have_attribute("data-state", "online")

    def presence(self, value: str) -> None:
        self.c("presence").select_option(value)
        expect(self.c("presence")).to_have_attribute("data-state", value)

    def row(self, list_name: str) -> Any:
        return self.page.locator(f'[data-c="{list_name}"] [data-c="conv-item"]')

    def items(self, **attrs: str) -> Any:
        where = "".join(f'[data-{k}="{v}"]' for k, v in attrs.items())
        return self.page.locator(f'[data-c="items"] [data-c="item"]{where}')

    def write(self, text: str, *, note: bool = False) -> None:
        toggle = self.c("note-toggle")
        if toggle.is_checked() != note:
            toggle.click()
        self.c("reply").fill(text)
        self.c("reply").press("Enter")
        expect(self.c("reply")).to_have_value("")
