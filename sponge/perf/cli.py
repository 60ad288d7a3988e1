"""`sponge profile`: measure l(b, c) of a model on this machine and save `<model>.profile.json`.

    sponge profile [--model PATH] [--batches 1,2,4,8,16] [--cpu-m 250,500,...] [--reps N]
                   [--out PATH] [--actuator auto|cgroup-v2|cgroup-v1|affinity]

Prints the grid (median/p99 per cell and the model's prediction), the fit (g, d, e, h; R² and p95
relative error on the fitted and on the held-back cells) and where the profile and its picture were
written. Exit status 0 when the fit is accepted, 1 when it is rejected (the measurements are then
saved as `*.profile.rejected.json`, which `sponge serve` does not use).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from sponge.config import ServerConfig


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def register(subparsers: argparse._SubParsersAction) -> None:
    from sponge.perf.profiler import (
        DEFAULT_BATCHES,
        DEFAULT_CELL_SECONDS,
        DEFAULT_MIN_REPS,
        DEFAULT_REPS,
        DEFAULT_WARMUP,
    )

    p = subparsers.add_parser(
        "profile",
        help="measure the model's batch latency over batch sizes x CPU allocations and fit l(b,c)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="path to an .onnx model (default: packaged EfficientNet-Lite0)")
    p.add_argument("--batches", type=_int_list, default=list(DEFAULT_BATCHES),
                   help=f"batch sizes (default {','.join(map(str, DEFAULT_BATCHES))})")
    p.add_argument("--cpu-m", dest="cpu_m", type=_int_list, default=None,
                   help="CPU allocations in millicores (default 250,500,750,1000,1500,2000,... up to all CPUs)")
    p.add_argument("--reps", type=int, default=DEFAULT_REPS,
                   help=f"at most this many timed batches per cell (default {DEFAULT_REPS}; a cell also stops "
                        f"after {DEFAULT_CELL_SECONDS:g} s of timed work, with at least {DEFAULT_MIN_REPS})")
    p.add_argument("--min-reps", dest="min_reps", type=int, default=DEFAULT_MIN_REPS)
    p.add_argument("--cell-seconds", dest="cell_seconds", type=float, default=DEFAULT_CELL_SECONDS)
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="untimed batches per cell")
    p.add_argument("--statistic", choices=["p99_ms", "median_ms"], default="p99_ms",
                   help="which cell summary the model is fitted to (default p99_ms)")
    p.add_argument("--out", help="where to write the profile (default: <model>.profile.json next to the model)")
    p.add_argument("--png", help="where to write the fit picture (default: next to the profile)")
    p.add_argument("--actuator", choices=["auto", "cgroup-v2", "cgroup-v1", "affinity"], default="auto",
                   help="how CPU allocations are applied (default: best available)")
    serve = ServerConfig()
    p.add_argument("--period-us", dest="period_us", type=int, default=serve.cfs_period_us,
                   help=f"CFS period of the replica's cgroup (default: {serve.cfs_period_us}, what `sponge serve` "
                        "uses; a profile is valid only for the period it was measured with)")
    p.add_argument("--min-r2", type=float, default=serve.profile_min_r2, help="refuse a fit with a lower R²")
    p.add_argument("--max-error", type=float, default=serve.profile_max_error,
                   help="refuse a fit whose p95 relative error is higher (default: what `sponge serve` accepts)")
    p.add_argument("--no-guarantee", dest="guaranteed", action="store_false",
                   help="do not give the profiled replica a high CPU weight (by default it is placed under a "
                        "high cpu.shares/cpu.weight parent so other processes cannot take its allocation)")
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON line (last)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from sponge.perf.profiler import describe_run, run_profile

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.model:
        model = args.model
    else:
        from sponge.models.efficientnet_lite0 import default_model_path

        model = str(default_model_path())
    if args.min_reps > args.reps:
        print(f"sponge profile: --min-reps ({args.min_reps}) exceeds --reps ({args.reps})", file=sys.stderr)
        return 2
    run = run_profile(
        model,
        args.batches,
        args.cpu_m,
        warmup=args.warmup,
        reps=args.reps,
        min_reps=args.min_reps,
        cell_seconds=args.cell_seconds,
        statistic=args.statistic,
        out=args.out,
        png=args.png or True,
        actuator=args.actuator,
        progress=args.progress,
        guaranteed=args.guaranteed,
        period_us=args.period_us,
        min_r2=args.min_r2,
        max_p95_rel_err=args.max_error,
    )
    print(f"model: {model}")
    print(describe_run(run))
    if args.json:
        print(json.dumps(run.figures()))
    return 0 if run.accepted else 1
