"""The analytics page (/console/analytics.html) in headless Chromium, against a real
gateway holding a constructed day of conversations (tests/test_analytics.py's ``Day``:
made through the real pipeline and routing, resolved by the bot and by agents, with CSAT
answers): the figures in the page are the exact ones, the period and the filters change
them, and who may not see them is told so clearly.

The gateway runs in its own thread (tests/test_browser.py's ``ThreadedGateway``), as
pytest-playwright's fixtures are synchronous; Playwright lives for this module only.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import cast
from urllib.parse import urlencode

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Locator,
    Page,
    expect,
)

from gateway.keys import AGENTS, STORE
from gateway.settings import Settings
from gateway.store import Store
from tests.conftest import Gateway
from tests.console_rig import ARTIFACTS, PASSWORD
from tests.test_analytics import HUMAN, REFUND, Day
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

pytestmark = pytest.mark.browser

PAGE = "/console/analytics.html"
# Refusals the page asks for and explains (401 before signing in, 403 for a designer or a
# team that is not the agent's): Chromium logs each failed load; nothing else may be.
EXPECTED = "Failed to load resource: the server responded with a status of 40"


@pytest.fixture
def new_page(browser: Browser) -> Iterator[Callable[[], Page]]:  # noqa: F811
    """A page in a context of its own (its own cookies), in UTC, so the period inputs
    (local time) are predictable."""
    contexts: list[BrowserContext] = []

    def make() -> Page:
        context = browser.new_context(viewport={"width": 1280, "height": 900},
                                      timezone_id="UTC", locale="en-GB")
        context.set_default_timeout(WAIT)
        contexts.append(context)
        return context.new_page()

    yield make
    for context in contexts:
        context.close()

# ------------------------------------------------------------------ the data set


class _Rig:
    """What ``Day`` needs of a gateway, for the threaded one."""

    def __init__(self, gw: ThreadedGateway) -> None:
        assert gw.app is not None
        self.app = gw.app
        self.url = gw.url

    @property
    def store(self) -> Store:
        return self.app[STORE]


class Built:
    def __init__(self, gw: ThreadedGateway, day: Day) -> None:
        self.gw, self.day = gw, day

    def url(self, **params: str) -> str:
        query = {"from": self.day.t.isoformat(), "to": self.day.at(days=1).isoformat(),
                 **params}
        return f"{self.gw.url}{PAGE}?{urlencode(query)}"


@pytest.fixture(scope="module")
def built(mongo_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """One gateway with the day built once for the module (the tests only read it)."""
    settings = Settings(
        mongodb_uri=mongo_uri, mongodb_db=f"t_{uuid.uuid4().hex[:16]}",
        data_dir=tmp_path_factory.mktemp("analytics") / "data", outbox_sweep_seconds=0.2,
        csat=True,
    )
    gw = ThreadedGateway(settings)
    try:
        gw.start()
        day = Day(cast(Gateway, _Rig(gw)))
        gw.call(day.build(), timeout=90)
        gw.call(_teamless(gw))
        gw.call(_passwords(gw))
        yield Built(gw, day)
    finally:
        gw.stop()


async def _teamless(gw: ThreadedGateway) -> None:
    """Nia, an agent in no team (and with no conversation in the day)."""
    assert gw.app is not None
    await gw.app[AGENTS].add("Nia", teams=[])


async def _passwords(gw: ThreadedGateway) -> None:
    """Day's agents (Alice: support, Bob: billing, Root: admin, Dee: designer) can sign in."""
    assert gw.app is not None
    agents = gw.app[AGENTS]
    for agent in await agents.list():
        await agents.update(agent.id, {"email": f"{agent.name.lower()}@desk.test",
                                       "password": PASSWORD})


def sign_in(page: Page, gw: ThreadedGateway, name: str) -> None:
    """The console's sign-in (POST /api/v1/session) in the page's context: its cookie."""
    response = page.request.post(gw.url + "/api/v1/session",
                                 data={"email": f"{name.lower()}@desk.test",
                                       "password": PASSWORD})
    assert response.status == 200, response.text()


class Problems:
    """Console errors (other than the refusals the page explains), page errors, CSP."""

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
        if message.type == "error" and not message.text.startswith(EXPECTED):
            self.errors.append(f"console: {message.text}")

    def check(self) -> None:
        assert self.page.evaluate("window.__cspViolations") == []
        assert self.errors == [], self.errors


# ------------------------------------------------------------------ reading the page


def card(page: Page, key: str) -> Locator:
    return page.locator(f'[data-card="{key}"] .an-card-value')


def cell(page: Page, section: str, group: str, fig: str) -> Locator:
    return page.locator(f'[data-an="{section}"] tr[data-group="{group}"] td[data-fig="{fig}"]')


def reason(page: Page, group: str, text: str) -> Locator:
    return page.locator(f'[data-an="reasons"] tr[data-group="{group}"][data-reason="{text}"] '
                        'td[data-fig="count"]')


def agent_cell(page: Page, name: str, fig: str) -> Locator:
    row = page.locator('[data-an="agents"] tbody tr').filter(
        has=page.get_by_role("rowheader", name=name, exact=True))
    return row.locator(f'td[data-fig="{fig}"]')


def groups(page: Page, section: str) -> list[str]:
    rows = page.locator(f'[data-an="{section}"] tbody tr')
    return [str(g) for g in rows.evaluate_all("rs => rs.map(r => r.dataset.group)")]


TOTAL = "(total)"


# ------------------------------------------------------------------ tests


def test_an_admin_sees_the_exact_figures_and_changes_period_and_filters(
    built: Built, new_page: Callable[[], Page]
) -> None:
    page = new_page()
    problems = Problems(page)
    sign_in(page, built.gw, "Root")
    response = page.goto(built.url())
    assert response is not None and response.ok
    assert "script-src 'self'" in response.headers["content-security-policy"]
    expect(page).to_have_title("Omnigate: analytics")
    expect(page.locator('[data-an="who"]')).to_have_text("Root (admin)")

    # the totals
    expect(card(page, "ended")).to_have_text("5")
    expect(card(page, "started")).to_have_text("5")
    expect(card(page, "containment")).to_have_text("40%")
    expect(card(page, "handed_off")).to_have_text("3")
    expect(card(page, "first_response")).to_have_text("1 min")
    expect(card(page, "resolution")).to_have_text("20 min")
    expect(card(page, "sla_breaches")).to_have_text("1")
    expect(card(page, "csat")).to_have_text("4.0")

    expect(card(page, "abandoned")).to_have_text("0")
    # per agent, whatever the breakdown: handled, first response, resolution, CSAT
    agents = '[data-an="agents"] tbody tr'
    assert [row.split("\t")[0] for row in page.locator(agents).all_inner_texts()] == [
        "Alice", "Bob", "No agent"]
    expect(agent_cell(page, "Alice", "handled")).to_have_text("1")
    expect(agent_cell(page, "Alice", "first_response")).to_have_text("1 min")
    expect(agent_cell(page, "Alice", "resolution")).to_have_text("10 min")
    expect(agent_cell(page, "Alice", "csat")).to_have_text("5.0")
    expect(agent_cell(page, "Bob", "handled")).to_have_text("2")
    expect(agent_cell(page, "Bob", "first_response")).to_have_text("3 min")
    expect(agent_cell(page, "Bob", "resolution")).to_have_text("20 min")
    expect(agent_cell(page, "Bob", "csat")).to_have_text("3.0")
    expect(agent_cell(page, "No agent", "handled")).to_have_text("2")
    expect(page.locator('[data-an="note"]')).to_be_hidden()

    # conversations per channel, containment
    assert groups(page, "volume") == [TOTAL, "telegram", "webchat"]
    expect(cell(page, "volume", "telegram", "started")).to_have_text("1")
    expect(cell(page, "volume", "webchat", "started")).to_have_text("4")
    expect(cell(page, "volume", "webchat", "ended")).to_have_text("4")
    expect(cell(page, "volume", "webchat", "bot_contained")).to_have_text("2")
    expect(cell(page, "volume", "webchat", "containment")).to_have_text("50%")
    expect(cell(page, "volume", "telegram", "containment")).to_have_text("0%")
    bar = page.locator('[data-an="volume"] tr[data-group="webchat"] '
                       'td[data-fig="containment_bar"] rect.an-bar-fg')
    expect(bar).to_have_attribute("width", "50.00")
    # handoff reasons
    expect(reason(page, TOTAL, HUMAN)).to_have_text("2")
    expect(reason(page, TOTAL, REFUND)).to_have_text("1")
    expect(reason(page, "telegram", HUMAN)).to_have_text("1")
    # times: median and p90
    expect(cell(page, "times", TOTAL, "first_response_median")).to_have_text("1 min")
    expect(cell(page, "times", TOTAL, "first_response_p90")).to_have_text("3 min")
    expect(cell(page, "times", TOTAL, "resolution_median")).to_have_text("20 min")
    expect(cell(page, "times", TOTAL, "resolution_p90")).to_have_text("30 min")
    expect(cell(page, "times", TOTAL, "resolution_count")).to_have_text("3")
    # SLA
    expect(cell(page, "sla", TOTAL, "with_sla")).to_have_text("3")
    expect(cell(page, "sla", TOTAL, "first_response_breaches")).to_have_text("1")
    expect(cell(page, "sla", TOTAL, "resolution_breaches")).to_have_text("0")
    expect(cell(page, "sla", "webchat", "first_response_breaches")).to_have_text("1")
    # CSAT: average, count, distribution
    expect(cell(page, "csat", TOTAL, "asked")).to_have_text("3")
    expect(cell(page, "csat", TOTAL, "answered")).to_have_text("2")
    expect(cell(page, "csat", TOTAL, "average")).to_have_text("4.0")
    expect(cell(page, "csat", TOTAL, "d3")).to_have_text("1")
    expect(cell(page, "csat", TOTAL, "d5")).to_have_text("1")
    expect(cell(page, "csat", TOTAL, "d1")).to_have_text("0")
    expect(cell(page, "csat", "telegram", "average")).to_have_text("5.0")
    expect(page.locator('[data-an="csat-chart"] svg')).to_have_attribute(
        "aria-label", "CSAT answers per score: 1: 0, 2: 0, 3: 1, 4: 0, 5: 1")

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "analytics.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    # per team, per topic
    page.locator('[data-an="by"]').select_option("team")
    expect(cell(page, "volume", "billing", "ended")).to_have_text("2")
    assert groups(page, "volume") == [TOTAL, "(none)", "billing", "support"]
    expect(cell(page, "volume", "(none)", "ended")).to_have_text("2")
    expect(cell(page, "volume", "support", "ended")).to_have_text("1")
    expect(cell(page, "times", "billing", "resolution_median")).to_have_text("20 min")
    expect(cell(page, "times", "billing", "resolution_p90")).to_have_text("30 min")
    expect(cell(page, "times", "support", "first_response_median")).to_have_text("1 min")
    expect(cell(page, "csat", "billing", "d3")).to_have_text("1")
    expect(page.locator('[data-an="volume"] tr[data-group="(none)"] th')).to_have_text("No team")
    page.locator('[data-an="by"]').select_option("topic")
    expect(cell(page, "volume", "returns", "ended")).to_have_text("2")
    expect(cell(page, "volume", "returns", "containment")).to_have_text("50%")
    expect(cell(page, "volume", "faq", "ended")).to_have_text("1")
    expect(cell(page, "volume", HUMAN, "ended")).to_have_text("2")

    # a filter: telegram only
    page.locator('[data-an="channel"]').select_option("telegram")
    expect(card(page, "ended")).to_have_text("1")
    expect(card(page, "containment")).to_have_text("0%")
    expect(card(page, "started")).to_have_text("1")
    expect(card(page, "csat")).to_have_text("5.0")
    assert "channel=telegram" in page.url
    # the team filter offers every agent's team; billing has no telegram outcome
    page.locator('[data-an="team"]').select_option("billing")
    expect(card(page, "ended")).to_have_text("0")
    expect(card(page, "containment")).to_have_text("—")
    page.locator('[data-an="channel"]').select_option("")
    expect(card(page, "ended")).to_have_text("2")
    expect(card(page, "handed_off")).to_have_text("2")
    page.locator('[data-an="team"]').select_option("")
    expect(card(page, "ended")).to_have_text("5")

    # the period: from an hour after T, only c2 (resolved by the bot at T + 2 h) is in it
    later = built.day.at(hours=1)
    page.locator('[data-an="from"]').fill(later.strftime("%Y-%m-%dT%H:%M"))
    expect(card(page, "ended")).to_have_text("1")
    expect(card(page, "containment")).to_have_text("100%")
    expect(card(page, "first_response")).to_have_text("—")
    # a preset: the last 30 days hold all five again
    page.get_by_role("button", name="30 days").click()
    expect(card(page, "ended")).to_have_text("5")
    expect(page.get_by_role("button", name="30 days")).to_have_attribute("aria-pressed", "true")
    # and a period with nothing in it
    page.locator('[data-an="to"]').fill(
        (built.day.t - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M"))
    expect(card(page, "ended")).to_have_text("0")
    expect(page.locator('[data-an="reasons"] tr[data-group="(total)"] td')).to_have_text(
        "No handoffs")
    # from after to: said so, nothing asked
    page.locator('[data-an="from"]').fill(built.day.t.strftime("%Y-%m-%dT%H:%M"))
    expect(page.locator('[data-an="problem"]')).to_contain_text("must be before")
    expect(page.locator('[data-an="report"]')).to_be_hidden()
    problems.check()


def test_an_agent_in_no_team_is_told_why(built: Built, new_page: Callable[[], Page]) -> None:
    page = new_page()
    problems = Problems(page)
    sign_in(page, built.gw, "Nia")
    page.goto(built.url())
    expect(page.locator('[data-an="who"]')).to_have_text("Nia (agent)")
    note = page.locator('[data-an="note"]')
    expect(note).to_be_visible()
    expect(note).to_have_text("You are in no team, so these are only the conversations you "
                              "had when they ended: team figures show once an admin adds you "
                              "to a team.")
    expect(card(page, "ended")).to_have_text("0")
    expect(page.locator('[data-an="agents"] tbody td')).to_have_text(
        "No conversation ended with an agent in the period")
    # the agent filter offers herself only
    assert page.locator('[data-an="agent"] option').all_inner_texts() == ["All", "Nia"]
    problems.check()


def test_refusals_are_explained(built: Built, new_page: Callable[[], Page]) -> None:
    # not signed in: a link to the console's sign-in
    page = new_page()
    problems = Problems(page)
    page.goto(built.url())
    problem = page.locator('[data-an="problem"]')
    expect(problem).to_have_attribute("data-kind", "signin")
    expect(problem).to_contain_text("You are not signed in.")
    expect(problem.get_by_role("link", name="Sign in")).to_have_attribute("href", "/console/")
    expect(page.locator('[data-an="report"]')).to_be_hidden()
    problems.check()

    # a bot designer: refused, and told why
    page = new_page()
    problems = Problems(page)
    sign_in(page, built.gw, "Dee")
    page.goto(built.url())
    problem = page.locator('[data-an="problem"]')
    expect(problem).to_have_attribute("data-kind", "forbidden")
    expect(problem).to_contain_text("Bot designers cannot see analytics.")
    expect(problem).to_contain_text("role designer may not do this")
    expect(page.locator('[data-an="report"]')).to_be_hidden()
    expect(page.locator('[data-card="ended"]')).to_have_count(0)  # no figure ever drawn
    problems.check()

    # an agent: their own team's figures only; another team's is refused
    page = new_page()
    problems = Problems(page)
    sign_in(page, built.gw, "Alice")
    page.goto(built.url())
    expect(page.locator('[data-an="who"]')).to_have_text("Alice (agent)")
    expect(card(page, "ended")).to_have_text("1")  # c3, handed to support
    expect(cell(page, "volume", "telegram", "ended")).to_have_text("1")
    assert groups(page, "volume") == [TOTAL, "telegram"]
    team_options = page.locator('[data-an="team"] option').all_inner_texts()
    assert team_options == ["All", "support"]
    page.goto(built.url(team="billing"))
    problem = page.locator('[data-an="problem"]')
    expect(problem).to_have_attribute("data-kind", "forbidden")
    expect(problem).to_contain_text("agents see the analytics of their own teams only (support)")
    expect(page.locator('[data-an="report"]')).to_be_hidden()
    # choosing their own team again shows the figures
    page.locator('[data-an="team"]').select_option("support")
    expect(card(page, "ended")).to_have_text("1")
    expect(page.locator('[data-an="problem"]')).to_be_hidden()
    problems.check()


def test_the_page_and_its_files_are_served_with_the_console_headers(built: Built,
                                                                      new_page: Callable[[], Page]
                                                                      ) -> None:
    page = new_page()
    for name, kind in (("analytics.js", "text/javascript"), ("analytics.css", "text/css")):
        response = page.request.get(f"{built.gw.url}/console/{name}")
        assert response.status == 200
        assert response.headers["content-type"].startswith(kind)
        assert response.headers["x-content-type-options"] == "nosniff"
    html = page.request.get(built.gw.url + PAGE)
    csp = html.headers["content-security-policy"]
    assert "'unsafe-inline'" not in csp and "script-src 'self'" in csp
    body = html.text()
    assert "<script src=\"analytics.js\"" in body and "style=" not in body
    assert "<script>" not in body
