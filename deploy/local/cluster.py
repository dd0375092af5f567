"""A two-node Ray cluster, two gateways and Postgres on this machine, as deploy/README.md describes.

    .venv/bin/python deploy/local/cluster.py            # start everything; Ctrl-C stops it all
    .venv/bin/python deploy/local/cluster.py --check    # start, show one user's ledger is shared, stop

- Ray: a head node and a second node (`ray start --block`, each its own raylet), joined with a
  generated auth token; the shards spread over both.
- Postgres: `LEDGER_DATABASE_URL` if set, else an embedded one under `deploy/local/.run/`.
- Gateways: two `usage-ledger serve` processes (ports 8101 and 8102, internal routes on 8111 and
  8112), both Ray drivers attached to the cluster, sharing secrets and `LEDGER_SHARDS`.

`--check` starts a session for one user through gateway 1, heartbeats it alternately through
both gateways, ends it through gateway 2, and checks that every answer came from the same
ledger (the same session, a version that only goes up) and that the cluster has two nodes.
Then it resizes the shards 4 -> 6 through gateway 1 and 6 -> 3 through gateway 2 while eight
users heartbeat through both gateways, and checks that every answer was a 200 (or a retried 503,
at most 2%), that each session was billed once, and that both gateways route by the same map.
Only the processes this script started are stopped (never `ray stop`, which would stop every
Ray on the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
RUN = HERE / ".run"
BIN = Path(sys.executable).parent
RAY_PORT = 6395
GATEWAYS = ((8101, 8111), (8102, 8112))
START_TIMEOUT_S = 180


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="show the shared ledger, then stop")
    args = parser.parse_args()
    RUN.mkdir(exist_ok=True)
    processes: list[subprocess.Popen[bytes]] = []
    postgres = None
    try:
        env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
        database_url = os.environ.get("LEDGER_DATABASE_URL")
        if database_url is None:
            from persistence.embedded import EmbeddedPostgres, ensure_database

            postgres = EmbeddedPostgres(RUN / "pg")
            admin = postgres.start()
            asyncio.run(ensure_database(admin, "ledger_local"))
            database_url = postgres.dsn("ledger_local")
        print(f"postgres: {database_url.split('@')[-1]}", flush=True)

        ray = str(BIN / "ray")
        common = ["--num-cpus=2", "--disable-usage-stats", "--block"]
        processes.append(
            _start(
                [ray, "start", "--head", f"--port={RAY_PORT}", "--include-dashboard=false", *common],
                env,
                "ray-head",
            )
        )
        _wait_for_nodes(env, 1)
        processes.append(_start([ray, "start", f"--address=127.0.0.1:{RAY_PORT}", *common], env, "ray-node"))
        _wait_for_nodes(env, 2)
        print("ray: two nodes", flush=True)

        jwt_secret = secrets.token_hex(32)
        gateway_env = {
            **env,
            "LEDGER_RAY_ADDRESS": f"127.0.0.1:{RAY_PORT}",
            "LEDGER_RAY_NAMESPACE": "usage-ledger-local",
            "LEDGER_DATABASE_URL": database_url,
            "LEDGER_JWT_SECRET": jwt_secret,
            "LEDGER_INTERNAL_SECRET": "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode(),
            "LEDGER_SHARDS": "4",
            "LEDGER_DATA_DIR": str(RUN / "data"),
        }
        for port, internal_port in GATEWAYS:
            gateway = {**gateway_env, "LEDGER_PORT": str(port), "LEDGER_INTERNAL_PORT": str(internal_port)}
            processes.append(_start([str(BIN / "usage-ledger"), "serve"], gateway, f"gateway-{port}"))
        for port, internal_port in GATEWAYS:
            _wait_ready(f"http://127.0.0.1:{internal_port}")
            print(f"gateway: http://127.0.0.1:{port} (internal http://127.0.0.1:{internal_port})", flush=True)
        (RUN / "env.json").write_text(json.dumps({"LEDGER_JWT_SECRET": jwt_secret}))
        if args.check:
            return _check(gateway_env, jwt_secret)
        print("running; logs in deploy/local/.run/; Ctrl-C stops everything", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    finally:
        for process in reversed(processes):  # gateways first: each flushes the shards on the way out
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
        if postgres is not None:
            postgres.stop()


def _start(command: list[str], env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
    log = (RUN / f"{name}.log").open("wb")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def _nodes(env: dict[str, str]) -> int:
    probe = (
        f"import ray; ray.init(address='127.0.0.1:{RAY_PORT}', logging_level='ERROR'); "
        "print(sum(1 for node in ray.nodes() if node['Alive']))"
    )
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 and done.stdout.strip() else 0


def _wait_for_nodes(env: dict[str, str], count: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while _nodes(env) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"the Ray cluster did not reach {count} nodes; see deploy/local/.run/ray-*.log")
        time.sleep(1)


def _wait_ready(base: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{base} did not become ready; see deploy/local/.run/gateway-*.log")
        time.sleep(1)


def _check(env: dict[str, str], jwt_secret: str) -> int:
    from gateway.auth import issue_token

    headers = {"Authorization": f"Bearer {issue_token(secret=jwt_secret, user_id='local-check', ttl_s=600)}"}
    first, second = (f"http://127.0.0.1:{port}" for port, _ in GATEWAYS)
    with httpx.Client(headers=headers, timeout=30) as http:
        started = http.post(f"{first}/v1/sessions", json={"topic": "two gateways"})
        assert started.status_code == 201, started.text
        session_id = started.json()["session_id"]
        versions = [started.json()["version"]]
        for beat in range(1, 7):
            gateway = (first, second)[beat % 2]
            time.sleep(0.5)
            answer = http.post(f"{gateway}/v1/sessions/{session_id}/heartbeat", json={"seq": beat})
            assert answer.status_code == 200, answer.text
            assert answer.json()["session_id"] == session_id
            versions.append(answer.json()["version"])
            minutes = answer.json()["session_minutes"]
            print(f"heartbeat {beat} via {gateway}: version {versions[-1]}, {minutes} min")
        ended = http.post(f"{second}/v1/sessions/{session_id}/end")
        assert ended.status_code == 200 and ended.json()["end_reason"] == "user_ended", ended.text
        versions.append(ended.json()["version"])
        seen_by_first = http.get(f"{first}/v1/usage").json()
        # Users on every shard, through both gateways: the data plane reaches the shards on the other
        # node over TCP (and those on the gateways' own node on their Unix sockets).
        for index in range(16):
            token = issue_token(secret=jwt_secret, user_id=f"local-{index}", ttl_s=600)
            other = {"Authorization": f"Bearer {token}"}
            for gateway in (first, second):
                assert http.get(f"{gateway}/v1/usage", headers=other).status_code == 200
        connects = {
            via: sum(_metric(http.get(f"{gateway}/metrics").text, via) for gateway in (first, second))
            for via in ("unix", "tcp")
        }
    assert connects["tcp"] >= 1, connects
    assert versions == sorted(versions) and len(set(versions)) == len(versions), versions
    assert seen_by_first["version"] == versions[-1] and seen_by_first["active_session"] is None
    nodes = _nodes(env)
    assert nodes == 2, nodes
    print(
        f"one ledger through both gateways: versions {versions}; {nodes} Ray nodes; "
        f"data-plane connections {connects}. OK",
        flush=True,
    )
    asyncio.run(_check_resize(env, jwt_secret))
    return 0


async def _check_resize(env: dict[str, str], jwt_secret: str) -> None:
    """Users heartbeat through both gateways while gateway 1 resizes 4 -> 6 and gateway 2 resizes
    6 -> 3: every answer is a 200 or a retried 503 (at most 2%), each session is billed once for the
    time it ran, and both gateways end up routing by the same map."""
    from gateway.auth import issue_token, signed_headers

    secret = env["LEDGER_INTERNAL_SECRET"]
    gateways = [f"http://127.0.0.1:{port}" for port, _ in GATEWAYS]
    internals = [f"http://127.0.0.1:{internal}" for _, internal in GATEWAYS]
    users = [f"resize-{index}" for index in range(8)]
    tokens = {user: issue_token(secret=jwt_secret, user_id=user, ttl_s=600) for user in users}
    statuses: dict[int, int] = {}

    def signed(body: str) -> dict[str, str]:
        return signed_headers(secret, body)

    async def resize(http: httpx.AsyncClient, internal: str, count: int) -> dict[str, object]:
        body = json.dumps({"count": count})
        answer = await http.post(f"{internal}/internal/v1/shards", content=body, headers=signed(body))
        assert answer.status_code == 202, answer.text
        while True:
            await asyncio.sleep(0.3)
            found: dict[str, object] = (
                await http.get(f"{internal}/internal/v1/shards", headers=signed(""))
            ).json()
            assert found["error"] is None, found
            if not found["moving"]:
                return found

    async with httpx.AsyncClient(timeout=30) as http:
        began, sessions = time.monotonic(), {}
        for user in users:
            started = await http.post(
                f"{gateways[0]}/v1/sessions", json={}, headers={"Authorization": f"Bearer {tokens[user]}"}
            )
            assert started.status_code == 201, started.text
            sessions[user] = started.json()["session_id"]
        beating = True

        async def beat(user: str) -> None:
            turn = 0
            while beating:
                turn += 1
                url = f"{gateways[turn % 2]}/v1/sessions/{sessions[user]}/heartbeat"
                for _ in range(20):
                    answer = await http.post(
                        url, json={}, headers={"Authorization": f"Bearer {tokens[user]}"}
                    )
                    statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
                    if answer.status_code != 503:
                        break
                    await asyncio.sleep(0.1)
                assert answer.status_code == 200 and answer.json()["state"] == "active", answer.text
                await asyncio.sleep(0.3)

        beaters = [asyncio.create_task(beat(user)) for user in users]
        grown = await resize(http, internals[0], 6)
        shrunk = await resize(http, internals[1], 3)
        beating = False
        await asyncio.gather(*beaters)
        ran_min = (time.monotonic() - began) / 60
        for index, user in enumerate(users):
            ended = await http.post(
                f"{gateways[index % 2]}/v1/sessions/{sessions[user]}/end",
                json={},
                headers={"Authorization": f"Bearer {tokens[user]}"},
            )
            assert ended.status_code == 200, ended.text
            billed = ended.json()["session_minutes"]
            assert abs(billed - ran_min) < 0.05, (user, billed, ran_min)
        maps = [
            (await http.get(f"{internal}/internal/v1/shards", headers=signed(""))).json()
            for internal in internals
        ]
    answered = sum(statuses.values())
    assert set(statuses) <= {200, 503} and statuses.get(503, 0) <= 0.02 * answered, statuses
    assert grown["count"] == 6 and shrunk["count"] == 3, (grown, shrunk)
    assert maps[0]["epoch"] == maps[1]["epoch"] and maps[0]["count"] == maps[1]["count"] == 3, maps
    print(
        f"resized 4 -> 6 through gateway 1 and 6 -> 3 through gateway 2 while {len(users)} users "
        f"heartbeat through both: answers {statuses}; sessions billed once ({ran_min:.2f} min). OK",
        flush=True,
    )


def _metric(text: str, via: str) -> float:
    """The gateway's `ledger_channel_connects_total{via=...}` from its /metrics."""
    prefix = f'ledger_channel_connects_total{{via="{via}"}} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


if __name__ == "__main__":
    sys.exit(main())
