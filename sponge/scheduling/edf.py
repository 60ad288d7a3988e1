"""Earliest-deadline-first request queue: a bounded binary heap keyed by (deadline, arrival order).

Pure data structure (no clocks, no I/O): times are passed in, in milliseconds on one monotonic clock.
The live server and the simulator use the same class. Each entry knows its `size` in images (a request's
first-axis rows, what l(b, c) counts); the queue keeps the total (`images`). Capacity counts requests.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """The queue holds `capacity` requests already; the caller should answer 503 + Retry-After."""


@dataclass(order=True)
class Entry(Generic[T]):
    """One queued request. Ordering key: deadline, then arrival sequence (FIFO among equal deadlines)."""

    deadline_ms: float
    seq: int
    arrival_ms: float = field(compare=False)
    payload: T = field(compare=False)
    size: int = field(default=1, compare=False)  # images (first-axis rows) this request carries
    # Batch-compatibility class: entries may share a batch only if their keys are equal (e.g. the inputs'
    # dtypes and non-batch dims, for a model with a second variable dimension). None for all: one class.
    key: object = field(default=None, compare=False)


class EDFQueue(Generic[T]):
    """Bounded EDF queue. `push` is O(log n); `pop` takes the earliest deadline."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._heap: list[Entry[T]] = []
        self._seq = itertools.count()
        self.images = 0  # total size of the queued entries

    def __len__(self) -> int:
        return len(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)

    def __iter__(self) -> Iterator[Entry[T]]:
        """Entries in EDF order (a sorted copy; O(n log n), for observation, not the hot path)."""
        return iter(sorted(self._heap))

    def push(self, payload: T, deadline_ms: float, arrival_ms: float, size: int = 1, key: object = None) -> Entry[T]:
        if len(self._heap) >= self.capacity:
            raise QueueFull(f"queue is full ({self.capacity} requests waiting)")
        if size < 1:
            raise ValueError(f"an entry's size must be >= 1 image, got {size}")
        entry = Entry(deadline_ms, next(self._seq), arrival_ms, payload, size, key)
        heapq.heappush(self._heap, entry)
        self.images += size
        return entry

    def requeue(self, entries: list[Entry[T]]) -> None:
        """Put back entries popped from this queue (unchanged: same deadline and arrival order, so they
        keep their EDF position). No capacity check: they were counted when first pushed."""
        for e in entries:
            heapq.heappush(self._heap, e)
            self.images += e.size

    def peek(self) -> Entry[T] | None:
        return self._heap[0] if self._heap else None

    def pop(self) -> Entry[T]:
        entry = heapq.heappop(self._heap)
        self.images -= entry.size
        return entry

    def pop_many(self, n: int) -> list[Entry[T]]:
        """Up to `n` entries from the head, in EDF order."""
        out = []
        while self._heap and len(out) < n:
            out.append(self.pop())
        return out

    def pop_images(self, limit: int) -> list[Entry[T]]:
        """Entries from the head, in EDF order, of at most `limit` images in all; requests are never split
        and never skipped: it stops at the first that does not fit. The head is always taken (alone if it
        is larger than `limit`)."""
        out: list[Entry[T]] = []
        total = 0
        heap = self._heap
        while heap and (not out or total + heap[0].size <= limit):
            e = self.pop()
            out.append(e)
            total += e.size
        return out

    def remove(self, entry: Entry[T]) -> bool:
        """Remove a specific entry (e.g. its client went away). O(n); returns False if absent."""
        try:
            i = self._heap.index(entry)
        except ValueError:
            return False
        last = self._heap.pop()
        if i < len(self._heap):
            self._heap[i] = last
            heapq.heapify(self._heap)
        self.images -= entry.size
        return True

    def deadlines_sizes(self) -> list[tuple[float, int]]:
        """(deadline_ms, size) of every queued entry in EDF order (ties by arrival): admission's view."""
        return [(d, s) for d, _, s in sorted((e.deadline_ms, e.seq, e.size) for e in self._heap)]

    def head(self, now_ms: float, k: int) -> tuple[list[float], list[int]]:
        """(deadline - now, size) of the first `k` entries in EDF order: what per-batch CPU sizing reads
        (sponge.policy.batch_cpu). O(n log k)."""
        first = heapq.nsmallest(k, self._heap)
        return [e.deadline_ms - now_ms for e in first], [e.size for e in first]

    def remaining_ms(self, now_ms: float) -> list[float]:
        """deadline - now of every queued request, in EDF order (the controller's backlog view)."""
        return sorted(e.deadline_ms - now_ms for e in self._heap)
