"""One shared, read-only empty mapping for the per-user containers that are usually empty.

Most resident users have no meters, no remembered replies, no ended sessions kept and nothing
waiting to be written. An empty `dict` is 64 bytes, and a ledger had eight of them: ~0.5 KB of
a resident user's ~1.4 KB. Each such container starts as `EMPTY` and becomes a dict of its own
on its first write (`writable`), and goes back to `EMPTY` when emptied (`or EMPTY`).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, TypeVar

K = TypeVar("K")
V = TypeVar("V")

EMPTY: Mapping[Any, Any] = MappingProxyType({})


def writable(mapping: Mapping[K, V]) -> dict[K, V]:
    """`mapping` itself if it is a dict of its own, else a new empty dict to write into."""
    if type(mapping) is dict:
        return mapping
    assert not mapping, "only the shared EMPTY is replaced"
    return {}
