"""`sponge report RUN_DIR... [--out DIR] [--names ...]`: table, PNG timelines, Markdown, one JSON line.

The JSON line is printed last so scripts (and benchmarks that quote figures) can take the final line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from sponge.report.plots import plot_timelines
from sponge.report.results import read_run
from sponge.report.summary import Summary, format_markdown, format_table, summarize


def _names(dirs: list[Path], given: list[str] | None, metas: list[dict[str, Any]]) -> list[str]:
    if given:
        if len(given) != len(dirs):
            raise ValueError(f"--names has {len(given)} names for {len(dirs)} runs")
        names = list(given)
    else:
        names = [str(m.get("name") or m.get("policy") or d.name) for d, m in zip(dirs, metas)]
    seen: dict[str, int] = {}
    out = []
    for n in names:  # keep columns distinct even if two runs share a policy name
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out


def _default_out(dirs: list[Path]) -> Path:
    if len(dirs) == 1:
        return dirs[0] / "report"
    return Path(os.path.commonpath([str(d.resolve()) for d in dirs])) / "report"


def _floor(meta: dict[str, Any], override: float | None) -> float | None:
    """The run's l(1, max CPU) for the saveable split: the override, else run.json's, else none."""
    if override is not None:
        return override
    v = meta.get("saveable_floor_ms")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def run_report(run_dirs: list[str], out: str | None = None, names: list[str] | None = None,
               saveable_floor_ms: float | None = None) -> dict[str, Any]:
    """Read runs, write timeline.png + summary.md + summary.json into `out`; return the figures.

    Saveable attainment uses each run's `saveable_floor_ms` from its run.json (simulated runs and
    bench/live.py's carry it), or `saveable_floor_ms` for every run when given; without either only
    requests that arrived already late are unsaveable."""
    dirs = [Path(d) for d in run_dirs]
    for d in dirs:
        if not (d / "requests.csv").is_file():
            raise FileNotFoundError(f"{d}: not a run directory (no requests.csv)")
    loaded = [read_run(d) for d in dirs]
    labels = _names(dirs, names, [m for _, _, m in loaded])
    summaries: dict[str, Summary] = {n: summarize(r, tl, _floor(m, saveable_floor_ms))
                                     for n, (r, tl, m) in zip(labels, loaded)}
    out_dir = Path(out) if out else _default_out(dirs)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_timelines({n: (r, tl) for n, (r, tl, _) in zip(labels, loaded)}, out_dir / "timeline.png")
    figures = {
        "runs": {n: s.as_dict() for n, s in summaries.items()},
        "dirs": {n: str(d) for n, d in zip(labels, dirs)},
        "out": str(out_dir),
        "png": [str(png)],
    }
    md = ["# Run report", ""]
    md += [f"- **{n}**: `{d}`" + (f" — {m.get('policy')}" if m.get("policy") else "")
           for n, d, (_, _, m) in zip(labels, dirs, loaded)]
    md += ["", format_markdown(summaries), "", f"![timelines]({png.name})", ""]
    (out_dir / "summary.md").write_text("\n".join(md))
    (out_dir / "summary.json").write_text(json.dumps(figures, indent=2))
    figures["table"] = format_table(summaries)
    return figures


def _main(args: argparse.Namespace) -> int:
    try:
        figures = run_report(args.run_dirs, args.out, args.names, args.saveable_floor_ms)
    except (FileNotFoundError, ValueError) as e:
        print(f"sponge report: {e}", file=sys.stderr)
        return 2
    table = figures.pop("table")
    print(table)
    print(f"\nwrote {figures['out']}/summary.md, summary.json, timeline.png")
    print(json.dumps(figures, separators=(",", ":")))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `report` sub-command; the parser's `func(args) -> int` runs it."""
    p = subparsers.add_parser("report", help="summarise and plot one or more runs side by side")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (requests.csv, timeline.csv)")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/report, or the common parent)")
    p.add_argument("--names", nargs="+", default=None, help="column names, one per run")
    p.add_argument("--saveable-floor-ms", type=float, default=None, metavar="MS",
                   help="l(1, max CPU): budgets below it count as unsaveable (default: each run.json's "
                        "saveable_floor_ms; without one, only budgets <= 0)")
    p.set_defaults(func=_main)
