"""Picture of a latency-model fit: measured cells (markers) against the fitted l(b, c) (lines).

A plotting module, so it writes a file. It draws on an Agg canvas directly and never switches the
process-wide matplotlib backend.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from sponge.perf.fit import ProfilePoint, evaluate
from sponge.perf.latency_model import LatencyModel
from sponge.perf.profile_store import Profile


def _cores_label(x: float, _pos: object = None) -> str:
    return f"{x:g}"


def plot_fit(
    profile_or_points: Profile | Sequence[ProfilePoint],
    model: LatencyModel | None = None,
    path_png: str | os.PathLike[str] = "fit.png",
    title: str | None = None,
    held_back: Sequence[ProfilePoint] = (),
) -> Path:
    """Write a two-panel PNG: latency vs CPU and throughput vs CPU, one colour per batch size.

    Filled markers are cells the model was fitted to, hollow ones held-back cells (taken from a
    Profile's grid, or passed as `held_back`). `model` defaults to the profile's own.
    """
    if isinstance(profile_or_points, Profile):
        prof = profile_or_points
        fitted = prof.points(include_holdout=False)
        held = [c.point(prof.statistic) for c in prof.grid if c.holdout] + list(held_back)
        model = model or prof.model
        ylabel = f"batch latency, {prof.statistic.removesuffix('_ms')} (ms)"
        title = title or f"{prof.model_file.name} on {prof.machine.get('usable_cpus', '?')} CPUs"
    else:
        fitted, held = list(profile_or_points), list(held_back)
        ylabel = "batch latency (ms)"
    if model is None:
        raise ValueError("plot_fit needs a model when given plain points")
    everything = fitted + held
    if not everything:
        raise ValueError("nothing to plot: no profile points")

    q = evaluate(model, everything)
    batches = sorted({p.batch for p in everything})
    cores = np.array([p.cpu_m for p in everything], dtype=float) / 1000.0
    c_grid = np.geomspace(cores.min(), cores.max(), 200)
    colours = [f"C{i % 10}" for i in range(len(batches))]

    fig = Figure(figsize=(11, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_l, ax_t = fig.subplots(1, 2)
    for b, col in zip(batches, colours):
        lat = np.array([model.latency_ms(b, c * 1000.0) for c in c_grid])
        ax_l.plot(c_grid, lat, color=col, lw=1.6, label=f"b={b}")
        ax_t.plot(c_grid, 1000.0 * b / lat, color=col, lw=1.6, label=f"b={b}")
        for pts, face in ((fitted, col), (held, "none")):
            sel = [p for p in pts if p.batch == b]
            if not sel:
                continue
            x = np.array([p.cpu_m for p in sel]) / 1000.0
            y = np.array([p.latency_ms for p in sel])
            ax_l.scatter(x, y, s=36, marker="o", facecolors=face, edgecolors=col, zorder=3)
            ax_t.scatter(x, 1000.0 * b / y, s=36, marker="o", facecolors=face, edgecolors=col, zorder=3)

    for ax in (ax_l, ax_t):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(_cores_label))
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0), numticks=15))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("CPU allocation c (cores)")
        ax.grid(True, which="major", alpha=0.3)
    ax_l.set_ylabel(ylabel)
    ax_l.set_title("latency l(b, c)")
    ax_t.set_ylabel("throughput 1000·b / l (requests/s)")
    ax_t.set_title("throughput h(b, c)")

    handles, labels = ax_l.get_legend_handles_labels()
    handles += [
        Line2D([], [], color="0.3", lw=1.6),
        Line2D([], [], color="0.3", marker="o", ls="none"),
    ]
    labels += ["fit", "measured (fitted)" if held else "measured"]
    if held:
        handles.append(Line2D([], [], color="0.3", marker="o", ls="none", markerfacecolor="none"))
        labels.append("measured (held back)")
    ax_t.legend(handles, labels, loc="upper left", fontsize=8, ncol=2, framealpha=0.9)

    m = model
    heading = (
        f"l(b,c) = {m.g:.3g}·b/c + {m.d:.3g}·b + {m.e:.3g}/c + {m.h:.3g} ms    "
        f"R²={q.r2:.3f}, |rel err| p95 {q.p95_rel_err:.0%}, max {q.max_rel_err:.0%} ({q.n} cells)"
    )
    fig.suptitle(f"{title}\n{heading}" if title else heading, fontsize=10)
    out = Path(path_png)
    fig.savefig(out, dpi=110)
    return out
