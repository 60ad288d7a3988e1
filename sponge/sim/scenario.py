"""The pieces of a simulated comparison, shared by `sponge simulate` and `sponge experiment`.

A comparison = a request plan (a `sponge.workload.scenario.Scenario`, the description `sponge load` replays
live; drawn once, replayed for every policy), a latency model, a deployment (the action spaces of the
compared policies) and one fresh policy object per run, built by `sponge.policy.make_policy` exactly as the
live controller builds it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from sponge.perf.builtin_profiles import builtin_profile_names, load_builtin_profile
from sponge.perf.latency_model import LatencyModel
from sponge.policy import make_policy
from sponge.policy.types import Decision, Policy
from sponge.report.summary import saveable_floor_ms
from sponge.sim.engine import NODE_CPU_M, SimConfig, SimResult, simulate
from sponge.sim.inputs import RequestSet
from sponge.sim.oracle import ActionSpace
from sponge.workload import RateTrace
from sponge.workload.scenario import Scenario

ALL_POLICIES = ("sponge", "paper", "static", "vpa", "hpa", "fa2", "joint", "themis")
REFERENCES = ("clairvoyant",)  # simulator-only: they read the future (sponge.sim.clairvoyant)


# ---- model -------------------------------------------------------------------------------------------
def load_model(spec: str) -> tuple[LatencyModel, str]:
    """A built-in profile name ('yolov5s', 'yolov5n') or a profile JSON path -> (model, description)."""
    if spec in builtin_profile_names():
        return load_builtin_profile(spec), f"built-in profile {spec}"
    p = Path(spec)
    if not p.is_file():
        raise FileNotFoundError(f"no built-in profile {spec!r} (known: {builtin_profile_names()}) and no file {p}")
    raw = json.loads(p.read_text())
    model_path = p.with_name(p.name.removesuffix(".profile.json"))
    if p.name.endswith(".profile.json") and model_path.is_file():
        from sponge.perf.profile_store import load_profile  # validates fit and model file

        return load_profile(p, model_path).model, f"measured profile {p}"
    if not isinstance(raw, dict) or "model" not in raw:
        raise ValueError(f"{p}: not a profile JSON (no 'model' coefficients)")
    return LatencyModel.from_dict(raw["model"]), f"profile {p} (model file not checked)"


def measured_noise_sigma(profile_path: str | Path) -> float:
    """Lognormal sigma of service-time noise from a measured profile's cells: for a lognormal factor,
    p99/median = exp(2.326 sigma); the median over the cells of ln(p99/median)/2.326."""
    raw = json.loads(Path(profile_path).read_text())
    cells = [c for c in raw.get("grid", []) if c.get("median_ms", 0) > 0 and c.get("p99_ms", 0) > 0]
    if not cells:
        raise ValueError(f"{profile_path}: no cells with median_ms and p99_ms to measure noise from")
    z99 = 2.3263478740408408
    return float(np.median([math.log(max(c["p99_ms"] / c["median_ms"], 1.0)) / z99 for c in cells]))


# ---- workload ----------------------------------------------------------------------------------------
def request_set(scenario: Scenario) -> tuple[RequestSet, RateTrace]:
    """The scenario's plan as the simulator's columns — the very requests `sponge load` sends for it
    (`Scenario.plan()` is `plan_over(rate_trace())`) — and the rate trace it was drawn from."""
    trace = scenario.rate_trace()
    return _columns(scenario, trace), trace


def _columns(scenario: Scenario, trace: RateTrace) -> RequestSet:
    return RequestSet.from_planned(scenario.plan_over(trace), trace.duration_s * 1000.0,
                                   f"{trace.description}; {scenario.summary()}")


# ---- deployment and policies -------------------------------------------------------------------------
@dataclass(frozen=True)
class Deployment:
    """The action spaces of the compared policies (paper scale by default: a 16-core node)."""

    min_cpu_m: int = 500  # vertical policies and joint, per replica
    max_cpu_m: int = 16_000
    max_batch: int = 16
    max_replicas: int = 8  # joint, hpa, fa2
    replica_cpu_m: int = 1000  # hpa / fa2 replica size (FA2: one core)
    step_m: int = 50  # sponge / joint millicore grid
    hpa_batch: int = 1
    vpa_time_scale: float = 1.0 / 1440.0  # VPA's day -> one minute, so it acts within a 20-minute window
    # Nodes (SimConfig.nodes / node_cpu_m; None: not modelled, as before). A replica never exceeds its node:
    # max_cpu_m and replica_cpu_m are cut to node_cpu_m here, so every policy and bound sees the cut.
    nodes: int | None = None
    node_cpu_m: int | None = None

    def __post_init__(self) -> None:
        node = self.node_cpu_m if self.node_cpu_m is not None else (NODE_CPU_M if self.nodes is not None else None)
        if node is None:
            return
        if self.nodes is not None and self.nodes < 1 or node < self.min_cpu_m:
            raise ValueError(f"need nodes >= 1 and a node ({node} m) at least min_cpu_m ({self.min_cpu_m} m)")
        object.__setattr__(self, "node_cpu_m", node)
        object.__setattr__(self, "max_cpu_m", min(self.max_cpu_m, node))
        object.__setattr__(self, "replica_cpu_m", min(self.replica_cpu_m, node))

    def sim_nodes(self) -> dict[str, int | None]:
        """The SimConfig fields of these nodes."""
        return {"nodes": self.nodes, "node_cpu_m": self.node_cpu_m}

    @property
    def vertical(self) -> ActionSpace:
        return ActionSpace(self.min_cpu_m, self.max_cpu_m, self.max_batch, node_cpu_m=self.node_cpu_m)

    @property
    def joint(self) -> ActionSpace:
        return ActionSpace(self.min_cpu_m, self.max_cpu_m, self.max_batch, 1, self.max_replicas, self.nodes,
                           self.node_cpu_m)

    @property
    def horizontal(self) -> ActionSpace:
        return ActionSpace(self.replica_cpu_m, self.replica_cpu_m, self.max_batch, 1, self.max_replicas, self.nodes,
                           self.node_cpu_m)

    def describe(self) -> str:
        nodes = "" if self.node_cpu_m is None else (
            f"; {'unlimited' if self.nodes is None else self.nodes} nodes of {self.node_cpu_m} m")
        return (f"{self.vertical.describe()}; joint up to {self.max_replicas} replicas; hpa/fa2 "
                f"{self.replica_cpu_m} m replicas{nodes}")

    def space_of(self, policy: str) -> ActionSpace:
        if policy in ("hpa", "fa2"):
            return self.horizontal
        if policy in ("joint", "themis") or (policy == "static" and self.nodes is not None):
            return self.joint  # with nodes, static at peak may hold several replicas
        return self.vertical


def default_params(name: str, dep: Deployment, static: Decision | None = None) -> dict[str, Any]:
    """The parameters each policy runs with in a comparison on deployment `dep`."""
    if name == "sponge":
        return {"min_cpu_m": dep.min_cpu_m, "max_cpu_m": dep.max_cpu_m, "step_m": dep.step_m, "max_batch": dep.max_batch}
    if name == "paper":
        return {"max_cores": max(1, dep.max_cpu_m // 1000), "max_batch": dep.max_batch}
    if name in ("joint", "themis"):  # themis (issue 11): the joint action space, the same parameters
        return {"min_cpu_m": dep.min_cpu_m, "max_cpu_m": dep.max_cpu_m, "step_m": dep.step_m,
                "max_batch": dep.max_batch, "max_replicas": dep.max_replicas}
    if name == "static":
        s = static or Decision(dep.max_cpu_m, min(8, dep.max_batch))
        return {"cpu_m": min(s.cpu_m, dep.max_cpu_m), "batch": s.batch, "replicas": s.replicas}
    if name == "vpa":
        return {"batch": static.batch if static else None, "min_cpu_m": dep.min_cpu_m, "max_cpu_m": dep.max_cpu_m,
                "time_scale": dep.vpa_time_scale}
    if name == "hpa":
        return {"cpu_m": dep.replica_cpu_m, "batch": dep.hpa_batch, "max_replicas": dep.max_replicas}
    if name == "fa2":
        return {"cpu_m": dep.replica_cpu_m, "max_batch": dep.max_batch, "max_replicas": dep.max_replicas}
    return {}


def initial_decision(name: str, dep: Deployment, model: LatencyModel, requests: RequestSet,
                     static: Decision | None) -> Decision:
    """Where a run starts: what the policy would run at the first seconds' load, so no policy pays for
    (or profits from) a cold start at t = 0. Vertical policies start at the static-at-peak allocation."""
    first = requests.send_ms < 10_000.0
    rate0 = float(first.sum()) / min(10.0, max(requests.duration_ms / 1000.0, 1e-9))
    if name in ("hpa", "fa2"):
        b = dep.hpa_batch if name == "hpa" else 1
        h = float(model.throughput_rps(b, dep.replica_cpu_m))
        n = min(dep.max_replicas, max(1, math.ceil(rate0 / (0.8 * h)))) if h > 0 else 1
        return Decision(dep.replica_cpu_m, b, n, True, "initial: replicas for the first 10 s at 80 % utilisation")
    s = static or Decision(dep.max_cpu_m, min(8, dep.max_batch))
    if name == "static":  # static at peak may need several replicas (beyond one node)
        return Decision(min(s.cpu_m, dep.max_cpu_m), s.batch, s.replicas, True, "initial: the static allocation")
    return Decision(min(s.cpu_m, dep.max_cpu_m), s.batch, 1, True, "initial: the static-at-peak allocation")


def new_policy(name: str, model: LatencyModel, params: dict[str, Any]) -> Policy:
    """A fresh policy object (they keep state): the registry the live controller uses."""
    return make_policy(name, model, **{k: v for k, v in params.items() if v is not None})


# ---- static at peak ----------------------------------------------------------------------------------
def static_at_peak(
    requests: RequestSet,
    model: LatencyModel,
    dep: Deployment,
    config: SimConfig,
    target: float = 0.999,
    batches: Sequence[int] = (1, 2, 3, 4, 6, 8, 12, 16),
    grid_m: int = 100,
    replicas: int = 1,
) -> tuple[Decision, float]:
    """The cheapest fixed (cpu, batch) on `replicas` replicas whose simulation of this very plan attains
    `target` — a static allocation provisioned for the peak with hindsight (the strongest static
    baseline). Binary search over CPU per batch size (attainment rises with CPU). Returns it and its
    attainment; if no allocation reaches the target, the best one at max CPU."""
    cand: list[tuple[int, int, float]] = []
    lo_all = max(dep.min_cpu_m, grid_m)
    top = dep.joint.max_cpu_for(replicas)  # with nodes, several replicas share them
    if top < lo_all:
        return Decision(top, 1, replicas, False, f"static at peak: {replicas} replicas do not fit the nodes"), 0.0

    def att(cpu: int, b: int) -> float:
        cfg = replace(config, initial_cpu_m=cpu, initial_batch=b, initial_replicas=replicas, keep_explanations=False)
        pol = make_policy("static", model, cpu_m=cpu, batch=b, replicas=replicas)
        return simulate(requests, model, pol, cfg).attainment

    best_fallback = (top, 1, -1.0)
    for b in batches:
        if b > dep.max_batch:
            continue
        a_hi = att(top, b)
        if a_hi > best_fallback[2]:
            best_fallback = (top, b, a_hi)
        if a_hi < target:
            continue
        lo, hi = lo_all // grid_m, top // grid_m  # hi feasible
        a_best = a_hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            a = att(mid * grid_m, b)
            if a >= target:
                hi, a_best = mid, a
            else:
                lo = mid
        if lo == lo_all // grid_m and att(lo * grid_m, b) >= target:
            hi, a_best = lo, att(lo * grid_m, b)
        cand.append((hi * grid_m if hi * grid_m <= top else top, b, a_best))
    if not cand:
        c, b, a = best_fallback
        return Decision(c, b, replicas, False, f"static at peak: nothing attains {target:.1%}; best {a:.2%}"), a
    c, b, a = min(cand)
    return Decision(c, b, replicas, True, f"static at peak: least fixed CPU attaining {target:.1%} ({a:.2%})"), a


def static_at_peak_replicas(
    requests: RequestSet,
    model: LatencyModel,
    dep: Deployment,
    config: SimConfig,
    max_replicas: int,
    target: float = 0.999,
) -> tuple[Decision, float]:
    """Static at peak beyond one replica (a load one node cannot carry): the fewest replicas r <= max_replicas
    whose best fixed allocation attains `target`, or r + 1 if that is cheaper in total CPU; without any,
    the best attainment found (at the most replicas tried)."""
    best: tuple[Decision, float] | None = None
    for r in range(1, max_replicas + 1):
        d, a = static_at_peak(requests, model, dep, config, target, replicas=r)
        if d.feasible:
            if r < max_replicas:
                d2, a2 = static_at_peak(requests, model, dep, config, target, replicas=r + 1)
                if d2.feasible and d2.total_cpu_m < d.total_cpu_m:
                    return d2, a2
            return d, a
        if best is None or a > best[1]:
            best = (d, a)
    assert best is not None
    return best


# ---- one comparison ----------------------------------------------------------------------------------
def run_policies(
    requests: RequestSet,
    model: LatencyModel,
    names: Sequence[str],
    dep: Deployment,
    config: SimConfig,
    *,
    static: Decision | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> dict[str, SimResult]:
    """Simulate every named policy on the same plan (fresh policy object and the same seed each)."""
    out: dict[str, SimResult] = {}
    for name in names:
        params = {**default_params(name, dep, static), **((overrides or {}).get(name, {}))}
        init = initial_decision(name, dep, model, requests, static)
        cfg = replace(config, initial_cpu_m=init.cpu_m, initial_batch=init.batch, initial_replicas=init.replicas)
        if name == "clairvoyant":
            from sponge.sim.clairvoyant import ClairvoyantVertical

            pol: Policy = ClairvoyantVertical(requests, model, dep.vertical, step_m=dep.step_m, **params)
        else:
            pol = new_policy(name, model, params)
        cb = (lambda f, n=name: progress(n, f)) if progress else None
        res = simulate(requests, model, pol, cfg, cb)
        res.meta.update({"name": name, "params": params, "space": dep.space_of(name).describe()})
        res.saveable_floor_ms = saveable_floor_ms(model, dep.max_cpu_m)
        out[name] = res
    return out


def parse_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """['sponge.arrival_eps=0.05', 'hpa.target_utilization=0.6'] -> {policy: {param: value}} (JSON values)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        pol, dot, param = key.partition(".")
        if not sep or not dot or not pol or not param:
            raise ValueError(f"--set wants POLICY.PARAM=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(pol, {})[param] = value
    return out


def fraction_met(results: dict[str, SimResult]) -> dict[str, float]:
    return {k: float(np.mean(r.outcome == 1)) for k, r in results.items()}
