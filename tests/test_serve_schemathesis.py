"""schemathesis drives every operation of the server's own OpenAPI document, with generated
valid and invalid inputs (bodies, path ids, query values, headers): no 5xx, ever.

Bounded: 25 examples per operation and mode on the tiny model with answers capped at 4 tokens,
so the whole module runs in well under a minute. `onthejob bench` is not involved; the larger
run whose counts are reported in docs/results/reliability.md uses the schemathesis CLI."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from onthejob.serve.app import create_app
from onthejob.serve.engine import Engine
from onthejob.serve.http import Limits
from onthejob.store import Store


@pytest.fixture(scope="module")
def served(tiny_lm, tmp_path_factory):
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('st') / 'st.db'}")
    store.create_tenant("acme")
    # acme's admin key reaches every tenant operation and acme's admin ones; the operator key
    # the admin operations on every tenant.
    keys = {"tenant": store.create_key("acme", admin=True), "admin": store.create_operator_key()}
    engine = Engine(tiny_lm)
    app = create_app(tiny_lm, store, limits=Limits(default_max_tokens=3, max_tokens=4),
                     engine=engine)
    yield app, keys
    engine.close()
    store.close()


OPERATIONS = ["GET /health", "GET /v1/models", "POST /v1/chat/completions", "GET /v1/sessions",
              "POST /v1/sessions", "GET /v1/sessions/{session_id}",
              "POST /v1/sessions/{session_id}/review", "POST /v1/sessions/{session_id}/end",
              "POST /v1/sessions/{session_id}/compact", "GET /v1/admin/tenants",
              "POST /v1/admin/tenants", "GET /v1/admin/tenants/{name}",
              "PATCH /v1/admin/tenants/{name}", "GET /v1/admin/tenants/{name}/keys",
              "POST /v1/admin/tenants/{name}/keys", "DELETE /v1/admin/tenants/{name}/keys/{prefix}"]

WITHOUT_INPUTS = {"GET /health", "GET /v1/models", "GET /v1/admin/tenants"}


def _documented(app) -> list[str]:
    api = schemathesis.openapi.from_asgi("/openapi.json", app)
    return [r.ok().label for r in api.get_all_operations()]


def test_the_document_lists_every_operation(served):
    assert set(OPERATIONS) <= set(_documented(served[0]))


# schemathesis's own pytest plugin does not load under pytest 9, so each operation's
# generated cases are drawn with hypothesis directly: valid inputs and invalid ones.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                         ids=["valid", "invalid"])
@pytest.mark.parametrize("label", OPERATIONS)
def test_no_generated_request_gets_a_5xx(served, label, mode):
    if mode == GenerationMode.NEGATIVE and label in WITHOUT_INPUTS:
        pytest.skip("no parameters or body to make invalid")
    _fuzz(served, label, mode)


def test_operations_added_later_are_fuzzed_too(served):
    """Operations other packages add (e.g. dreaming) get the same treatment."""
    for label in sorted(set(_documented(served[0])) - set(OPERATIONS)):
        _fuzz(served, label, GenerationMode.POSITIVE)
        try:
            _fuzz(served, label, GenerationMode.NEGATIVE)
        except Unsatisfiable:  # nothing to make invalid
            pass


def _fuzz(served, label: str, mode: GenerationMode) -> None:
    app, keys = served
    key = keys["admin" if " /v1/admin/" in label else "tenant"]
    api = schemathesis.openapi.from_asgi("/openapi.json", app)
    operation = next(r.ok() for r in api.get_all_operations() if r.ok().label == label)
    statuses = []

    @settings(max_examples=25, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case):
        response = case.call(headers={"Authorization": f"Bearer {key}"})
        statuses.append(response.status_code)
        case.validate_response(response, checks=[not_a_server_error])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert error["message"] and error["code"], response.text

    check()
    assert statuses and all(status < 500 for status in statuses)
