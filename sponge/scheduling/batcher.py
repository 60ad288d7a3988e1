"""Deadline-aware batch formation: what a free replica should do next. Pure (DESIGN §1).

When a replica is free the dispatcher asks `Batcher.next_action(queue, now_ms)`:
- requests that cannot meet their deadline even if served next are *expired*: with the default
  policy they are removed and answered at once with a deadline error; with `serve_late` they stay
  and are served in EDF order (they are at the head anyway);
- with `b` or more requests queued, the head `b` are dispatched;
- with fewer, the batcher waits for more only while the head's slack allows (and at most
  `max_wait_ms`), then dispatches what there is.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable, Generic, TypeVar

from sponge.scheduling.edf import EDFQueue, Entry

T = TypeVar("T")

# Estimated service time (ms) of a batch of the given size on the replica's current allocation.
ServiceEstimate = Callable[[int], float]


class ExpiryPolicy(str, Enum):
    REJECT = "reject"  # answer at once with a deadline error (default)
    SERVE_LATE = "serve_late"  # serve anyway, in EDF order; the response says the deadline was missed


@dataclass
class Dispatch(Generic[T]):
    """Run these entries now as one batch (EDF order)."""

    entries: list[Entry[T]]


@dataclass
class Wait:
    """Nothing to run yet; ask again at `until_ms` or when a request arrives."""

    until_ms: float | None  # None: queue empty, wait for an arrival


@dataclass
class Action(Generic[T]):
    expired: list[Entry[T]]  # removed from the queue: answer with a deadline error
    step: Dispatch[T] | Wait


class Batcher:
    """Forms batches of at most `batch_size` from the head of an EDF queue."""

    def __init__(
        self,
        batch_size: int,
        estimate_ms: ServiceEstimate,
        expiry: ExpiryPolicy = ExpiryPolicy.REJECT,
        max_wait_ms: float = 5.0,
    ) -> None:
        self.batch_size = batch_size
        self.estimate_ms = estimate_ms
        self.expiry = expiry
        self.max_wait_ms = max_wait_ms

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @batch_size.setter
    def batch_size(self, b: int) -> None:
        if b < 1:
            raise ValueError(f"batch size must be >= 1, got {b}")
        self._batch_size = b

    def _expire(self, queue: EDFQueue[T], now_ms: float) -> list[Entry[T]]:
        """Remove head entries that would miss their deadline even if run alone right now."""
        if self.expiry is ExpiryPolicy.SERVE_LATE:
            return []
        expired: list[Entry[T]] = []
        single = self.estimate_ms(1)
        while queue and queue.peek().deadline_ms < now_ms + single:  # type: ignore[union-attr]
            expired.append(queue.pop())
        return expired

    def next_action(self, queue: EDFQueue[T], now_ms: float) -> Action[T]:
        expired = self._expire(queue, now_ms)
        n = len(queue)
        if n == 0:
            return Action(expired, Wait(None))
        b = self.batch_size
        if n >= b:
            return Action(expired, Dispatch(queue.pop_many(b)))
        head = queue.peek()
        assert head is not None
        # Latest start that still lets a full batch finish by the head's deadline, capped by max_wait.
        latest_start = head.deadline_ms - self.estimate_ms(b)
        wait_until = min(latest_start, head.arrival_ms + self.max_wait_ms)
        if wait_until <= now_ms:
            return Action(expired, Dispatch(queue.pop_many(n)))
        return Action(expired, Wait(wait_until))
