"""schemathesis against the app's own OpenAPI document, over real HTTP, Ray and Postgres.

Every operation gets generated requests; each answer must not be a 5xx and must
match the document: status code, content type, body schema, headers; and
schema-invalid requests must be refused. Schema-valid ones may still be refused
for what the document cannot say (an unknown plan name, a session that is not
the user's), so that one check is off. Internal routes are signed per request.
The stream is left out (it never ends by itself)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.core import NotSet
from schemathesis.specs.openapi.checks import ignored_auth, positive_data_acceptance

from tests.harness import RunningServer, auth, new_user, signed

EXAMPLES_PER_OPERATION = 40


def fuzz(spec: dict[str, Any], base_url: str, user_headers: dict[str, str]) -> dict[str, Counter[int]]:
    """Run every operation's cases (blocking: call it in a thread). Returns the statuses seen."""
    schema = schemathesis.openapi.from_dict(spec)
    seen: dict[str, Counter[int]] = {}
    with httpx.Client(base_url=base_url, timeout=30) as http:
        for result in schema.get_all_operations():
            operation = result.ok()
            if operation.path.endswith("/stream"):
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
            @given(case=operation.as_strategy(GenerationMode.POSITIVE))
            def check(case: Any) -> None:
                # A fresh key per request: the same key with another body is 422, by design.
                headers = {**user_headers, "Idempotency-Key": uuid.uuid4().hex}
                if case.path.startswith("/internal/"):
                    # Signed over the exact bytes sent, as billing would.
                    body = None if isinstance(case.body, NotSet) else case.body
                    content = json.dumps(body).encode() if body is not None else b""
                    headers = {**signed(content.decode())[1], "Idempotency-Key": headers["Idempotency-Key"]}
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
                # cannot tell a valid one it did not make from a made-up one.
                internal = case.path.startswith("/internal/")
                excluded = [positive_data_acceptance, *([ignored_auth] if internal else [])]
                case.validate_response(response, excluded_checks=excluded)

            check()
    return seen


async def test_generated_requests_get_documented_answers_and_no_5xx(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    spec = (await client.get("/openapi.json")).json()
    seen = await asyncio.to_thread(fuzz, spec, server.base_url, auth(new_user()))
    assert len(seen) >= 15, sorted(seen)
    total = sum(sum(statuses.values()) for statuses in seen.values())
    statuses = dict(sum(seen.values(), Counter()))
    print(f"schemathesis: {len(seen)} operations, {total} requests, statuses {statuses}")
