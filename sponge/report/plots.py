"""PNG timelines of runs side by side, and the spread of budgets a network trace causes.

One column per run, one row per quantity, y axes shared across a row so runs compare at a glance.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from sponge.report.results import RequestRecord, TimelineRecord  # noqa: E402

RunData = tuple[Sequence[RequestRecord], Sequence[TimelineRecord]]

_PANELS = (
    "load (req/s)",
    "allocated CPU (millicores)",
    "CPU per replica (millicores)",
    "batch size",
    "replicas",
    "server latency vs budget (ms)",
    "misses per interval",
)
# the row of each panel by key, so a new panel does not renumber the code that draws them
_ROW = {"load": 0, "total": 1, "per_replica": 2, "batch": 3, "replicas": 4, "latency": 5, "misses": 6}


def replica_series(timeline: Sequence[TimelineRecord]) -> dict[str, np.ndarray]:
    """What the replica panels draw, per timeline row in time order: t_s (interval end), replicas in
    force, CPU per replica (millicores), total allocated CPU, and replicas refused for want of a node
    (simulator with --nodes). Live and simulated timelines carry the same columns."""
    rows = sorted(timeline, key=lambda r: r.t_ms)
    return {
        "t_s": np.array([r.t_ms / 1000.0 for r in rows], dtype=float),
        "replicas": np.array([r.replicas for r in rows], dtype=int),
        "cpu_per_replica_m": np.array([r.cpu_m for r in rows], dtype=float),
        "total_cpu_m": np.array([r.total_cpu_m for r in rows], dtype=float),
        "refused_replicas": np.array([getattr(r, "refused_replicas", 0) for r in rows], dtype=int),
    }


def _interval_s(timeline: Sequence[TimelineRecord], default: float = 10.0) -> float:
    t = np.array(sorted(r.t_ms for r in timeline))
    if t.size >= 2:
        step = float(np.median(np.diff(t))) / 1000.0
        if step > 0:
            return step
    return default


def _step(ax: plt.Axes, tl: Sequence[TimelineRecord], attr: str, **kw: object) -> None:
    """Timeline rows hold values for the interval that ends at t_ms: draw them as post-steps from 0."""
    rows = sorted(tl, key=lambda r: r.t_ms)
    t = np.array([0.0] + [r.t_ms / 1000.0 for r in rows])
    v = np.array([getattr(r, attr) for r in rows], dtype=float)
    ax.step(t, np.append(v, v[-1]), where="post", **kw)


def _no_data(ax: plt.Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what}", ha="center", va="center", transform=ax.transAxes, color="grey")


def _legend(ax: plt.Axes, show: bool, **kw: object) -> None:
    if show:
        ax.legend(loc="upper left", fontsize=7, framealpha=0.85, **kw)


def _draw_run(
    axes: Sequence[plt.Axes], reqs: Sequence[RequestRecord], tl: Sequence[TimelineRecord], legends: bool
) -> None:
    sent = np.array([r.sent_ms for r in reqs], dtype=float) / 1000.0
    miss = np.array([r.outcome != "ok" for r in reqs], dtype=bool)
    horizon = max([float(sent.max()) if sent.size else 0.0] + [r.t_ms / 1000.0 for r in tl]) or 1.0

    ax = axes[0]  # load: observed sends per second, and what the controller measured per interval
    if sent.size:
        per_s = np.bincount(np.clip(sent, 0, None).astype(np.int64))
        ax.plot(np.arange(per_s.size) + 0.5, per_s, color="0.7", lw=0.6, label="sent / s")
    if tl:
        _step(ax, tl, "arrival_rps", color="C0", lw=1.2, label="arrival rate (interval)")
    if sent.size or tl:
        _legend(ax, legends)
    else:
        _no_data(ax, "requests")

    if tl:
        _step(axes[_ROW["total"]], tl, "total_cpu_m", color="C1", lw=1.4, label="total (starting replicas too)")
        _legend(axes[_ROW["total"]], legends)
        _step(axes[_ROW["per_replica"]], tl, "cpu_m", color="C5", lw=1.2)
        _step(axes[_ROW["batch"]], tl, "batch", color="C2", lw=1.2)
        ax = axes[_ROW["replicas"]]
        _step(ax, tl, "replicas", color="C4", lw=1.2, label="replicas")
        rs = replica_series(tl)
        refused = rs["refused_replicas"] > 0
        if refused.any():  # a scale-out that found no node (sponge simulate --nodes)
            ax.scatter(rs["t_s"][refused], rs["replicas"][refused] + rs["refused_replicas"][refused], marker="x",
                       s=14, color="C3", lw=0.8, label="asked, no node")
            _legend(ax, legends)
    else:
        for k in ("total", "per_replica", "batch", "replicas"):
            _no_data(axes[_ROW[k]], "timeline")

    ax = axes[_ROW["latency"]]  # each request: its budget (grey) and its server time (blue, red when missed)
    if reqs:
        budget = np.array([r.budget_ms for r in reqs], dtype=float)
        server = np.array([r.server_ms for r in reqs], dtype=float)
        answered = np.isfinite(server)
        ax.scatter(sent, budget, s=2, color="0.65", label="budget", rasterized=True)
        ok = answered & ~miss
        ax.scatter(sent[ok], server[ok], s=2, color="C0", label="server time (met)", rasterized=True)
        late = answered & miss
        ax.scatter(sent[late], server[late], s=5, color="C3", label="server time (missed)", rasterized=True)
        dropped = ~answered & miss
        if dropped.any():
            ax.scatter(sent[dropped], budget[dropped], s=12, marker="x", color="C3", lw=0.7,
                       label="no answer (at its budget)")
        _legend(ax, legends, markerscale=2.5)
    else:
        _no_data(ax, "requests")

    ax = axes[_ROW["misses"]]
    step = _interval_s(tl)
    if reqs:
        bins = np.arange(0.0, horizon + step, step)
        m, _ = np.histogram(sent[miss], bins=bins)
        ax.bar(bins[:-1], m, width=step, align="edge", color="C3", label=f"misses per {step:g} s")
        _legend(ax, legends)
    else:
        _no_data(ax, "requests")
    for ax in axes:
        ax.set_xlim(0, horizon)
        ax.grid(alpha=0.3, lw=0.5)


def _latency_ylim(runs: Mapping[str, RunData]) -> float | None:
    vals = [v for reqs, _ in runs.values() for r in reqs for v in (r.budget_ms, r.server_ms) if math.isfinite(v)]
    if not vals:
        return None
    return float(np.percentile(vals, 99.5)) * 1.15  # a few outliers should not flatten the rest


def _save(fig: Any, path: str | Path) -> Path:
    """Lay out, write the PNG (creating its folder) and free the figure."""
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_timelines(runs: Mapping[str, RunData], path: str | Path, title: str | None = None) -> Path:
    """One PNG: a column per run (name -> (requests, timeline)), a row per quantity."""
    if not runs:
        raise ValueError("plot_timelines needs at least one run")
    names = list(runs)
    fig, axes = plt.subplots(
        len(_PANELS), len(names), figsize=(4.6 * len(names) + 1.2, 14.0), sharex="col", sharey="row", squeeze=False
    )
    for j, name in enumerate(names):
        reqs, tl = runs[name]
        _draw_run(axes[:, j], reqs, tl, legends=(j == 0))
        met = sum(r.outcome == "ok" for r in reqs)
        head = f"{name}: {met / len(reqs):.1%} met of {len(reqs)}" if reqs else name
        axes[0, j].set_title(head, fontsize=11)
        axes[-1, j].set_xlabel("time (s)")
    for i, label in enumerate(_PANELS):
        axes[i, 0].set_ylabel(label, fontsize=8)
    top = _latency_ylim(runs)
    lat = _ROW["latency"]
    if top is not None and top > 0:
        axes[lat, 0].set_ylim(min(0.0, axes[lat, 0].get_ylim()[0]), top)
    for k in ("load", "total", "per_replica", "batch", "replicas", "misses"):
        axes[_ROW[k], 0].set_ylim(bottom=0)
    for k in ("batch", "replicas", "misses"):
        axes[_ROW[k], 0].yaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_budget_spread(
    budgets_by_config: Mapping[str, Sequence[float] | np.ndarray], path: str | Path, slo_ms: float | None = None
) -> Path:
    """Histogram and CDF of per-request budgets, one series per configuration (e.g. image size)."""
    if not budgets_by_config:
        raise ValueError("plot_budget_spread needs at least one configuration")
    fig, (ax_h, ax_c) = plt.subplots(1, 2, figsize=(11, 4))
    all_b = np.concatenate([np.asarray(b, dtype=float) for b in budgets_by_config.values()])
    lo, hi = float(np.nanmin(all_b)), float(np.nanmax(all_b))
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 60)
    for k, (name, b) in enumerate(budgets_by_config.items()):
        arr = np.sort(np.asarray(b, dtype=float))
        c = f"C{k % 10}"
        label = f"{name} (p50 {np.median(arr):.0f}, p5 {np.percentile(arr, 5):.0f} ms)"
        ax_h.hist(arr, bins=bins, histtype="step", lw=1.4, color=c, label=label)
        ax_c.plot(arr, np.arange(1, arr.size + 1) / arr.size, color=c, lw=1.4, label=name)
    for ax in (ax_h, ax_c):
        if slo_ms is not None:
            ax.axvline(slo_ms, color="0.4", ls=":", lw=1)
        ax.axvline(0, color="C3", ls="--", lw=0.8)  # left of this: already late on arrival
        ax.set_xlabel("server budget = SLO - network (ms)")
        ax.grid(alpha=0.3, lw=0.5)
    ax_h.set_ylabel("requests")
    ax_h.legend(fontsize=8, frameon=False, loc="upper left")
    ax_c.set_ylabel("fraction of requests")
    ax_c.set_ylim(0, 1)
    ax_h.set_title("budget histogram")
    ax_c.set_title("budget CDF")
    return _save(fig, path)
