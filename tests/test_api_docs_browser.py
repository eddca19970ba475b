"""/api/docs in headless Chromium: Swagger UI over the generated OpenAPI, every operation
shown, nothing loaded from anywhere but the gateway, no CSP violation or console error."""

from __future__ import annotations

import json
import urllib.request

from playwright.sync_api import Page, Request, expect

from tests.console_rig import ARTIFACTS
from tests.test_browser import (  # noqa: F401 - fixtures, collected from this module
    NO_PROXY,
    WAIT,
    Problems,
    ThreadedGateway,
    browser,
    browser_context_args,
    browser_type,
    browser_type_launch_args,
    launch_browser,
    live_gateway,
    playwright,
)


def test_the_api_docs_page_shows_every_operation_offline(
    live_gateway: ThreadedGateway, page: Page  # noqa: F811
) -> None:
    with NO_PROXY.open(urllib.request.Request(live_gateway.url + "/api/openapi.json"),
                       timeout=10) as response:
        spec = json.loads(response.read())
    operations = [(method, path) for path, ops in spec["paths"].items() for method in ops]
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    problems = Problems(page)
    failed: list[str] = []

    def on_failed(request: Request) -> None:  # (a bound list.append is no handler to it)
        failed.append(request.url)

    page.on("requestfailed", on_failed)

    response = page.goto(live_gateway.url + "/api/docs")
    assert response is not None and response.ok
    assert "script-src 'self'" in response.headers["content-security-policy"]
    expect(page).to_have_title("Omnigate agent API")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("Omnigate agent API",
                                                                     timeout=WAIT)
    expect(page.locator(".opblock")).to_have_count(len(operations), timeout=WAIT)
    me = page.locator(".opblock-get", has=page.locator("[data-path='/api/v1/me']"))
    me.locator(".opblock-summary").click()
    responses = me.locator(".responses-wrapper")
    expect(responses).to_contain_text('"capacity"')  # the AgentOut example
    expect(responses).to_contain_text("401Not signed in")  # with the status's text
    page.screenshot(path=str(ARTIFACTS / "api-docs.png"))
    problems.check()
    assert failed == []
    foreign = [url for url in requested
               if not url.startswith(live_gateway.url + "/") and not url.startswith("data:")]
    assert foreign == []  # no CDN, no public validator: works offline
