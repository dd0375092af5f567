"""How the runtime names an error in a log line."""

from __future__ import annotations

import ray

from gateway.runtime import describe_error


def test_a_failed_ray_task_is_logged_as_what_it_raised_without_rays_coloured_traceback() -> None:
    cause = ValueError("the store said no")
    failed = ray.exceptions.RayTaskError(
        "stop", "\x1b[36mTraceback (most recent call last):\x1b[0m ...", cause
    )
    assert describe_error(failed) == "ValueError('the store said no')"
    timed_out = ray.exceptions.GetTimeoutError("timed out\nand more")
    assert describe_error(timed_out) == "GetTimeoutError: timed out"
    assert describe_error(TimeoutError()) == "TimeoutError"
