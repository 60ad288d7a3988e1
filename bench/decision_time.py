"""How long one decide() takes for the paper rule, SpongeOptimizer and JointOptimizer (target <= 1 ms), and
one per-batch CPU call of SpongeOptimizer (`batch_cpu_m`, made at every arrival and batch start/end; the
simulator charges it as SimConfig.decision_ms before its resize is issued).

Realistic observations: a few hundred budgets (SLO minus a heavy-tailed network delay), a backlog of
~50 queued requests in EDF order, a rate history, in a closed loop (each decision is the next
observation's `current`); the CPU range is a laptop's 2 cores and a paper-scale
32-core node, both in 50 m steps, with max batch 16 or 32. Models: the YOLOv5s / YOLOv5n fits of the
Sponge authors' published profiles (../shared/data/profiles, bounded least squares).
Prints a table of p50/p99 microseconds per policy and scenario (wall clock, and the thread's CPU time,
which a busy shared machine does not inflate); the LAST line is one JSON object.

    python bench/decision_time.py [--iterations N]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace

import numpy as np

from sponge.perf.latency_model import LatencyModel
from sponge.policy import Decision, Observation, make_policy
from sponge.policy.types import QueueView, RunningBatch

YOLOV5S = LatencyModel(g=131.46, d=28.72, e=0.0, h=2.43)  # p99 profile, batch 1-8 x 1-16 cores
YOLOV5N = LatencyModel(g=18.16, d=4.73, e=46.2, h=0.71)  # figure profile, batch 1-16 x 1-32 cores


@dataclass(frozen=True)
class Scenario:
    name: str
    model: LatencyModel
    max_cpu_m: int
    max_batch: int
    load_rps: float
    slo_ms: float


SCENARIOS = [
    Scenario("2 cores, b<=16, yolov5n 20 rps, SLO 2 s", YOLOV5N, 2000, 16, 20.0, 2000.0),
    Scenario("2 cores, b<=32, yolov5n 20 rps, SLO 1 s", YOLOV5N, 2000, 32, 20.0, 1000.0),
    Scenario("32 cores, b<=16, yolov5n 120 rps", YOLOV5N, 32000, 16, 120.0, 1000.0),
    Scenario("32 cores, b<=32, yolov5n 120 rps", YOLOV5N, 32000, 32, 120.0, 1000.0),
    Scenario("32 cores, b<=32, yolov5s 25 rps", YOLOV5S, 32000, 32, 25.0, 1500.0),
]


def observations(s: Scenario, n: int, seed: int = 0) -> list[Observation]:
    """n varied observations around the scenario's load: 300 budgets, 50 queued requests."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        network = np.minimum(rng.lognormal(np.log(80.0), 0.6, 300), 0.6 * s.slo_ms)
        budgets = tuple(s.slo_ms - network)
        waited = rng.uniform(0.0, 250.0, 50)
        queue = tuple(np.sort(rng.choice(budgets, 50) - waited))
        hist = tuple(s.load_rps * rng.uniform(0.8, 1.2, 10))
        out.append(
            Observation(
                now_ms=1000.0 * i,
                interval_ms=1000.0,
                arrival_rate_rps=hist[-1],
                rate_history_rps=hist,
                budgets_ms=budgets,
                queue_remaining_ms=queue,
                current=Decision(cpu_m=s.max_cpu_m // 2, batch=4, replicas=1),
            )
        )
    return out


def policies(s: Scenario) -> dict[str, object]:
    return {
        "paper": make_policy("paper", s.model, max_cores=s.max_cpu_m // 1000, max_batch=s.max_batch),
        "sponge": make_policy("sponge", s.model, max_cpu_m=s.max_cpu_m, step_m=50, max_batch=s.max_batch),
        "joint": make_policy(
            "joint", s.model, max_cpu_m=s.max_cpu_m, step_m=50, max_batch=s.max_batch, max_replicas=16
        ),
    }


def time_policy(policy, obs: list[Observation], iterations: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Closed loop: each decision becomes the next observation's `current` (replicas ready at once).

    Returns wall-clock and thread-CPU microseconds per decide(): on a shared machine the wall p99 also
    measures preemption by other processes; the CPU time is what the decision itself costs.
    """
    current = obs[0].current
    for o in obs[:20]:  # warm-up (first-call numpy overheads)
        current = policy.decide(replace(o, current=current))
    wall, cpu = np.empty(iterations), np.empty(iterations)
    feasible = 0
    for i in range(iterations):
        o = replace(obs[i % len(obs)], current=current)
        c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
        current = policy.decide(o)
        wall[i], cpu[i] = time.perf_counter_ns() - t0, time.thread_time_ns() - c0
        feasible += current.feasible
    return wall / 1e3, cpu / 1e3, feasible / iterations


def time_batch_cpu(policy, obs: list[Observation], iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Wall and thread-CPU microseconds per `batch_cpu_m` call: the observation's 50 queued requests
    behind a running batch, after a decision (the sizer's floor and cap come from it)."""
    current = obs[0].current
    for o in obs[:20]:
        current = policy.decide(replace(o, current=current))
    wall, cpu = np.empty(iterations), np.empty(iterations)
    for i in range(iterations):
        o = obs[i % len(obs)]
        view = QueueView(o.queue_remaining_ms, [1] * len(o.queue_remaining_ms),
                         RunningBatch(4, 40.0, float(o.queue_remaining_ms[0])), current.cpu_m, 16.0,
                         o.arrival_rate_rps)
        c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
        policy.batch_cpu_m(view)
        wall[i], cpu[i] = time.perf_counter_ns() - t0, time.thread_time_ns() - c0
    return wall / 1e3, cpu / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=2000)
    args = ap.parse_args()
    results: dict[str, dict[str, dict[str, float]]] = {}
    print(f"{'':50s} {'wall clock':>17s} {'thread CPU':>17s}")
    print(
        f"{'scenario':42s} {'policy':7s} {'p50 us':>8s} {'p99 us':>8s} {'p50 us':>8s} {'p99 us':>8s} {'feasible':>9s}"
    )
    for s in SCENARIOS:
        obs = observations(s, 100)
        results[s.name] = {}
        for pname, policy in policies(s).items():
            wall, cpu, feas = time_policy(policy, obs, args.iterations)
            w50, w99, c50, c99 = (float(np.percentile(a, q)) for a in (wall, cpu) for q in (50, 99))
            results[s.name][pname] = {
                "p50_us": round(w50, 1),
                "p99_us": round(w99, 1),
                "cpu_p50_us": round(c50, 1),
                "cpu_p99_us": round(c99, 1),
                "feasible": feas,
            }
            print(f"{s.name:42s} {pname:7s} {w50:8.1f} {w99:8.1f} {c50:8.1f} {c99:8.1f} {feas:9.0%}")
            if pname == "sponge":
                wall, cpu = time_batch_cpu(policy, obs, args.iterations)
                w50, w99, c50, c99 = (float(np.percentile(a, q)) for a in (wall, cpu) for q in (50, 99))
                results[s.name]["sponge per-batch"] = {"p50_us": round(w50, 1), "p99_us": round(w99, 1),
                                                       "cpu_p50_us": round(c50, 1), "cpu_p99_us": round(c99, 1),
                                                       "feasible": 1.0}
                print(f"{s.name:42s} {'batch':7s} {w50:8.1f} {w99:8.1f} {c50:8.1f} {c99:8.1f} {'':>9s}")
    worst = {k: max(r[k] for sc in results.values() for r in sc.values()) for k in ("p50_us", "p99_us", "cpu_p99_us")}
    print(json.dumps({"decision_time": results, **{f"worst_{k}": v for k, v in worst.items()}, "target_us": 1000.0}))


if __name__ == "__main__":
    main()
