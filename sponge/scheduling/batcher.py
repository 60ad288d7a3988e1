"""Deadline-aware batch formation: what a free replica should do next. Pure (DESIGN §1).

Batch sizes count images (a request's first-axis rows, `Entry.size`), as l(b, c) does; a request is
never split. When a replica is free the dispatcher asks `Batcher.next_action(queue, now_ms)`:
- requests that cannot meet their deadline even if served next (alone: l(size)) are *expired*: with the
  default policy they are removed and answered at once with a deadline error; with `serve_late` they
  stay and are served in EDF order (they are at the head anyway);
- when the head requests fill `b` images (or the next one in EDF order does not fit), they are
  dispatched; a single request larger than `b` is dispatched alone;
- with fewer images queued, the batcher waits for more only while the head's slack allows (a full
  batch of `b` images must still finish by its deadline) and at most `max_wait_ms`, then dispatches
  what there is.

Only compatible requests share a batch (`Entry.key`: for a model with a second variable dimension, the
inputs' dtypes and non-batch dims). A batch is the EDF head plus the following queued requests with the
head's key, in EDF order, while they fit in `b` images (a compatible request that does not fit ends the
batch: a later smaller one never jumps it). Incompatible requests are passed over and stay queued in
their place; at most `scan_window` of them are looked past. The rule that keeps EDF honest: a compatible
request behind a passed-over one joins the batch only if every passed-over request could still finish by
its deadline when started right after this batch (now + l(batch with it) + l(its own size)); otherwise
the batch ends there. With one key for all requests (the usual case) this is exactly the plain EDF batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable, Generic, TypeVar

from sponge.scheduling.edf import EDFQueue, Entry

T = TypeVar("T")

# Longest wait for a fuller batch, by default, live (ServerConfig.max_batch_wait_ms) and simulated
# (SimConfig.max_wait_ms) alike: 0 = greedy (under load the queue fills batches by itself; at low load
# nobody waits).
DEFAULT_MAX_WAIT_MS = 0.0

# Estimated service time (ms) of a batch of the given number of images on the replica's current allocation.
ServiceEstimate = Callable[[int], float]

# How many incompatible requests (another shape) a batch may look past for compatible ones.
DEFAULT_SCAN_WINDOW = 64


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
    """Forms batches of at most `batch_size` images from the head of an EDF queue."""

    def __init__(
        self,
        batch_size: int,
        estimate_ms: ServiceEstimate,
        expiry: ExpiryPolicy = ExpiryPolicy.REJECT,
        max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
        scan_window: int = DEFAULT_SCAN_WINDOW,
        expiry_estimate_ms: ServiceEstimate | None = None,
    ) -> None:
        """expiry_estimate_ms: the service time that decides whether a request can still make it (default
        `estimate_ms`, the allocation in force); where CPU is sized per batch, the allocation reachable
        (the sizer raises it for the tight request), else a request would be expired at an idle replica's
        low allocation that the next resize was about to raise."""
        self.batch_size = batch_size
        self.estimate_ms = estimate_ms
        self.expiry_estimate_ms = expiry_estimate_ms or estimate_ms
        self.expiry = expiry
        self.max_wait_ms = max_wait_ms
        self.scan_window = scan_window

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
        est = self.expiry_estimate_ms
        while queue:
            head = queue.peek()
            assert head is not None
            if head.deadline_ms >= now_ms + est(head.size):
                break
            expired.append(queue.pop())
        return expired

    def expire(self, queue: EDFQueue[T], now_ms: float) -> list[Entry[T]]:
        """Remove and return the head entries that would miss their deadline even if run alone now (none
        with `serve_late`): for a deadline timer that answers them while every replica is busy."""
        return self._expire(queue, now_ms)

    def next_action(self, queue: EDFQueue[T], now_ms: float) -> Action[T]:
        expired = self._expire(queue, now_ms)
        if not queue:
            return Action(expired, Wait(None))
        b = self.batch_size
        if queue.images >= b:  # the head fills a batch (or is as full as it can get without a split)
            return Action(expired, Dispatch(self._form(queue, now_ms)))
        head = queue.peek()
        assert head is not None
        # Latest start that still lets a full batch finish by the head's deadline, capped by max_wait.
        latest_start = head.deadline_ms - self.estimate_ms(b)
        wait_until = min(latest_start, head.arrival_ms + self.max_wait_ms)
        if wait_until <= now_ms:
            return Action(expired, Dispatch(self._form(queue, now_ms)))
        return Action(expired, Wait(wait_until))

    def _form(self, queue: EDFQueue[T], now_ms: float) -> list[Entry[T]]:
        """Pop one batch: the head and the compatible requests after it (module docstring's rule)."""
        b, est = self.batch_size, self.estimate_ms
        head = queue.pop()
        batch, images = [head], head.size
        passed: list[Entry[T]] = []
        while queue and images < b and len(passed) < self.scan_window:
            e = queue.peek()
            assert e is not None
            if e.key != head.key:
                passed.append(queue.pop())
                continue
            if images + e.size > b:
                break
            if passed:
                done_ms = now_ms + est(images + e.size)
                if any(done_ms + est(p.size) > p.deadline_ms for p in passed):
                    break
            batch.append(queue.pop())
            images += e.size
        queue.requeue(passed)
        return batch
