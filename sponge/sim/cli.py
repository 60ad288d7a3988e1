"""`sponge simulate`: one request plan, several policies side by side, a lower bound on what they must
spend, and one run directory per policy in the results format `sponge report` reads.

    sponge simulate --trace twitter:bursty --scale 0.436 --policy sponge,paper,static,hpa --out runs/sim

The workload options are `sponge load`'s (sponge.workload.scenario): the same options draw the same
requests live and here. Prints the summary table (sponge.report.summary) with core-seconds as a ratio
to the oracle bound, then one JSON line (last) with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from sponge.policy import POLICY_NAMES
from sponge.sim.engine import DECISION_MS, FRONT_DOOR_CPU_MS, RESIZE_DELAY_MS, SimConfig, SimResult
from sponge.sim.oracle import OracleBound, oracle_bound
from sponge.sim.scenario import (
    ALL_POLICIES,
    REFERENCES,
    Deployment,
    load_model,
    parse_overrides,
    request_set,
    run_policies,
    static_at_peak,
    static_at_peak_replicas,
)
from sponge.workload.scenario import add_scenario_args, scenario_from_args, warn_notes


def add_deployment_args(p: argparse.ArgumentParser) -> None:
    d = Deployment()
    g = p.add_argument_group("deployment (paper scale by default)")
    g.add_argument("--profile", default="yolov5s", help="built-in profile (yolov5s, yolov5n) or a profile JSON")
    g.add_argument("--min-cpu-m", type=int, default=d.min_cpu_m)
    g.add_argument("--max-cpu-m", type=int, default=d.max_cpu_m)
    g.add_argument("--max-batch", type=int, default=d.max_batch)
    g.add_argument("--max-replicas", type=int, default=d.max_replicas, help="joint, hpa, fa2")
    g.add_argument("--replica-cpu-m", type=int, default=d.replica_cpu_m, help="hpa / fa2 replica size")
    g.add_argument("--nodes", type=int, default=None,
                   help="nodes the replicas are packed on; a scale-out that fits on none is refused and counted "
                        "(default: unlimited)")
    g.add_argument("--node-cpu-m", type=int, default=None,
                   help="CPU of one node: no replica exceeds it (caps --max-cpu-m and --replica-cpu-m); default: "
                        "no node limit, or 16000 with --nodes")
    g.add_argument("--interval-ms", type=float, default=1000.0)
    g.add_argument("--resize-delay-ms", type=float, default=RESIZE_DELAY_MS,
                   help="decision -> new CPU in force (default: a local cgroup, measured by bench/resize.py)")
    g.add_argument("--decision-ms", type=float, default=DECISION_MS, help="compute time of a per-batch CPU decision")
    g.add_argument("--no-per-batch", dest="per_batch", action="store_false",
                   help="no per-batch CPU between decisions (an actuator too slow for it)")
    g.add_argument("--cold-start-ms", type=float, default=7000.0)
    g.add_argument("--front-door-cpu-ms", type=float, default=FRONT_DOOR_CPU_MS, metavar="MS",
                   help="CPU ms the front door (HTTP, decoding, queue, controller) spends per request, billed "
                        "apart from the replicas as front-door core-seconds (default: bench/overhead.py's "
                        f"measurement, {FRONT_DOOR_CPU_MS:g})")
    g.add_argument("--noise-sigma", default="0", help="lognormal sigma of service-time noise (mean 1), or "
                   "'profile': measured from the profile JSON's cells (p99 vs median)")
    g.add_argument("--expiry", choices=["reject", "serve_late"], default="reject")
    g.add_argument("--static-cpu-m", type=int, help="static policy CPU (default: least that attains 99.9%%)")
    g.add_argument("--static-batch", type=int, help="static policy batch (with --static-cpu-m)")


def deployment_from(args: argparse.Namespace) -> Deployment:
    return replace(Deployment(), min_cpu_m=args.min_cpu_m, max_cpu_m=args.max_cpu_m, max_batch=args.max_batch,
                   max_replicas=args.max_replicas, replica_cpu_m=args.replica_cpu_m,
                   nodes=getattr(args, "nodes", None), node_cpu_m=getattr(args, "node_cpu_m", None))


def config_from(args: argparse.Namespace) -> SimConfig:
    if args.noise_sigma == "profile":
        from sponge.sim.scenario import measured_noise_sigma

        sigma = measured_noise_sigma(args.profile)
    else:
        sigma = float(args.noise_sigma)
    return SimConfig(interval_ms=args.interval_ms, resize_delay_ms=args.resize_delay_ms,
                     decision_ms=args.decision_ms, per_batch=args.per_batch,
                     cold_start_ms=args.cold_start_ms, noise_sigma=sigma, expiry=args.expiry, seed=args.seed,
                     front_door_cpu_ms=getattr(args, "front_door_cpu_ms", FRONT_DOOR_CPU_MS),
                     nodes=getattr(args, "nodes", None), node_cpu_m=getattr(args, "node_cpu_m", None))


def summary_rows(results: dict[str, SimResult], oracles: dict[str, OracleBound], dep: Deployment) -> dict[str, Any]:
    """Per policy: the shared summary (attainment over all requests and over the saveable ones, against
    the run's l(1, max CPU)) plus exact core-seconds and the ratio to its action space's bound."""
    from sponge.report.summary import summarize

    out: dict[str, Any] = {}
    for name, r in results.items():
        s = summarize(r.records(), r.timeline, r.saveable_floor_ms).as_dict()
        space = dep.space_of(name).describe()
        ob = oracles.get(space)
        s.update({
            "core_seconds_exact": r.core_seconds,
            "front_door_core_seconds_exact": r.front_door_core_seconds,
            "core_seconds_with_front_door_exact": r.core_seconds_with_front_door,
            "oracle_space": space,
            # an infeasible space has no bound: None, and "oracle" says infeasible with where (the reason)
            "oracle": None if ob is None else ("bound" if ob.feasible else "infeasible"),
            "oracle_infeasible": ob.infeasible if ob is not None and not ob.feasible else None,
            "oracle_core_seconds": ob.core_seconds if ob is not None and ob.feasible else None,
            "ratio_to_oracle": ob.ratio(r.core_seconds) if ob else None,
            "nodes": r.meta.get("nodes"),  # with --nodes: nodes used, refused scale-outs, CPU cuts
            "sim_wall_s": r.wall_s,
            "sim_requests_per_s": r.requests_per_wall_s,
        })
        out[name] = s
    return out


def print_table(results: dict[str, SimResult], rows: dict[str, Any]) -> str:
    """The shared summary table, then core-seconds against the oracle bound of each policy's space."""
    from sponge.report.summary import format_table, summarize

    table = format_table({n: summarize(r.records(), r.timeline, r.saveable_floor_ms) for n, r in results.items()})
    lines = [table, "", f"{'policy':<11}  {'core-s':>9}  {'bound':>10}  {'ratio':>10}  {'+front door':>11}  "
                        "action space of the bound"]
    for n in results:
        r = rows[n]
        if r.get("oracle") == "infeasible":
            bound = ratio = "infeasible"
        else:
            bound = "-" if r["oracle_core_seconds"] is None else f"{r['oracle_core_seconds']:.1f}"
            ratio = "-" if r["ratio_to_oracle"] is None else f"{r['ratio_to_oracle']:.2f}x"
        lines.append(f"{n:<11}  {r['core_seconds_exact']:>9.1f}  {bound:>10}  {ratio:>10}  "
                     f"{r['core_seconds_with_front_door_exact']:>11.1f}  {r['oracle_space']}")
    reasons = dict.fromkeys(r["oracle_infeasible"] for r in rows.values() if r.get("oracle_infeasible"))
    lines += [f"  {why}" for why in reasons]
    return "\n".join(lines)


def _main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    names = list(ALL_POLICIES) if args.policy == "all" else [p.strip() for p in args.policy.split(",") if p.strip()]
    unknown = [n for n in names if n not in POLICY_NAMES and n not in REFERENCES]
    if unknown:
        print(f"sponge simulate: unknown policy {unknown}; known: {', '.join(POLICY_NAMES)}", file=sys.stderr)
        return 2
    try:
        model, model_desc = load_model(args.profile)
        scenario = scenario_from_args(args)
        requests, trace = request_set(scenario)
        warn_notes(scenario, "sponge simulate")
        overrides = parse_overrides(args.set or [])
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"sponge simulate: {e}", file=sys.stderr)
        return 2
    try:
        dep = deployment_from(args)
        cfg = config_from(args)
    except (OSError, ValueError) as e:
        print(f"sponge simulate: {e}", file=sys.stderr)
        return 2
    print(f"{len(requests)} requests over {trace.duration_s} s ({trace.description}); model: {model_desc}",
          file=sys.stderr)

    from sponge.policy.types import Decision

    if args.static_cpu_m:
        static = Decision(args.static_cpu_m, args.static_batch or 1)
    elif "static" in names or "vpa" in names:
        if dep.nodes is not None:  # beyond one node: static at peak may need several replicas
            static, att = static_at_peak_replicas(requests, model, dep, cfg, dep.max_replicas)
        else:
            static, att = static_at_peak(requests, model, dep, cfg)
        print(f"static at peak: {static.replicas} x {static.cpu_m} m, b={static.batch} ({att:.3%})", file=sys.stderr)
    else:
        static = None
    results = run_policies(requests, model, names, dep, cfg, static=static, overrides=overrides)
    oracles: dict[str, OracleBound] = {}
    if not args.no_oracle:
        for n in names:
            sp = dep.space_of(n)
            if sp.describe() not in oracles:
                oracles[sp.describe()] = oracle_bound(requests, model, sp)
    rows = summary_rows(results, oracles, dep)
    out = Path(args.out)
    dirs = {}
    for name, r in results.items():
        r.meta.update({"model": model_desc, "scenario": scenario.describe(),
                       "oracle": rows[name]["oracle_core_seconds"] if rows[name]["oracle"] != "infeasible"
                       else "infeasible"})
        dirs[name] = str(r.write(out / name))
    print(print_table(results, rows))
    print(f"\nwrote {', '.join(dirs.values())}  (sponge report {' '.join(dirs.values())})")
    figures = {
        "requests": len(requests),
        "trace": trace.description,
        "scenario": scenario.describe(),
        "model": model_desc,
        "config": asdict(cfg),
        "deployment": asdict(dep),
        "static": None if static is None else {"cpu_m": static.cpu_m, "batch": static.batch},
        "oracles": {k: v.as_dict() for k, v in oracles.items()},
        "runs": rows,
        "dirs": dirs,
        "wall_s": time.perf_counter() - t0,
    }
    (out / "simulate.json").write_text(json.dumps(figures, indent=2, default=str))
    print(json.dumps(figures, separators=(",", ":"), default=str))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `simulate` sub-command; the parser's `func(args) -> int` runs it."""
    p = subparsers.add_parser("simulate", help="trace-driven simulation of policies side by side (paper scale)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scenario_args(p)
    add_deployment_args(p)
    p.add_argument("--policy", default="sponge,paper,static,vpa,hpa,fa2,joint",
                   help=f"comma-separated policies or 'all' (known: {', '.join(POLICY_NAMES)}; simulator-only "
                        f"reference: {', '.join(REFERENCES)}, which knows the future)")
    p.add_argument("--set", action="append", metavar="POLICY.PARAM=VALUE",
                   help="override a policy parameter (JSON value), e.g. sponge.arrival_eps=0.05; repeatable")
    p.add_argument("--no-oracle", action="store_true", help="skip the lower bound (it takes a few seconds)")
    p.add_argument("--out", default="runs/sim", help="one run directory per policy under this")
    p.set_defaults(func=_main)
