"""Live adapters between the controller and the running server (the I/O edge of the loop)."""

from __future__ import annotations

import logging
from typing import Any, Sequence

from sponge.perf.samples import BatchSample
from sponge.policy.types import Decision
from sponge.server.core import ServingCore
from sponge.server.per_batch import PerBatchSizer
from sponge.server.scaler import ReplicaScaler

log = logging.getLogger("sponge.live")


class LiveView:
    """Reads arrivals, budgets, backlog, served batches, CPU usage and allocation from the serving core and
    the actuators."""

    def __init__(self, core: ServingCore, scaler: ReplicaScaler, pool: Any = None) -> None:
        self.core = core
        self.scaler = scaler
        self.pool = pool  # when given, its `starting()` counts the replicas in their cold start

    def front_door_cpu_s(self) -> float:
        """CPU seconds the front door has used (server/metrics.py FrontDoorCpu: this process, not its replicas)."""
        return self.core.metrics.front_door.seconds()

    def arrivals_total(self) -> int:
        return self.core.arrivals

    def take_budgets(self) -> Sequence[tuple[float, float]]:
        budgets, self.core.recent_budgets = self.core.recent_budgets, []
        return budgets

    def take_batches(self) -> Sequence[BatchSample]:
        batches, self.core.recent_batches = self.core.recent_batches, []
        return batches

    def cpu_allocated_mms(self, now_ms: float) -> float:
        """Allocated CPU as applied, summed over replicas, integrated since the start (millicore-ms)."""
        return self.scaler.allocation.integral_mms(now_ms)

    def queue_remaining_ms(self, now_ms: float) -> Sequence[float]:
        return self.core.queue.remaining_ms(now_ms)

    def cpu_usage_ns(self) -> dict[str, int | None]:
        return {r.name: self.scaler.cpu_usage_ns(r.name) for r in self.core.replicas}

    def replicas_starting(self) -> int:
        """Replicas ordered and not serving yet: the core's starting ones (a KubernetesPool adds the pods the
        kubelet has not made ready)."""
        if self.pool is not None:
            return int(self.pool.starting())
        return self.core.states()["starting"]


class LiveApplier:
    """Applies decisions: the replica count (ReplicaPool: new replicas start, removed ones drain; without a
    pool the count is fixed), every replica resized in place, the batch size. While the policy sizes CPU per
    batch (`per_batch`, sponge.server.per_batch) the CPU is left to it: the decision is its floor, applied
    by `PerBatchSizer.decided` right after (serve.py's on_decision), not first down to the floor and then
    back up for the batch in flight."""

    def __init__(self, core: ServingCore, scaler: ReplicaScaler, max_batch: int,
                 per_batch: PerBatchSizer | None = None, pool: Any = None) -> None:
        self.core = core
        self.scaler = scaler
        self.max_batch = max_batch
        self.per_batch = per_batch
        self.pool = pool  # ReplicaPool or KubernetesPool: scale_to(n, cpu_m)
        self._warned_replicas = False

    def apply(self, decision: Decision) -> None:
        cpu_m = min(max(decision.cpu_m, self.scaler.min_cpu_m), self.scaler.max_cpu_m)
        if self.pool is not None:  # first the count (new replicas start at the decision's CPU), then CPU
            self.pool.scale_to(decision.replicas, cpu_m)
        if self.per_batch is not None and self.core.sizes_per_batch:
            self.per_batch.deferred = True
        elif any(self.core.cpu_m[r.name] != cpu_m or self.scaler.wish(r.name) not in (None, cpu_m)
                 for r in self.core.replicas):  # (a pod may still wish for an earlier decision: take it back)
            self.scaler.resize_all(cpu_m)
        self.core.set_batch(min(max(1, decision.batch), self.max_batch))
        if self.pool is None and decision.replicas != len(self.core.replicas) and not self._warned_replicas:
            self._warned_replicas = True
            log.warning("policy asked for %d replicas; this server runs a fixed %d (--max-replicas N lets it "
                        "add and remove replicas)", decision.replicas, len(self.core.replicas))
