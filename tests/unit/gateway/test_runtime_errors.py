"""How the runtime names an error in a log line."""

from __future__ import annotations

import ray

from gateway.runtime import _plain


def test_a_failed_ray_task_is_logged_as_what_it_raised_without_rays_coloured_traceback() -> None:
    cause = ValueError("the store said no")
    failed = ray.exceptions.RayTaskError(
        "stop", "\x1b[36mTraceback (most recent call last):\x1b[0m ...", cause
    )
    assert _plain(failed) == "ValueError('the store said no')"
    assert _plain(ray.exceptions.GetTimeoutError("timed out\nand more")) == "GetTimeoutError: timed out"
    assert _plain(TimeoutError()) == "TimeoutError"
