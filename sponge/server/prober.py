"""Background profiling in idle gaps: measure the latency cells the online model still lacks.

Served batches measure l(b, c) only at the allocation in force; a learned model needs other CPU levels
and batch sizes too. When a replica has been idle for a while (nothing queued, nothing in flight, no
arrival for `quiet_ms`), the prober resizes it in place to a wanted cell's allocation, runs one batch of
synthetic inputs, records the sample and restores the allocation. It never holds the replica from real
work: the moment a request arrives (or the controller resizes the replica) the allocation is restored at
once — a resize takes effect within one CFS period — and the disturbed sample is thrown away, so a
request that arrives mid-probe waits at most for the rest of one small batch at its own allocation.
Probes whose expected duration exceeds `max_probe_ms` are skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from sponge.perf.samples import BatchSample
from sponge.runtime.replica import Replica

log = logging.getLogger("sponge.prober")

# (cpu levels, batch sizes, limit) -> wanted (batch, cpu_m) cells, most wanted first
WantedCells = Callable[[Sequence[int], Sequence[int], int], Sequence[tuple[int, int]]]
# (batch, cpu_m) -> expected latency in ms (None: unknown)
Expected = Callable[[int, int], float | None]


@dataclass
class ProbeStats:
    run: int = 0  # probes completed and recorded
    disturbed: int = 0  # probes cut short by an arrival or a resize (sample discarded)
    failed: int = 0


class IdleProber:
    """One asyncio task that fills the online model's grid while the server is idle."""

    def __init__(self, core: Any, scaler: Any, wanted: WantedCells, record: Callable[[BatchSample], None],
                 cpu_levels: Sequence[int], batch_sizes: Sequence[int], expected: Expected | None = None,
                 quiet_ms: float = 300.0, period_ms: float = 100.0, max_probe_ms: float = 250.0,
                 clock: Callable[[], float] | None = None) -> None:
        self.core = core
        self.scaler = scaler
        self.wanted = wanted
        self.record = record
        self.cpu_levels = sorted({int(c) for c in cpu_levels if scaler.min_cpu_m <= c <= scaler.max_cpu_m})
        self.batch_sizes = sorted({int(b) for b in batch_sizes if b >= 1})
        self.expected = expected
        self.quiet_ms, self.period_ms, self.max_probe_ms = quiet_ms, period_ms, max_probe_ms
        self.clock = clock or (lambda: time.monotonic() * 1000.0)
        self.stats = ProbeStats()
        self._last_arrivals = -1
        self._last_change_ms = self.clock()
        self._rng = np.random.default_rng(0)
        self._inputs: dict[int, dict[str, np.ndarray]] = {}

    # ---- eligibility -------------------------------------------------------------------------------------
    def _quiet(self) -> bool:
        """No arrival for quiet_ms and nothing queued."""
        now = self.clock()
        if self.core.arrivals != self._last_arrivals:
            self._last_arrivals = self.core.arrivals
            self._last_change_ms = now
            return False
        return len(self.core.queue) == 0 and now - self._last_change_ms >= self.quiet_ms

    def _disturbed(self, replica: Replica, arrivals0: int, cpu_m: int) -> bool:
        return (self.core.arrivals != arrivals0 or len(self.core.queue) > 0
                or self.core.cpu_m.get(replica.name) != cpu_m)

    def _pick(self) -> tuple[int, int] | None:
        for b, c in self.wanted(self.cpu_levels, self.batch_sizes, len(self.cpu_levels) * len(self.batch_sizes)):
            exp = self.expected(b, c) if self.expected is not None else None
            if exp is None and b > 1:
                continue  # unknown cost: probe single images first; the model then bounds larger batches
            if exp is not None and exp > self.max_probe_ms:
                continue
            return int(b), int(c)
        return None

    def _batch(self, replica: Replica, b: int) -> dict[str, np.ndarray]:
        if b not in self._inputs:
            from sponge.perf.profiler import random_inputs

            self._inputs[b] = random_inputs(replica.inputs, b, self._rng)
        return self._inputs[b]

    # ---- one probe ------------------------------------------------------------------------------------------
    async def probe_once(self, replica: Replica, b: int, cpu_m: int) -> BatchSample | None:
        """Run one probe batch at (b, cpu_m) on an idle replica; the sample, or None if disturbed/failed.

        The serving core is told (`probe_started`/`probe_ended`, when it has them): its dispatch loop waits
        for the probe instead of queueing a batch behind it in the worker, admission counts the probe as
        work in flight, and per-batch CPU sizing leaves the probe's allocation alone while nothing is
        queued; an arrival mid-probe is sized with the probe as the batch in flight, and then the sizer,
        not the probe, owns the allocation (no restore to the idle allocation under the arrival's feet)."""
        restore_to = self.core.cpu_m[replica.name]
        arrivals0 = self.core.arrivals
        inputs = self._batch(replica, b)
        moved = cpu_m != restore_to
        started = getattr(self.core, "probe_started", None)
        if started is not None:
            started(replica.name, b, cpu_m)
        try:
            if moved:
                self.scaler.resize(replica.name, cpu_m)
            return await self._run_probe(replica, b, cpu_m, restore_to, moved, arrivals0, inputs)
        finally:
            ended = getattr(self.core, "probe_ended", None)
            if ended is not None:
                ended(replica.name)  # after the restore: the sizer sizes from the allocation in force

    async def _run_probe(self, replica: Replica, b: int, cpu_m: int, restore_to: int, moved: bool, arrivals0: int,
                         inputs: dict[str, np.ndarray]) -> BatchSample | None:
        task = asyncio.ensure_future(replica.infer(inputs))
        disturbed = False
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.005)
                if not disturbed and self._disturbed(replica, arrivals0, cpu_m):
                    disturbed = True
                    self._restore(replica, cpu_m, restore_to, moved)
            result = task.result()
        except Exception as exc:  # a dying replica is the dispatcher's business; the probe just ends
            self.stats.failed += 1
            log.debug("probe (%d, %d m) on %s failed: %s", b, cpu_m, replica.name, exc)
            if not disturbed:
                self._restore(replica, cpu_m, restore_to, moved)
            return None
        if disturbed:
            self.stats.disturbed += 1
            return None
        self._restore(replica, cpu_m, restore_to, moved)
        sample = BatchSample(images=b, cpu_m=cpu_m, latency_ms=float(result.infer_ms), t_ms=self.clock())
        self.stats.run += 1
        self.record(sample)
        return sample

    def _restore(self, replica: Replica, probed_at: int, restore_to: int, moved: bool) -> None:
        """Back to the allocation in force, unless someone (the controller) resized meanwhile, or per-batch
        CPU sizing owns the allocation and work is queued (it sized for the arrival, the probe included)."""
        if getattr(self.core, "sizes_per_batch", False) and len(self.core.queue) > 0:
            return
        if moved and self.core.cpu_m.get(replica.name) == probed_at:
            self.scaler.resize(replica.name, restore_to)

    async def step(self) -> BatchSample | None:
        """One look: probe one cell on one idle replica if everything is quiet."""
        if not self._quiet():
            return None
        replica = next((r for r in self.core.serving() if not r.busy), None)
        if replica is None:
            return None
        cell = self._pick()
        if cell is None:
            return None
        return await self.probe_once(replica, *cell)

    async def run(self) -> None:
        """Look every period_ms until cancelled; a failing look is logged, never fatal."""
        while True:
            await asyncio.sleep(self.period_ms / 1000.0)
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("idle probe failed; trying again later")
