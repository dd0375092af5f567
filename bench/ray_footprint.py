"""`python -m bench.ray_footprint`: what a local Ray costs a small node, as `usage-ledger serve`
starts it now (`after`) and as it did before issue 17 (`before`).

    .venv/bin/python -m bench.ray_footprint            # 3 runs of each variant, alternating
    .venv/bin/python -m bench.ray_footprint --runs 1 --shards 1

Each run is a fresh process (`--one VARIANT`): it starts a local Ray with the variant's options,
creates the real shard actors (`actors.hosting`) on a real Postgres and waits until every one has
started; lets the node settle, then reads its own process tree (Ray's processes, the shards, the
driver): resident memory (RSS, which counts a page shared by N processes N times, and USS, the
pages private to each process: what stopping it would free), the process count, and the CPU the
tree uses while idle. Then it kills the shards and shuts Ray down. Postgres:
`LEDGER_BENCH_DATABASE_URL`, else an embedded server of its own. Prints one JSON report (every
run, and each variant's medians) and a table of the medians. The machine's other load shows in
the times and the CPU; the memory figures hardly move from run to run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from bench.server import bench_database
from bench.shards import ShardCluster
from gateway.runtime import local_ray_options, migrate_database
from gateway.settings import Settings

# After the shards are ready: Ray starts (and reaps) helper processes for a moment yet.
SETTLE_S = 3.0
IDLE_CPU_WINDOW_S = 5.0
RUN_TIMEOUT_S = 180.0
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _before(settings: Settings) -> dict[str, Any]:
    """What `serve` passed to `ray.init` before issue 17."""
    return {
        "address": "local",
        "namespace": settings.ray_namespace,
        "include_dashboard": False,
        "logging_level": logging.WARNING,
    }


VARIANTS: dict[str, Callable[[Settings], dict[str, Any]]] = {"before": _before, "after": local_ray_options}

# A process's role, by a fragment of its command line (the first that matches).
ROLES = (
    ("gcs_server", "gcs_server"),
    ("raylet/raylet", "raylet"),
    ("dashboard/dashboard.py", "dashboard (API server)"),
    ("ray::DashboardAgent", "DashboardAgent"),
    ("ray::RuntimeEnvAgent", "RuntimeEnvAgent"),
    ("log_monitor.py", "log_monitor"),
    ("monitor.py", "autoscaler monitor"),
    ("ray::IDLE", "idle worker"),
    ("Shard", "shard"),
)


def _process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


def _field_kib(path: str, name: str) -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith(name):
            return int(line.split()[1])
    return 0


def _cpu_ticks(pids: list[int]) -> int:
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks


def _role(pid: int) -> str:
    if pid == os.getpid():
        return "driver"
    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return next((role for fragment, role in ROLES if fragment in command), command[:40])


def _snapshot() -> dict[str, Any]:
    pids = _process_tree(os.getpid())
    ticks = _cpu_ticks(pids)
    time.sleep(IDLE_CPU_WINDOW_S)
    idle_cpu = (_cpu_ticks(pids) - ticks) / CLOCK_TICKS_PER_S / IDLE_CPU_WINDOW_S
    rss_by_role: dict[str, float] = {}
    rss_kib = uss_kib = processes = 0
    for pid in _process_tree(os.getpid()):
        try:
            rss = _field_kib(f"/proc/{pid}/status", "VmRSS:")
            rollup = f"/proc/{pid}/smaps_rollup"
            uss_kib += _field_kib(rollup, "Private_Clean:") + _field_kib(rollup, "Private_Dirty:")
            role = _role(pid)
        except OSError:
            continue  # gone meanwhile
        rss_kib += rss
        processes += 1
        rss_by_role[role] = round(rss_by_role.get(role, 0) + rss / 1024, 1)
    return {
        "rss_mb": round(rss_kib / 1024, 1),
        "uss_mb": round(uss_kib / 1024, 1),
        "processes": processes,
        "idle_cpu_percent": round(100 * idle_cpu, 1),
        "rss_mb_by_role": dict(sorted(rss_by_role.items())),
    }


def run_one(variant: str, database_url: str, shards: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ledger-bench-footprint-") as workdir:
        cluster = ShardCluster(database_url, shards, Path(workdir))
        began = time.perf_counter()
        ray.init(**VARIANTS[variant](cluster.settings))
        try:
            initialised = time.perf_counter()
            cluster.create()
            asyncio.run(cluster.ready())
            ready = time.perf_counter()
            time.sleep(SETTLE_S)
            report = {
                "variant": variant,
                "init_s": round(initialised - began, 2),
                "shards_ready_s": round(ready - began, 2),
                **_snapshot(),
            }
            asyncio.run(cluster.stop())
            return report
        finally:
            ray.shutdown()


def _run_child(variant: str, database_url: str, shards: int) -> dict[str, Any]:
    env = {**os.environ, "LEDGER_BENCH_DATABASE_URL": database_url}
    command = [sys.executable, "-m", "bench.ray_footprint", "--one", variant, f"--shards={shards}"]
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    try:
        out, _ = child.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.terminate()  # the driver's SIGTERM handler exits, and Ray's processes with it
        child.communicate(timeout=30)
        raise
    if child.returncode != 0:
        raise RuntimeError(f"{variant} run failed (exit {child.returncode})")
    report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return report


MEDIAN_FIELDS = ("rss_mb", "uss_mb", "processes", "idle_cpu_percent", "init_s", "shards_ready_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each variant")
    parser.add_argument("--shards", type=int, default=4, help="shard actors (serve's default: 4)")
    parser.add_argument("--one", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, os.environ["LEDGER_BENCH_DATABASE_URL"], args.shards)), flush=True)
        return
    runs: list[dict[str, Any]] = []
    with bench_database() as database_url:
        asyncio.run(migrate_database(database_url, Settings(database_url=database_url)))
        for number in range(args.runs):
            for variant in VARIANTS:
                runs.append(_run_child(variant, database_url, args.shards))
                print(f"run {number + 1} {variant}: {runs[-1]}", file=sys.stderr, flush=True)
    medians = {
        variant: {
            field: statistics.median(run[field] for run in runs if run["variant"] == variant)
            for field in MEDIAN_FIELDS
        }
        for variant in VARIANTS
    }
    print(json.dumps({"shards": args.shards, "runs": runs, "medians": medians}, indent=2))
    print(f"\nmedians of {args.runs} runs, {args.shards} shards | " + " | ".join(MEDIAN_FIELDS))
    for variant, values in medians.items():
        print(f"{variant:>6} | " + " | ".join(f"{values[field]:g}" for field in MEDIAN_FIELDS))


if __name__ == "__main__":
    main()
