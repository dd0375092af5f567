"""LEDGER_INTERNAL_PORT: internal routes answer only on their own listener, user routes only on the other."""

from __future__ import annotations

import httpx

from tests.harness import ServerFactory, auth, change_plan, new_user, signed


async def test_each_listener_serves_only_its_own_routes(start_server: ServerFactory) -> None:
    server = await start_server(internal_listener=True)
    assert server.internal_url is not None
    user = new_user()
    async with (
        server.client() as public,
        httpx.AsyncClient(base_url=server.internal_url, timeout=30) as internal,
    ):
        hidden = await change_plan(public, user, "pro")
        assert hidden.status_code == 404, "a signed internal call on the public port finds nothing"
        unsigned = await public.get(f"/internal/v1/users/{user}/usage")
        assert unsigned.status_code == 404, "404 before 401: the public port says nothing of internal routes"
        assert (await change_plan(internal, user, "pro")).status_code == 200
        usage = await internal.get(f"/internal/v1/users/{user}/usage", headers=signed("")[1])
        assert usage.status_code == 200 and usage.json()["plan"] == "pro"
        assert (await internal.get(f"/internal/v1/users/{user}/usage")).status_code == 401
        assert (await public.get("/v1/usage", headers=auth(user))).json()["plan"] == "pro"
        assert (await internal.get("/v1/usage", headers=auth(user))).status_code == 404
        for listener in (public, internal):
            assert (await listener.get("/healthz")).status_code == 200
            assert (await listener.get("/metrics")).status_code == 200
    await server.stop()
