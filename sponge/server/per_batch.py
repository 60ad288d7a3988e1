"""Per-batch CPU, live: between two controller decisions, size the replica to the work actually present.

The policy (`SpongeOptimizer.batch_cpu_m`, forwarded by `LearningPolicy` while it runs on the learned
model) answers, for a `QueueView` — the queue head in EDF order, the batch in flight with its remaining time
and tightest deadline, the allocation in force, the resize's delay, the last second's arrivals — the least
CPU (never below the last decision; the minimum when idle) under which everything present meets its
deadline, and the batch cap for the next batches. `ServingCore` calls `PerBatchSizer` at the simulator's
events (`sponge.sim.engine.Simulator._size`): after an arrival is queued, before a batch is formed (so the
cap applies to it), when a batch starts and when it ends, and on the deadline timer's wakeups. The resize
is `ReplicaScaler.resize`, synchronous: a quota write takes effect within one 10 ms CFS period here.

Differences from the simulator, each for the live server's sake:
  * while a batch runs the allocation only goes up (an arrival that needs more CPU gets it); it comes down
    when the batch ends. A batch resized mid-way measured two allocations and is no sample of l(b, c), and
    the learned model lives on samples: lowering mid-batch would save a fraction of one batch's CPU and
    lose most samples at light load (the pre-batch sizing already accounts for the resize delay, so the
    sizing right after the start usually finds a little less is enough);
  * nothing is asked when nothing changed since the last call (queue, running work, decision, allocation),
    while a batch runs at the largest allocation, or while the policy keeps the interval decision (it
    answered None: asked again at the next decision);
  * while an idle probe (`IdleProber`) holds the replica and nothing is queued, the probe owns the
    allocation; a request arriving mid-probe is sized with the probe as the running batch, and the probe
    then leaves the allocation to the sizer instead of restoring its own.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from sponge.policy.batch_cpu import DEFAULT_MAX_QUEUED
from sponge.policy.types import BatchCpu, Decision, QueueView, RunningBatch
from sponge.server.core import ServingCore

log = logging.getLogger("sponge.per_batch")

# Issue -> in effect, ms: the decision's own time (mean 0.21 ms live, bench/live.py; up to ~1.6 ms when even the
# top allocation falls short, bench/decision_time.py) rounded up to 2, plus the resize: bench/resize.py measured
# the quota in effect p99 5 ms and the runtime's threads following p99 13 ms, rounded up to 15. The simulator
# charges the same (SimConfig.decision_ms + resize_delay_ms).
PER_BATCH_DELAY_MS = 17.0

RATE_WINDOW_MS = 1000.0  # QueueView.recent_rate_rps: arrivals over the last second


class PerBatchSizer:
    """`core.batch_sizer`: builds the QueueView, asks the policy, applies the cap and the CPU."""

    def __init__(self, core: ServingCore, batch_cpu_m: Callable[[QueueView], BatchCpu | None],
                 resize: Callable[[str, int], Any], min_cpu_m: int, max_cpu_m: int, max_batch: int,
                 delay_ms: float = PER_BATCH_DELAY_MS) -> None:
        if len(core.replicas) != 1:
            raise ValueError(f"per-batch CPU sizes one replica; this server has {len(core.replicas)}")
        self.core = core
        self.batch_cpu_m = batch_cpu_m
        self.resize = resize
        self.min_cpu_m, self.max_cpu_m, self.max_batch = min_cpu_m, max_cpu_m, max_batch
        self.delay_ms = delay_ms
        self.name = core.replicas[0].name
        self._key: tuple | None = None
        # the policy answered None: it keeps the interval decision, and only a decision changes that (it is
        # asked again at the next one, `decided`), so events do not ask it meanwhile
        self._declined = False
        self._decisions = 0
        self.moved = False  # the allocation is one this sizer set (the decision's must come back without it)
        self.deferred = False  # the applier left a new decision's CPU to this sizer (see `decided`)
        # counters since the last decision (for the decision log) and in all
        self.calls = self.skipped = self.resizes = 0
        self.window_resizes = 0
        self.window_lo: int | None = None
        self.window_hi: int | None = None

    def _view(self, now: float) -> QueueView:
        core, name = self.core, self.name
        cpu = core.cpu_m[name]
        running = None
        work = core.running.get(name)
        if work is not None:
            whole = core.latency_ms(work.images, work.cpu_m)
            left = work.left(now, whole) * (whole if work.cpu_m == cpu else core.latency_ms(work.images, cpu))
            running = RunningBatch(work.images, left, work.deadline_ms - now)
        rem, images = core.queue.head(now, DEFAULT_MAX_QUEUED)
        times = core.arrival_times
        while times and times[0] <= now - RATE_WINDOW_MS:
            times.popleft()
        return QueueView(rem, images, running, cpu, self.delay_ms, len(times) * 1000.0 / RATE_WINDOW_MS)

    def _pinned_at_top(self, name: str) -> bool:
        """A batch runs at the largest allocation: nothing to decide until it ends (mid-batch the CPU only
        goes up, and the next batch's cap is decided when it ends). Under overload, when the queue is long
        and a call is dearest (the sizer then weighs every cap: ~3 ms for 128 queued here), it is skipped."""
        work = self.core.running.get(name)
        return (self.core.sizes_per_batch and work is not None and not work.probe
                and self.core.cpu_m[name] >= self.max_cpu_m)

    def __call__(self, now: float, force: bool = False) -> bool:
        """Size now; True when the policy sized (its allocation is in force), False when it keeps the interval
        decision (None) or the replica cannot be sized now."""
        core, name = self.core, self.name
        replica = core.replicas[0]
        if not replica.ready:
            return core.sizes_per_batch
        if name in core.probing and not core.queue:
            return core.sizes_per_batch  # an idle probe holds the allocation: sized again when it ends
        if not force and self._declined:
            return False  # the policy keeps the interval decision until its next decision (a forced call)
        key = (core.version, self._decisions, core.cpu_m[name], core.batcher.batch_size)
        if not force and (key == self._key or self._pinned_at_top(name)):
            self.skipped += 1
            return core.sizes_per_batch
        t0 = time.perf_counter()
        self.calls += 1
        got = self.batch_cpu_m(self._view(now))
        self._declined = got is None
        if got is None:
            self._key = key
            if core.sizes_per_batch:
                core.sizes_per_batch = False
                core.metrics.per_batch_active.set(0)
            return False
        if not core.sizes_per_batch:
            core.sizes_per_batch = True
            core.metrics.per_batch_active.set(1)
        batch = min(max(1, int(got.batch)), self.max_batch)
        if batch != core.batcher.batch_size:
            core.batcher.batch_size = batch
            core.metrics.configured_batch.labels(core.model_name).set(batch)
        cpu = min(max(int(got.cpu_m), self.min_cpu_m), self.max_cpu_m)
        current = core.cpu_m[name]
        work = core.running.get(name)
        if work is not None and not work.probe and cpu < current:
            cpu = current  # mid-batch only up: it comes down when the batch ends (module docstring)
        resized = cpu != current
        if resized:
            self.resize(name, cpu)
            self.moved = True
            self.resizes += 1
            self.window_resizes += 1
            core.metrics.batch_resizes.labels("up" if cpu > current else "down").inc()
        applied = core.cpu_m[name]
        self.window_lo = applied if self.window_lo is None else min(self.window_lo, applied)
        self.window_hi = applied if self.window_hi is None else max(self.window_hi, applied)
        self._key = (core.version, self._decisions, applied, core.batcher.batch_size)
        core.metrics.batch_sizing.labels(str(resized).lower()).observe(time.perf_counter() - t0)
        return True

    def decided(self, decision: Decision) -> bool:
        """After each controller decision (the policy's state changed; serve.py calls it once the admission
        and latency views follow the new mode): size at once. If the policy does not size per batch (it
        is not on the learned model) and the allocation is not the decision's because this sizer moved it
        or the applier left it to this sizer, put the decision's back. True when the policy sized."""
        self._decisions += 1
        if self(self.core.clock(), True):
            self.deferred = False
            return True
        if self.name in self.core.probing:
            return False  # the probe restores its own allocation; the next decision puts the decision's back
        cpu = min(max(int(decision.cpu_m), self.min_cpu_m), self.max_cpu_m)
        if (self.moved or self.deferred) and self.core.cpu_m[self.name] != cpu:
            self.resize(self.name, cpu)
        self.moved = self.deferred = False
        return False

    def take_window(self) -> str:
        """What it did since the last call (for the decision log), and start a new window."""
        if self.window_lo is None:
            text = ""
        else:
            text = (f"; per-batch CPU: {self.window_resizes} resize(s) since the last decision, "
                    f"{self.window_lo}-{self.window_hi} m")
        self.window_resizes, self.window_lo, self.window_hi = 0, None, None
        return text
