"""schemathesis against the app's own OpenAPI document, over real HTTP, Ray and Postgres.

Every operation gets generated requests, in two runs: schema-valid (positive)
and schema-invalid (negative: a wrong body, parameter, key, or an unknown query
parameter). Each answer must not be a 5xx and must match the document: status
code, content type, body schema, headers; and every schema-invalid request must
be refused. Schema-valid ones may still be refused for what the document cannot
say (an unknown plan name, a session that is not the user's), so that one check
is off. Internal routes are signed per request. The stream is left out (it never
ends by itself), and so is a resize (it would resize the server other tests share)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core import NotSet
from schemathesis.specs.openapi.checks import (
    ignored_auth,
    negative_data_rejection,
    positive_data_acceptance,
)

from tests.harness import RunningServer, auth, new_user, signed

EXAMPLES_PER_OPERATION = 40


def fuzz(
    spec: dict[str, Any], base_url: str, user_headers: dict[str, str], mode: GenerationMode
) -> dict[str, Counter[int]]:
    """Run every operation's cases (blocking: call it in a thread). Returns the statuses seen."""
    schema = schemathesis.openapi.from_dict(spec)
    # The bearer token is this test's to give (a made-up one is simply 401, checked elsewhere), so
    # negative cases put their invalid part where it tests something: a body, a parameter, a key.
    schema.config.generation.update(with_security_parameters=False)
    seen: dict[str, Counter[int]] = {}
    with httpx.Client(base_url=base_url, timeout=30) as http:
        for result in schema.get_all_operations():
            operation = result.ok()
            if operation.path.endswith("/stream"):
                continue
            if operation.method.upper() == "POST" and operation.path == "/internal/v1/shards":
                # A valid case would resize the server every other test shares (test_resize.py
                # resizes its own, and checks what is refused).
                continue
            statuses: Counter[int] = Counter()
            seen[operation.label] = statuses

            @settings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(mode))
            def check(case: Any) -> None:
                # A fresh key per request: the same key with another body is 422, by design. In
                # negative mode the case's own (invalid) headers win: they are what is tested.
                headers = {**user_headers, "Idempotency-Key": uuid.uuid4().hex}
                if mode is GenerationMode.NEGATIVE:
                    headers.update(case.headers or {})
                if case.path.startswith("/internal/"):
                    # Signed over the exact bytes sent, as billing would.
                    body = None if isinstance(case.body, NotSet) else case.body
                    if isinstance(body, bytes):  # a negative case's raw body: signed if it is text
                        content = body
                    else:
                        content = json.dumps(body).encode() if body is not None else b""
                    text = content.decode("utf-8", errors="replace")
                    headers = {**signed(text)[1], "Idempotency-Key": headers["Idempotency-Key"]}
                    response = http.request(
                        case.method,
                        case.formatted_path,
                        params=case.query,
                        content=content,
                        headers={**headers, "content-type": "application/json"},
                    )
                else:
                    response = case.call(base_url=base_url, headers=headers)
                statuses[response.status_code] += 1  # noqa: B023 (check() runs within this iteration)
                assert response.status_code < 500, (
                    f"{case.method} {case.formatted_path}: {response.text[:300]}"
                )
                # Signatures are checked by tests/integration/test_internal.py; schemathesis
                # cannot tell a valid one it did not make from a made-up one. Internal requests are
                # signed here, which makes a case whose invalid part was a webhook header valid,
                # so "invalid data is rejected" is not checked for them (their bodies are, there).
                internal = case.path.startswith("/internal/")
                excluded = [positive_data_acceptance]
                if internal:
                    excluded += [ignored_auth, negative_data_rejection]
                case.validate_response(response, excluded_checks=excluded)

            try:
                check()
            except Unsatisfiable:
                if mode is not GenerationMode.NEGATIVE:
                    raise
                del seen[operation.label]  # nothing in it can be made invalid (no body, no parameter)
    return seen


@pytest.mark.parametrize(
    "mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"]
)
async def test_generated_requests_get_documented_answers_and_no_5xx(
    server: RunningServer, client: httpx.AsyncClient, mode: GenerationMode
) -> None:
    spec = (await client.get("/openapi.json")).json()
    seen = await asyncio.to_thread(fuzz, spec, server.base_url, auth(new_user()), mode)
    assert len(seen) >= (15 if mode is GenerationMode.POSITIVE else 10), sorted(seen)
    total = sum(sum(statuses.values()) for statuses in seen.values())
    statuses = dict(sum(seen.values(), Counter()))
    print(f"schemathesis {mode.value}: {len(seen)} operations, {total} requests, statuses {statuses}")
