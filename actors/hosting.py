"""Hosting shards on Ray: the one module that applies `ray.remote`.

Shards are named, detached actors (`ledger-shard-{index}` in the configured
namespace), so every gateway process of a cluster reaches the same ones; which
users each serves is the shard map (`actors.routing`), so a user has exactly
one writer however many shards there are. Ray restarts a shard whose process
dies (`max_restarts=-1`); tasks are never retried automatically
(`max_task_retries=0`), because only the caller knows whether a call is safe
to repeat. A restarted shard starts itself at once, so it rebuilds its users
and re-arms their alarms without waiting for a request.

Shards are spread over the cluster's nodes (`SPREAD`): they ask for no CPU, so
without it Ray would put them wherever their creation request happened to land.
When a node is lost, Ray restarts its shards on the nodes that are left.

Each activation also serves the data plane (`actors.channel`): once started it
listens on a Unix socket and a TCP port, and tells gateways where (`channel`)
over Ray. The channel's secret is made when the shards are created and given
to every activation of a shard (Ray restarts an actor with the same
arguments); gateways learn it from `channel`, so only a Ray caller can dial.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import stat
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray

from actors import wire
from actors.channel import ChannelServer
from actors.errors import Unavailable
from actors.logsetup import LogFormat, configure_logging
from actors.processes import alive, freeze_long_lived
from actors.routing import shard_name
from actors.shard import LedgerShard, ShardConfig
from actors.store import LedgerStore

# Ray's own bound on concurrent calls per actor; the shard's `max_pending_calls`
# (checked first) stays below it so overload is refused by name, not queued.
RAY_MAX_CONCURRENCY = 20_000
CHANNEL_SECRET_BYTES = 32


class _HostedShard(LedgerShard):
    def __init__(
        self,
        config: ShardConfig,
        store_factory: Callable[[], Awaitable[LedgerStore]],
        log_format: LogFormat,
        log_level: str,
        channel_secret: bytes,
    ) -> None:
        configure_logging(log_format=log_format, level=log_level)
        super().__init__(config, store_factory)
        self._channel = ChannelServer(
            self.answer, epoch=0, secret=channel_secret, shard_index=config.shard_index
        )
        self._channel_address: asyncio.Task[wire.ChannelAddress] | None = None
        # This process serves this shard from now on (see `freeze_long_lived`).
        freeze_long_lived()
        # Ray runs an async actor's __init__ on the actor's event loop.
        self._boot = asyncio.get_running_loop().create_task(self.start())

    async def channel(self) -> wire.ChannelAddress:
        """Where this activation serves the data plane (listening from the first call on)."""
        try:
            async with asyncio.timeout(self._config.start_wait_s):
                await asyncio.shield(self._boot)
        except TimeoutError:
            raise Unavailable("shard is still starting (storage unreachable?)") from None
        if not self._is_running():
            raise self._refusal() or Unavailable("shard is shutting down")
        if self._channel_address is None:
            epoch = self.epoch
            assert epoch is not None, "a hosted shard is fenced (it has an owner)"
            self._channel.epoch = epoch
            self._channel_address = asyncio.get_running_loop().create_task(
                self._channel.open(
                    node_id=self.node_id(),
                    host=ray.util.get_node_ip_address(),  # type: ignore[no-untyped-call]
                    socket_dir=_socket_dir(self._config.shard_index),
                )
            )
        return await asyncio.shield(self._channel_address)

    def channel_stats(self) -> dict[str, int]:
        return {
            "connections": self._channel.connections,
            "calls": self._channel.calls,
            "refused": self._channel.refused,
        }

    def _left_service(self) -> None:
        self._channel.close()

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this shard runs on (hex)."""
        return str(ray.get_runtime_context().get_node_id())


def _socket_dir(shard_index: int) -> Path:
    """Where this node's shards put their Unix sockets (short: a socket path is at most 107 bytes):
    a directory of this user's alone (refused otherwise: whoever could write in it could stand in
    for a shard), without the sockets of this shard's activations that died."""
    path = Path(tempfile.gettempdir()) / f"usage-ledger-{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    found = path.lstat()
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o077:
        raise Unavailable(f"{path} must be a directory of this user's alone (mode 0700)")
    for old in path.glob(f"shard-{shard_index}-*.sock"):
        pid = old.stem.rsplit("-", 1)[-1]
        if pid.isdigit() and not alive(int(pid)):
            old.unlink(missing_ok=True)
    return path


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
        name = shard_name(config.shard_index)
        handle = ShardActor.options(
            name=name,
            namespace=namespace,
            lifetime="detached",
            get_if_exists=True,
        ).remote(
            replace(config, owner=f"{namespace}/{name}"),
            store_factory,
            log_format,
            log_level,
            secrets.token_bytes(CHANNEL_SECRET_BYTES),
        )
        handles.append(handle)
    return handles


def get_shard(namespace: str, index: int) -> Any:
    """The handle of a shard another process created (a resize's). Blocking; `ValueError` if none."""
    return ray.get_actor(shard_name(index), namespace=namespace)


def legacy_shards(namespace: str) -> list[str]:
    """Shards of an older version in `namespace` (named `ledger-shard-i-of-n`, in no map). Blocking."""
    return [
        entry["name"]
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry.get("namespace") == namespace and "-of-" in entry.get("name", "")
    ]


def kill_shards(handles: Sequence[Any]) -> None:
    """Kill shards for good (no restart). Blocking. Their unflushed state is lost: flush first."""
    for handle in handles:
        ray.kill(handle, no_restart=True)
