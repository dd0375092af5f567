"""Hosting shards on Ray: the one module that applies `ray.remote`.

Shards are named, detached actors (`ledger-shard-{index}-of-{count}` in the
configured namespace), so every gateway process of a cluster reaches the same
ones and a user has exactly one writer. Ray restarts a shard whose process
dies (`max_restarts=-1`); tasks are never retried automatically
(`max_task_retries=0`), because only the caller knows whether a call is safe
to repeat. A restarted shard starts itself at once, so it rebuilds its users
and re-arms their alarms without waiting for a request.

Shards are spread over the cluster's nodes (`SPREAD`): they ask for no CPU, so
without it Ray would put them wherever their creation request happened to land.
When a node is lost, Ray restarts its shards on the nodes that are left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import ray

from actors.logsetup import LogFormat, configure_logging
from actors.shard import LedgerShard, ShardConfig
from actors.store import LedgerStore

# Ray's own bound on concurrent calls per actor; the shard's `max_pending_calls`
# (checked first) stays below it so overload is refused by name, not queued.
RAY_MAX_CONCURRENCY = 20_000


def shard_name(index: int, count: int) -> str:
    return f"ledger-shard-{index}-of-{count}"


class _HostedShard(LedgerShard):
    def __init__(
        self,
        config: ShardConfig,
        store_factory: Callable[[], Awaitable[LedgerStore]],
        log_format: LogFormat,
        log_level: str,
    ) -> None:
        configure_logging(log_format=log_format, level=log_level)
        super().__init__(config, store_factory)
        # Ray runs an async actor's __init__ on the actor's event loop.
        self._boot = asyncio.get_running_loop().create_task(self.start())

    def pid(self) -> int:
        import os

        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this shard runs on (hex)."""
        return str(ray.get_runtime_context().get_node_id())


# Ray's typed overloads list task options only; the actor options below are valid.
ShardActor = ray.remote(  # type: ignore[call-overload]
    max_restarts=-1,
    max_task_retries=0,
    num_cpus=0,
    max_concurrency=RAY_MAX_CONCURRENCY,
    scheduling_strategy="SPREAD",
)(_HostedShard)


def get_or_create_shards(
    *,
    namespace: str,
    configs: Sequence[ShardConfig],
    store_factory: Callable[[], Awaitable[LedgerStore]],
    log_format: LogFormat,
    log_level: str,
) -> list[Any]:
    """Handles to the shards, creating those that do not exist yet. Blocking (talks to Ray's GCS)."""
    handles = []
    for config in configs:
        assert config.shard_count == len(configs), "one config per shard"
        name = shard_name(config.shard_index, config.shard_count)
        handle = ShardActor.options(
            name=name,
            namespace=namespace,
            lifetime="detached",
            get_if_exists=True,
        ).remote(replace(config, owner=f"{namespace}/{name}"), store_factory, log_format, log_level)
        handles.append(handle)
    return handles


def other_shard_counts(namespace: str, count: int) -> set[int]:
    """Shard counts other than `count` that have live shards in `namespace`. Blocking."""
    found = set()
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") != namespace:
            continue
        name = entry.get("name", "")
        if name.startswith("ledger-shard-") and "-of-" in name:
            other = int(name.rsplit("-of-", 1)[1])
            if other != count:
                found.add(other)
    return found


def kill_shards(handles: Sequence[Any]) -> None:
    """Kill shards for good (no restart). Blocking. Their unflushed state is lost: flush first."""
    for handle in handles:
        ray.kill(handle, no_restart=True)
