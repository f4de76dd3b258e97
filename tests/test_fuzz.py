"""schemathesis against the app's own OpenAPI schema, through real HTTP on the real engine and a real SQLite file:
every operation, with data that fits the schema and data that does not (its examples, coverage and fuzzing phases).
No answer is a 5xx; every refusal is a 4xx in OpenAI's error shape that the schema documents; every answer fits the
schema; data the schema forbids is refused. Without a key every client and operator route is a 401 that changes
nothing. The server is healthy afterwards (it serves chat).

One fresh server for this module (the fuzzed operations add and revoke keys, delete users, start training runs,
promote and roll back); the seed is fixed and generation deterministic, so CI sees the same requests every time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis import Case, CheckContext, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.serverkit import AppServer
from tests.store_reads import count_completions

USER, ADMIN = "fuzz-user-key", "fuzz-admin-key"
SEED = 20_260_610
# Bounded for CI: up to 40 fuzzed examples per operation, besides the coverage phase (boundary and invalid values):
# the module takes about a minute on two cores.
MAX_EXAMPLES = 40


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _config(max_examples: int, mode: str) -> schemathesis.Config:
    return schemathesis.Config.from_dict({
        "seed": SEED,
        "generation": {"mode": mode, "max-examples": max_examples, "deterministic": True, "no-shrink": True},
        "suppress-health-check": ["too_slow", "filter_too_much", "data_too_large", "large_base_example"],
        "request-timeout": 120,
        "output": {"sanitization": {"enabled": False}},  # test keys only; "max_tokens" is no secret
    })


@pytest.fixture(scope="module")
def fuzzed(make_server: Callable[..., AppServer]) -> AppServer:
    """Client and admin keys set (so every guard is on), a trainer that only runs when asked."""
    return make_server(api_keys=[USER], admin_keys=[ADMIN])


@pytest.fixture(scope="module")
def served_model(fuzzed: AppServer) -> str:
    return httpx.get(f"{fuzzed.url}/v1/models", headers=bearer(ADMIN)).json()["data"][0]["id"]


def app_schema() -> dict[str, Any]:
    """The app's OpenAPI document, as its ``/schema/openapi.json`` serves it (checked below), built without
    serving: pytest collects one test per operation before any server runs. (schemathesis's loader for a schema
    from a fixture, ``schemathesis.pytest.from_fixture``, fails on pytest 9.2: it sets ``Function._nodeid``.)"""
    from alignd.app import create_app
    from alignd.config import load_settings

    app = create_app(load_settings({"model": "unused", "data_dir": "unused"}, environ={}))
    return app.openapi_schema.to_schema()


SCHEMA = app_schema()
api_schema = schemathesis.openapi.from_dict(SCHEMA, config=_config(MAX_EXAMPLES, "all"))
anonymous_schema = schemathesis.openapi.from_dict(SCHEMA, config=_config(2, "positive"))


def openai_error_shape(ctx: CheckContext, response: schemathesis.Response, case: Case) -> bool | None:
    """Every 4xx is JSON ``{"error": {"message", "type", "param", "code"}}`` with a message and a type."""
    if not 400 <= response.status_code < 500:
        return None
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["type"] in {"invalid_request_error", "authentication_error", "permission_error",
                             "rate_limit_error"}, error
    return True


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]

def test_the_schema_is_the_served_one(fuzzed: AppServer) -> None:
    """What the tests below fuzz is what the server serves (with a key: the schema maps every route)."""
    assert httpx.get(f"{fuzzed.url}/schema/openapi.json").status_code == 401
    served = httpx.get(f"{fuzzed.url}/schema/openapi.json", headers=bearer(ADMIN))
    assert served.status_code == 200 and served.json() == SCHEMA


@api_schema.parametrize()
def test_every_operation_with_an_admin_key(case: Case, fuzzed: AppServer, served_model: str) -> None:
    # Chat with a random model name ends at the 404 before the engine: a valid request names the served model.
    if (case.operation.path == "/v1/chat/completions" and isinstance(case.body, dict)
            and case.meta is not None and case.meta.generation.mode is GenerationMode.POSITIVE):
        case.body["model"] = served_model
    response = case.call(base_url=fuzzed.url, headers=bearer(ADMIN))
    case.validate_response(response, checks=CHECKS, additional_checks=[openai_error_shape])


@anonymous_schema.parametrize()
def test_every_operation_without_a_key(case: Case, fuzzed: AppServer) -> None:
    before = fuzzed.loop.run(count_completions(fuzzed.state.store))
    response = case.call(base_url=fuzzed.url)
    case.validate_response(response, checks=[not_a_server_error, status_code_conformance],
                           additional_checks=[openai_error_shape])
    if case.operation.path in ("/health", "/ready"):
        assert response.status_code == 200, response.text
    else:  # the client API, operator routes, /metrics and the schema all take a key here
        assert response.status_code == 401, (case.operation.label, response.status_code, response.text)
        assert response.json()["error"]["type"] == "authentication_error"
    assert fuzzed.loop.run(count_completions(fuzzed.state.store)) == before


@pytest.mark.parametrize(("method", "path", "body", "status", "param"), [
    # vLLM refused these only once generation began: a 500.
    ("POST", "/v1/chat/completions", {"stop": [""]}, 400, "stop[0]"),
    ("POST", "/v1/chat/completions", {"max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
    # Past the store's 32-bit column, or a date before year 1: a 500.
    ("POST", "/v1/policies/10410471802662746587136/promote", None, 400, None),
    ("GET", "/v1/policies/2147483648", None, 400, None),
    ("POST", "/v1/policies/rollback", {"version": 2**31}, 400, "version"),
    ("GET", "/v1/feedback/export?policy=2147483648", None, 422, "policy"),
    ("POST", "/v1/admin/retention", {"older_than_days": 3305451178}, 422, "older_than_days"),
    # 'null' read as no value: every policy's data exported.
    ("GET", "/v1/feedback/export?policy=null", None, 422, "policy"),
    ("GET", "/v1/feedback?since=null", None, 422, "since"),
])
def test_what_fuzzing_found(fuzzed: AppServer, served_model: str, method: str, path: str,
                            body: dict[str, Any] | None, status: int, param: str | None) -> None:
    """The requests schemathesis found answered with a 5xx (or accepted against the schema), each a 4xx now that
    names the field and stores nothing."""
    if path == "/v1/chat/completions":
        body = {"model": served_model, "messages": [{"role": "user", "content": "Hi"}], **(body or {})}
    before = fuzzed.loop.run(count_completions(fuzzed.state.store))
    r = httpx.request(method, f"{fuzzed.url}{path}", json=body, headers=bearer(ADMIN), timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"
    assert fuzzed.loop.run(count_completions(fuzzed.state.store)) == before


def test_healthy_after_fuzzing(fuzzed: AppServer, served_model: str) -> None:
    """Runs after the fuzzing above (file order): probes pass and a chat is served and stored."""
    assert httpx.get(f"{fuzzed.url}/health").status_code == 200
    assert httpx.get(f"{fuzzed.url}/ready").json()["status"] == "ready"
    before = fuzzed.loop.run(count_completions(fuzzed.state.store))
    r = httpx.post(f"{fuzzed.url}/v1/chat/completions", headers=bearer(USER), timeout=120,
                   json={"model": served_model, "max_tokens": 8,
                         "messages": [{"role": "user", "content": "Still there?"}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    assert fuzzed.loop.run(count_completions(fuzzed.state.store)) == before + 1
    # The configured keys still work: fuzzing revoked no key it did not create.
    assert httpx.get(f"{fuzzed.url}/v1/admin/keys", headers=bearer(ADMIN)).status_code == 200
