"""What the controller sees each interval, built one way for the live server and the simulator. Pure.

`ObservationBuilder` turns what a server measured since the previous look (arrivals, budgets with their
arrival times, backlog, cumulative CPU usage and allocation, served batches) into the policy's
`Observation`. `sponge.control.Controller` feeds it from the running server, `sponge.sim.engine` from
the simulated one, so a policy cannot tell them apart. `AllocationMeter` integrates an allocation that
changes at known instants (the live side's applied CPU), so live and simulated runs bill the same thing.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Iterable, Mapping, Sequence

from sponge.perf.samples import BatchSample
from sponge.policy.types import Decision, Observation

BUDGET_WINDOW_MS = 10_000.0  # budgets of requests that arrived in the last 10 s (+ one interval) are "recent"
MAX_BUDGETS = 5_000  # ... but never more than this many, the newest (bounded memory, bounded decide() time)
RATE_HISTORY = 60  # intervals of arrival rate kept for predictors


class ObservationBuilder:
    """Builds one Observation per controller tick from what the server measured since the previous one.

    Per tick it is fed (`observe`): the time; the cumulative count of arrivals; the budgets of the
    requests that arrived since the last tick, with their arrival times; the backlog (deadline - now of
    every queued request, EDF order); each replica's cumulative CPU usage in millicore-ms (None where it
    cannot be measured; a replica not seen before starts from 0); the decision in force; replicas still
    starting; the batches served since the last tick; and the cumulative allocated CPU in millicore-ms
    (all replicas, starting ones included), from which `total_cpu_m` — the time-weighted allocation over
    the interval just closed, what a run is billed — is derived.

    Budgets are kept while they arrived in (now - budget_window_ms - interval_ms, now], at most
    `max_budgets` (the newest), in the order fed (arrival order: newest last), each with its age.
    Rates and usage are over the time actually elapsed since the last tick.
    """

    def __init__(self, interval_ms: float, now_ms: float = 0.0, arrivals_total: int = 0,
                 usage_mms: Mapping[object, float | None] | None = None, allocated_mms: float | None = None,
                 history_len: int = RATE_HISTORY, budget_window_ms: float = BUDGET_WINDOW_MS,
                 max_budgets: int = MAX_BUDGETS, serves_late: bool = False) -> None:
        self.interval_ms = interval_ms
        self.serves_late = serves_late  # the server's expiry policy, as every Observation reports it
        self.budget_window_ms = budget_window_ms
        self.last_t = now_ms
        self._last_arrivals = arrivals_total
        self._last_usage: dict[object, float | None] = dict(usage_mms or {})
        self._last_alloc = allocated_mms
        self._rates: deque[float] = deque(maxlen=history_len)
        self._budget_t: deque[float] = deque(maxlen=max_budgets)
        self._budget_v: deque[float] = deque(maxlen=max_budgets)
        self.total_cpu_m = math.nan  # time-weighted allocated CPU over the last interval (set by observe)

    def observe(self, now_ms: float, arrivals_total: int, budgets: Iterable[tuple[float, float]],
                queue_remaining_ms: Sequence[float], usage_mms: Mapping[object, float | None], current: Decision,
                replicas_starting: int = 0, batches: Sequence[BatchSample] = (),
                allocated_mms: float | None = None) -> Observation:
        elapsed_ms = max(1e-6, now_ms - self.last_t)
        rate = (arrivals_total - self._last_arrivals) * 1000.0 / elapsed_ms
        self._rates.append(rate)

        bt, bv = self._budget_t, self._budget_v
        for t, b in budgets:
            bt.append(t)
            bv.append(b)
        cutoff = now_ms - self.budget_window_ms - self.interval_ms
        while bt and bt[0] <= cutoff:
            bt.popleft()
            bv.popleft()

        last = self._last_usage
        usage_m = []
        for key, u in usage_mms.items():
            u0 = last.get(key, 0.0)
            usage_m.append((u - u0) / elapsed_ms if u is not None and u0 is not None else math.nan)
        self._last_usage = dict(usage_mms)

        if allocated_mms is not None and self._last_alloc is not None:
            self.total_cpu_m = (allocated_mms - self._last_alloc) / elapsed_ms
        else:  # no meter: the decision in force over the interval
            self.total_cpu_m = float(current.total_cpu_m)
        self._last_alloc = allocated_mms

        self.last_t, self._last_arrivals = now_ms, arrivals_total
        return Observation(
            now_ms=now_ms,
            interval_ms=self.interval_ms,
            arrival_rate_rps=rate,
            rate_history_rps=tuple(self._rates),
            budgets_ms=tuple(bv),
            queue_remaining_ms=tuple(queue_remaining_ms),
            current=current,
            cpu_usage_m=tuple(usage_m),
            replicas_starting=replicas_starting,
            batches=tuple(batches),
            budget_ages_ms=tuple(now_ms - t for t in bt),
            serves_late=self.serves_late,
        )


class AllocationMeter:
    """Integral over time of an allocation that changes at known instants (millicore-ms), summed over keys
    (replicas): what was applied, when it was applied. Times in ms on one monotonic clock."""

    def __init__(self, now_ms: float, allocation: Mapping[str, int]) -> None:
        self._alloc = dict(allocation)
        self._t = now_ms
        self._total = float(sum(self._alloc.values()))
        self._integral = 0.0

    def _advance(self, now_ms: float) -> None:
        if now_ms > self._t:
            self._integral += self._total * (now_ms - self._t)
            self._t = now_ms

    def set(self, now_ms: float, key: str, cpu_m: int | None) -> None:
        """`key` holds `cpu_m` from `now_ms` on (None: it is gone)."""
        self._advance(now_ms)
        if cpu_m is None:
            self._alloc.pop(key, None)
        else:
            self._alloc[key] = cpu_m
        self._total = float(sum(self._alloc.values()))

    def integral_mms(self, now_ms: float) -> float:
        """Allocated millicore-ms from the start until `now_ms`."""
        self._advance(now_ms)
        return self._integral
