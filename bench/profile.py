"""Profile the default model on this machine (issue 3): grid, fit, held-back validation, PNG.

One real replica process is resized in place through the real CPU actuator (cgroup quota here) over
batch sizes x CPU allocations; l(b, c) = g*b/c + d*b + e/c + h is fitted to the cells' p99 and judged
on held-back cells. Targets: R² >= 0.95 and p95 relative error <= 15 % on the held-back cells.

The profile is measured with the CFS period `sponge serve` uses (10 ms, `cfs_period_us`) and saved
next to the model when `sponge serve` would accept it. By default the same grid is then measured
again with the kernel's 100 ms period (`--compare-period-us`, 0 to skip) and saved beside it as
`*.profile.cfs100000us.json`: under a 100 ms period a replica allocated 500 m runs ~50 ms at full speed then waits ~50 ms, so the
p99 of a small batch carries a throttling wait of up to 100*(1 - c/ceil(c)) ms that the four-term
model cannot express; a 10 ms period shrinks that wait tenfold. `--statistic median_ms` fits the
median instead (bimodal at 100 ms, where a batch either fits in the period's quota or waits; smooth
at 10 ms).

The p99 of a cell is estimated from 5-40 batches, i.e. it is about the cell's maximum: on a shared
host one disturbed batch moves it, and the held-back error of p99 fits varies from run to run.

Usage: python bench/profile.py [--model PATH] [--batches 1,2,4,8,16] [--cpu-m 250,500,...]
                               [--statistic p99_ms|median_ms] [--out PATH] [--compare-period-us N] [--quick]
The last line printed is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from sponge.config import ServerConfig
from sponge.perf.profile_store import profile_path_for
from sponge.perf.profiler import DEFAULT_BATCHES, ProfileRun, default_cpu_grid, describe_run, run_profile

TARGET_R2 = 0.95
TARGET_P95 = 0.15


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _figures(run: ProfileRun) -> dict:
    fig = run.figures()
    h_r2, h_p95 = fig["r2_holdout"], fig["p95_rel_err_holdout"]
    fig["targets_met"] = h_r2 is not None and h_r2 >= TARGET_R2 and h_p95 <= TARGET_P95
    fig["cfs_period_us"] = run.profile.machine.get("profiled_with", {}).get("cfs_period_us")
    fig["grid"] = [{"batch": c.batch, "cpu_m": c.cpu_m, "mean_ms": round(c.mean_ms, 2),
                    "median_ms": round(c.median_ms, 2), "p99_ms": round(c.p99_ms, 2), "n": c.n,
                    "threads": c.threads, "other_cores": round(c.ext_cores, 2)} for c in run.cells]
    return fig


def _verdict(fig: dict) -> str:
    if fig["r2_holdout"] is None:
        return "no held-back cells"
    return (f"held-back cells: R² = {fig['r2_holdout']:.4f} (target >= {TARGET_R2}), p95 relative error = "
            f"{fig['p95_rel_err_holdout']:.1%} (target <= {TARGET_P95:.0%}) -> "
            f"{'MET' if fig['targets_met'] else 'NOT MET'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="ONNX model (default: packaged EfficientNet-Lite0)")
    ap.add_argument("--batches", type=_ints, default=list(DEFAULT_BATCHES))
    ap.add_argument("--cpu-m", dest="cpu_m", type=_ints, default=None)
    ap.add_argument("--statistic", choices=["p99_ms", "median_ms"], default="p99_ms")
    ap.add_argument("--out", help="profile path (default: next to the model)")
    ap.add_argument("--compare-period-us", dest="compare", type=int, default=100_000,
                    help="also profile with this CFS period (0: do not)")
    ap.add_argument("--quick", action="store_true", help="batches 1,4,8 at 500/1000/2000 m, short cells")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    if args.model:
        model = args.model
    else:
        from sponge.models.efficientnet_lite0 import default_model_path

        model = str(default_model_path())
    serve = ServerConfig()
    kw: dict = {"statistic": args.statistic, "progress": not args.no_progress,
                "min_r2": serve.profile_min_r2, "max_p95_rel_err": serve.profile_max_error}
    batches, cpu = args.batches, args.cpu_m or list(default_cpu_grid())
    if args.quick:
        batches, cpu = [1, 4, 8], [500, 1000, 2000]
        kw |= {"cell_seconds": 0.5, "reps": 15}
    out = Path(args.out) if args.out else profile_path_for(model)

    print(f"model: {model}\n\n=== CFS period {serve.cfs_period_us / 1000:g} ms (what `sponge serve` uses) ===",
          flush=True)
    run = run_profile(model, batches, cpu, out=out, period_us=serve.cfs_period_us, **kw)
    print(describe_run(run))
    fig = _figures(run)
    print(_verdict(fig), flush=True)
    figures = {"serve_period": fig}

    if args.compare:
        alt_out = out.with_name(out.name.removesuffix(".json") + f".cfs{args.compare}us.json")
        print(f"\n=== CFS period {args.compare / 1000:g} ms (comparison; not used by `sponge serve`) ===", flush=True)
        alt = run_profile(model, batches, cpu, out=alt_out, period_us=args.compare, **kw)
        print(describe_run(alt))
        afig = _figures(alt)
        print(_verdict(afig))
        figures["compare_period"] = afig
        print("\n                     period   R²(held back)  p95 err(held back)  p95 err(all)"
              "   p99 b=1 @250/500/1000 m")
        for name, f in (("serve", fig), ("compare", afig)):
            p99 = {(g["batch"], g["cpu_m"]): g["p99_ms"] for g in f["grid"]}
            tail = "/".join(f"{p99.get((1, c), float('nan')):.0f}" for c in (250, 500, 1000))
            per = f["cfs_period_us"]
            nan = float("nan")
            print(f"  {name:<10} {'-' if per is None else f'{per / 1000:g} ms':>14}"
                  f"   {f['r2_holdout'] or nan:>10.4f}   {f['p95_rel_err_holdout'] or nan:>14.1%}"
                  f"   {f['p95_rel_err_all']:>12.1%}   {tail:>20}")
    print(json.dumps(figures))
    return 0 if run.accepted else 1


if __name__ == "__main__":
    sys.exit(main())
