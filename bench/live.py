"""Live side-by-side run (issue 4): the default model on this machine, a Twitter window scaled to
what 2 cores serve at peak, Ghent 4G budgets — static at all cores, static at the smallest allocation
that holds the peak, `paper`, `sponge` (its online model seeded with the offline profile) and
`sponge-online` (no profile: it starts at the safe allocation and learns the model while serving), one
after another on the same replayed requests. Each but sponge-online is also simulated on the same
requests, with the server's own policy factory and the profile's step model as the truth (issue 5's
validation; the simulator has no idle prober, so an online start from nothing has no twin).
Core-seconds are billed as the CPU in force over each interval, as applied, live and simulated alike;
the front door's own CPU (the server process, measured live; a cost per request in the simulator) is
reported beside them (`front_door_core_seconds`, `core_seconds_with_front_door` in each run's figures).

Usage: python bench/live.py [--duration-s 600] [--slo-ms 400] [--out runs/live]
Prints a table and, last, one JSON line; writes the runs, a side-by-side timeline PNG and summary.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from sponge.report.jsonline import json_line
from sponge.config import ServerConfig
from sponge.models.efficientnet_lite0 import default_model_path
from sponge.perf.profile_store import load_profile, profile_path_for
from sponge.policy.sponge_opt import SpongeOptimizer
from sponge.report.plots import plot_timelines
from sponge.report.results import read_run
from sponge.report.summary import format_table, saveable_floor_ms, summarize
from sponge.server.process import ADMIN_TOKEN, ServerProcess
from sponge.perf.profiler import default_cpu_grid, run_profile
from sponge.server.serve import load_offline_profile, make_learning_policy, make_policy_for
from sponge.sim.engine import SimConfig, simulate
from sponge.sim.inputs import RequestSet
from sponge.sim.scenario import measured_noise_sigma
from sponge.workload.loadgen import run_load
from sponge.workload.scenario import Scenario


def ensure_profile(model_path: Path, max_cpu_m: int):
    """The offline profile `sponge serve` would seed its model with (loaded, or measured now as
    `sponge profile` would; its cells are used whatever the four-term fit's quality)."""
    cfg = ServerConfig()
    profile, why = load_offline_profile(cfg, model_path)
    if profile is None:
        print(f"{why}: measuring one now", flush=True)
        run_profile(model_path, (1, 2, 4, 8), default_cpu_grid(max_cpu_m), reps=150, min_reps=4, cell_seconds=0.6,
                    out=profile_path_for(model_path), progress=True, period_us=cfg.cfs_period_us,
                    guaranteed=cfg.guaranteed, min_r2=-math.inf, max_p95_rel_err=math.inf)
        profile, why = load_offline_profile(cfg, model_path)
        if profile is None:
            raise SystemExit(f"cannot obtain a profile: {why}")
    return profile


def per_batch_counts(url: str) -> dict[str, float]:
    """From the live server's /metrics: per-batch resizes, batches served, batches that straddled a resize."""
    import re

    import httpx

    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))

    calls = total("sponge_batch_sizing_seconds_count")
    fast = sum(float(v) for v in re.findall(r'^sponge_batch_sizing_seconds_bucket{le="0.0005",[^}]*} (\S+)$', text,
                                            re.M))
    return {"per_batch_resizes": total("sponge_batch_resizes_total"), "batches": total("sponge_batch_size_count"),
            "straddled_batches": total("sponge_batches_straddled_total"), "sizing_calls": calls,
            "sizing_mean_ms": 1000.0 * total("sponge_batch_sizing_seconds_sum") / calls if calls else 0.0,
            "sizing_over_0_5ms": 1.0 - fast / calls if calls else 0.0}


def simulate_twin(scenario: Scenario, truth, policy, cfg: ServerConfig, noise: float, start_cpu: int,
                  start_batch: int, floor: float, out: Path, **sim: Any):
    """A live run's simulated twin: the same requests, the server's own policy object, the measured profile
    as the truth, the live start; written to `out` and summarised (`sim`: further SimConfig fields)."""
    run = simulate(RequestSet.from_planned(scenario.plan()), truth, policy,
                   SimConfig(interval_ms=cfg.interval_ms, noise_sigma=noise, max_wait_ms=cfg.max_batch_wait_ms,
                             initial_cpu_m=start_cpu, initial_batch=start_batch, expiry=cfg.expiry_policy, **sim))
    run.saveable_floor_ms = floor
    run.write(out)
    reqs, tl, _ = read_run(out)
    return summarize(reqs, tl, floor)


def smallest_static(model, scenario: Scenario, peak_rps: float, max_cpu_m: int, max_batch: int) -> tuple[int, int]:
    """The least CPU (and its batch) that the sponge feasibility rule says holds the peak load with
    the scenario's budget distribution and no backlog — the best a static allocation can be sized."""
    budgets = [p.budget_ms for p in scenario.plan()]
    opt = SpongeOptimizer(model, min_cpu_m=100, max_cpu_m=max_cpu_m, max_batch=max_batch, per_batch=False,
                          arrival_eps=0.005, safety=0.9)
    plan = opt.plan(budgets, [], peak_rps, 1000.0)
    return int(plan.cpu_m), int(plan.batch)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration-s", type=int, default=600)
    ap.add_argument("--window", default="bursty")
    ap.add_argument("--slo-ms", type=float, default=400.0)
    ap.add_argument("--image-kib", type=float, default=200.0)
    ap.add_argument("--peak-fraction", type=float, default=0.5,
                    help="peak load as a fraction of the model's best throughput at all cores (the rest of the "
                         "machine runs the HTTP server and this load generator)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--policies", default="static-max,static-peak,paper,sponge,sponge-online")
    ap.add_argument("--out", default="runs/live")
    args = ap.parse_args()

    cores = len(os.sched_getaffinity(0))
    max_cpu_m = 1000 * cores
    model_path = default_model_path()
    profile = ensure_profile(model_path, max_cpu_m)
    m = profile.model
    truth = profile.step_model or m  # what the simulator runs batches on: Sponge's model of this machine
    best = max(m.throughput_rps(b, max_cpu_m) for b in range(1, args.max_batch + 1))
    floor = saveable_floor_ms(truth, max_cpu_m)  # budgets under one image at all cores are unsaveable
    peak = round(args.peak_fraction * best, 1)
    scenario = Scenario(trace=f"twitter:{args.window}", peak_rps=peak, duration_s=args.duration_s,
                        slo_ms=args.slo_ms, image_kib=args.image_kib)
    budgets = np.array([p.budget_ms for p in scenario.plan()])
    static_cpu, static_b = smallest_static(m, scenario, peak, max_cpu_m, args.max_batch)
    print(f"model best {best:.0f} req/s at {max_cpu_m} m -> peak {peak} req/s; {len(budgets)} requests, "
          f"budgets p1/p50/p99 {np.percentile(budgets, 1):.0f}/{np.percentile(budgets, 50):.0f}/"
          f"{np.percentile(budgets, 99):.0f} ms; static-peak = {static_cpu} m batch {static_b}", flush=True)

    # One ServerConfig per contender: the live server gets it as flags, the simulator builds its policy
    # from it with the server's own factory — what is simulated is what runs.
    configs = {
        "static-max": {"policy": "static", "cpu_m": max_cpu_m, "batch": static_b},
        "static-peak": {"policy": "static", "cpu_m": static_cpu, "batch": static_b},
        "paper": {"policy": "paper", "cpu_m": max_cpu_m},
        "sponge": {"policy": "sponge", "cpu_m": max_cpu_m},
        "sponge-online": {"policy": "sponge", "cpu_m": max_cpu_m,
                          "profile": str(Path(tempfile.mkdtemp()) / "no-such.profile.json")},
    }
    out = Path(args.out)
    runs, sims = {}, {}
    server_counts: dict[str, dict[str, float]] = {}
    noise = measured_noise_sigma(profile_path_for(model_path))
    for name in args.policies.split(","):
        cfg = ServerConfig(**{k: v for k, v in configs[name].items() if k != "profile"}, max_batch=args.max_batch)
        flags = [x for k, v in configs[name].items() for x in (f"--{k.replace('_', '-')}", str(v))]
        print(f"\n== {name}: {' '.join(flags)} ({args.duration_s} s) ==", flush=True)
        srv = ServerProcess(*flags, "--max-batch", str(args.max_batch), "--log-level", "warning")
        try:
            time.sleep(1.0)
            state = srv.admin("GET", "/admin/replicas").json()  # the configuration in force at the start
            start_cpu, start_batch = state["replicas"][0]["cpu_m"], state["batch"]
            run_load(scenario, srv.url, "efficientnet-lite0", out / name, ADMIN_TOKEN, label=name)
            server_counts[name] = per_batch_counts(srv.url)
        finally:
            srv.stop()
        meta_path = out / name / "run.json"  # so `sponge report` splits off the unsaveable requests too
        meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "saveable_floor_ms": floor}, indent=2))
        reqs, tl, _ = read_run(out / name)
        runs[name] = (reqs, tl)
        if name == "sponge-online":
            continue  # no twin: the simulator has no idle prober to learn a model from nothing
        policy = (make_policy_for(cfg, None, cfg.cpu_m, max_cpu_m) if cfg.policy == "static"
                  else make_learning_policy(cfg, profile, cfg.cpu_m, max_cpu_m))
        # the simulator's default resize delay + decision time: what the live per-batch sizer plans with
        # (sponge.server.per_batch.PER_BATCH_DELAY_MS), so both size alike
        sims[name] = simulate_twin(scenario, truth, policy, cfg, noise, start_cpu, start_batch, floor,
                                   out / f"{name}-sim")

    summaries = {n: summarize(r, t, floor) for n, (r, t) in runs.items()}
    print("\n" + format_table(summaries))
    print("\nlive vs simulated (same requests, measured profile, same policy objects):")
    print(f"{'':14}{'attainment live':>16}{'sim':>9}{'diff (pts)':>11}{'saveable live':>14}{'sim':>9}"
          f"{'core-s live':>13}{'sim':>8}{'ratio':>7}{'front door live':>16}{'sim':>8}")
    validation = {}
    for n, s in summaries.items():
        if n not in sims:
            continue
        sim_s = sims[n]
        validation[n] = {"attainment_live": s.attainment, "attainment_sim": sim_s.attainment,
                         "attainment_diff_pts": 100 * (sim_s.attainment - s.attainment),
                         "attainment_saveable_live": s.attainment_saveable,
                         "attainment_saveable_sim": sim_s.attainment_saveable,
                         "core_s_live": s.core_seconds, "core_s_sim": sim_s.core_seconds,
                         "core_s_ratio": sim_s.core_seconds / s.core_seconds if s.core_seconds else float("nan"),
                         # the front door's own CPU: measured live, modelled per request in the simulator
                         "front_door_core_s_live": s.front_door_core_seconds,
                         "front_door_core_s_sim": sim_s.front_door_core_seconds}
        v = validation[n]
        print(f"{n:14}{v['attainment_live']:>16.2%}{v['attainment_sim']:>9.2%}{v['attainment_diff_pts']:>11.2f}"
              f"{v['attainment_saveable_live']:>14.2%}{v['attainment_saveable_sim']:>9.2%}"
              f"{v['core_s_live']:>13.0f}{v['core_s_sim']:>8.0f}{v['core_s_ratio']:>7.2f}"
              f"{v['front_door_core_s_live']:>16.1f}{v['front_door_core_s_sim']:>8.1f}")
    png = plot_timelines(runs, out / "timelines.png",
                         title=f"live: {args.window} window, peak {peak} req/s, SLO {args.slo_ms:.0f} ms, 4G budgets")
    figures = {n: {**s.as_dict(), **server_counts.get(n, {})} for n, s in summaries.items()}
    if any(server_counts.values()):
        print("\nper-batch CPU (live server's /metrics): "
              + "; ".join(f"{n}: {c['per_batch_resizes']:.0f} resizes, {c['batches']:.0f} batches, "
                          f"{c['straddled_batches']:.0f} straddled, {c['sizing_calls']:.0f} sizing calls of "
                          f"{c['sizing_mean_ms']:.2f} ms mean ({c['sizing_over_0_5ms']:.1%} > 0.5 ms)"
                          for n, c in server_counts.items() if c))
    ref = summaries.get("static-max")
    if ref is not None:
        for n, s in summaries.items():
            figures[n]["core_seconds_vs_static_max"] = s.core_seconds / ref.core_seconds
    print(f"timelines: {png}")
    if "sponge" in summaries and ref is not None:
        sp = summaries["sponge"]
        print(f"targets (sponge): attainment >= 99 %: {sp.attainment:.2%} (saveable {sp.attainment_saveable:.2%}, "
              f"{sp.unsaveable} unsaveable under {floor:.1f} ms); core-s <= 0.8x static-max: "
              f"{sp.core_seconds / ref.core_seconds:.2f}x", end="")
        if "paper" in summaries:
            pa = summaries["paper"]
            print(f"; vs paper: attainment {sp.attainment:.2%} vs {pa.attainment:.2%}, core-s "
                  f"{sp.core_seconds:.0f} vs {pa.core_seconds:.0f}")
        else:
            print()
    print("validation target: simulated within 10 % of live core-seconds and 1 point of attainment")
    print(json_line({"bench": "live", "peak_rps": peak, "slo_ms": args.slo_ms, "duration_s": args.duration_s,
                     "saveable_floor_ms": floor,
                     "static_peak_cpu_m": static_cpu, "runs": figures, "sim_vs_live": validation}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
