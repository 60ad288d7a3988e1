"""JointOptimizer: horizontal + vertical. Replicas n and CPU per replica c minimising total CPU n*c.

Horizontal capacity is slow (a new replica pays a cold start, and is billed while it starts) and in-place
vertical scaling is fast, so the replica count follows the sustained load and the CPU per replica absorbs
the rest (bursts, the backlog, the cold start). The per-replica arithmetic is the `sponge` rule's pipeline
(`ReplicaPlanner`): the latency model's measured margin (margins.py), the load envelope (envelope.py: a
10-interval mean that follows a rise within 1-3 intervals, with the forecast's measured dispersion), the
deadline demand at a stated risk `arrival_eps` (demand.py: a Poisson envelope of the arrivals, not a
constant headroom) and the least allocation (allocation.py: least CPU, largest batch; the fewest jobs
given up when nothing is enough). Per interval:

1. Recommended count n*: the demand is pooled — one Poisson envelope of the whole deployment's arrivals
   (the replicas share one EDF queue, so a burst is one burst, not n independent ones; an envelope per
   replica at load/n cost 32-40 % more core-seconds on the windows below) — and each of n replicas
   serves every n-th job of it in EDF order (the tightest share) at 1/n of the rate (`share_of`). For every n from the fewest that can
   possibly carry the forecast to max_replicas, the least CPU c_n at which one replica meets its share
   (arrivals only); n* minimises n * (c_n + replica_overhead_m), ties to fewer replicas (nothing feasible:
   the fewest jobs given up first). Whether few big or many small replicas win depends on the model: with
   a large per-request term d, CPU beyond a point buys little throughput and more small replicas are
   cheaper.
2. Scale-out: at once when the per-replica cap binds (the replicas already ordered, starting ones
   included, cannot carry the forecast even at max CPU); otherwise once n* has exceeded the count for
   `scale_out_window` (3) consecutive intervals: a level that persists. A shorter surge is met vertically,
   which is cheaper than a cold start billed at the bridge's CPU (1 interval: 3,143 core-s on the window
   below, 3: 3,048). Scale-in: only to the largest n* of the last `scale_in_window` (30) intervals (the
   load stayed low for the whole stabilisation window).
3. CPU per replica: the plan for the k = min(n, ready) replicas that actually serve now — capacity that
   is still starting is never counted — each with its share of the forecast and of the queue. While
   replicas start (k < n) this is the cold-start bridge: the ready replicas carry the load vertically, up
   to max_cpu_m. A decision has one cpu_m for all replicas and starting ones are billed (DESIGN §5), so
   the bridge costs n x that; `bridge_cost_cap` caps it at the largest of the current allocation, an even
   share of k * max_cpu_m and the steady plan for n (feasible=False when it bites). In steady state CPU
   goes down after `down_window` (1) intervals (hysteresis.stabilise), as the `sponge` rule's.

No per-batch CPU between decisions (the simulator sizes per batch only with one replica), so the stated
risk is lower than the `sponge` rule's 0.3: arrival_eps 0.05 (damping 8, scale_out_window 1: 0.005 cost
+14 % core-s; 0.2-0.3 missed 2-3 requests).

Measured (sponge simulate, unscaled YOLOv5s Twitter bursty window, Ghent 4G budgets, SLO 1 s, 16-core
replicas, at most 8, 7 s cold start, seed 0): damping 8, 100 % of requests for 3,048 core-s = 1.49x the
multi-replica oracle bound (themis 99.91 % for 3,652, hpa 98.90 % for 5,642); damping 5, 100 % for 4,579 =
1.34x (themis 100 % for 5,501, hpa 98.24 % for 7,473). The rule before issue 11 (reactive rate + 10 %
headroom, a Gaussian burst allowance per replica, CPU held 5 intervals, max CPU when infeasible):
100 % for 3,963 (1.94x) and 6,185 (1.81x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from sponge.perf.latency_model import LatencyModel
from sponge.policy.allocation import LeastAllocation, Plan
from sponge.policy.demand import DeadlineDemand
from sponge.policy.envelope import EnvelopeState, LoadEnvelope, LoadForecast
from sponge.policy.feasibility import Workload, latency_bounds_ms, worst_slack_ms
from sponge.policy.hysteresis import DownscaleStabilizer, stabilise
from sponge.policy.margins import MarginState, ModelErrorMargin
from sponge.policy.sponge_opt import backlog_summary, budget_summary
from sponge.policy.types import Decision, Observation

__all__ = ["JointOptimizer", "ReplicaChoice", "ReplicaPlanner", "share_of"]


@dataclass(frozen=True)
class ReplicaChoice:
    """The recommended replica count and its per-replica plan (arrivals only, no backlog)."""

    replicas: int
    plan: Plan

    @property
    def total_cpu_m(self) -> int:
        return self.replicas * self.plan.cpu_m


def share_of(w: Workload, n: int) -> Workload:
    """One replica's share of a pooled workload served by `n` replicas from one EDF queue: every n-th job
    (the tightest share) and 1/n of the rate."""
    if n <= 1:
        return w
    mine = None if w.is_backlog is None else w.is_backlog[::n]
    d = w.deadlines_ms[::n]
    return Workload(d, -(-w.n_written_off // n), w.load_rps / n, int(mine.sum()) if mine is not None else 0,
                    int(d.size - (mine.sum() if mine is not None else 0)), mine)


class ReplicaPlanner:
    """The per-replica arithmetic shared by the joint rules (`joint`, `themis`): the sponge pipeline's
    stages with the load split n ways. Keeps the margin's and the envelope's state between calls of
    `observe` (one per decision)."""

    def __init__(self, model: LatencyModel, *, min_cpu_m: int, max_cpu_m: int, step_m: int, max_batch: int,
                 safety: float | str, arrival_eps: float, predictor: str, predictor_params: dict[str, Any] | None,
                 jump_z: float | None, measure_dispersion: bool, blocking: float, batch_rule: str,
                 infeasible: str) -> None:
        if isinstance(safety, str):
            if safety != "measured":
                raise ValueError("safety must be 'measured' or a number in (0, 1]")
        elif not 0 < float(safety) <= 1:
            raise ValueError("safety must be 'measured' or a number in (0, 1]")
        self.model = model
        self.fixed_safety = None if isinstance(safety, str) else float(safety)
        self.margin = ModelErrorMargin(model, prior=0.9 if self.fixed_safety is None else self.fixed_safety)
        self.envelope = LoadEnvelope(predictor, predictor_params, jump_z=jump_z, measure_dispersion=measure_dispersion)
        self.alloc = LeastAllocation(model, min_cpu_m=min_cpu_m, max_cpu_m=max_cpu_m, step_m=step_m,
                                     max_batch=max_batch, blocking=blocking, batch_rule=batch_rule,
                                     infeasible=infeasible)
        self.demand = DeadlineDemand(self.alloc.floor_ms, arrival_eps=arrival_eps)
        self._h_max = float(max(model.throughput_rps(b, max_cpu_m) for b in range(1, max_batch + 1)))
        self._margin_state = MarginState()
        self._env_state = EnvelopeState()

    def observe(self, obs: Observation) -> tuple[LoadForecast, float]:
        """Advance the margin and the envelope by one decision: (forecast, safety)."""
        self._margin_state = self.margin.update(self._margin_state, obs.batches)
        safety = self.fixed_safety if self.fixed_safety is not None else self.margin.safety(self._margin_state)
        forecast, self._env_state = self.envelope.forecast(obs, self._env_state)
        return forecast, safety

    def workload(self, obs: Observation, forecast: LoadForecast, safety: float, backlog: bool = True) -> Workload:
        """The pooled deadline demand of the whole deployment: the forecast arrivals at the total rate (one
        Poisson envelope: the replicas share one EDF queue, so a burst is one burst, not n) and, if
        `backlog`, the queue."""
        queue = obs.queue_remaining_ms if backlog else ()
        return self.demand.workload(obs.budgets_ms, queue, forecast, obs.interval_ms, safety, obs.serves_late)

    def plan(self, n: int, obs: Observation, forecast: LoadForecast, safety: float, backlog: bool = True,
             pooled: Workload | None = None) -> Plan:
        """Per-replica plan when `n` replicas share the pooled demand: each serves every n-th job in EDF
        order (the tightest share: jobs 0, n, 2n, ...) and sustains 1/n of the rate."""
        w = pooled if pooled is not None else self.workload(obs, forecast, safety, backlog)
        return self.alloc.plan(share_of(w, n), obs.serves_late)

    def fewest(self, rate_rps: float) -> int:
        """The fewest replicas whose full vertical range could possibly sustain `rate_rps`."""
        return max(1, math.ceil(rate_rps / self._h_max - 1e-9)) if rate_rps > 0 else 1

    def recommend(self, obs: Observation, forecast: LoadForecast, safety: float, lo: int, hi: int,
                  overhead_m: int = 0) -> ReplicaChoice:
        """n in [lo, hi] minimising n * (c_n + overhead_m) for the forecast arrivals: feasible plans first,
        then the fewest jobs given up, then the least total, then the fewest replicas."""
        lo = min(max(lo, self.fewest(forecast.rate_rps)), hi)
        pooled = self.workload(obs, forecast, safety, backlog=False)
        a = self.alloc
        ns = np.arange(lo, hi + 1)
        bounds = np.stack([latency_bounds_ms(share_of(pooled, int(n)), a.max_batch, a.blocking) for n in ns])
        first = a.first_feasible(bounds).min(axis=1)  # one table lookup for every n
        feasible = first < a.grid.size
        if feasible.any():
            total = np.where(feasible, ns * (a.grid[np.minimum(first, a.grid.size - 1)] + overhead_m),
                             np.iinfo(np.int64).max)
            n = int(ns[int(np.argmin(total))])  # argmin: the first of equal totals, i.e. the fewest replicas
            return ReplicaChoice(n, self.plan(n, obs, forecast, safety, pooled=pooled))
        # nothing is feasible: the fewest jobs given up, then the least total, then the fewest replicas
        best: tuple[tuple[int, int, int, int], ReplicaChoice] | None = None
        for n in range(lo, hi + 1):
            p = self.plan(n, obs, forecast, safety, pooled=pooled)
            key = (0 if p.feasible else 1, p.given_up, n * (p.cpu_m + overhead_m), n)
            if best is None or key < best[0]:
                best = (key, ReplicaChoice(n, p))
        assert best is not None
        return best[1]


class JointOptimizer:
    """Horizontal + vertical scaling with per-request budgets (module docstring)."""

    name = "joint"

    def __init__(
        self,
        model: LatencyModel,
        *,
        min_cpu_m: int = 100,
        max_cpu_m: int = 2000,
        step_m: int = 50,
        max_batch: int = 16,
        min_replicas: int = 1,
        max_replicas: int = 16,
        replica_overhead_m: int = 0,
        bridge_cost_cap: bool = False,
        safety: float | str = "measured",
        arrival_eps: float = 0.05,
        predictor: str = "mean",
        predictor_params: dict[str, Any] | None = None,
        jump_z: float | None = 2.5,
        measure_dispersion: bool = True,
        blocking: float = 1.0,
        batch_rule: str = "largest",
        infeasible: str = "saveable",
        down_window: int = 1,
        max_down_step_m: int | None = None,
        scale_out_window: int = 3,
        scale_in_window: int = 30,
    ) -> None:
        if not 1 <= min_replicas <= max_replicas or replica_overhead_m < 0:
            raise ValueError("need 1 <= min_replicas <= max_replicas and replica_overhead_m >= 0")
        if down_window < 1 or scale_out_window < 1 or scale_in_window < 1:
            raise ValueError("down_window, scale_out_window and scale_in_window must be >= 1 interval")
        self.planner = ReplicaPlanner(
            model, min_cpu_m=min_cpu_m, max_cpu_m=max_cpu_m, step_m=step_m, max_batch=max_batch, safety=safety,
            arrival_eps=arrival_eps, predictor=predictor, predictor_params=predictor_params, jump_z=jump_z,
            measure_dispersion=measure_dispersion, blocking=blocking, batch_rule=batch_rule, infeasible=infeasible)
        self.alloc = self.planner.alloc
        self.model = model
        self.min_replicas, self.max_replicas = min_replicas, max_replicas
        self.replica_overhead_m, self.bridge_cost_cap = replica_overhead_m, bridge_cost_cap
        self.down_window, self.max_down_step_m = down_window, max_down_step_m
        self.scale_out_window = scale_out_window
        self.replica_stabilizer = DownscaleStabilizer(scale_in_window)
        self._recent_cpu: tuple[int, ...] = ()
        self._above = 0  # consecutive intervals with n* above the replica count
        self._bridging = False  # last decision bridged a cold start: drop its CPU without hysteresis

    def recommend_replicas(self, obs: Observation, forecast: LoadForecast, safety: float) -> ReplicaChoice:
        """n* (module docstring, step 1)."""
        return self.planner.recommend(obs, forecast, safety, self.min_replicas, self.max_replicas,
                                      self.replica_overhead_m)

    def decide(self, obs: Observation) -> Decision:
        v = self.alloc
        cur = obs.current
        forecast, safety = self.planner.observe(obs)
        rec = self.recommend_replicas(obs, forecast, safety)
        notes: list[str] = []
        # 2. the replica count: out at once if the cap binds, else when the level persists; in after the window
        cap_binds = False
        if rec.replicas > cur.replicas:
            self._above += 1
            ordered = self.planner.plan(cur.replicas, obs, forecast, safety, backlog=False)
            cap_binds = not ordered.feasible
            out = cap_binds or self._above >= self.scale_out_window
            if not out:
                notes.append(f"scale-out to {rec.replicas} waits ({self._above}/{self.scale_out_window} intervals)")
            candidate = rec.replicas if out else cur.replicas
        else:
            self._above = 0
            candidate = rec.replicas
        n = self.replica_stabilizer.update(candidate, cur.replicas)
        n = min(max(n, self.min_replicas), self.max_replicas)
        if n < cur.replicas or (n == cur.replicas and rec.replicas < n):
            if rec.replicas < n:
                notes.append(f"scale-in held at {n} replicas (recommended {rec.replicas})")
        if n > cur.replicas and cap_binds:
            notes.append(f"cap binds: {cur.replicas} replicas cannot carry the forecast at {v.max_cpu_m}m")
        # 3. CPU per replica, for the replicas that serve now (starting ones are not capacity)
        ready = max(1, cur.replicas - obs.replicas_starting)
        k = min(n, ready)
        p = self.planner.plan(k, obs, forecast, safety)
        feasible = p.feasible
        steady = n == cur.replicas and obs.replicas_starting == 0 and not self._bridging
        if steady and p.feasible:
            cpu, self._recent_cpu = stabilise(p.cpu_m, cur.cpu_m, self._recent_cpu, self.down_window,
                                              self.max_down_step_m)
        else:
            cpu, self._recent_cpu = p.cpu_m, ()
        if k < n:
            notes.append(f"cold-start bridge: {k} ready of {n} carry the load, need {p.cpu_m}m")
            if self.bridge_cost_cap:
                share = int(v.grid[max(0, np.searchsorted(v.grid, k * v.max_cpu_m / n, side="right") - 1)])
                cap = max(cur.cpu_m, share, rec.plan.cpu_m if rec.replicas == n else 0)
                if cpu > cap:
                    cpu, feasible = cap, False
                    notes.append(f"capped at {cap}m: deadlines may be missed until the new replicas are ready")
        self._bridging = k < n
        cpu = int(min(max(cpu, v.min_cpu_m), v.max_cpu_m))
        batch = p.batch
        if cpu != p.cpu_m:
            batch = v.batch_at(cpu, p.bounds_ms) or p.batch
            if cpu > p.cpu_m:
                notes.append(f"cpu held at {cpu}m above plan {p.cpu_m}m")
        slack = worst_slack_ms(p.workload, float(self.model.latency_ms(batch, cpu)), batch, v.blocking)
        if feasible:
            verdict = ""
        elif p.given_up:
            verdict = f"INFEASIBLE: {p.given_up} jobs given up; "
        else:
            verdict = "INFEASIBLE: best effort; "
        explanation = (
            f"joint: {verdict}load {obs.arrival_rate_rps:.1f} rps, {forecast.describe()}, safety {safety:.2f}, "
            f"{budget_summary(obs.budgets_ms)}, {backlog_summary(p.workload, obs.queue_remaining_ms[::k])} per "
            f"serving replica, recommended {rec.replicas} x {rec.plan.cpu_m}m, ready {ready}/{cur.replicas} -> "
            f"{n} x {cpu}m (total {n * cpu}m) b={batch}, worst slack {slack:.1f} ms, "
            f"h={k * self.model.throughput_rps(batch, cpu):.1f} rps now"
            + ("; " + "; ".join(notes) if notes else "")
        )
        return Decision(cpu_m=cpu, batch=batch, replicas=n, feasible=feasible, explanation=explanation)

