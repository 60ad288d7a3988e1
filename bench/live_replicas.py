"""Live joint scaling (issue 11): the default model on this machine, at most `--max-replicas` replicas of at
most `--replica-cpu-m` each, a Twitter window whose peak needs more than one replica's cap, Ghent 4G budgets.
Side by side on the same replayed requests:

* `joint`      — replicas + CPU per replica (`sponge serve --max-replicas N`, the default policy then);
* `vertical`   — one replica, CPU in place up to the cap (`sponge`, CPU per batch);
* `horizontal` — replicas of the capped size, count by CPU usage (`hpa`, Kubernetes HPA-like);
* `themis`     — the published vertical-then-horizontal rule (optional: `--policies ...,themis`).

Each live run is also simulated on the same requests with the server's own policy factory, the profile's
step model as the truth and the cold start measured live (`sponge_replica_cold_start_seconds`): the twin's
core-seconds should be within 10 % of the live run's. Core-seconds bill every replica that exists
(starting, serving, draining) at its applied allocation, live and simulated alike.

Usage: python bench/live_replicas.py [--duration-s 240] [--replica-cpu-m 600] [--max-replicas 3] [--out runs/live-replicas]
Prints a table and, last, one JSON line; writes the runs and a side-by-side timeline PNG (replicas and CPU
per replica over time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/live.py's helpers

from live import ensure_profile, simulate_twin  # noqa: E402

from sponge.config import ServerConfig  # noqa: E402
from sponge.models.efficientnet_lite0 import default_model_path  # noqa: E402
from sponge.perf.profile_store import profile_path_for  # noqa: E402
from sponge.report.jsonline import json_line  # noqa: E402
from sponge.report.plots import plot_timelines  # noqa: E402
from sponge.report.results import read_run  # noqa: E402
from sponge.report.summary import format_table, saveable_floor_ms, summarize  # noqa: E402
from sponge.server.process import ADMIN_TOKEN, ServerProcess  # noqa: E402
from sponge.server.serve import make_learning_policy, make_policy_for  # noqa: E402
from sponge.sim.scenario import measured_noise_sigma  # noqa: E402
from sponge.workload.loadgen import run_load  # noqa: E402
from sponge.workload.scenario import Scenario  # noqa: E402


def cold_starts(url: str) -> tuple[float, int]:
    """Mean measured cold start (s) and how many, from the server's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("sponge_replica_cold_start_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith("sponge_replica_cold_start_seconds_count"):
            count = float(line.split()[-1])
    return (total / count if count else float("nan")), int(count)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration-s", type=int, default=240)
    ap.add_argument("--window", default="bursty")
    ap.add_argument("--slo-ms", type=float, default=400.0)
    ap.add_argument("--image-kib", type=float, default=200.0)
    ap.add_argument("--replica-cpu-m", type=int, default=600, help="the cap of one replica (its 'node')")
    ap.add_argument("--max-replicas", type=int, default=3)
    ap.add_argument("--peak-over-cap", type=float, default=1.6,
                    help="peak load as a multiple of one replica's best throughput at its cap")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--policies", default="joint,vertical,horizontal")
    ap.add_argument("--out", default="runs/live-replicas")
    args = ap.parse_args()

    cores = len(os.sched_getaffinity(0))
    machine_m = 1000 * cores
    cap = args.replica_cpu_m
    model_path = default_model_path()
    profile = ensure_profile(model_path, machine_m)
    m = profile.model
    truth = profile.step_model or m
    h_cap = max(m.throughput_rps(b, cap) for b in range(1, args.max_batch + 1))
    h_all = max(m.throughput_rps(b, machine_m) for b in range(1, args.max_batch + 1))
    peak = round(min(args.peak_over_cap * h_cap, 0.6 * h_all), 1)
    floor = saveable_floor_ms(truth, cap)
    scenario = Scenario(trace=f"twitter:{args.window}", peak_rps=peak, duration_s=args.duration_s,
                        slo_ms=args.slo_ms, image_kib=args.image_kib)
    print(f"one replica at its cap {cap} m serves at most {h_cap:.0f} req/s (model); peak {peak} req/s "
          f"= {peak / h_cap:.2f}x that; up to {args.max_replicas} replicas; {len(scenario.plan())} requests",
          flush=True)

    common = {"max_cpu_m": cap, "cpu_m": cap, "max_batch": args.max_batch}
    configs = {
        "joint": {"policy": "joint", "max_replicas": args.max_replicas},
        "vertical": {"policy": "sponge"},
        "horizontal": {"policy": "hpa", "max_replicas": args.max_replicas, "batch": 4},
        "themis": {"policy": "themis", "max_replicas": args.max_replicas},
    }
    out = Path(args.out)
    runs, sims, colds = {}, {}, {}
    noise = measured_noise_sigma(profile_path_for(model_path))
    for name in args.policies.split(","):
        settings = {**common, **configs[name]}
        cfg = ServerConfig(**settings)
        flags = [x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", str(v))]
        print(f"\n== {name}: {' '.join(flags)} ({args.duration_s} s) ==", flush=True)
        srv = ServerProcess(*flags, log_level="info")  # its log (decisions, cold starts) kept with the run
        try:
            time.sleep(1.0)
            state = srv.admin("GET", "/admin/replicas").json()
            start_cpu, start_batch = state["replicas"][0]["cpu_m"], state["batch"]
            run_load(scenario, srv.url, "efficientnet-lite0", out / name, ADMIN_TOKEN, label=name)
            colds[name] = cold_starts(srv.url)
        finally:
            srv.stop()
            (out / name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(srv.log_path, out / name / "server.log")
        meta_path = out / name / "run.json"
        meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "saveable_floor_ms": floor}, indent=2))
        runs[name] = read_run(out / name)[:2]
        cold_s = colds[name][0] if colds[name][1] else 2.0
        policy = (make_policy_for(cfg, m, cfg.cpu_m, cap) if cfg.policy == "hpa"
                  else make_learning_policy(cfg, profile, cfg.cpu_m, cap))
        sims[name] = simulate_twin(scenario, truth, policy, cfg, noise, start_cpu, start_batch, floor,
                                   out / f"{name}-sim", cold_start_ms=1000.0 * cold_s,
                                   max_replicas=cfg.replica_limit)

    summaries = {n: summarize(r, t, floor) for n, (r, t) in runs.items()}
    print("\n" + format_table(summaries))
    print("\nlive vs simulated twin (same requests, measured profile and cold start, same policy objects):")
    print(f"{'':12}{'saveable live':>14}{'sim':>9}{'core-s live':>13}{'sim':>8}{'ratio':>7}{'max repl.':>10}"
          f"{'cold start s':>13}")
    validation = {}
    for n, s in summaries.items():
        sim_s = sims[n]
        tl = runs[n][1]
        max_rep = max((r.replicas for r in tl), default=1)
        validation[n] = {"attainment_saveable_live": s.attainment_saveable,
                         "attainment_saveable_sim": sim_s.attainment_saveable,
                         "core_s_live": s.core_seconds, "core_s_sim": sim_s.core_seconds,
                         "core_s_ratio": sim_s.core_seconds / s.core_seconds if s.core_seconds else float("nan"),
                         "max_replicas": max_rep, "cold_start_s": colds[n][0], "cold_starts": colds[n][1]}
        v = validation[n]
        print(f"{n:12}{v['attainment_saveable_live']:>14.2%}{v['attainment_saveable_sim']:>9.2%}"
              f"{v['core_s_live']:>13.0f}{v['core_s_sim']:>8.0f}{v['core_s_ratio']:>7.2f}{max_rep:>10}"
              f"{v['cold_start_s']:>13.2f}")
    png = plot_timelines(runs, out / "timelines.png",
                         title=f"live joint scaling: {args.window}, peak {peak} req/s ({peak / h_cap:.1f}x one "
                               f"replica at {cap} m), SLO {args.slo_ms:.0f} ms, 4G budgets")
    if "joint" in summaries:
        j = summaries["joint"]
        parts = [f"{o}: saveable {summaries[o].attainment_saveable:.2%}, core-s {summaries[o].core_seconds:.0f} "
                 f"({j.core_seconds / summaries[o].core_seconds:.2f}x)" for o in summaries if o != "joint"]
        print(f"joint: saveable {j.attainment_saveable:.2%}, core-s {j.core_seconds:.0f}; " + "; ".join(parts))
    print(f"timelines: {png}")
    print("validation target: each simulated twin within 10 % of its live core-seconds")
    print(json_line({"bench": "live_replicas", "peak_rps": peak, "replica_cpu_m": cap,
                     "max_replicas": args.max_replicas, "one_replica_max_rps": h_cap, "slo_ms": args.slo_ms,
                     "duration_s": args.duration_s, "saveable_floor_ms": floor,
                     "runs": {n: s.as_dict() for n, s in summaries.items()}, "sim_vs_live": validation}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
