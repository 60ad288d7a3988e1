"""Deadline-aware admission: will a request finish by its deadline behind the work already there? Pure.

DESIGN §1: the front door admits by deadline. On arrival the request is placed, in thought, at its EDF
position in the queue, and the queue is played forward as the dispatch loops would serve it:

- each replica frees at its `free_at_ms` (now when idle; the expected end of the batch it runs);
- a free replica takes a batch from the head as `Batcher` does (greedy: up to `batch` images, requests
  never split, the head always taken) and runs it for `service_ms(images)`, the latency at the
  allocation the controller can reach (its largest: admission must not refuse what scaling up could
  save);
- with expiry (policy `reject`), a head that cannot finish even if its batch starts alone at that moment
  is dropped, as the batcher will drop it: it takes no service time.

Verdicts:
- **504** (hopeless): its own budget is shorter than one inference of its images on an idle replica at
  the reachable allocation: no server state could have saved it;
- **503** (overloaded, `Retry-After`): it would finish after its deadline because of the work ahead of it;
- **503** (would displace): it would finish in time, but, being earlier than requests already admitted,
  it would push at least one of them from on time to late. Choice: an admission is a promise — a
  request admitted as saveable stays saveable unless the latency model was wrong — so under overload
  the queue does not churn (a tight request displacing a looser one gains nothing in the count of
  on-time answers, and the displaced one would wait, then get a 504, instead of a fast 503).

`service_ms` unknown (nothing measured yet, no model): admit. The verdict never sheds on a guess.

Cost: O(n) in the queued requests, twice (with and without the newcomer). Under admission the queue
holds about capacity × the longest budget of requests (e.g. ~90 for 90 req/s and 1 s), not its bound.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_right
from dataclasses import dataclass
from typing import Callable, Sequence

# Batch service time (ms) for a number of images at the allocation the controller can reach.
ServiceTime = Callable[[int], float]

ADMIT, OVERLOADED, HOPELESS = 200, 503, 504


@dataclass(frozen=True)
class Verdict:
    status: int  # ADMIT (200), OVERLOADED (503) or HOPELESS (504)
    finish_ms: float  # estimated finish on the monotonic clock (nan when not estimated)
    reason: str  # for the error message
    retry_after_s: int = 0  # with 503: when the backlog ahead would let a request of this budget in
    displaced: int = 0  # admitted requests it would have pushed past their deadline (503 if > 0)

    @property
    def admit(self) -> bool:
        return self.status == ADMIT


def play(entries: Sequence[tuple[float, int]], free_at_ms: Sequence[float], batch: int,
         service_ms: ServiceTime, expire: bool) -> list[float]:
    """Finish time of each queued entry ((deadline_ms, images), EDF order) when the replicas, free at
    `free_at_ms`, serve the queue as the Batcher does; `inf` for an entry dropped as hopeless (`expire`)."""
    n = len(entries)
    out = [math.inf] * n
    free = sorted(free_at_ms)  # a sorted list is a valid heap
    i = 0
    while i < n:
        t = heapq.heappop(free)
        if expire:
            while i < n and entries[i][0] < t + service_ms(entries[i][1]):
                i += 1  # the batcher expires it at the head: it is answered 504, takes no replica time
            if i == n:
                break
        j, total = i, 0
        while j < n and (j == i or total + entries[j][1] <= batch):
            total += entries[j][1]
            j += 1
        done = t + service_ms(total)
        for k in range(i, j):
            out[k] = done
        heapq.heappush(free, done)
        i = j
    return out


class AdmissionControl:
    """Decides admit / 503 / 504 for one arriving request (see the module docstring).

    `headroom` (>= 1) multiplies the service times of the backlog check: > 1 keeps a margin for latency
    noise (admits a little less than the model says fits). `protect_admitted`: refuse a request that
    would push an admitted one past its deadline (the default; see the module docstring)."""

    def __init__(self, headroom: float = 1.0, protect_admitted: bool = True) -> None:
        if headroom < 1.0:
            raise ValueError(f"headroom must be >= 1, got {headroom}")
        self.headroom = headroom
        self.protect_admitted = protect_admitted

    def check(self, now_ms: float, deadline_ms: float, images: int, queued: Sequence[tuple[float, int]],
              free_at_ms: Sequence[float], batch: int, service_ms: ServiceTime | None,
              expire: bool = True) -> Verdict:
        """`queued`: (deadline_ms, images) of the queued requests in EDF order; `free_at_ms`: when each
        replica frees (>= now); `batch`: the batch size in images; `service_ms`: batch latency at the
        reachable allocation, None when unknown (then admit)."""
        if service_ms is None or not free_at_ms:
            return Verdict(ADMIT, math.nan, "no latency estimate yet")
        memo: dict[int, float] = {}

        def svc(k: int) -> float:
            v = memo.get(k)
            if v is None:
                v = memo[k] = float(service_ms(k))
            return v

        alone = svc(images)
        if alone <= 0.0:
            return Verdict(ADMIT, math.nan, "no latency estimate yet")
        if now_ms + alone > deadline_ms:
            return Verdict(HOPELESS, now_ms + alone,
                           f"one inference of {images} image(s) takes ~{alone:.1f} ms even on an idle replica "
                           f"at the largest allocation; {deadline_ms - now_ms:.1f} ms were left")
        h = self.headroom
        backlog_svc: ServiceTime = svc if h == 1.0 else (lambda k: h * svc(k))
        pos = bisect_right([d for d, _ in queued], deadline_ms)  # after equal deadlines: FIFO among them
        with_new = [*queued[:pos], (deadline_ms, images), *queued[pos:]]
        free = [max(now_ms, f) for f in free_at_ms]
        fin = play(with_new, free, batch, backlog_svc, expire)
        mine = fin[pos]
        if mine > deadline_ms:
            ahead = sum(s for _, s in queued[:pos])
            late_by = mine - deadline_ms
            est = "hopeless at its turn" if math.isinf(mine) else f"would finish in ~{mine - now_ms:.0f} ms"
            return Verdict(OVERLOADED, mine,
                           f"overloaded: {est} behind {ahead} queued image(s) with earlier deadlines "
                           f"({len(queued)} requests queued, {sum(1 for f in free if f > now_ms)} replica(s) "
                           f"busy); its budget left {deadline_ms - now_ms:.0f} ms",
                           retry_after_s=retry_after_s(late_by if math.isfinite(late_by) else
                                                       sum(backlog_svc(s) for _, s in queued[:pos])))
        if self.protect_admitted and pos < len(queued):
            base = play(queued, free, batch, backlog_svc, expire)
            displaced = 0
            for k, (d, _) in enumerate(queued):
                after = fin[k if k < pos else k + 1]
                if base[k] <= d < after:
                    displaced += 1
            if displaced:
                return Verdict(OVERLOADED, mine,
                               f"overloaded: admitting it would push {displaced} admitted request(s) past "
                               f"their deadlines ({len(queued)} requests queued)",
                               retry_after_s=retry_after_s(svc(images)), displaced=displaced)
        return Verdict(ADMIT, mine, "fits")


def retry_after_s(ms: float) -> int:
    """Whole seconds for a Retry-After header: at least 1."""
    return max(1, math.ceil(ms / 1000.0)) if math.isfinite(ms) else 1
