"""Themis-like joint scaling: vertical for a surge, horizontal once the load has stabilised.

Source. K. Razavi, M. Salmani, M. Mühlhäuser, B. Koldehofe, L. Wang, "A Tale of Two Scales: Reconciling
Horizontal and Vertical Scaling for Inference Serving Systems", arXiv:2407.14843 (v1, 20 July 2024) — the
system is called Themis; Razavi, Mühlhäuser and Wang are authors of Sponge (EuroMLSys 2024). What we could
read is the abstract (arxiv.org/abs/2407.14843 and its HTML rendering) and third-party summaries of it,
not the paper's algorithm section; the venue was not stated in what we found. The abstract says: Themis
"employs a two-stage autoscaling strategy: initially using in-place vertical scaling to handle workload
surges and then switching to horizontal scaling to optimize resource efficiency once the workload
stabilizes"; it "profiles the processing latency of deep learning models, calculates queuing delays, and
employs different dynamic programming algorithms to solve the joint horizontal and vertical scaling problem
optimally based on the workload situation". A summary (sciencestack.ai) adds that the vertical and the
horizontal solver run according to the workload's status, the transition guided by Amdahl's law (a bigger
replica parallelises worse, so many moderate replicas are cheaper for a stable load) and an LSTM load
predictor. We followed the abstract; where it is silent we took the simplest reading, and say so:

* Forecast: the paper's LSTM is not available; the load envelope the other policies here use stands in
  (sponge.policy.envelope: 10-interval mean that follows a rise within 1-3 intervals).
* Latency and queueing: the per-replica feasibility is this repository's (the EDF batch rule over the
  measured budgets with a Poisson arrival envelope, sponge.policy.joint.ReplicaPlanner), so that the
  comparison with `joint` is about the scaling strategy, not the latency arithmetic.
* Vertical stage (every interval): the least CPU at which the ready replicas carry the forecast and the
  queue; replicas still starting are not counted. If even max CPU on the replicas already ordered cannot
  carry the forecast (the per-replica cap binds), the fewest more replicas that can are ordered at once.
* Stable: the rate of each of the last `stable_window` intervals lies within the larger of
  `stable_tolerance` x their mean and `stable_z` Poisson standard deviations of it (a pure relative test
  would call no low load stable: at 5 req/s one second's count is 5 +- 2.2).
* Horizontal stage (while stable): the replica count minimising total CPU for the forecast (the paper's
  DP solves the same objective; here an exhaustive search over the counts), then the vertical stage sizes
  each replica for it — vertical back down once the new replicas are ready. Scale-in happens only then,
  so the stability window is also the scale-in stabilisation.
"""

from __future__ import annotations

import math
from typing import Any

from sponge.perf.latency_model import LatencyModel
from sponge.policy.feasibility import worst_slack_ms
from sponge.policy.hysteresis import stabilise
from sponge.policy.joint import ReplicaPlanner
from sponge.policy.sponge_opt import budget_summary
from sponge.policy.types import Decision, Observation


def is_stable(rates_rps: tuple[float, ...] | list[float], window: int, tolerance: float, z: float,
              interval_ms: float) -> tuple[bool, float]:
    """(whether the last `window` rates stay at one level, that level = their mean). See the docstring."""
    if window < 1 or len(rates_rps) < window or interval_ms <= 0:
        return False, math.nan
    last = [float(x) for x in rates_rps[-window:]]
    m = sum(last) / window
    scale = interval_ms / 1000.0  # rate -> count
    band = max(tolerance * m, z * math.sqrt(max(m, 0.0) / scale))
    return all(abs(x - m) <= band for x in last), m


class ThemisPolicy:
    """The two-stage rule of Themis (module docstring): vertical for a surge, horizontal once stable."""

    name = "themis"

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
        stable_window: int = 30,
        stable_tolerance: float = 0.2,
        stable_z: float = 2.0,
    ) -> None:
        if not 1 <= min_replicas <= max_replicas:
            raise ValueError("need 1 <= min_replicas <= max_replicas")
        if down_window < 1 or stable_window < 1 or stable_tolerance < 0 or stable_z < 0:
            raise ValueError("down_window, stable_window >= 1; stable_tolerance, stable_z >= 0")
        self.planner = ReplicaPlanner(
            model, min_cpu_m=min_cpu_m, max_cpu_m=max_cpu_m, step_m=step_m, max_batch=max_batch, safety=safety,
            arrival_eps=arrival_eps, predictor=predictor, predictor_params=predictor_params, jump_z=jump_z,
            measure_dispersion=measure_dispersion, blocking=blocking, batch_rule=batch_rule, infeasible=infeasible)
        self.alloc = self.planner.alloc
        self.model = model
        self.min_replicas, self.max_replicas = min_replicas, max_replicas
        self.down_window = down_window
        self.stable_window, self.stable_tolerance, self.stable_z = stable_window, stable_tolerance, stable_z
        self._recent_cpu: tuple[int, ...] = ()

    def decide(self, obs: Observation) -> Decision:
        v, cur = self.alloc, obs.current
        forecast, safety = self.planner.observe(obs)
        stable, level = is_stable(obs.rate_history_rps, self.stable_window, self.stable_tolerance, self.stable_z,
                                  obs.interval_ms)
        n = min(max(cur.replicas, self.min_replicas), self.max_replicas)
        if stable:
            rec = self.planner.recommend(obs, forecast, safety, self.min_replicas, self.max_replicas)
            n, stage = rec.replicas, f"horizontal (stable at {level:.1f} rps): {rec.replicas} x {rec.plan.cpu_m}m"
        else:
            stage = "vertical (load not stable)"
            pooled = self.planner.workload(obs, forecast, safety, backlog=False)
            if not self.planner.plan(n, obs, forecast, safety, pooled=pooled).feasible:
                m = n
                while m < self.max_replicas and not self.planner.plan(m, obs, forecast, safety, pooled=pooled).feasible:
                    m += 1
                if m > n:
                    stage += f"; cap binds: {n} replicas cannot carry the forecast at {v.max_cpu_m}m, add {m - n}"
                    n = m
        ready = max(1, cur.replicas - obs.replicas_starting)
        k = min(n, ready)
        p = self.planner.plan(k, obs, forecast, safety)
        steady = n == cur.replicas and obs.replicas_starting == 0
        if steady and p.feasible:
            cpu, self._recent_cpu = stabilise(p.cpu_m, cur.cpu_m, self._recent_cpu, self.down_window)
        else:
            cpu, self._recent_cpu = p.cpu_m, ()
        cpu = int(min(max(cpu, v.min_cpu_m), v.max_cpu_m))
        batch = p.batch if cpu == p.cpu_m else (v.batch_at(cpu, p.bounds_ms) or p.batch)
        slack = worst_slack_ms(p.workload, float(self.model.latency_ms(batch, cpu)), batch, v.blocking)
        verdict = "" if p.feasible else "INFEASIBLE: best effort; "
        bridge = f"; {k} ready of {n} carry the load" if k < n else ""
        explanation = (
            f"themis: {verdict}{stage}; load {obs.arrival_rate_rps:.1f} rps, {forecast.describe()}, "
            f"safety {safety:.2f}, {budget_summary(obs.budgets_ms)}, ready {ready}/{cur.replicas} -> "
            f"{n} x {cpu}m (total {n * cpu}m) b={batch}, worst slack {slack:.1f} ms{bridge}"
        )
        return Decision(cpu_m=cpu, batch=batch, replicas=n, feasible=p.feasible, explanation=explanation)
