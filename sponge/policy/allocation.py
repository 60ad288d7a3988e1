"""Stage 3 of the Sponge decision: the least allocation — the least CPU on the millicore grid, and a
batch size, under which the EDF batch rule meets every deadline of a workload. Pure, stateless.

For every batch size b, the largest batch latency that meets every deadline (one batch of the candidate
already running, `blocking` = 1) and sustains the rate (feasibility.latency_bounds_ms); the least CPU with
l(b, c) <= that bound. Choose the least CPU; at that CPU, the LARGEST feasible batch (batch_rule
"largest": the batch is only a cap, the batcher takes what is queued, so a larger cap costs nothing at
low load and drains bursts faster; "least" is the paper's tie-break).

Infeasible (nothing up to max CPU meets every job): give up the fewest jobs possible
(feasibility.excess_jobs, exact): first queued requests, the fewest that every batch size must lose at max
CPU, then the fewest forecast arrivals (a forecast at a high quantile is given up before a real request).
Then the least CPU and largest batch meeting every remaining job, without the rate beyond the horizon (the
next decision sees what is left); `given_up` says how many. Where the server serves late requests anyway
(`serves_late`), given-up jobs are not dropped: they stay as work at the head of the EDF order (they are
the tightest, EDF serves them first), so the plan provisions for the requests that will actually be
served. infeasible="max" keeps the earlier rule (max CPU, the batch with the least lateness).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from sponge.perf.latency_model import LatencyModel
from sponge.policy.feasibility import (
    Workload,
    backlog_only,
    excess_jobs,
    give_up,
    latency_bounds_ms,
    worst_slack_ms,
    worst_slacks_ms,
)


@dataclass(frozen=True)
class Plan:
    """The least-CPU configuration for one workload (infeasible: see `given_up`)."""

    cpu_m: int
    batch: int
    feasible: bool
    batch_latency_ms: float  # l(batch, cpu_m)
    bounds_ms: np.ndarray  # per batch size: the largest feasible batch latency
    workload: Workload
    blocking: float = 1.0
    given_up: int = 0  # infeasible: constrained jobs no configuration can meet together with the rest

    @cached_property
    def worst_slack_ms(self) -> float:
        """Worst (least) deadline slack of the plan; computed on demand, the search does not need it."""
        return worst_slack_ms(self.workload, self.batch_latency_ms, self.batch, self.blocking)


def cpu_grid(min_cpu_m: int, max_cpu_m: int, step_m: int) -> np.ndarray:
    """Allocations the optimizer may choose: min, min+step, ..., and always max itself."""
    if not 0 < min_cpu_m <= max_cpu_m or step_m <= 0:
        raise ValueError("need 0 < min_cpu_m <= max_cpu_m and step_m > 0")
    grid = np.arange(min_cpu_m, max_cpu_m + 1, step_m, dtype=np.int64)
    if grid[-1] != max_cpu_m:
        grid = np.append(grid, max_cpu_m)
    return grid


class LeastAllocation:
    """Stage 3: `plan(workload) -> Plan` over a millicore grid and batch sizes 1..max_batch."""

    def __init__(self, model: LatencyModel, *, min_cpu_m: int, max_cpu_m: int, step_m: int = 50,
                 max_batch: int = 16, blocking: float = 1.0, batch_rule: str = "largest",
                 infeasible: str = "saveable") -> None:
        if batch_rule not in ("largest", "least") or infeasible not in ("saveable", "max"):
            raise ValueError("batch_rule must be 'largest' or 'least', infeasible 'saveable' or 'max'")
        if max_batch < 1 or blocking < 0:
            raise ValueError("max_batch must be >= 1 and blocking >= 0")
        self.model = model
        self.min_cpu_m, self.max_cpu_m, self.step_m = min_cpu_m, max_cpu_m, step_m
        self.max_batch, self.blocking = max_batch, blocking
        self.batch_rule, self.infeasible = batch_rule, infeasible
        self.grid = cpu_grid(min_cpu_m, max_cpu_m, step_m)
        self.batches = np.arange(1, max_batch + 1)
        # l(b, c) for every candidate, computed once: each decision is then a comparison against a table.
        self.lat = np.asarray(model.latency_ms(self.batches[:, None], self.grid[None, :].astype(float)))
        # A deadline below this cannot be met even served next, alone, at max CPU: written off.
        self.floor_ms = float(model.latency_ms(1, max_cpu_m))

    def _pick(self, first: np.ndarray) -> tuple[int, int]:
        """(grid index, batch index) of the least CPU and, at it, the batch rule's batch."""
        ci = int(first.min())
        ok = np.flatnonzero(first <= ci)
        return ci, int(ok[-1] if self.batch_rule == "largest" else ok[0])

    def plan(self, w: Workload, serves_late: bool = False) -> Plan:
        """Least CPU (then the batch rule) meeting every deadline of `w`; infeasible: module docstring."""
        bounds = latency_bounds_ms(w, self.max_batch, self.blocking)
        first = self.first_feasible(bounds)
        if (first < self.grid.size).any():
            ci, bi = self._pick(first)
            return Plan(int(self.grid[ci]), bi + 1, True, float(self.lat[bi, ci]), bounds, w, self.blocking)
        lat_max = self.lat[:, -1]
        if self.infeasible == "saveable":
            return self._saveable_plan(w, lat_max, serves_late)
        slacks = worst_slacks_ms(w, lat_max, self.blocking)
        if w.load_rps > 0:  # a batch too small to keep up loses without bound beyond the horizon
            short = 1000.0 * self.batches / lat_max < w.load_rps
            if not short.all():
                slacks = np.where(short, -np.inf, slacks)
        bi = int(np.argmax(slacks))
        return Plan(self.max_cpu_m, bi + 1, False, float(lat_max[bi]), bounds, w, self.blocking)

    def _saveable_plan(self, w: Workload, lat_max: np.ndarray, serves_late: bool) -> Plan:
        big = np.iinfo(np.int64).max
        drop_b = excess_jobs(backlog_only(w), lat_max, self.blocking)
        n_b = int(drop_b.min())
        w1 = give_up(w, n_b, 0.0, backlog=True, keep_work=serves_late)
        drop_a = np.where(drop_b == n_b, excess_jobs(w1, lat_max, self.blocking), big)
        n_a = int(drop_a.min())
        w2 = give_up(w1, n_a, backlog=False, keep_work=serves_late)
        bounds = latency_bounds_ms(w2, self.max_batch, self.blocking)
        first = self.first_feasible(bounds)
        if not (first < self.grid.size).any():  # rounding at the boundary (or kept work): max CPU
            first = np.where(drop_a == n_a, self.grid.size - 1, first)
            if not (first < self.grid.size).any():
                first = np.full_like(first, self.grid.size - 1)
        ci, bi = self._pick(first)
        if w.load_rps > 0 and 1000.0 * (bi + 1) / self.lat[bi, ci] < w.load_rps:
            # Overload: what is left can be met, but a batch this small falls behind the arrivals and the
            # queue grows without bound. At max CPU, the least batch that keeps up, else the largest.
            keeps_up = np.flatnonzero(1000.0 * self.batches / lat_max >= w.load_rps)
            ci, bi = self.grid.size - 1, int(keeps_up[0] if keeps_up.size else self.max_batch - 1)
        return Plan(int(self.grid[ci]), bi + 1, False, float(self.lat[bi, ci]), bounds, w2, self.blocking,
                    n_b + n_a)

    def first_feasible(self, bounds_ms: np.ndarray) -> np.ndarray:
        """Per batch size (last axis of `bounds_ms`, any leading shape), the index of the least grid CPU
        with l(b, c) <= bound; grid.size where none.

        For the DESIGN §4 model, l(b,c) <= B solves in closed form: c >= 1000 (g b + e) / (B - d b - h)
        millicores; the table check after it only corrects floating-point rounding. Any other latency
        model (a subclass overriding latency_ms) is searched in the precomputed table instead.
        """
        size = self.grid.size
        if type(self.model) is LatencyModel:
            m, b = self.model, self.batches
            room = bounds_ms - (m.d * b + m.h)
            with np.errstate(divide="ignore", invalid="ignore"):
                need = np.where(room > 0, 1000.0 * (m.g * b + m.e) / room, np.inf)
            idx = np.searchsorted(self.grid, need, side="left")
            rows = np.broadcast_to(b - 1, idx.shape)
            for _ in range(2):  # rounding: step forward where the table disagrees
                bad = (idx < size) & (self.lat[rows, np.minimum(idx, size - 1)] > bounds_ms)
                if not bad.any():
                    break
                idx = idx + bad
            return idx
        flat = np.asarray(bounds_ms).reshape(-1, self.max_batch)
        out = np.empty(flat.shape, dtype=np.int64)
        for j, row in enumerate(flat):
            ok = self.lat <= row[:, None]
            out[j] = np.where(ok.any(axis=1), ok.argmax(axis=1), size)
        return out.reshape(np.shape(bounds_ms))

    def batch_at(self, cpu_m: int, bounds_ms: np.ndarray) -> int | None:
        """The batch size chosen at `cpu_m` among the feasible ones (see `batch_rule`), or None."""
        lat = np.asarray(self.model.latency_ms(self.batches, float(cpu_m)))
        ok = np.flatnonzero(lat <= bounds_ms)
        if not ok.size:
            return None
        return int(ok[-1] if self.batch_rule == "largest" else ok[0]) + 1
