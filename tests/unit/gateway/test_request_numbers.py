"""Request integers: JSON's 3.0 is the integer 3; strings, booleans and fractions are refused."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.schemas import HeartbeatRequest, MeterConsumeRequest


@pytest.mark.parametrize(
    ("body", "amount"), [('{"amount": 3}', 3), ('{"amount": 3.0}', 3), ('{"amount": 1e2}', 100)]
)
def test_whole_numbers_are_integers(body: str, amount: int) -> None:
    assert MeterConsumeRequest.model_validate_json(body).amount == amount


@pytest.mark.parametrize(
    "body", ['{"amount": 3.5}', '{"amount": "3"}', '{"amount": true}', '{"amount": 0.0}', '{"amount": null}']
)
def test_anything_else_is_refused(body: str) -> None:
    with pytest.raises(ValidationError):
        MeterConsumeRequest.model_validate_json(body)


def test_heartbeat_seq_follows_the_same_rule() -> None:
    assert HeartbeatRequest.model_validate_json('{"seq": 7.0}').seq == 7
    with pytest.raises(ValidationError):
        HeartbeatRequest.model_validate_json('{"seq": "7"}')
