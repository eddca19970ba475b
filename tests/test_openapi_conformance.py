"""The agent API matches its OpenAPI: schemathesis over the live /api/openapi.json.

A real gateway (the whole app, the real store) runs in its own thread (schemathesis calls
the API synchronously with ``requests``). Every operation in the served spec is exercised
as an admin (so the authenticated routes answer, not just 401), with all of schemathesis's
checks enabled (its defaults: not_a_server_error, status_code_conformance,
content_type_conformance, response_headers_conformance, response_schema_conformance,
negative_data_rejection, positive_data_acceptance, missing_required_header,
unsupported_method, ...) over its examples, coverage and fuzzing phases, with
both valid and invalid data. Any failed check fails the test (one subtest per operation
says which). Generation is deterministic and bounded, so CI sees the same cases each run.

Run alone: ``.venv/bin/python -m pytest -m conformance -q``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis

from gateway.desk.api import SPEC, DeskApi
from gateway.keys import AGENTS, PIPELINE, ROUTING
from gateway.model import AgentRole
from gateway.settings import Settings
from tests.test_browser import ThreadedGateway

pytestmark = [pytest.mark.conformance, pytest.mark.timeout(600)]

MAX_EXAMPLES = 12  # per operation and phase: ~45 operations stay well under two minutes
SEED = 20261209


@dataclass
class Rig:
    gateway: ThreadedGateway
    token: str
    ids: dict[str, str]


async def _seed(gw: ThreadedGateway) -> tuple[str, dict[str, str]]:
    """An admin (whose token the checks use), and one real object of each kind the
    path parameters name, so operations answer 200 for some cases, not only 404."""
    assert gw.app is not None
    agents, pipeline, routing = gw.app[AGENTS], gw.app[PIPELINE], gw.app[ROUTING]
    admin, token = await agents.add("Conformance admin", "admin@example.com",
                                    role=AgentRole.ADMIN, teams=["support"])
    other, _ = await agents.add("Other agent", "other@example.com", teams=["support"])
    queued = await pipeline.open_conversation("webchat", "v_conformance", "v_conformance")
    assert await routing.handoff(queued.id, "conformance: needs a human")
    return token, {"admin": admin.id, "agent": other.id, "conversation": queued.id,
                   "contact": queued.contact_id}


@pytest.fixture(scope="module")
def rig(mongo_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp: Path = tmp_path_factory.mktemp("conformance")
    settings = Settings(mongodb_uri=mongo_uri, mongodb_db="t_conformance",
                        data_dir=tmp / "data", outbox_sweep_seconds=0.2)
    gw = ThreadedGateway(settings)
    try:
        gw.start()
        token, ids = gw.call(_seed(gw))
        yield Rig(gw, token, ids)
    finally:
        gw.stop()


def _served_spec() -> dict[str, Any]:
    """The spec the gateway serves at /api/openapi.json (built from the endpoint table, no
    I/O); ``test_the_served_spec_is_the_one_tested`` checks the live answer is this."""
    spec: dict[str, Any] = DeskApi().app()[SPEC]
    return json.loads(json.dumps(spec))


CONFIG = schemathesis.Config.from_dict({
    "seed": SEED,
    "generation": {
        "mode": "all",  # valid and invalid data: the negative-data checks need both
        "max-examples": MAX_EXAMPLES,
        "deterministic": True,
        "database": "none",
    },
    "operations": [{
        # A period's two ends are each valid alone, but from must be before to and the
        # period at most 366 days: OpenAPI cannot relate two parameters, so for these
        # operations a 400 for schema-valid data is expected (and documented). Every other
        # check, and positive_data_acceptance everywhere else, stays as it is.
        "include-path-regex": "^/api/v1/(analytics|sla/breaches)",
        "checks": {"positive_data_acceptance": {"expected-statuses": [
            "2xx", "3xx", "400", "401", "403", "404", "409", "429", "5xx"]}},
    }],
})
schema = schemathesis.openapi.from_dict(_served_spec(), config=CONFIG)


def test_the_served_spec_is_the_one_tested(rig: Rig) -> None:
    with urllib.request.urlopen(rig.gateway.url + "/api/openapi.json", timeout=30) as response:
        assert json.load(response) == _served_spec()


@schema.parametrize()
def test_the_api_matches_its_openapi(case: schemathesis.Case, rig: Rig) -> None:
    case.call_and_validate(base_url=rig.gateway.url,
                           headers={"Authorization": f"Bearer {rig.token}"})


def _call(rig: Rig, method: str, path: str, body: Any = None) -> tuple[int, Any, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        rig.gateway.url + path, data=data, method=method,
        headers={"Authorization": f"Bearer {rig.token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, error.headers, json.load(error)


def test_the_issues_findings_stay_fixed(rig: Rig) -> None:
    """The findings schemathesis reported (issue 9), as plain requests."""
    status, headers, body = _call(rig, "TRACE", "/api/v1/me")
    assert (status, body["error"]) == (405, "method_not_allowed")
    assert "GET" in headers["Allow"]
    for query in ("limit=0", "limit=201", "limit=7_0", "mine=yes", "owner="):
        status, _, body = _call(rig, "GET", f"/api/v1/conversations?{query}")
        assert (status, body["error"]) == (400, "bad_request"), query
    for query in ("from=", "to=", "from=yesterday"):
        status, _, body = _call(rig, "GET", f"/api/v1/analytics?{query}")
        assert (status, body["error"]) == (400, "bad_request"), query
    for capacity in (False, True, "3", 2.5):
        status, _, body = _call(rig, "POST", "/api/v1/agents",
                                {"name": "Strict", "capacity": capacity})
        assert (status, body["error"]) == (400, "bad_request"), capacity
        assert "capacity" in body["message"]
    status, _, body = _call(rig, "POST", "/api/v1/agents", {"name": "Whole", "capacity": 4.0})
    assert (status, body["agent"]["capacity"]) == (201, 4)
    status, _, body = _call(rig, "PATCH", f"/api/v1/agents/{rig.ids['agent']}", {"active": 0})
    assert (status, body["error"]) == (400, "bad_request")

