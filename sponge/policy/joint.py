"""JointOptimizer: horizontal + vertical. Replicas n and CPU per replica c minimising total CPU n*c.

Horizontal capacity is slow (a new replica pays a cold start) and in-place vertical scaling is fast, so
the replica count follows the sustained load and the CPU per replica absorbs the rest (the backlog,
the cold start). Per interval (load' = predicted load * (1 + headroom)):
1. Replica count, from the predicted arrivals only. For n replicas each carries load'/n with the
   measured budget distribution (SpongeOptimizer.plan, the EDF batch rule of feasibility.py); the
   objective is n * (c_n + replica_overhead_m), ties to fewer replicas. Feasibility only improves with
   n, so: n_lo = the fewest replicas whose full vertical range can carry load'; if n_lo is infeasible,
   binary-search the least feasible n up to max_replicas; then walk n upwards while it pays: stop after
   `patience` steps without improvement, or when even the least CPU any replica can have (the tightest
   budget's latency floor) times n cannot beat the best. Whether fewer big or more small replicas win
   depends on the model: with a large per-request term d, CPU beyond a point buys little throughput.
2. Scale-out at once; scale-in only to the largest n recommended over the last `scale_in_window`
   intervals (the load stayed low for the whole stabilisation period).
3. CPU per replica: the plan for the k = min(n, ready) replicas that actually serve now, each with
   load'/k and every k-th queued request of the shared EDF queue (its share, tightest first). While
   replicas are still starting (k < n) this is a cold-start bridge: the ready replicas carry the whole
   load vertically; starting replicas get the same allocation (one cpu_m per decision) and count as
   cost (DESIGN §5). CPU scale-down has its own hysteresis (`down_window`), reset when n changes.
4. Infeasible (even max CPU on the serving replicas misses a deadline): max CPU, feasible=False.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sponge.perf.latency_model import LatencyModel
from sponge.policy.feasibility import BudgetProfile, worst_slack_ms
from sponge.policy.hysteresis import DownscaleStabilizer
from sponge.policy.predictors import Predictor
from sponge.policy.sponge_opt import Plan, SpongeOptimizer, backlog_summary, budget_summary
from sponge.policy.types import Decision, Observation


class JointOptimizer:
    """Horizontal + vertical scaling with per-request budgets (wraps SpongeOptimizer's per-replica plan)."""

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
        patience: int = 2,
        replica_overhead_m: int = 0,
        cold_start_bridge: bool = True,
        headroom: float = 0.10,
        safety: float = 0.9,
        burst_z: float = 1.0,
        blocking: float = 1.0,
        down_window: int = 5,
        scale_in_window: int = 30,
        max_down_step_m: int | None = None,
        predictor: str | Predictor = "reactive",
        predictor_params: dict[str, Any] | None = None,
    ) -> None:
        if not 1 <= min_replicas <= max_replicas or patience < 1 or replica_overhead_m < 0:
            raise ValueError("need 1 <= min_replicas <= max_replicas, patience >= 1, replica_overhead_m >= 0")
        self.vertical = SpongeOptimizer(
            model,
            min_cpu_m=min_cpu_m,
            max_cpu_m=max_cpu_m,
            step_m=step_m,
            max_batch=max_batch,
            headroom=headroom,
            safety=safety,
            burst_z=burst_z,
            blocking=blocking,
            down_window=down_window,
            max_down_step_m=max_down_step_m,
            predictor=predictor,
            predictor_params=predictor_params,
        )
        self.model = model
        self.min_replicas, self.max_replicas = min_replicas, max_replicas
        self.patience, self.replica_overhead_m, self.cold_start_bridge = patience, replica_overhead_m, cold_start_bridge
        self.replica_stabilizer = DownscaleStabilizer(scale_in_window)
        self._bridging = False  # last decision bridged a cold start: drop its CPU without hysteresis
        self._h_max = float(max(model.throughput_rps(b, max_cpu_m) for b in range(1, max_batch + 1)))

    def plan_for(
        self, n: int, obs: Observation, load_rps: float, profile: BudgetProfile, backlog: bool = True
    ) -> Plan:
        """Per-replica plan when `n` replicas share the load (and, if `backlog`, the EDF queue) evenly."""
        share = (obs.queue_remaining_ms[::n] if n > 1 else obs.queue_remaining_ms) if backlog else ()
        return self.vertical.plan(profile, share, load_rps / n, obs.interval_ms)

    def _cpu_floor(self, profile: BudgetProfile) -> int:
        """Least CPU any replica can have: the first batch must meet the tightest reachable budget."""
        v = self.vertical
        reachable = profile.sorted_ms[profile.sorted_ms >= v.floor_ms]
        if not reachable.size:
            return v.min_cpu_m
        ok = np.flatnonzero(v._lat[0] <= reachable[0] / (1.0 + v.blocking))
        return int(v.grid[ok[0]]) if ok.size else v.max_cpu_m

    def recommend_replicas(self, obs: Observation, load_rps: float, profile: BudgetProfile) -> tuple[int, Plan]:
        """Least n * (c + overhead) for the predicted arrivals (no backlog); step 1 of the module doc."""
        n_lo = max(self.min_replicas, math.ceil(load_rps / self._h_max) if load_rps > 0 else 1)
        n_lo = min(n_lo, self.max_replicas)
        plan = {n_lo: self.plan_for(n_lo, obs, load_rps, profile, backlog=False)}
        if not plan[n_lo].feasible:
            hi = self.max_replicas
            plan[hi] = self.plan_for(hi, obs, load_rps, profile, backlog=False)
            if not plan[hi].feasible:  # more replicas do not help: budgets too tight for any batch
                return n_lo, plan[n_lo]
            lo = n_lo
            while hi - lo > 1:  # lo infeasible, hi feasible
                mid = (lo + hi) // 2
                plan[mid] = self.plan_for(mid, obs, load_rps, profile, backlog=False)
                lo, hi = (lo, mid) if plan[mid].feasible else (mid, hi)
            n_lo = hi
        oh = self.replica_overhead_m
        best_n, best_total = n_lo, n_lo * (plan[n_lo].cpu_m + oh)
        floor = self._cpu_floor(profile)
        n, stale = n_lo + 1, 0
        while n <= self.max_replicas and stale < self.patience and n * (floor + oh) < best_total:
            p = plan.get(n) or self.plan_for(n, obs, load_rps, profile, backlog=False)
            plan[n] = p
            if p.feasible and n * (p.cpu_m + oh) < best_total:
                best_n, best_total, stale = n, n * (p.cpu_m + oh), 0
            else:
                stale += 1
            n += 1
        return best_n, plan[best_n]

    def decide(self, obs: Observation) -> Decision:
        v = self.vertical
        predicted = v.predicted_load(obs)
        load = predicted * (1.0 + v.headroom)
        cur = obs.current
        profile = v.profile(obs.budgets_ms)
        n_rec, p_rec = self.recommend_replicas(obs, load, profile)
        n = self.replica_stabilizer.update(n_rec, cur.replicas)
        n = min(max(n, self.min_replicas), self.max_replicas)
        ready = max(1, cur.replicas - obs.replicas_starting)
        k = min(n, ready) if self.cold_start_bridge else n  # replicas that serve during the next interval
        no_queue = not len(obs.queue_remaining_ms)
        p = p_rec if k == n_rec and no_queue else self.plan_for(k, obs, load, profile)
        feasible = p.feasible
        notes: list[str] = []
        if n != n_rec:
            notes.append(f"scale-in held at {n} replicas (recommended {n_rec})")
        steady = n == cur.replicas and obs.replicas_starting == 0 and not self._bridging
        if steady:
            cpu = v.stabilizer.update(p.cpu_m, cur.cpu_m) if p.feasible else p.cpu_m
        else:
            v.stabilizer.reset()
            cpu = p.cpu_m
        if k < n:
            # Every replica gets the bridge allocation (one cpu_m per decision): cap the total at what the
            # ready replicas could use at most, but never below the steady-state plan for n replicas.
            target = p_rec if n == n_rec else self.plan_for(n, obs, load, profile, backlog=False)
            cap = int(v.grid[max(0, np.searchsorted(v.grid, k * v.max_cpu_m / n, side="right") - 1)])
            cap = max(cap, target.cpu_m)
            notes.append(f"cold-start bridge: {k} ready of {n} carry the load, need {p.cpu_m}m")
            if cpu > cap:
                cpu, feasible = cap, False
                notes.append(f"capped at {cap}m (total <= {k} x max): deadlines may be missed until ready")
        self._bridging = k < n
        cpu = int(min(max(cpu, v.min_cpu_m), v.max_cpu_m))
        batch = p.batch
        if cpu != p.cpu_m:
            batch = v.least_batch_at(cpu, p.bounds_ms) or p.batch
            if steady and cpu > p.cpu_m:
                notes.append(f"cpu held at {cpu}m above plan {p.cpu_m}m")
        slack = worst_slack_ms(p.workload, float(self.model.latency_ms(batch, cpu)), batch, v.blocking)
        verdict = "" if feasible else "INFEASIBLE: best effort; "
        explanation = (
            f"joint: {verdict}load {obs.arrival_rate_rps:.1f} rps, predicted {predicted:.1f} "
            f"(+{v.headroom:.0%} -> {load:.1f}), {budget_summary(obs.budgets_ms)}, "
            f"{backlog_summary(p.workload, obs.queue_remaining_ms[::k])} per serving replica, "
            f"ready {ready}/{cur.replicas} -> {n} x {cpu}m (total {n * cpu}m) b={batch}, "
            f"worst slack {slack:.1f} ms, h={k * self.model.throughput_rps(batch, cpu):.1f} rps now"
            + ("; " + "; ".join(notes) if notes else "")
        )
        return Decision(cpu_m=cpu, batch=batch, replicas=n, feasible=feasible, explanation=explanation)
