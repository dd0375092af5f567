"""One timer mechanism per shard: a heap of deadlines, not a task per user.

Each user has at most one armed deadline (the earliest of its alarms). Re-arming
pushes a new heap entry and leaves the old one to be skipped when popped
(lazy deletion); the heap is rebuilt when skipped entries outnumber live ones.
"""

from __future__ import annotations

import heapq

# Rebuild the heap once it holds this many more entries than armed users.
COMPACT_SLACK_ENTRIES = 4_096


class DeadlineHeap:
    def __init__(self) -> None:
        self._heap: list[tuple[int, str]] = []
        self._armed: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._armed)

    def arm(self, key: str, deadline_ms: int | None) -> bool:
        """Arm (or disarm, with None) `key`. True when the earliest deadline moved earlier."""
        current = self._armed.get(key)
        if deadline_ms == current:
            return False
        if deadline_ms is None:
            del self._armed[key]
            return False
        earliest = self.next_deadline_ms()
        self._armed[key] = deadline_ms
        heapq.heappush(self._heap, (deadline_ms, key))
        if len(self._heap) > 2 * len(self._armed) + COMPACT_SLACK_ENTRIES:
            self._heap = [(deadline, user) for user, deadline in self._armed.items()]
            heapq.heapify(self._heap)
        return earliest is None or deadline_ms < earliest

    def next_deadline_ms(self) -> int | None:
        heap = self._heap
        while heap and self._armed.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pop_due(self, now_ms: int) -> list[str]:
        """Disarm and return every key whose deadline is at or before `now_ms`, earliest first."""
        due: list[str] = []
        heap = self._heap
        while heap and heap[0][0] <= now_ms:
            deadline, key = heapq.heappop(heap)
            if self._armed.get(key) == deadline:
                del self._armed[key]
                due.append(key)
        return due

    def armed(self, key: str) -> int | None:
        return self._armed.get(key)
