"""Tune and check SpongeOptimizer on the experiment's paper-scale windows (and a small live-like setting).

Runs `sponge` (with optional parameter overrides, several configurations side by side) through the real
simulator on the four Twitter windows of `sponge experiment` (yolov5s, 1 replica 500-16000 m, batch <= 16,
SLO 1000 ms, 200 KiB images over the Ghent 4G trace, busiest window peaking at 24 req/s) and prints
attainment (of all requests, and of the saveable ones: budget >= l(1, max CPU)), misses, core-seconds and
the ratios to the oracle lower bound, static at peak and `paper`. With --live, also the live-like setting
(a synthetic EfficientNet-Lite0 profile on 2 cores, l(b, c) = 11 b / c + 0.5 b + 1 / c + 0.5 ms, 100-2000 m,
SLO 400 ms, the bursty window at 80 req/s). The references (static at peak, paper, oracle) depend only on
the setting and seed; they are cached in --cache, so a configuration costs only its own simulations
(~0.3 s per window).

    python bench/policy_tuning.py --seeds 1,2,3,4 --live --config new: \
        --config 'old:arrival_eps=0,infeasible="max",predictor="reactive",headroom=0.1,down_window=5,jump_z=0'
    python bench/policy_tuning.py --seeds 0 --live           # the defaults, reported on seed 0

A configuration is NAME:PARAM=JSON,PARAM=JSON (empty: the defaults; `old` above is the previous rule).
Tune on seeds 1-4, report on 0. The LAST line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from sponge.report.summary import saveable_floor_ms, summarize
from sponge.sim.engine import SimConfig, simulate
from sponge.sim.scenario import (
    Deployment,
    default_params,
    initial_decision,
    load_model,
    new_policy,
    request_set,
    run_policies,
    static_at_peak,
)
from sponge.workload.scenario import Scenario

WINDOWS = ("bursty", "steady_low", "steady_high", "fluctuating")
# EfficientNet-Lite0 on a 2-core laptop, roughly: l(b, c) = 11 b / c + 0.5 b + 1 / c + 0.5 ms
LIVE_MODEL = {"g": 11.0, "d": 0.5, "e": 1.0, "h": 0.5}


def parse_config(text: str) -> tuple[str, dict[str, Any]]:
    name, _, rest = text.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        try:
            params[k] = json.loads(v)
        except json.JSONDecodeError:
            params[k] = v
    return name or "default", params


def references(key: str, requests, model, dep: Deployment, cfg: SimConfig, cache: dict[str, Any]) -> dict[str, Any]:
    """Static at peak, paper and the 1-replica oracle bound for one plan (cached by `key`)."""
    if key in cache:
        return cache[key]
    from sponge.sim.oracle import oracle_bound

    static, static_att = static_at_peak(requests, model, dep, cfg)
    res = run_policies(requests, model, ["paper", "static"], dep, cfg, static=static)
    ref = {
        "static_cpu_m": static.cpu_m, "static_batch": static.batch,
        "static": res["static"].core_seconds, "static_att": res["static"].attainment,
        "paper": res["paper"].core_seconds, "paper_att": res["paper"].attainment,
        "oracle": oracle_bound(requests, model, dep.vertical).core_seconds,
    }
    cache[key] = ref
    return ref


def run_sponge(requests, model, dep: Deployment, cfg: SimConfig, static, params: dict[str, Any]):
    p = {**default_params("sponge", dep, static), **params}
    init = initial_decision("sponge", dep, model, requests, static)
    from dataclasses import replace

    c = replace(cfg, initial_cpu_m=init.cpu_m, initial_batch=init.batch, initial_replicas=1, keep_explanations=False)
    return simulate(requests, model, new_policy("sponge", model, p), c)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--windows", default=",".join(WINDOWS))
    ap.add_argument("--config", action="append", default=[], help="NAME:PARAM=JSON,... (repeatable)")
    ap.add_argument("--live", action="store_true", help="also the small live-like setting (EfficientNet-Lite0)")
    ap.add_argument("--no-paper-scale", action="store_true", help="only the live-like setting")
    ap.add_argument("--noise-sigma", type=float, default=0.0, help="lognormal service-time noise (SimConfig)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/sponge_policy_tuning_refs.json"))
    args = ap.parse_args()
    configs = [parse_config(c) for c in (args.config or ["default:"])]
    seeds = [int(s) for s in args.seeds.split(",")]
    cache: dict[str, Any] = json.loads(args.cache.read_text()) if args.cache.is_file() else {}
    rows: list[dict[str, Any]] = []

    settings = []
    if not args.no_paper_scale:
        from sponge.experiment import common_scale

        scale = common_scale(WINDOWS, 5.0, 24.0)
        for w in args.windows.split(","):
            settings.append((w, dict(trace=f"twitter:{w}", damping=5.0, scale=scale), "yolov5s", Deployment(), 1000.0))
    if args.live:
        prof = Path("/tmp/efficientnet_lite0_synthetic.json")
        prof.write_text(json.dumps({"model": LIVE_MODEL}))
        settings.append(("live-bursty", dict(trace="twitter:bursty", peak_rps=80.0), str(prof),
                         Deployment(min_cpu_m=100, max_cpu_m=2000, max_batch=16), 400.0))

    print(f"{'setting':<14}{'seed':>5} {'config':<14}{'att %':>8}{'sav %':>8}{'miss':>6}{'core-s':>9}{'/orc':>7}"
          f"{'/static':>8}{'/paper':>8}{'wall s':>7}")
    for label, sc_kw, profile, dep, slo in settings:
        model, _ = load_model(profile)
        for seed in seeds:
            requests, _ = request_set(Scenario(**sc_kw, slo_ms=slo, seed=seed))
            cfg = SimConfig(seed=seed, noise_sigma=args.noise_sigma)
            key = f"{label}|{profile}|{slo}|{seed}|{dep}" + (f"|noise {args.noise_sigma}" if args.noise_sigma else "")
            ref = references(key, requests, model, dep, cfg, cache)
            args.cache.write_text(json.dumps(cache, indent=1))
            from sponge.policy.types import Decision

            static = Decision(ref["static_cpu_m"], ref["static_batch"])
            print(f"{label:<14}{seed:>5} {'(paper)':<14}{100 * ref['paper_att']:>8.3f}{'':>14}{ref['paper']:>9.0f}"
                  f"{ref['paper'] / ref['oracle']:>7.2f}{ref['paper'] / ref['static']:>8.2f}{1.0:>8.2f}")
            print(f"{label:<14}{seed:>5} {'(static)':<14}{100 * ref['static_att']:>8.3f}{'':>14}{ref['static']:>9.0f}"
                  f"{ref['static'] / ref['oracle']:>7.2f}{1.0:>8.2f}{ref['static'] / ref['paper']:>8.2f}")
            for name, params in configs:
                t0 = time.perf_counter()
                r = run_sponge(requests, model, dep, cfg, static, params)
                sav_att = summarize(r.records(), (), saveable_floor_ms(model, dep.max_cpu_m)).attainment_saveable
                row = {"setting": label, "seed": seed, "config": name, "params": params,
                       "attainment": r.attainment, "saveable_attainment": sav_att,
                       "misses": int((r.outcome != 1).sum()),
                       "core_seconds": r.core_seconds, "to_oracle": r.core_seconds / ref["oracle"],
                       "to_static": r.core_seconds / ref["static"], "to_paper": r.core_seconds / ref["paper"]}
                rows.append(row)
                print(f"{label:<14}{seed:>5} {name:<14}{100 * r.attainment:>8.3f}{100 * sav_att:>8.3f}"
                      f"{row['misses']:>6}{r.core_seconds:>9.0f}{row['to_oracle']:>7.2f}{row['to_static']:>8.2f}"
                      f"{row['to_paper']:>8.2f}{time.perf_counter() - t0:>7.1f}", flush=True)
    # per configuration: worst attainment and mean ratios over every setting and seed
    print()
    for family in ("paper scale", "live-like"):
        for name, _ in configs:
            live = family == "live-like"
            mine = [r for r in rows if r["config"] == name and r["setting"].startswith("live") == live]
            if mine:
                print(f"{family:<12}{name:<14} min att {100 * min(r['attainment'] for r in mine):.3f} % "
                      f"(saveable {100 * min(r['saveable_attainment'] for r in mine):.3f} %)  "
                      f"pooled misses {sum(r['misses'] for r in mine)}  "
                      f"max /oracle {max(r['to_oracle'] for r in mine):.3f}  "
                      f"mean /oracle {sum(r['to_oracle'] for r in mine) / len(mine):.3f}  "
                      f"mean /static {sum(r['to_static'] for r in mine) / len(mine):.3f}  "
                      f"mean /paper {sum(r['to_paper'] for r in mine) / len(mine):.3f}")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
