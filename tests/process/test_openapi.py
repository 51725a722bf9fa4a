"""The OpenAPI document describes the real API: exactly the application's routes, and
schemathesis, driving a real ``phasewatch serve`` with requests it generates from the
document, finds no 5xx and no response other than documented."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import settings
from schemathesis.checks import positive_data_acceptance

from consumer.api.openapi import document
from consumer.service import Service
from consumer.settings import Settings
from consumer.store.memory import MemoryStore
from tests.process.service_proc import ServiceProcess

pytestmark = pytest.mark.slow

# The event stream is left out: it never ends, so there is no response to validate
# (tests/process/test_changes_stream.py and tests/http/test_changes_feed.py cover it).
schema = schemathesis.openapi.from_dict(document()).exclude(path="/changes/stream")


def test_the_document_names_exactly_the_routes() -> None:
    service = Service(Settings(database_url="memory://"), MemoryStore())
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in service.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {(method, path) for path, item in document()["paths"].items() for method in item}
    assert documented == served


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    service = ServiceProcess(tmp_path_factory.mktemp("openapi") / "pw.db").start()
    try:
        yield service.url
    finally:
        service.stop()


@schema.parametrize()
@settings(max_examples=25, deadline=None)
def test_the_api_answers_as_documented(case: Any, served: str) -> None:
    # A schema-valid webhook body is not yet a valid event (its task must have an id, a
    # phase, a time...), and 4xx is then the right answer: that check is left out.
    _short_long_poll(case)
    case.call_and_validate(base_url=served, excluded_checks=[positive_data_acceptance])


def _short_long_poll(case: Any) -> None:
    """Nothing commits while schemathesis runs, so a valid `wait` on /changes would hold
    the request for its whole length (up to 30 s, past the client's timeout). Valid
    values are cut to a tenth of a second; invalid ones stay, for the 400s."""
    query = case.query if isinstance(case.query, dict) else None
    if case.path != "/changes" or not query or "wait" not in query:
        return
    try:
        wait = float(query["wait"])
    except (TypeError, ValueError):
        return
    if 0.1 < wait <= 30:
        query["wait"] = 0.1
