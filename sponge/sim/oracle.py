"""A proven LOWER BOUND on the core-seconds any policy in a given action space must spend to meet every
budget that can be met, with perfect knowledge of future arrivals and budgets. Not exact: a bound.

Action space: r replicas (min_replicas <= r <= max_replicas) of c millicores each (integers in
[min_cpu_m, max_cpu_m]), batches of b <= max_batch, service time l(b, c) of the latency model (noise-free).

The argument, step by step:

0. Requests that nothing can save — budget < l(1, max_cpu_m), too short even served alone, at once, at
   full speed — are excluded: every policy misses them. The bound is for serving all the others in time.
1. Rate/cost curve. A replica at c running a batch of b makes progress on its b requests at a combined
   rate of b / l(b, c) requests per ms (a resize mid-batch changes the rate, not the total work). Every
   request of a batch must finish within its own budget, so l(b, c) <= X, the largest budget of all kept
   requests. Hence at any instant the deployment's service rate is at most sum_j H(c_j), where
   H(c) = max {b / l(b, c) : b <= max_batch, l(b, c) <= X}, while it pays sum_j c_j >= floor =
   min_replicas * min_cpu_m (cold-starting replicas pay and serve nothing: dropped, a relaxation).
   P(rate) = the lower convex envelope of the points (r*H(c), r*c) over all r and integer c, and
   (0, floor); P = +inf above the top rate. Whatever the allocation, cost(t) >= P(rate(t)).
2. Fluid relaxation. A real schedule serves request j entirely inside [arrival_j, deadline_j]: its one
   unit of service is delivered there, at the instantaneous rate of step 1. Non-preemption, batch
   formation, the controller's interval, resize delays and cold starts are ignored (relaxations).
3. Duality. For any prices lam(t) >= 0 and any schedule, with P*(lam) = sup_r (lam*r - P(r)):
       cost >= integral P(rate) dt >= integral (lam*rate - P*(lam)) dt      (Fenchel-Young)
            = sum_j integral lam * service_j dt - integral P*(lam) dt
            >= sum_j min_{t in [a_j, d_j]} lam(t) - integral P*(lam) dt =: D(lam).
   So D(lam) is a lower bound for EVERY price function; its maximum is the optimum of the fluid
   relaxation (LP duality). `oracle_bound` restricts lam to be constant on slots of `slot_ms` (min over a
   request's window = min over the slots it touches, which can only lower D), improves the prices by
   L-BFGS on a smoothed surrogate and reports the exact D at the best prices found. Stopping early
   makes the bound looser, never invalid. Horizon: [0, trace end) (whole slots), no longer than any
   simulated run, which lasts at least that long; requests whose deadline lies beyond it are not
   required (prices are 0 after the horizon), which only lowers the bound.
4. `lp_bound` solves the primal of the same relaxation on slots directly (HiGHS) with a subset of the
   window constraints (still a bound); it is slow and serves to check the dual on small cases.

So: oracle core-seconds <= the core-seconds of every policy in the action space that meets every
saveable budget. What it leaves out (why it is below what is achievable): batching delay and blocking,
the interval granularity of decisions, resize and cold-start delays, and the slot rounding.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import sparse
from scipy.optimize import linprog

from sponge.perf.latency_model import LatencyModel
from sponge.sim.inputs import RequestSet


@dataclass(frozen=True)
class ActionSpace:
    """What a policy may choose: CPU per replica (integer millicores), batch size, replica count."""

    min_cpu_m: int
    max_cpu_m: int
    max_batch: int
    min_replicas: int = 1
    max_replicas: int = 1
    # replicas are packed on `nodes` nodes of `node_cpu_m` each (None: no node limit): r replicas of c
    # millicores fit iff ceil(r / floor(node_cpu_m / c)) <= nodes, so c <= node_cpu_m // ceil(r / nodes)
    nodes: int | None = None
    node_cpu_m: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.min_cpu_m <= self.max_cpu_m or self.max_batch < 1:
            raise ValueError("need 1 <= min_cpu_m <= max_cpu_m and max_batch >= 1")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError("need 1 <= min_replicas <= max_replicas")
        if (self.nodes is not None and self.nodes < 1) or (self.node_cpu_m is not None and self.node_cpu_m < 1):
            raise ValueError("need nodes >= 1 and node_cpu_m >= 1 when given")
        if self.node_cpu_m is not None and self.node_cpu_m < self.min_cpu_m:
            raise ValueError(f"a node of {self.node_cpu_m} m cannot hold a replica of min_cpu_m {self.min_cpu_m}")

    @property
    def floor_m(self) -> int:
        return self.min_replicas * self.min_cpu_m

    def max_cpu_for(self, replicas: int) -> int:
        """The most CPU per replica with `replicas` replicas packed on the nodes (0: they do not fit)."""
        top = self.max_cpu_m if self.node_cpu_m is None else min(self.max_cpu_m, self.node_cpu_m)
        if self.nodes is None or self.node_cpu_m is None:
            return top
        per_node = -(-replicas // self.nodes)
        return min(top, self.node_cpu_m // per_node)

    def describe(self) -> str:
        reps = "1 replica" if self.max_replicas == 1 else f"{self.min_replicas}-{self.max_replicas} replicas"
        nodes = ""
        if self.node_cpu_m is not None and self.max_replicas > 1:  # one replica: max_cpu_m says it
            nodes = f", {'unlimited' if self.nodes is None else self.nodes} nodes of {self.node_cpu_m} m"
        return f"{reps} x {self.min_cpu_m}-{self.max_cpu_m} m, batch <= {self.max_batch}{nodes}"


@dataclass(frozen=True)
class CostEnvelope:
    """P(rate) as the upper hull of supporting lines: cost_m >= slope * rate_per_ms + intercept."""

    rates: np.ndarray  # hull vertices: service rate (requests/ms)
    costs: np.ndarray  # hull vertices: allocated CPU (millicores)

    @property
    def max_rate(self) -> float:
        return float(self.rates[-1])

    def lines(self, max_lines: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(slopes, intercepts) of hull edges (each a supporting line of P); a spread subset if many."""
        dr = np.diff(self.rates)
        slopes = np.diff(self.costs) / dr
        icpt = self.costs[:-1] - slopes * self.rates[:-1]
        if max_lines is not None and slopes.size > max_lines:
            keep = np.unique(np.round(np.linspace(0, slopes.size - 1, max_lines)).astype(int))
            slopes, icpt = slopes[keep], icpt[keep]
        return slopes, icpt

    def __call__(self, rate: float | np.ndarray) -> np.ndarray:
        """P itself (linear interpolation of the hull; extended with the last edge beyond max_rate)."""
        s, b = self.lines()
        r = np.asarray(rate, dtype=float)
        return np.max(r[..., None] * s + b, axis=-1) if s.size else np.full(r.shape, self.costs[0])


def _lower_hull(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower convex hull of points, x ascending (Andrew's monotone chain), keeping only its
    non-decreasing part from the leftmost point (cost never falls as the rate rises)."""
    order = np.lexsort((y, x))
    xs, ys = x[order], y[order]
    hx: list[float] = []
    hy: list[float] = []
    for px, py in zip(xs.tolist(), ys.tolist()):
        if hx and px == hx[-1]:
            continue  # same rate, higher cost (sorted): dominated
        while len(hx) >= 2 and (hx[-1] - hx[-2]) * (py - hy[-2]) - (hy[-1] - hy[-2]) * (px - hx[-2]) <= 0:
            hx.pop()
            hy.pop()
        hx.append(px)
        hy.append(py)
    return np.array(hx), np.array(hy)


def single_replica_rates(model: LatencyModel, space: ActionSpace, max_budget_ms: float) -> tuple[np.ndarray, np.ndarray]:
    """(cpu_m grid, H(c) in requests/ms) for every integer millicore of the range (step 1)."""
    c = np.arange(space.min_cpu_m, space.max_cpu_m + 1, dtype=np.float64)
    best = np.zeros_like(c)
    for b in range(1, space.max_batch + 1):
        lat = np.asarray(model.latency_ms(b, c), dtype=np.float64)
        ok = (lat > 0) & (lat <= max_budget_ms)
        best = np.where(ok, np.maximum(best, b / np.where(lat > 0, lat, np.inf)), best)
    return c, best


def cost_envelope(model: LatencyModel, space: ActionSpace, max_budget_ms: float) -> CostEnvelope:
    """The lower convex envelope P of (total rate, total CPU) over the action space (step 1)."""
    c, h = single_replica_rates(model, space, max_budget_ms)
    hulls: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    xs, ys = [np.array([0.0])], [np.array([float(space.floor_m)])]
    for r in range(space.min_replicas, space.max_replicas + 1):  # hull of the union = hull of scaled hulls
        cap = space.max_cpu_for(r)  # with nodes, more replicas leave less CPU each
        if cap < space.min_cpu_m:
            break  # r replicas do not fit on the nodes (nor do more)
        if cap not in hulls:
            ok = (h > 0) & (c <= cap)
            hulls[cap] = _lower_hull(np.append(h[ok], 0.0), np.append(c[ok], float(space.min_cpu_m)))
        hx, hy = hulls[cap]
        xs.append(r * hx)
        ys.append(r * hy)
    rx, ry = _lower_hull(np.concatenate(xs), np.concatenate(ys))
    start = int(np.argmin(ry))  # floor point; the hull rises from there
    rx, ry = rx[start:], ry[start:]
    if rx[0] > 0:  # rates below the cheapest configuration's cost nothing extra
        rx, ry = np.append(0.0, rx), np.append(ry[0], ry)
    return CostEnvelope(rx, ry)


def _window_counts(a_slot: np.ndarray, d_slot: np.ndarray, n_slots: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Prefix counts for N(a, b) = D[b] - A[a-1] + span(a, b) (span: requests straddling the window)."""
    dcum = np.cumsum(np.bincount(d_slot, minlength=n_slots))
    acum = np.cumsum(np.bincount(a_slot, minlength=n_slots))
    max_span = int((d_slot - a_slot).max()) + 1 if a_slot.size else 1
    return dcum, acum, max_span


def _straddlers(a_slot: np.ndarray, d_slot: np.ndarray, n_slots: int, max_span: int) -> dict[int, np.ndarray]:
    """For each window length L < max_span: span_L[a] = #{requests with arrival slot < a and deadline slot
    > a + L - 1} (they straddle the whole window), for every start a (vectorised over a)."""
    e = d_slot - a_slot
    cnt = np.zeros((n_slots, max_span + 1), dtype=np.int64)
    np.add.at(cnt, (a_slot, e), 1)
    rev = np.cumsum(cnt[:, ::-1], axis=1)[:, ::-1]  # rev[a', t] = #(arrival slot a', span >= t)
    out: dict[int, np.ndarray] = {}
    for L in range(1, max_span):
        span = np.zeros(n_slots, dtype=np.int64)
        for k in range(1, max_span - L + 1):  # arrival slot a - k, span >= L + k
            span[k:] += rev[: n_slots - k, L + k]
        out[L] = span
    return out


def _count(a: np.ndarray, b: np.ndarray, dcum: np.ndarray, acum: np.ndarray,
           straddle: dict[int, np.ndarray]) -> np.ndarray:
    """N(a, b) = D[b] - A[a-1] + straddlers(a, b) for arrays of windows."""
    n = dcum[b] - np.where(a > 0, acum[np.maximum(a - 1, 0)], 0)
    lengths = b - a + 1
    for L, span in straddle.items():
        w = lengths == L
        if w.any():
            n[w] += span[a[w]]
    return n


def _window_family(n_slots: int, full_len: int, ratio: float = 1.25, per_len: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Windows [a, b] of slots: all up to full_len slots, then longer ones on a coarser grid (step 3)."""
    aa, bb = [], []
    for length in range(1, min(full_len, n_slots) + 1):
        a = np.arange(0, n_slots - length + 1)
        aa.append(a)
        bb.append(a + length - 1)
    length = float(full_len)
    while True:
        length *= ratio
        L = int(round(length))
        if L > n_slots:
            break
        step = max(1, L // per_len)
        a = np.arange(0, n_slots - L + 1, step)
        aa.append(a)
        bb.append(a + L - 1)
    aa.append(np.array([0]))
    bb.append(np.array([n_slots - 1]))  # the whole horizon: total throughput
    return np.concatenate(aa), np.concatenate(bb)


@dataclass(frozen=True)
class OracleBound:
    """The bound and how it was obtained."""

    core_seconds: float  # the lower bound
    horizon_ms: float
    space: ActionSpace
    slot_ms: float
    requests: int  # requests the bound serves
    excluded: int  # requests nothing can save (budget < l(1, max_cpu_m))
    windows: int  # window constraints in the LP
    lines: int  # supporting lines of P used
    max_rate_per_s: float  # the action space's top service rate
    overloaded_slots: int  # slots whose LP rate exceeds that: no policy can meet every budget there
    floor_core_seconds: float  # floor * horizon, what an idle deployment costs anyway
    solve_s: float
    status: str
    kind: str = "lower bound"
    notes: dict[str, Any] = field(default_factory=dict)
    # False: no schedule in the space meets every saveable budget (`fluid_infeasibility`), so there is no
    # bound to give (core_seconds is NaN); `infeasible` says where the load exceeds the space's top rate
    feasible: bool = True
    infeasible: str = ""

    def ratio(self, core_seconds: float) -> float | None:
        """core_seconds / the bound; None when the space cannot meet every saveable budget."""
        if not self.feasible:
            return None
        return core_seconds / self.core_seconds if self.core_seconds > 0 else math.inf

    def label(self, fmt: str = "{:.1f}") -> str:
        """The bound for a table: the figure, or 'infeasible'."""
        return fmt.format(self.core_seconds) if self.feasible else "infeasible"

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "feasible": self.feasible,
            "infeasible": self.infeasible or None,
            "core_seconds": self.core_seconds if self.feasible else None,
            "horizon_ms": self.horizon_ms,
            "space": self.space.describe(),
            "slot_ms": self.slot_ms,
            "requests": self.requests,
            "excluded": self.excluded,
            "windows": self.windows,
            "lines": self.lines,
            "max_rate_per_s": self.max_rate_per_s,
            "overloaded_slots": self.overloaded_slots,
            "floor_core_seconds": self.floor_core_seconds,
            "solve_s": self.solve_s,
            "status": self.status,
            **self.notes,
        }


def _slots(requests: RequestSet, model: LatencyModel, space: ActionSpace, slot_ms: float):
    """Step 0, the horizon, and the slot indices of every kept request's [arrival, deadline].

    The horizon is [0, n*slot_ms) with n = floor(trace duration / slot_ms): every simulated run lasts at
    least the trace's duration, so no run is charged for less. Requests whose deadline falls beyond it
    may be served after it; their service is not required by the bound (prices are 0 there: they add
    nothing to D), which only lowers it.
    """
    send = requests.send_ms
    dl = send + requests.budget_ms
    top = space.max_cpu_for(1)  # a replica never exceeds its node
    saveable = requests.budget_ms >= float(model.latency_ms(1, top))
    n_slots = max(int(float(requests.duration_ms) // slot_ms), 1)
    horizon = n_slots * slot_ms
    inside = saveable & (dl < horizon)
    s_send, s_dl = send[inside], dl[inside]
    a_slot = (s_send // slot_ms).astype(np.int64)
    d_slot = (s_dl // slot_ms).astype(np.int64)
    x_max = float(requests.budget_ms[saveable].max()) if saveable.any() else 0.0
    env = cost_envelope(model, space, max(x_max, float(model.latency_ms(1, top))))
    excluded = int((~saveable).sum())
    return a_slot, d_slot, n_slots, horizon, excluded, env, int(saveable.sum() - inside.sum())


def lp_bound(
    requests: RequestSet,
    model: LatencyModel,
    space: ActionSpace,
    *,
    slot_ms: float = 50.0,
    full_windows_s: float = 3.0,
    max_lines: int = 40,
) -> OracleBound:
    """The primal LP of steps 3-4 (slow: minutes for 10^4 requests; the reference for small cases)."""
    t0 = time.perf_counter()
    a_slot, d_slot, n_slots, horizon, excluded, env, tail = _slots(requests, model, space, slot_ms)
    slopes, icpt = env.lines(max_lines)
    floor_cs = space.floor_m * horizon / 1e6
    if a_slot.size == 0:
        return OracleBound(floor_cs, horizon, space, slot_ms, 0, excluded, 0, 0, env.max_rate * 1000, 0,
                           floor_cs, time.perf_counter() - t0, "no requests", "lower bound (LP)")
    bad = fluid_infeasibility(a_slot, d_slot, n_slots, slot_ms, env.max_rate)
    if bad is not None:
        return OracleBound(math.nan, horizon, space, slot_ms, int(a_slot.size), excluded, 0, int(slopes.size),
                           env.max_rate * 1000, bad.slots, floor_cs, time.perf_counter() - t0, "infeasible",
                           "lower bound (LP)", feasible=False, infeasible=bad.describe(space))
    dcum, acum, max_span = _window_counts(a_slot, d_slot, n_slots)
    full_len = max(int(math.ceil(full_windows_s * 1000.0 / slot_ms)), max_span + 1)
    wa, wb = _window_family(n_slots, full_len)
    nw = _count(wa, wb, dcum, acum, _straddlers(a_slot, d_slot, n_slots, max_span))
    keep = nw > 0
    wa, wb, nw = wa[keep], wb[keep], nw[keep].astype(np.float64)

    # Variables: U_1..U_S (cumulative service, U_0 = 0) then p_0..p_{S-1} (slot cost, millicore-ms).
    S = n_slots
    s = np.arange(S)
    m = wa.size
    ridx = np.arange(m)
    has_a = wa > 0
    rows = [ridx, ridx[has_a]]
    cols = [wb, wa[has_a] - 1]  # U_{b+1} is variable b; U_a is variable a-1
    vals = [np.full(m, -1.0), np.ones(int(has_a.sum()))]
    rhs = [-nw]  # window: U_a - U_{b+1} <= -N
    r0 = m
    rows += [s + r0, s[1:] + r0]  # u_s >= 0: U_s - U_{s+1} <= 0
    cols += [s, s[1:] - 1]
    vals += [np.full(S, -1.0), np.ones(S - 1)]
    rhs += [np.zeros(S)]
    r0 += S
    for k in range(slopes.size):  # alpha_k (U_{s+1} - U_s) - p_s <= -beta_k * slot
        rows += [s + r0, s[1:] + r0, s + r0]
        cols += [s, s[1:] - 1, S + s]
        vals += [np.full(S, slopes[k]), np.full(S - 1, -slopes[k]), np.full(S, -1.0)]
        rhs += [np.full(S, -icpt[k] * slot_ms)]
        r0 += S
    a_ub = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(r0, 2 * S))
    c = np.concatenate((np.zeros(S), np.ones(S)))
    bounds = [(0, None)] * S + [(space.floor_m * slot_ms, None)] * S
    res = linprog(c, A_ub=a_ub, b_ub=np.concatenate(rhs), bounds=bounds, method="highs")
    if res.status != 0:
        raise RuntimeError(f"oracle LP failed: {res.message}")
    u = np.diff(np.concatenate(([0.0], res.x[:S])))
    overloaded = int(np.count_nonzero(u > env.max_rate * slot_ms * (1 + 1e-9)))
    value = float(res.fun) * (1 - 1e-6) / 1e6  # HiGHS is feasible to ~1e-7 relative: shave it
    return OracleBound(value, horizon, space, slot_ms, int(a_slot.size), excluded, int(m), int(slopes.size),
                       env.max_rate * 1000.0, overloaded, floor_cs, time.perf_counter() - t0, str(res.message),
                       "lower bound (LP)")


# ---- feasibility: is there any schedule to bound? -------------------------------------------------------
@dataclass(frozen=True)
class Infeasibility:
    """Where the fluid relaxation cannot meet every kept request: the seconds whose deadlines are missed
    even at the action space's top service rate, and how much work misses them."""

    missed_requests: float  # fluid: requests' worth of service not done by their deadlines
    slots: int  # slots at whose end work due is left undone
    spans_s: list[tuple[int, int]]  # [first, last] seconds holding missed deadlines
    max_rate_per_s: float
    peak_arrival_rps: float  # busiest second of arrivals (kept requests) in those spans

    def describe(self, space: ActionSpace) -> str:
        secs = sum(b - a + 1 for a, b in self.spans_s)
        shown = ", ".join(f"{a}-{b} s" if b > a else f"{a} s" for a, b in self.spans_s[:6])
        more = f" and {len(self.spans_s) - 6} more spans" if len(self.spans_s) > 6 else ""
        return (f"infeasible: {space.describe()} serves at most {self.max_rate_per_s:.1f} req/s; arrivals "
                f"(up to {self.peak_arrival_rps:.0f} req/s) exceed it so that ~{self.missed_requests:.0f} saveable "
                f"requests miss their deadlines in {secs} s ({shown}{more}) whatever the policy")


def fluid_infeasibility(a_slot: np.ndarray, d_slot: np.ndarray, n_slots: int, slot_ms: float,
                        max_rate_per_ms: float) -> Infeasibility | None:
    """None if every kept request can be served inside its slots at the space's top rate; else where not.

    Preemptive EDF at a constant rate is optimal for one fluid server (the relaxation of steps 1-2 with
    the slot rounding of step 3, which only widens windows): it misses a deadline iff some window of
    slots must serve more than top rate x its length. The dual is then unbounded (L-BFGS would report
    whatever finite value it stopped at, up to ~1e37), so there is no bound: no policy in the space meets
    every saveable budget."""
    import heapq

    cap = max_rate_per_ms * slot_ms * (1 + 1e-9)
    order = np.argsort(a_slot, kind="stable")
    a_sorted, d_sorted = a_slot[order].tolist(), d_slot[order].tolist()
    left: dict[int, float] = {}  # deadline slot -> work left (requests)
    heap: list[int] = []
    missed_at: dict[int, float] = {}
    j, n = 0, len(a_sorted)
    for s in range(n_slots):
        while j < n and a_sorted[j] == s:
            d = d_sorted[j]
            if d not in left:
                left[d] = 0.0
                heapq.heappush(heap, d)
            left[d] += 1.0
            j += 1
        budget = cap
        while heap and budget > 0:
            d = heap[0]
            take = min(budget, left[d])
            left[d] -= take
            budget -= take
            if left[d] <= 1e-12:
                heapq.heappop(heap)
                del left[d]
        if heap and heap[0] == s:  # due now, not done
            missed_at[s] = left.pop(s)
            heapq.heappop(heap)
    if not missed_at:
        return None
    per_s = 1000.0 / slot_ms
    seconds = sorted({int(s // per_s) for s in missed_at})
    spans: list[tuple[int, int]] = []
    for sec in seconds:
        if spans and sec <= spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], sec)
        else:
            spans.append((sec, sec))
    arr_s = np.bincount((a_slot // per_s).astype(np.int64), minlength=int(n_slots // per_s) + 1)
    peak = max(float(arr_s[max(a - 5, 0): b + 1].max()) for a, b in spans)  # arrivals drive the overload
    return Infeasibility(float(sum(missed_at.values())), len(missed_at), spans, max_rate_per_ms * 1000.0, peak)


# ---- the dual bound (the default: fast, and valid for every price vector) ----------------------------


class _Dual:
    """D(lam) = sum_j min_{slots s of j} lam_s - slot_ms * sum_s P*(lam_s), and a smoothed surrogate."""

    def __init__(self, a_slot: np.ndarray, d_slot: np.ndarray, n_slots: int, slot_ms: float, env: CostEnvelope):
        self.S, self.dt = n_slots, slot_ms
        span = d_slot - a_slot
        width = int(span.max()) + 1 if span.size else 1
        k = np.arange(width)
        self.mask = k[None, :] <= span[:, None]
        self.J = np.minimum(a_slot[:, None] + k[None, :], n_slots - 1)
        self.r, self.c = env.rates, env.costs  # hull vertices: P* (lam) = max_i lam r_i - c_i
        slopes = np.diff(env.costs) / np.diff(env.rates)
        self.slopes = slopes  # increasing; vertex i is optimal for slopes[i-1] <= lam <= slopes[i]

    def pstar(self, lam: np.ndarray) -> np.ndarray:
        i = np.searchsorted(self.slopes, lam, side="left")  # first vertex whose right edge is steeper
        return lam * self.r[i] - self.c[i]

    def exact(self, lam: np.ndarray) -> float:
        v = np.where(self.mask, lam[self.J], np.inf).min(axis=1)
        return float(v.sum() - self.dt * self.pstar(lam).sum())

    def smooth(self, lam: np.ndarray, tau: float) -> tuple[float, np.ndarray]:
        """Soft-min (temperature tau) over each request's slots, exact P*: a value <= exact(lam) and its
        gradient. P* is piecewise linear with one kink per hull vertex (thousands of tiny kinks), which
        L-BFGS treats as smooth; only the per-request minimum needs smoothing."""
        x = np.where(self.mask, lam[self.J], np.inf)
        m = x.min(axis=1, keepdims=True)
        w = np.exp(-(x - m) / tau)  # 0 where masked (inf)
        z = w.sum(axis=1, keepdims=True)
        jobs = float((m[:, 0] - tau * np.log(z[:, 0])).sum())
        g = np.bincount(self.J[self.mask], weights=(w / z)[self.mask], minlength=self.S)
        i = np.searchsorted(self.slopes, lam, side="left")
        pst = lam * self.r[i] - self.c[i]
        return jobs - self.dt * float(pst.sum()), g - self.dt * self.r[i]

    def start(self, a_slot: np.ndarray, smooth_slots: int) -> np.ndarray:
        """Prices P'(local arrival rate): right if the optimal schedule served arrivals as they come."""
        counts = np.bincount(a_slot, minlength=self.S).astype(float)
        k = max(1, min(smooth_slots, self.S))
        kern = np.ones(k) / k
        rate = np.convolve(counts, kern, mode="same") / self.dt
        i = np.clip(np.searchsorted(self.r, rate, side="left"), 1, self.slopes.size)
        return self.slopes[i - 1]


def oracle_bound(
    requests: RequestSet,
    model: LatencyModel,
    space: ActionSpace,
    *,
    slot_ms: float = 100.0,
    iterations: int = 450,
) -> OracleBound:
    """The lower bound by LP duality (see the module docstring, "Dual").

    Weak duality: for ANY prices lam(t) >= 0, piecewise constant on slots of `slot_ms`,
        cost of any schedule >= integral P(r(t)) dt >= sum_j min_{t in [a_j, d_j]} lam(t) - integral P*(lam(t)) dt
    (Fenchel-Young, P(r) >= lam*r - P*(lam), and each request's unit of service is spent where lam is at
    least its minimum over the request's window). The prices are improved by L-BFGS on a smoothed
    surrogate; whatever they end as, the exact dual value at them is reported, so the figure is a
    lower bound even if the search stops early. At the optimum it equals the fluid optimum of steps 1-3.
    """
    from scipy.optimize import minimize

    t0 = time.perf_counter()
    a_slot, d_slot, n_slots, horizon, excluded, env, tail = _slots(requests, model, space, slot_ms)
    floor_cs = space.floor_m * horizon / 1e6
    if a_slot.size == 0:
        return OracleBound(floor_cs, horizon, space, slot_ms, 0, excluded, 0, int(env.rates.size),
                           env.max_rate * 1000, 0, floor_cs, time.perf_counter() - t0, "no requests",
                           "lower bound (dual)")
    bad = fluid_infeasibility(a_slot, d_slot, n_slots, slot_ms, env.max_rate)
    if bad is not None:
        return OracleBound(math.nan, horizon, space, slot_ms, int(a_slot.size), excluded, 0, int(env.rates.size),
                           env.max_rate * 1000, bad.slots, floor_cs,
                           time.perf_counter() - t0, "infeasible", "lower bound (dual)",
                           notes={"beyond_horizon": tail, "missed_requests": bad.missed_requests,
                                  "infeasible_seconds": bad.spans_s},
                           feasible=False, infeasible=bad.describe(space))
    dual = _Dual(a_slot, d_slot, n_slots, slot_ms, env)
    lam0 = dual.start(a_slot, max(1, int(round(3000.0 / slot_ms))))
    best_lam, best = lam0, dual.exact(lam0)
    scale = float(np.median(lam0[lam0 > 0])) if np.any(lam0 > 0) else 1.0
    z = lam0 / scale
    used = 0
    stages = (1e-3, 3e-4, 1e-4)  # smoothing temperatures, as fractions of the typical price
    for frac in stages:
        tau = frac * scale

        def f(x: np.ndarray, tau: float = tau) -> tuple[float, np.ndarray]:
            v, g = dual.smooth(x * scale, tau)
            return -v / scale, -g

        per = max(iterations // len(stages), 1)
        res = minimize(f, z, jac=True, method="L-BFGS-B", bounds=[(0, None)] * n_slots,
                       options={"maxiter": per, "maxfun": 2 * per})
        used += int(res.nit)
        z = res.x
        val = dual.exact(z * scale)
        if val > best:
            best, best_lam = val, z * scale
    # over-full slots: the prices ask for more than the top rate (no policy meets every budget there)
    i = np.searchsorted(dual.slopes, best_lam, side="left")
    overloaded = int(np.count_nonzero(i >= dual.slopes.size))
    return OracleBound(
        core_seconds=max(best, 0.0) / 1e6,
        horizon_ms=horizon,
        space=space,
        slot_ms=slot_ms,
        requests=int(a_slot.size),
        excluded=excluded,
        windows=0,
        lines=int(env.rates.size),
        max_rate_per_s=env.max_rate * 1000.0,
        overloaded_slots=overloaded,
        floor_core_seconds=floor_cs,
        solve_s=time.perf_counter() - t0,
        status=f"L-BFGS {used} iterations; start {dual.exact(lam0) / 1e6:.1f} core-s",
        kind="lower bound (dual)",
        notes={"beyond_horizon": tail},
    )
