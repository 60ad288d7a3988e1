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
from sponge.sim.engine import SimConfig, SimResult, simulate
from sponge.sim.inputs import RequestSet
from sponge.sim.oracle import ActionSpace
from sponge.workload import RateTrace
from sponge.workload.scenario import Scenario

ALL_POLICIES = ("sponge", "paper", "static", "vpa", "hpa", "fa2", "joint")
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

    @property
    def vertical(self) -> ActionSpace:
        return ActionSpace(self.min_cpu_m, self.max_cpu_m, self.max_batch)

    @property
    def joint(self) -> ActionSpace:
        return ActionSpace(self.min_cpu_m, self.max_cpu_m, self.max_batch, 1, self.max_replicas)

    @property
    def horizontal(self) -> ActionSpace:
        return ActionSpace(self.replica_cpu_m, self.replica_cpu_m, self.max_batch, 1, self.max_replicas)

    def space_of(self, policy: str) -> ActionSpace:
        if policy in ("hpa", "fa2"):
            return self.horizontal
        if policy == "joint":
            return self.joint
        return self.vertical


def default_params(name: str, dep: Deployment, static: Decision | None = None) -> dict[str, Any]:
    """The parameters each policy runs with in a comparison on deployment `dep`."""
    if name == "sponge":
        return {"min_cpu_m": dep.min_cpu_m, "max_cpu_m": dep.max_cpu_m, "step_m": dep.step_m, "max_batch": dep.max_batch}
    if name == "paper":
        return {"max_cores": max(1, dep.max_cpu_m // 1000), "max_batch": dep.max_batch}
    if name == "joint":
        return {"min_cpu_m": dep.min_cpu_m, "max_cpu_m": dep.max_cpu_m, "step_m": dep.step_m,
                "max_batch": dep.max_batch, "max_replicas": dep.max_replicas}
    if name == "static":
        s = static or Decision(dep.max_cpu_m, min(8, dep.max_batch))
        return {"cpu_m": s.cpu_m, "batch": s.batch, "replicas": s.replicas}
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
    return Decision(s.cpu_m, s.batch, 1, True, "initial: the static-at-peak allocation")


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
) -> tuple[Decision, float]:
    """The cheapest fixed (cpu, batch) on one replica whose simulation of this very plan attains
    `target` — a static allocation provisioned for the peak with hindsight (the strongest static
    baseline). Binary search over CPU per batch size (attainment rises with CPU). Returns it and its
    attainment; if no allocation reaches the target, the best one at max CPU."""
    cand: list[tuple[int, int, float]] = []
    lo_all = max(dep.min_cpu_m, grid_m)

    def att(cpu: int, b: int) -> float:
        cfg = replace(config, initial_cpu_m=cpu, initial_batch=b, initial_replicas=1, keep_explanations=False)
        pol = make_policy("static", model, cpu_m=cpu, batch=b)
        return simulate(requests, model, pol, cfg).attainment

    best_fallback = (dep.max_cpu_m, 1, -1.0)
    for b in batches:
        if b > dep.max_batch:
            continue
        a_hi = att(dep.max_cpu_m, b)
        if a_hi > best_fallback[2]:
            best_fallback = (dep.max_cpu_m, b, a_hi)
        if a_hi < target:
            continue
        lo, hi = lo_all // grid_m, dep.max_cpu_m // grid_m  # hi feasible
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
        cand.append((hi * grid_m, b, a_best))
    if not cand:
        c, b, a = best_fallback
        return Decision(c, b, 1, False, f"static at peak: nothing attains {target:.1%}; best {a:.2%}"), a
    c, b, a = min(cand)
    return Decision(c, b, 1, True, f"static at peak: least fixed CPU attaining {target:.1%} ({a:.2%})"), a


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
