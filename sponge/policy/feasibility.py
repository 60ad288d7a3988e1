"""The feasibility arithmetic behind SpongeOptimizer, pure and reusable (e.g. by a simulator's oracle).

The rule ("EDF batch rule"), for one replica serving batches of at most `b` at `c` millicores:

1. Jobs. The work the configuration must serve, in EDF order, as deadlines in ms from now:
   - the backlog: each queued request's remaining time (deadline - now);
   - the predicted arrivals: a stream at the predicted rate `load` whose budgets follow the measured
     budget distribution F (the recent `budgets_ms` samples). A request arriving at time u with budget x
     has deadline u + x, so the number of arrivals with deadline <= L is
         n(L) = load * integral_0^L F(x) dx = load * mean(max(0, L - budget_i)),
     and the i-th arrival in EDF order has deadline n^-1(i) on average. Tight budgets come first and rare
     tight requests are spread out in time; loose requests can wait behind them. Arrivals are random:
     - exact Poisson envelope (`eps`, what SpongeOptimizer uses): for a Poisson stream the arrivals with
       deadline <= L are Poisson(n(L)), so the (i+1)-th deadline has passed by L with probability
       P(Gamma(i+1) <= n(L)). Job i is placed at the deadline it beats with probability eps only,
       n^-1(gammaincinv(i+1, eps)) (poisson_envelope), and there are as many jobs as the upper
       (1 - eps)-quantile of the count: a burst as early and as large as happens with probability eps;
     - Gaussian allowance (`burst_z`, the earlier rule, kept for comparison): the count is
       inflated to n + z*sqrt(n), and there is always one job at the tightest budget.
     Every deadline is multiplied by `safety` (0.9, the paper's margin for model error).
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
5. Giving up (excess_jobs, give_up). When even max CPU cannot meet every job, the fewest jobs to give up
   so that it meets the rest has a closed form (unit jobs in batch slots with deadlines form a matroid):
   with S(t) = b * max(0, floor(t / l - blocking)) places done by t, of which the n_off written-off jobs
   take the first, D_b = max_i (i + 1 - max(n_off, S(d[i]))), and giving up the D_b tightest constrained
   jobs is one such set. `is_backlog` tells queued requests from predicted arrivals, so a caller can
   give up forecast jobs before real ones.

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
    # which deadlines are queued requests (True) rather than predicted arrivals; None: not recorded
    is_backlog: np.ndarray | None = None

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

    def arrival_deadlines(
        self, load_rps: float, *, horizon_ms: float, burst_z: float = 0.0, eps: float | None = None,
        dispersion: float = 1.0,
    ) -> np.ndarray:
        """EDF-ordered deadlines (ms from now) of a stream at `load_rps` with budgets drawn from this
        profile, up to `horizon_ms`.

        eps None (Gaussian allowance): job i at mean count x with x + burst_z*sqrt(x) = i, and always at
        least one job (a request with the tightest budget may arrive at any time, even at zero load).
        eps given (exact Poisson envelope): job i at its early eps-quantile (poisson_envelope); none at
        zero load. dispersion phi > 1 (the forecast's measured error, sponge.policy.envelope): arrivals
        come as clumps of phi jobs, a Poisson stream of n/phi clumps (same mean, phi times the variance):
        job i is placed where clump floor(i / phi) is, x_i = phi * y_floor(i/phi)."""
        s = self.sorted_ms
        if not s.size:
            return np.empty(0)
        rate = max(load_rps, 0.0) / 1000.0  # per ms
        if rate == 0.0:
            return s[:0].copy() if eps is not None else s[:1].copy()
        n_knots = rate * self.unit_counts  # n(L) at L = s_k; n(L) grows with slope rate * F(L)
        n_last = float(n_knots[-1])
        n_h = n_last + rate * max(horizon_ms - s[-1], 0.0)
        if eps is not None and dispersion > 1.0:
            y = poisson_envelope(n_h / dispersion, eps)
            jobs = np.arange(int(math.floor(y.size * dispersion)))
            x = dispersion * y[np.minimum(jobs // dispersion, y.size - 1).astype(np.int64)]
        elif eps is not None:
            x = poisson_envelope(n_h, eps)
        else:
            n_jobs = int(math.floor(n_h + burst_z * math.sqrt(n_h))) + 1
            i = np.arange(n_jobs, dtype=float)
            x = ((np.sqrt(burst_z * burst_z + 4.0 * i) - burst_z) / 2.0) ** 2 if burst_z > 0 else i
        inside = np.interp(x, n_knots, s)
        beyond = s[-1] + (x - n_last) / rate
        return np.where(x <= n_last, inside, beyond)


@lru_cache(maxsize=64)
def _envelope_table(eps: float, size: int) -> np.ndarray:
    from scipy.special import gammaincinv  # imported on first use: scipy.special takes ~0.2 s to load

    x = np.asarray(gammaincinv(np.arange(1.0, size + 1.0), eps), dtype=float)
    x.setflags(write=False)
    return x


def poisson_envelope(n_mean: float, eps: float) -> np.ndarray:
    """Early eps-quantiles of the arrival "times" of a Poisson stream, in units of its mean count.

    The (i+1)-th event of a unit-rate Poisson process occurs at a Gamma(i+1, 1) time, so it has occurred
    by mean count x with probability P(Gamma(i+1) <= x); x_i = gammaincinv(i+1, eps) is the count by
    which it has occurred with probability eps only. Returns x_0 < x_1 < ... for every i with
    x_i <= n_mean: as many jobs as the upper (1 - eps)-quantile of Poisson(n_mean), each as early as it
    is with probability eps. (Memoised table; doubled on demand.)"""
    if not 0.0 < eps < 1.0:
        raise ValueError("eps must be in (0, 1)")
    size = 64
    table = _envelope_table(eps, size)
    while table[-1] <= n_mean:
        size *= 2
        table = _envelope_table(eps, size)
    return table[: int(np.searchsorted(table, n_mean, side="right"))]


def arrival_deadlines(
    budgets_ms: Sequence[float] | np.ndarray,
    load_rps: float,
    *,
    horizon_ms: float,
    burst_z: float = 0.0,
    eps: float | None = None,
) -> np.ndarray:
    """EDF-ordered deadlines of predicted arrivals (see BudgetProfile.arrival_deadlines)."""
    return BudgetProfile.of(budgets_ms).arrival_deadlines(load_rps, horizon_ms=horizon_ms, burst_z=burst_z, eps=eps)


def build_workload(
    budgets_ms: "Sequence[float] | BudgetProfile",
    queue_remaining_ms: Sequence[float],
    load_rps: float,
    *,
    interval_ms: float = 1000.0,
    safety: float = 0.9,
    burst_z: float = 0.0,
    floor_ms: float = 0.0,
    eps: float | None = None,
    dispersion: float = 1.0,
) -> Workload:
    """Backlog plus predicted arrivals as one EDF-ordered deadline list (see the module docstring).

    `budgets_ms` may be a BudgetProfile already made with this `safety` (then it is used as is).
    """
    profile = BudgetProfile.of(budgets_ms, safety)
    horizon = interval_ms + (float(profile.sorted_ms[-1]) if profile.size else 0.0)
    arrivals = profile.arrival_deadlines(load_rps, horizon_ms=horizon, burst_z=burst_z, eps=eps,
                                         dispersion=dispersion)
    if len(queue_remaining_ms):
        backlog = np.asarray(queue_remaining_ms, dtype=float) * safety
        d = np.concatenate((backlog, arrivals))
        order = np.argsort(d, kind="stable")
        d, mine = d[order], order < backlog.size
    else:
        backlog, d = arrivals[:0], arrivals  # arrivals are already in ascending order
        mine = np.zeros(d.size, dtype=bool)
    n_off = int(np.searchsorted(d, max(floor_ms, 1e-9), side="left"))
    return Workload(d, n_off, float(load_rps), int(backlog.size), int(arrivals.size), mine)


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


def excess_jobs(w: Workload, batch_latency_ms: np.ndarray, blocking: float = 1.0) -> np.ndarray:
    """Per batch size b = 1..len(batch_latency_ms): the fewest constrained jobs that must be given up so
    that every other one meets its deadline at batch latency l_b (the workload's load is not checked).

    Batch k finishes at (k + 1 + blocking) * l_b, so S(t) = b * max(0, floor(t / l_b - blocking)) jobs can
    be done by t. The n_off written-off jobs take the first places (their work counts); jobs 0..i (EDF
    order) then need i + 1 places by d[i], hence at least i + 1 - max(n_off, S(d[i])) of the constrained
    ones among them are lost, and giving up that many of the tightest achieves it for every i at once:
    D_b = max(0, max_i (i + 1 - max(n_off, S(d[i])))), and the EDF-first D_b constrained jobs are a set
    to give up. (Unit jobs in slots with deadlines form a matroid: greedy EDF with rejection keeps the
    most, and this is its count.)"""
    lat = np.asarray(batch_latency_ms, dtype=float)
    d = w.deadlines_ms[w.n_written_off :]
    if not d.size:
        return np.zeros(lat.size, dtype=np.int64)
    b = np.arange(1, lat.size + 1)[:, None]
    places = b * np.maximum(0.0, np.floor(d[None, :] / lat[:, None] - blocking))
    places = np.maximum(places, w.n_written_off)  # written-off jobs take the first places, whenever they end
    need = np.arange(w.n_written_off + 1, w.n_jobs + 1)[None, :]
    return np.maximum(0, (need - places).max(axis=1)).astype(np.int64)


def give_up(w: Workload, n: int, load_rps: float | None = None, *, backlog: bool | None = None,
            keep_work: bool = False) -> Workload:
    """The workload without its `n` tightest constrained jobs (they leave the EDF order and the work:
    the queue answers a request at its head that can no longer make it, without serving it), and
    optionally at another load. backlog True / False: only among queued requests / predicted arrivals.
    keep_work (a server that serves late requests anyway): they stay as work but no longer constrain —
    written off, served first (they are the tightest, EDF serves them first)."""
    if n <= 0 and load_rps is None:
        return w
    if keep_work:
        idx = np.arange(w.n_written_off, w.n_jobs)
        if backlog is not None:
            if w.is_backlog is None:
                raise ValueError("this workload does not record which jobs are queued")
            idx = idx[w.is_backlog[idx] == backlog]
        d = w.deadlines_ms.copy()
        d[idx[: max(n, 0)]] = -np.inf
        order = np.argsort(d, kind="stable")
        mine = None if w.is_backlog is None else w.is_backlog[order]
        n_off = w.n_written_off + int(min(max(n, 0), idx.size))
        return Workload(d[order], n_off, float(w.load_rps if load_rps is None else load_rps),
                        w.n_backlog, w.n_arrivals, mine)
    idx = np.arange(w.n_written_off, w.n_jobs)
    if backlog is not None:
        if w.is_backlog is None:
            raise ValueError("this workload does not record which jobs are queued")
        idx = idx[w.is_backlog[idx] == backlog]
    keep = np.ones(w.n_jobs, dtype=bool)
    keep[idx[: max(n, 0)]] = False
    mine = None if w.is_backlog is None else w.is_backlog[keep]
    return Workload(w.deadlines_ms[keep], w.n_written_off, float(w.load_rps if load_rps is None else load_rps),
                    w.n_backlog, w.n_arrivals, mine)


def backlog_only(w: Workload) -> Workload:
    """The queued requests of a workload (and every written-off job, whose work still counts)."""
    if w.is_backlog is None:
        raise ValueError("this workload does not record which jobs are queued")
    keep = w.is_backlog.copy()
    keep[: w.n_written_off] = True
    return Workload(w.deadlines_ms[keep], w.n_written_off, 0.0, w.n_backlog, 0, w.is_backlog[keep])
