"""What a policy sees and what it answers. Pure data: no I/O, no clocks (DESIGN §2, §4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

from sponge.perf.samples import BatchSample


@dataclass(frozen=True)
class Decision:
    """A configuration for the next interval: CPU per replica (millicores), batch size, replicas."""

    cpu_m: int
    batch: int
    replicas: int = 1
    feasible: bool = True  # False: nothing in the action space meets every budget; this is the best effort
    explanation: str = ""  # human-readable reason, for the decision log

    @property
    def total_cpu_m(self) -> int:
        return self.cpu_m * self.replicas


@dataclass(frozen=True)
class Observation:
    """What the controller measured over the last interval(s), on the server's own clock.

    now_ms: monotonic time of the observation.
    interval_ms: the adaptation interval.
    arrival_rate_rps: requests per second arrived over the last interval.
    rate_history_rps: per-interval arrival rates, oldest first (the last one equals arrival_rate_rps).
    budgets_ms: server-side budgets (slo - network) of requests that arrived in the recent window, in
        arrival order (newest last).
    queue_remaining_ms: for each queued request in EDF order, deadline - now (may be negative).
    current: the decision in force.
    cpu_usage_m: measured CPU usage of each replica over the last interval (for usage-based baselines).
    replicas_starting: replicas ordered but not ready yet (cold start in progress).
    batches: batches served since the previous observation (images, cpu_m, latency): free measurements
        of l(b, c) from which a policy may learn its latency model online.
    budget_ages_ms: now - arrival time of each budget in budgets_ms (same order); empty when the builder
        was not given arrival times. Lets a policy take "the latest request" or "the last second".
    """

    now_ms: float
    interval_ms: float
    arrival_rate_rps: float
    rate_history_rps: tuple[float, ...]
    budgets_ms: tuple[float, ...]
    queue_remaining_ms: tuple[float, ...]
    current: Decision
    cpu_usage_m: tuple[float, ...] = field(default_factory=tuple)
    replicas_starting: int = 0
    batches: tuple[BatchSample, ...] = ()
    budget_ages_ms: tuple[float, ...] = ()
    serves_late: bool = False  # the server serves requests past their deadline (expiry serve_late)


@dataclass(frozen=True)
class RunningBatch:
    """The batch in flight on a replica: its images, its remaining time at the allocation in force, and
    the remaining time (deadline - now) of its tightest member (+inf: nothing to protect)."""

    images: int
    remaining_ms: float
    deadline_ms: float = float("inf")


@dataclass(frozen=True)
class QueueView:
    """What the dispatcher sees at an event (an arrival, a batch start, a batch end), for a policy that
    sizes CPU per batch (`batch_cpu_m`): the queue in EDF order, the batch in flight, the allocation in
    force, and how long a resize takes to take effect (decision + actuation)."""

    queue_remaining_ms: Sequence[float]
    queue_images: Sequence[int]
    running: RunningBatch | None
    current_cpu_m: int
    delay_ms: float = 0.0
    recent_rate_rps: float = 0.0  # arrivals over the last second: the queue must not fall behind it


@dataclass(frozen=True)
class BatchCpu:
    """A per-batch answer: the allocation to apply now, and the batch cap for the next batches."""

    cpu_m: int
    batch: int


class Policy(Protocol):
    """Pure decision rule, called once per adaptation interval by the live controller and the simulator."""

    name: str

    def decide(self, obs: Observation) -> Decision: ...


# Optional, for policies that size CPU per batch between two decisions (SpongeOptimizer):
#   batch_cpu_m(view: QueueView) -> BatchCpu | None   (None: keep the interval decision)
#   max_cpu_m: int   (the most it reaches: a request is hopeless only if it misses at this)
# The simulator and the live dispatcher call it at every arrival, batch start and batch end when the
# policy has it and one replica serves.
