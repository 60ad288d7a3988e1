"""The feasibility arithmetic behind SpongeOptimizer, pure and reusable (e.g. by a simulator's oracle).

The rule ("EDF batch rule"), for one replica serving batches of at most `b` at `c` millicores:

1. Jobs. The work the configuration must serve, in EDF order, as deadlines in ms from now:
   - the backlog: each queued request's remaining time (deadline - now);
   - the predicted arrivals: a stream at the predicted rate `load` whose budgets follow the measured
     budget distribution F (the recent `budgets_ms` samples). A request arriving at time u with budget x
     has deadline u + x, so the number of arrivals with deadline <= L is
         n(L) = load * integral_0^L F(x) dx = load * mean(max(0, L - budget_i)),
     and the i-th arrival in EDF order has deadline n^-1(i). Tight budgets come first and rare tight
     requests are spread out in time; loose requests can wait behind them. With a burst allowance z the
     count is inflated to n + z*sqrt(n) (z standard deviations of a Poisson count), pulling deadlines
     earlier. Every deadline is multiplied by `safety` (0.9, the paper's margin for model error).
     Arrivals are generated up to one interval plus the largest budget: every arrival of the next
     interval (later ones are the next decision's business).
2. Batches. EDF serves job j in batch floor(j/b); batch k finishes at (k + 1 + blocking) * l(b, c): one
   batch may already be running when the jobs arrive (non-preemptive blocking, approximated by one batch
   of the candidate configuration, since an in-place resize speeds the running batch up too), then the
   k+1 batches up to and including its own. All jobs of a batch finish together, so the binding job of
   batch k is its tightest, the first one: deadline d[k*b].
3. Feasible iff, for every batch k,  (k + 1 + blocking) * l(b, c) <= d[k*b],  and  h(b, c) >= load
   (beyond the horizon the queue must not grow). Equivalently  l(b, c) <= bound_b  where
       bound_b = min( min_k d[k*b] / (k + 1 + blocking),  1000 * b / load ).
   That is a single number per batch size, so the optimizer's search over (b, c) is a table lookup.
4. Written-off jobs. A job whose deadline is below `floor_ms` (the optimizer uses l(1, max_cpu): it cannot
   be met even if served next, alone, at full speed) can be saved by no configuration; it still occupies
   its place in the EDF order (its work is counted) but imposes no constraint. This matches the queue's
   policy for hopeless requests and stops one lost request from pinning the allocation at its maximum.

With one budget value and all load arriving at once (no spreading, blocking 0) this is exactly the
paper's rule `k*l + l <= 0.9*budget_min`; the differences are the budget distribution, arrivals spread
over time at the predicted rate, the backlog, and the running batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from sponge.perf.latency_model import LatencyModel


@dataclass(frozen=True)
class Workload:
    """EDF-ordered deadlines (ms from now, safety applied, ascending) and what they are made of."""

    deadlines_ms: np.ndarray
    n_written_off: int  # leading deadlines below the floor: counted as work, not as constraints
    load_rps: float  # rate the configuration must sustain (already including any headroom)
    n_backlog: int
    n_arrivals: int

    @property
    def n_jobs(self) -> int:
        return int(self.deadlines_ms.size)


@dataclass(frozen=True)
class Check:
    """Result of checking one (batch, cpu) against a Workload."""

    feasible: bool
    worst_slack_ms: float  # min over batches of deadline - finish; +inf when nothing constrains
    throughput_rps: float
    load_rps: float


@dataclass(frozen=True)
class BudgetProfile:
    """The measured budget distribution, prepared once per observation (sorted, safety applied).

    `unit_counts[k]` = integral_0^{s_k} F(x) dx = mean(max(0, s_k - s_j)): the number of arrivals with
    deadline <= s_k per unit of rate (1/ms). Reused across candidate loads (the joint optimizer splits
    the load n ways), because n(L) is linear in the rate.
    """

    sorted_ms: np.ndarray
    unit_counts: np.ndarray

    @staticmethod
    def of(budgets_ms: "Sequence[float] | np.ndarray | BudgetProfile", safety: float = 1.0) -> "BudgetProfile":
        if isinstance(budgets_ms, BudgetProfile):
            return budgets_ms
        s = np.sort(np.asarray(budgets_ms, dtype=float)) * safety
        if not s.size:
            return BudgetProfile(s, s)
        prefix = np.concatenate(([0.0], np.cumsum(s)[:-1]))
        return BudgetProfile(s, (np.arange(s.size) * s - prefix) / s.size)

    @property
    def size(self) -> int:
        return int(self.sorted_ms.size)

    def arrival_deadlines(self, load_rps: float, *, horizon_ms: float, burst_z: float = 0.0) -> np.ndarray:
        """EDF-ordered deadlines (ms from now) of a stream at `load_rps` with budgets drawn from this
        profile, up to `horizon_ms`; always at least one (a request with the tightest budget may arrive
        at any time, even at zero predicted load)."""
        s = self.sorted_ms
        if not s.size:
            return np.empty(0)
        rate = max(load_rps, 0.0) / 1000.0  # per ms
        if rate == 0.0:
            return s[:1].copy()
        n_knots = rate * self.unit_counts  # n(L) at L = s_k; n(L) grows with slope rate * F(L)
        n_last = float(n_knots[-1])
        n_h = n_last + rate * max(horizon_ms - s[-1], 0.0)
        n_jobs = int(math.floor(n_h + burst_z * math.sqrt(n_h))) + 1
        i = np.arange(n_jobs, dtype=float)
        x = ((np.sqrt(burst_z * burst_z + 4.0 * i) - burst_z) / 2.0) ** 2 if burst_z > 0 else i
        inside = np.interp(x, n_knots, s)
        beyond = s[-1] + (x - n_last) / rate
        return np.where(x <= n_last, inside, beyond)


def arrival_deadlines(
    budgets_ms: Sequence[float] | np.ndarray, load_rps: float, *, horizon_ms: float, burst_z: float = 0.0
) -> np.ndarray:
    """EDF-ordered deadlines of predicted arrivals (see BudgetProfile.arrival_deadlines)."""
    return BudgetProfile.of(budgets_ms).arrival_deadlines(load_rps, horizon_ms=horizon_ms, burst_z=burst_z)


def build_workload(
    budgets_ms: "Sequence[float] | BudgetProfile",
    queue_remaining_ms: Sequence[float],
    load_rps: float,
    *,
    interval_ms: float = 1000.0,
    safety: float = 0.9,
    burst_z: float = 0.0,
    floor_ms: float = 0.0,
) -> Workload:
    """Backlog plus predicted arrivals as one EDF-ordered deadline list (see the module docstring).

    `budgets_ms` may be a BudgetProfile already made with this `safety` (then it is used as is).
    """
    profile = BudgetProfile.of(budgets_ms, safety)
    horizon = interval_ms + (float(profile.sorted_ms[-1]) if profile.size else 0.0)
    arrivals = profile.arrival_deadlines(load_rps, horizon_ms=horizon, burst_z=burst_z)
    if len(queue_remaining_ms):
        backlog = np.asarray(queue_remaining_ms, dtype=float) * safety
        d = np.sort(np.concatenate((backlog, arrivals)))
    else:
        backlog, d = arrivals[:0], arrivals  # arrivals are already in ascending order
    n_off = int(np.searchsorted(d, max(floor_ms, 1e-9), side="left"))
    return Workload(d, n_off, float(load_rps), int(backlog.size), int(arrivals.size))


@lru_cache(maxsize=256)
def _batch_heads_all(n_jobs: int, n_off: int, max_batch: int) -> tuple[np.ndarray, ...]:
    """_batch_heads for b = 1..max_batch, memoised: job counts repeat from one interval to the next."""
    out = _batch_heads(n_jobs, n_off, np.arange(1, max_batch + 1))
    for a in out:
        a.setflags(write=False)
    return out


def _batch_heads(
    n_jobs: int, n_off: int, batches: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each batch size, the batches that hold a constrained job, flattened over batch sizes:
    (batch index k, index of its tightest constrained job, group start offsets, group sizes)."""
    nk = -(-n_jobs // batches)  # ceil(n_jobs / b) batches
    kstart = n_off // batches  # first batch holding a constrained job
    counts = nk - kstart
    starts = np.cumsum(counts) - counts
    total = int(counts.sum())
    within = np.arange(total) - np.repeat(starts, counts)
    k = np.repeat(kstart, counts) + within
    idx = np.maximum(k * np.repeat(batches, counts), n_off)
    return k, idx, starts, counts


def latency_bounds_ms(w: Workload, max_batch: int, blocking: float = 1.0) -> np.ndarray:
    """bound[b-1] = the largest l(b, c) that is feasible for batch size b (+inf: unconstrained)."""
    batches = np.arange(1, max_batch + 1)
    bounds = np.full(max_batch, np.inf)
    if w.n_jobs > w.n_written_off:
        k, idx, starts, _ = _batch_heads_all(w.n_jobs, w.n_written_off, max_batch)
        ratio = w.deadlines_ms[idx] / (k + 1.0 + blocking)
        bounds = np.minimum.reduceat(ratio, starts)
    if w.load_rps > 0:
        bounds = np.minimum(bounds, 1000.0 * batches / w.load_rps)
    return bounds


def arrival_bounds_for_loads(
    profile: BudgetProfile,
    loads_rps: np.ndarray,
    max_batch: int,
    *,
    interval_ms: float = 1000.0,
    burst_z: float = 0.0,
    floor_ms: float = 0.0,
    blocking: float = 1.0,
) -> np.ndarray:
    """latency_bounds_ms for arrivals only (no backlog) at several loads at once: shape (loads, batches).

    Row j equals latency_bounds_ms(build_workload(profile, (), loads_rps[j], ...)); it is vectorised
    because the joint optimizer asks it for every replica count n (load/n) in one interval. The trick:
    the arrivals at rate r have deadlines G^-1(x_i / r) where G is the rate-free count profile.
    """
    loads = np.asarray(loads_rps, dtype=float)
    batches = np.arange(1, max_batch + 1)
    out = np.full((loads.size, max_batch), np.inf)
    s = profile.sorted_ms
    if not s.size or not loads.size:
        return out
    rates = np.maximum(loads, 0.0) / 1000.0
    u_last = float(profile.unit_counts[-1])
    horizon = interval_ms + float(s[-1])
    n_h = rates * (u_last + max(horizon - s[-1], 0.0))
    n_jobs = np.where(rates > 0, np.floor(n_h + burst_z * np.sqrt(n_h)).astype(np.int64) + 1, 1)
    job_start = np.cumsum(n_jobs) - n_jobs
    i = np.arange(int(n_jobs.sum())) - np.repeat(job_start, n_jobs)
    x = ((np.sqrt(burst_z * burst_z + 4.0 * i) - burst_z) / 2.0) ** 2 if burst_z > 0 else i.astype(float)
    r = np.repeat(rates, n_jobs)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.where(r > 0, x / r, 0.0)  # rate-free count: deadline = G^-1(u)
    d = np.where(u <= u_last, np.interp(u, profile.unit_counts, s), s[-1] + (u - u_last))
    below = d < max(floor_ms, 1e-9)
    n_off = np.add.reduceat(below.astype(np.int64), job_start)
    # batch heads for every (load, batch size) pair, flattened
    nj = np.repeat(n_jobs, max_batch)
    no = np.repeat(n_off, max_batch)
    bb = np.tile(batches, loads.size)
    counts = np.where(no < nj, -(-nj // bb) - no // bb, 0)
    total = int(counts.sum())
    if total:
        starts = np.cumsum(counts) - counts
        k = np.repeat(no // bb, counts) + (np.arange(total) - np.repeat(starts, counts))
        idx = np.maximum(k * np.repeat(bb, counts), np.repeat(no, counts))
        idx += np.repeat(np.repeat(job_start, max_batch), counts)
        ratio = d[idx] / (k + 1.0 + blocking)
        has = counts > 0
        flat = np.full(has.size, np.inf)
        flat[has] = np.minimum.reduceat(ratio, starts[has])
        out = flat.reshape(loads.size, max_batch)
    with np.errstate(divide="ignore"):
        thr = np.where(loads[:, None] > 0, 1000.0 * batches[None, :] / loads[:, None], np.inf)
    return np.minimum(out, thr)


def worst_slacks_ms(w: Workload, batch_latency_ms: np.ndarray, blocking: float = 1.0) -> np.ndarray:
    """Per batch size b = 1..len(batch_latency_ms): min over batches k of d[k*b] - (k+1+blocking)*l_b.
    Negative values are the worst lateness; +inf when nothing constrains."""
    lat = np.asarray(batch_latency_ms, dtype=float)
    if w.n_jobs <= w.n_written_off:
        return np.full(lat.size, np.inf)
    k, idx, starts, counts = _batch_heads_all(w.n_jobs, w.n_written_off, lat.size)
    slack = w.deadlines_ms[idx] - (k + 1.0 + blocking) * np.repeat(lat, counts)
    return np.minimum.reduceat(slack, starts)


def worst_slack_ms(w: Workload, batch_latency_ms: float, batch: int, blocking: float = 1.0) -> float:
    """min over batches k of d[k*b] - (k + 1 + blocking) * l: negative means the worst lateness."""
    if w.n_jobs <= w.n_written_off:
        return math.inf
    k, idx, _, _ = _batch_heads(w.n_jobs, w.n_written_off, np.array([batch]))
    return float(np.min(w.deadlines_ms[idx] - (k + 1.0 + blocking) * batch_latency_ms))


def check(model: LatencyModel, batch: int, cpu_m: float, w: Workload, blocking: float = 1.0) -> Check:
    """Is (batch, cpu_m) feasible for the workload? The reference (unvectorised) form of the rule."""
    lat = model.latency_ms(batch, cpu_m)
    slack = worst_slack_ms(w, lat, batch, blocking)
    thr = model.throughput_rps(batch, cpu_m)
    ok = slack >= 0.0 and thr >= w.load_rps * (1.0 - 1e-12)
    return Check(ok, slack, thr, w.load_rps)
