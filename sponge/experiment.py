"""`sponge experiment`: every figure of the evaluation in one command (a few minutes on two cores).

  (a) budget_spread.png — per-request server budgets the Ghent 4G trace leaves at several image sizes;
  (b) fit_<profile>.png — the l(b, c) fit of the built-in paper-scale profiles (and of a locally measured
      profile, if an accepted one exists in the model cache);
  (c) <window>/timelines.png — load, CPU, batch, replicas, latency vs budget and misses per interval,
      Sponge vs every baseline, on each of the paper's Twitter windows, simulated at paper scale
      (yolov5s profile, 16-core node), with one run directory per policy (`sponge report` reads them);
  (d) summary.md / summary.html / summary.json — per window and policy: attainment, misses, p99 of
      latency/budget, core-seconds and their ratio to the oracle lower bound of the policy's action space
      (sponge.sim.oracle), to static-at-peak and to `paper`, and the issue's targets for `sponge`.

All policies of a window replay the same request plan (same arrivals, same budgets, same seed). Each
window is a `Scenario` (sponge.workload.scenario) — the workload options are `sponge load`'s and
`sponge simulate`'s, less the trace and its scaling, which the experiment sets: the windows are scaled
by one common factor so that the busiest window peaks at `--peak-rps` (default 24 req/s, what one
16-core yolov5s replica can serve within ~1 s budgets), keeping "low" low and "high" high. The same
window's requests are drawn live by `sponge load --trace twitter:<window> --scale <scale>`.

`--trace SPEC` (any `sponge simulate --trace`, e.g. counts:my.txt or times:arrivals.csv) replaces the four
windows with one window named after the file, scaled so its peak is `--peak-rps`; a file `--network`
(mahimahi:, bandwidth:) is also the network of the budget figure (a). Without the shared data folder,
(a) falls back to nothing and (b) to the fits without their source points, so a user's own trace and
network run anywhere.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sponge.workload.scenario import Scenario, add_scenario_args, scenario_from_args, warn_notes
from sponge.workload.userfiles import file_label

WINDOWS = ("bursty", "steady_low", "steady_high", "fluctuating")
POLICIES = ("sponge", "paper", "static", "vpa", "hpa", "fa2", "joint", "clairvoyant")
# The paper's own bursty window, unscaled: its load exceeds what one 16-core YOLOv5s replica serves (~30
# req/s), so vertical scaling alone misses; these run the multi-replica policies on 16-core nodes.
UNSCALED = {"bursty_d8_unscaled": ("bursty", 8.0), "bursty_d5_unscaled": ("bursty", 5.0)}
UNSCALED_POLICIES = ("joint", "themis", "hpa", "fa2", "static", "sponge")  # those registered run
UNSCALED_NODES = 4
UNSCALED_NODE_CPU_M = 16_000
UNSCALED_MAX_REPLICAS = 64  # 4 nodes hold 64 one-core hpa/fa2 replicas; joint is capped by the nodes
ALL_WINDOWS = WINDOWS + tuple(UNSCALED)


def default_policies() -> tuple[str, ...]:
    """POLICIES plus `themis` once it is registered (sponge.policy.POLICY_NAMES)."""
    from sponge.policy import POLICY_NAMES

    return POLICIES + tuple(p for p in ("themis",) if p in POLICY_NAMES and p not in POLICIES)


def unscaled_policies(policies: Sequence[str]) -> list[str]:
    """The multi-replica policies of the unscaled windows: UNSCALED_POLICIES that are registered and asked for."""
    from sponge.policy import POLICY_NAMES

    return [p for p in UNSCALED_POLICIES if p in POLICY_NAMES and p in policies]


def unscaled_deployment() -> Any:
    """The unscaled windows' deployment: UNSCALED_NODES nodes of UNSCALED_NODE_CPU_M (sponge.sim.scenario)."""
    from sponge.sim.scenario import Deployment

    return Deployment(max_replicas=UNSCALED_MAX_REPLICAS, nodes=UNSCALED_NODES, node_cpu_m=UNSCALED_NODE_CPU_M)
IMAGE_KIBS = (100, 200, 500)


class _Progress:
    """A tqdm bar over the experiment's steps (plain lines when tqdm is missing or output is not a tty)."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.quiet = quiet
        self.t0 = time.perf_counter()
        try:
            from tqdm import tqdm

            tty = sys.stderr.isatty()
            self.bar = None if quiet or not tty else tqdm(total=total, unit="step", file=sys.stderr, dynamic_ncols=True)
        except ImportError:  # pragma: no cover - tqdm is a dependency
            self.bar = None
        self.done, self.total = 0, total

    def step(self, what: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(what[:60])
            self.bar.update(1)
        elif not self.quiet:
            print(f"[{self.done}/{self.total} {time.perf_counter() - self.t0:6.1f}s] {what}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- (a) and (b) ---------------------------------------------------------------------------------------
# Sponge's own setup for the budget figure: its rule, no RTT, one client at trace offset 0 (trace time =
# run time), 10 req/s evenly spaced over the Ghent log's first 600 s.
SPONGE_BUDGETS = Scenario(trace="constant:10", duration_s=600, arrivals="uniform", network="ghent",
                          tx_rule="sponge", rtt="none", clients=1, client_offsets="zero")


def budget_spread(out: Path, slo_ms: float = 1000.0, image_kibs: Sequence[int] = IMAGE_KIBS, seed: int = 0,
                  network: str = "ghent") -> dict[str, Any]:
    """Per-request budgets of SPONGE_BUDGETS at each image size — over a user's network file instead of
    the Ghent log when `network` is one (mahimahi:, bandwidth:, ghent:PATH)."""
    from sponge.report.plots import plot_budget_spread

    setup = replace(SPONGE_BUDGETS, network=network) if ":" in network else SPONGE_BUDGETS
    link = "Ghent 4G" if setup.network == "ghent" else setup.network
    budgets: dict[str, np.ndarray] = {}
    stats: dict[str, Any] = {}
    for kib in image_kibs:
        try:
            plan = replace(setup, image_kib=kib, slo_ms=slo_ms, seed=seed).plan()
        except FileNotFoundError as e:  # no shared data and no network file of the user's
            return {"png": None, "note": f"no budget figure: {e}", "link": link, "network": setup.summary(),
                    "budgets": {}}
        b = np.array([r.budget_ms for r in plan])
        budgets[f"{kib} KiB"] = b
        stats[f"{kib} KiB"] = {"n": int(b.size), **{f"p{q}": float(np.percentile(b, q)) for q in (1, 5, 50, 95)},
                               "min": float(b.min()), "below_zero": int((b <= 0).sum())}
    png = plot_budget_spread(budgets, out / "budget_spread.png", slo_ms=slo_ms)
    return {"png": png.name, "slo_ms": slo_ms, "link": link, "network": setup.summary(),
            "scenario": setup.describe(), "budgets": stats}


def fit_plots(out: Path) -> dict[str, Any]:
    """Fit pictures of the built-in profiles and of any accepted locally measured profile."""
    from sponge.perf.builtin_profiles import builtin_profile_names, load_builtin_info, read_source_points
    from sponge.perf.plot import plot_fit
    from sponge.workload.paths import shared_data_dir

    res: dict[str, Any] = {}
    for name in builtin_profile_names():
        info = load_builtin_info(name)
        try:
            pts = read_source_points(shared_data_dir(), name)
        except FileNotFoundError as e:  # the fit ships with the package; its source points do not
            res[name] = {"png": None, "note": str(e), "model": info.model.to_dict(), "r2": info.fit.r2,
                         "p95_rel_err": info.fit.p95_rel_err}
            continue
        png = plot_fit(pts, info.model, out / f"fit_{name}.png",
                       title=f"{name} (paper scale): {info.data['source']['file']}")
        res[name] = {"png": png.name, "model": info.model.to_dict(), "r2": info.fit.r2,
                     "p95_rel_err": info.fit.p95_rel_err}
    res["local"] = _local_profile(out)
    return res


def _local_profile(out: Path) -> dict[str, Any]:
    from sponge.models.onnx_cache import default_cache_dir

    d = default_cache_dir()
    found = sorted(d.glob("*.profile.json")) if d.is_dir() else []
    rejected = sorted(p.name for p in d.glob("*.rejected.json")) if d.is_dir() else []
    for p in found:
        model_path = p.with_name(p.name.removesuffix(".profile.json"))
        try:
            from sponge.perf.plot import plot_fit
            from sponge.perf.profile_store import load_profile

            prof = load_profile(p, model_path)
        except Exception as e:  # a stale or poor profile is reported, not fatal
            rejected.append(f"{p.name}: {e}")
            continue
        png = plot_fit(prof, None, out / "fit_local.png")
        return {"png": png.name, "profile": str(p), "model": prof.model.to_dict(), "r2": prof.fit.r2}
    return {"png": None, "note": f"no accepted measured profile in {d}", "rejected": rejected}


# ---- (c) -----------------------------------------------------------------------------------------------
def common_scale(windows: Sequence[str], damping: float | None, peak_rps: float) -> float:
    """The one factor that makes the busiest of `windows` (whole, at `damping`) peak at `peak_rps`."""
    from sponge.workload import named_window

    top = max(named_window(w, damping).peak_rps for w in windows)
    return peak_rps / top


def window_scenarios(base: Scenario, windows: Sequence[str], peak_rps: float) -> dict[str, Scenario]:
    """The experiment's workloads: `base` over each Twitter window, all scaled by `common_scale`; the
    UNSCALED windows at their own damping and scale 1."""
    scaled = [w for w in windows if w not in UNSCALED]
    scale = common_scale(scaled, base.damping, peak_rps) if scaled else 1.0
    out = {}
    for w in windows:
        if w in UNSCALED:
            name, damping = UNSCALED[w]
            out[w] = replace(base, trace=f"twitter:{name}", damping=damping, scale=None, peak_rps=None)
        else:
            out[w] = replace(base, trace=f"twitter:{w}", scale=scale, peak_rps=None)
    return out


def trace_scenarios(base: Scenario, trace: str, peak_rps: float) -> dict[str, Scenario]:
    """A user's trace as the experiment's one window, named after its file and scaled (like the windows)
    so that its peak — of the whole trace, before --duration-s — is `peak_rps`."""
    whole = replace(base, trace=trace, duration_s=None, scale=None, peak_rps=None).rate_trace()
    if whole.peak_rps <= 0:
        raise ValueError(f"--trace {trace}: no requests to scale")
    return {file_label(trace): replace(base, trace=trace, scale=peak_rps / whole.peak_rps, peak_rps=None)}


def run_window(
    window: str,
    scenario: Scenario,
    out: Path,
    *,
    policies: Sequence[str],
    profile: str,
    progress: _Progress,
    plot: bool = True,
    dep: Any = None,
) -> dict[str, Any]:
    """Static-at-peak search, every policy, the oracle bounds, run directories and the timelines PNG.
    `dep` (a sponge.sim.scenario.Deployment; default: one 16-core replica, no node model) with nodes also
    sets the simulator's nodes, and static at peak may then take several replicas."""
    from sponge.sim.cli import summary_rows
    from sponge.sim.engine import SimConfig
    from sponge.sim.oracle import oracle_bound
    from sponge.sim.scenario import (Deployment, load_model, request_set, run_policies, static_at_peak,
                                     static_at_peak_replicas)

    model, model_desc = load_model(profile)
    requests, trace = request_set(scenario)
    dep = dep or Deployment()
    cfg = SimConfig(seed=scenario.seed, **dep.sim_nodes())
    if dep.nodes is not None:
        static, static_att = static_at_peak_replicas(requests, model, dep, cfg, min(dep.max_replicas, 2 * dep.nodes))
    else:
        static, static_att = static_at_peak(requests, model, dep, cfg)
    progress.step(f"{window}: static at peak {static.replicas}x{static.cpu_m}m b={static.batch}")
    results = {}
    for name in policies:
        results.update(run_policies(requests, model, [name], dep, cfg, static=static))
        progress.step(f"{window}: {name}")
    oracles = {}
    for name in policies:
        sp = dep.space_of(name)
        if sp.describe() not in oracles:
            oracles[sp.describe()] = oracle_bound(requests, model, sp)
    if dep.vertical.describe() not in oracles:
        oracles[dep.vertical.describe()] = oracle_bound(requests, model, dep.vertical)
    progress.step(f"{window}: oracle bounds")
    rows = summary_rows(results, oracles, dep)
    wdir = out / window
    dirs = {}
    for name, r in results.items():
        r.meta.update({"model": model_desc, "window": window, "scenario": scenario.describe(),
                       "oracle": rows[name]["oracle_core_seconds"] if rows[name]["oracle"] != "infeasible"
                       else "infeasible"})
        dirs[name] = str(r.write(wdir / name).relative_to(out))
    png = None
    if plot:
        from sponge.report.plots import plot_timelines

        runs = {n: (r.records(), r.timeline) for n, r in results.items()}
        png = plot_timelines(runs, wdir / "timelines.png",
                             title=f"{window}: {trace.description} — {model_desc}, {dep.describe()}")
        png = str(png.relative_to(out))
    progress.step(f"{window}: written")
    v_oracle = oracles[dep.vertical.describe()]
    for name, row in rows.items():
        row["ratio_to_vertical_oracle"] = v_oracle.ratio(results[name].core_seconds)
        row["vertical_oracle"] = "bound" if v_oracle.feasible else "infeasible"
    return {
        "window": window,
        "scenario": scenario.describe(),
        "trace": trace.description,
        "notes": list(scenario.notes()),
        "requests": len(requests),
        "mean_rps": trace.mean_rps,
        "peak_rps": trace.peak_rps,
        "static": {"cpu_m": static.cpu_m, "batch": static.batch, "replicas": static.replicas,
                   "attainment": static_att},
        "deployment": dep.describe(),
        "unscaled": window in UNSCALED,
        "oracles": {k: v.as_dict() for k, v in oracles.items()},
        "runs": rows,
        "dirs": dirs,
        "png": png,
    }


# ---- (d) -----------------------------------------------------------------------------------------------
TARGETS = (
    ("attainment >= 99.9 %", lambda s, w: s["attainment"] >= 0.999),
    ("core-s <= 0.6 x static at peak", lambda s, w: _ratio(s, w, "static") <= 0.6),
    ("core-s <= 0.85 x paper", lambda s, w: _ratio(s, w, "paper") <= 0.85),
    ("core-s <= 1.15 x oracle bound", lambda s, w: None if s.get("oracle") == "infeasible"
     else (s.get("ratio_to_oracle") or math.inf) <= 1.15),
    ("misses <= 0.1 x HPA and FA2 at no more core-s",
     lambda s, w: all(_miss_ok(s, w, b) for b in ("hpa", "fa2") if b in w["runs"])),
)


def _joint_cheapest(s: dict[str, Any], w: dict[str, Any]) -> bool | None:
    """joint's core-s <= min(horizontal-only at no lower attainment, themis); None if neither ran."""
    others = [w["runs"][b]["core_seconds_exact"] for b in ("hpa", "fa2") if b in w["runs"]
              and (w["runs"][b]["attainment_saveable"] or 0) >= (s["attainment_saveable"] or 0)]
    if "themis" in w["runs"]:
        others.append(w["runs"]["themis"]["core_seconds_exact"])
    return None if not others else s["core_seconds_exact"] <= min(others)


JOINT_TARGETS = (
    ("attainment of saveable >= 99.9 %", lambda s, w: (s.get("attainment_saveable") or 0) >= 0.999),
    ("core-s <= min(hpa/fa2 at equal attainment, themis)", _joint_cheapest),
    ("core-s <= 1.5 x oracle (joint space)", lambda s, w: None if s.get("oracle") != "bound"
     else (s.get("ratio_to_oracle") or math.inf) <= 1.5),
)


def _ratio(s: dict[str, Any], w: dict[str, Any], other: str) -> float:
    o = w["runs"].get(other)
    return s["core_seconds_exact"] / o["core_seconds_exact"] if o and o["core_seconds_exact"] else math.nan


def _miss_ok(s: dict[str, Any], w: dict[str, Any], other: str) -> bool:
    o = w["runs"][other]
    return s["misses"] <= 0.1 * o["misses"] and s["core_seconds_exact"] <= o["core_seconds_exact"]


def _oracle_cell(s: dict[str, Any], ratio_key: str, kind_key: str) -> str:
    """A ratio to an oracle bound, or 'infeasible' where the space cannot meet every saveable budget."""
    if s.get(kind_key) == "infeasible":
        return "infeasible"
    return _fmt(s.get(ratio_key), "{:.2f}")


def _fmt(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return fmt.format(v)


def summary_markdown(result: dict[str, Any]) -> str:
    d = result["scenario"]["damping"]
    damping = "each window's own damping" if d is None else f"damping {d:g}"
    windows = (f"User trace `{result['trace']}`, scaled by {result['scale']:.3g} (peak = {result['peak_rps']:g} "
               f"req/s)" if result.get("trace") else
               f"Twitter 2021-08 windows at {damping}, all scaled by {result['scale']:.3f} "
               f"(busiest peak = {result['peak_rps']:g} req/s)")
    unscaled = [w for w in result["windows"] if w.get("unscaled")]
    if unscaled and len(unscaled) == len(result["windows"]):
        windows = (f"The bursty window at its own damping, unscaled (more than one replica's vertical range), "
                   f"deployment {unscaled[0]['deployment']}, multi-replica policies only")
    elif unscaled:
        windows += (f"; the *_unscaled windows are the bursty window at its own damping, unscaled (more than one "
                    f"replica's vertical range), deployment {unscaled[0]['deployment']}, multi-replica policies only")
    lines = ["# Sponge experiment", "",
             f"Model **{result['profile']}**, deployment: {result['deployment']}. "
             f"Request plan: {Scenario(**result['scenario']).summary()}. "
             f"{windows}. Simulated with sponge.sim "
             f"(interval {result['config']['interval_ms']:g} ms, resize delay {result['config']['resize_delay_ms']:g} ms, "
             f"cold start {result['config']['cold_start_ms']:g} ms, expiry {result['config']['expiry']}).", "",
             "**Oracle** = a proven lower bound on the core-seconds of any policy in the same action space that "
             "meets every saveable budget (fluid relaxation + LP duality, `sponge/sim/oracle.py`); it is not "
             "achievable, so a ratio to it overstates the distance to the true optimum. **clairvoyant** is a "
             "simulator-only reference that knows the next two intervals' arrivals and budgets and picks the "
             "least CPU that replays them in time (`sponge/sim/clairvoyant.py`): when it meets every budget "
             "its cost is achievable, so the optimum of the 1-replica space lies between the oracle bound "
             "and it.", "",
             "## (d) Summary", "",
             "Attainment of **saveable** requests leaves out those no policy can meet (DESIGN §5): arrived "
             "already late, or a budget under l(1, max CPU); **unsaveable** counts them.", "",
             "| window | policy | attainment | of saveable | unsaveable | misses | p99 latency/budget | core-s "
             "| / oracle (own space) | / oracle (1 replica) | / clairvoyant | / static at peak | / paper "
             "| mean CPU (m) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for w in result["windows"]:
        for name, s in w["runs"].items():
            lines.append(
                f"| {w['window']} | {name} | {_fmt(s['attainment'], '{:.3%}')} | "
                f"{_fmt(s.get('attainment_saveable'), '{:.3%}')} | {s.get('unsaveable', '-')} | {s['misses']} | "
                f"{_fmt(s['p99_server_over_budget'], '{:.3f}')} | {s['core_seconds_exact']:.0f} | "
                f"{_oracle_cell(s, 'ratio_to_oracle', 'oracle')} | "
                f"{_oracle_cell(s, 'ratio_to_vertical_oracle', 'vertical_oracle')} | "
                f"{_fmt(_ratio(s, w, 'clairvoyant'), '{:.2f}')} | "
                f"{_fmt(_ratio(s, w, 'static'), '{:.2f}')} | {_fmt(_ratio(s, w, 'paper'), '{:.2f}')} | "
                f"{_fmt(s['mean_cpu_m'], '{:.0f}')} |")
    lines += ["", "Oracle bounds (core-s) per window and action space:", ""]
    for w in result["windows"]:
        parts = [f"{k}: **{v['core_seconds']:.0f}**" if v.get("feasible", True) else f"{k}: **infeasible**"
                 for k, v in w["oracles"].items()]
        reps = w["static"].get("replicas", 1)
        lines.append(f"- {w['window']} ({w['requests']} requests, mean {w['mean_rps']:.1f}, peak "
                     f"{w['peak_rps']:.1f} req/s; static at peak {'' if reps == 1 else f'{reps} x '}"
                     f"{w['static']['cpu_m']} m b={w['static']['batch']}): " + "; ".join(parts))
        lines += [f"  - note: {n}" for n in w.get("notes", [])]
        lines += [f"  - {v['infeasible']}" for v in w["oracles"].values() if v.get("infeasible")]
        nodes = {n: r["nodes"] for n, r in w["runs"].items() if r.get("nodes")}
        if nodes:
            lines.append("  - nodes used / replicas refused (scale-outs refused) / CPU cuts: " + "; ".join(
                f"{n} {v['used']} / {v['refused_replicas']} ({v['refused_decisions']}) / {v['clamped_cpu']}"
                for n, v in nodes.items()))
    if any("sponge" in w["runs"] for w in result["windows"] if not w.get("unscaled")):
        lines += ["", "## Targets for `sponge`", "", "| window | " + " | ".join(t for t, _ in TARGETS) + " |",
                  "| --- |" + " :---: |" * len(TARGETS)]
        for w in result["windows"]:
            s = w["runs"].get("sponge")
            if s is None or w.get("unscaled"):
                continue
            cells = []
            for _, test in TARGETS:
                try:
                    ok = test(s, w)
                    cells.append("infeasible" if ok is None else "yes" if ok else "**no**")
                except (KeyError, TypeError):
                    cells.append("-")
            lines.append(f"| {w['window']} | " + " | ".join(cells) + " |")
    if any("joint" in w["runs"] for w in unscaled):
        lines += ["", "## Targets for `joint` on the unscaled windows (issue 11)", "",
                  "| window | " + " | ".join(t for t, _ in JOINT_TARGETS) + " |", "| --- |" + " :---: |" * len(JOINT_TARGETS)]
        for w in unscaled:
            s = w["runs"].get("joint")
            if s is None:
                continue
            cells = []
            for _, test in JOINT_TARGETS:
                ok = test(s, w)
                cells.append("-" if ok is None else "yes" if ok else "**no**")
            lines.append(f"| {w['window']} | " + " | ".join(cells) + " |")
    b = result["budgets"]
    lines += ["", f"## (a) Budget spread ({b.get('link', 'Ghent 4G')}, first 600 s)", "",
              f"![budget spread]({b['png']})" if b["png"] else b.get("note", ""), ""]
    for k, v in result["budgets"]["budgets"].items():
        lines.append(f"- {k}: p1 {v['p1']:.0f}, p5 {v['p5']:.0f}, p50 {v['p50']:.0f}, p95 {v['p95']:.0f}, "
                     f"min {v['min']:.0f} ms ({v['below_zero']} already late)")
    lines += ["", "## (b) l(b, c) fits", ""]
    for k, v in result["fits"].items():
        if k == "local":
            if v.get("png"):
                lines += [f"Locally measured profile `{v['profile']}` (R² {v['r2']:.3f}):", "", f"![local fit]({v['png']})", ""]
            else:
                lines += [f"Locally measured profile: {v['note']}" + (f" (rejected: {', '.join(v['rejected'])})"
                                                                     if v.get("rejected") else ""), ""]
            continue
        m = v["model"]
        lines += [f"{k}: g={m['g']:g} d={m['d']:g} e={m['e']:g} h={m['h']:g}, R² {v['r2']:.3f}, "
                  f"p95 |rel err| {v['p95_rel_err']:.1%}", "",
                  f"![{k} fit]({v['png']})" if v["png"] else f"(no picture: {v.get('note')})", ""]
    lines += ["## (c) Timelines", ""]
    for w in result["windows"]:
        if w["png"]:
            lines += [f"### {w['window']}", "", f"{w['trace']}", "", f"![{w['window']}]({w['png']})", ""]
    lines += [f"Total wall time {result['wall_s']:.0f} s.", ""]
    return "\n".join(lines)


def markdown_to_html(md: str, title: str = "Sponge experiment") -> str:
    """Enough Markdown for this report: headings, paragraphs, lists, tables, images, **bold**, `code`."""
    import re

    def inline(s: str) -> str:
        s = html.escape(s, quote=False)
        s = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r'<img alt="\1" src="\2" style="max-width:100%">', s)
        s = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", s)

    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif;max-width:1400px;margin:auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td:first-child,td:nth-child(2){text-align:left}"
           "</style></head><body>"]
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        ln = lines[i]
        if ln.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in rows[0]) + "</tr>")
            for r in rows[2:]:
                out.append("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>")
            out.append("</table>")
            continue
        if ln.startswith("#"):
            level = len(ln) - len(ln.lstrip("#"))
            out.append(f"<h{level}>{inline(ln[level:].strip())}</h{level}>")
        elif ln.startswith("- "):
            out.append(f"<ul><li>{inline(ln[2:])}</li></ul>")
        elif ln.strip():
            out.append(f"<p>{inline(ln)}</p>")
        i += 1
    out.append("</body></html>")
    return "\n".join(out)


# ---- the command -----------------------------------------------------------------------------------------
def run_experiment(
    out: str | Path = "runs/experiment",
    *,
    base: Scenario = Scenario(),
    windows: Sequence[str] = ALL_WINDOWS,
    peak_rps: float = 24.0,
    policies: Sequence[str] | None = None,
    profile: str = "yolov5s",
    quiet: bool = False,
    plots: bool = True,
    trace: str | None = None,
) -> dict[str, Any]:
    """Everything of the module docstring into `out`; `base` is the workload of every window but its
    trace and scale (`window_scenarios`), or, given a user's `trace`, of its one window
    (`trace_scenarios`). Returns the figures (also in summary.json)."""
    from sponge.sim.engine import SimConfig
    from sponge.sim.scenario import Deployment

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    policies = list(policies) if policies is not None else list(default_policies())
    scenarios = trace_scenarios(base, trace, peak_rps) if trace else window_scenarios(base, windows, peak_rps)
    multi = unscaled_policies(policies)
    per_window = {w: (multi if w in UNSCALED else policies) for w in scenarios}
    progress = _Progress(2 + sum(len(p) + 3 for p in per_window.values()), quiet)
    budgets = budget_spread(out, base.slo_ms, seed=base.seed, network=base.network)
    progress.step("budget spread")
    fits = fit_plots(out)
    progress.step("fit plots")
    results = [run_window(w, sc, out, policies=per_window[w], profile=profile, progress=progress, plot=plots,
                          dep=unscaled_deployment() if w in UNSCALED else None)
               for w, sc in scenarios.items() if per_window[w]]
    progress.close()
    dep = Deployment()
    result = {
        "profile": profile,
        "deployment": dep.describe(),
        "config": asdict(SimConfig(seed=base.seed)),
        "scenario": base.describe(),
        "trace": trace,
        "scale": next((sc.scale for w, sc in scenarios.items() if w not in UNSCALED), 1.0),
        "peak_rps": peak_rps,
        "budgets": budgets,
        "fits": fits,
        "windows": results,
    }
    result["wall_s"] = time.perf_counter() - t0
    md = summary_markdown(result)
    (out / "summary.md").write_text(md)
    (out / "summary.html").write_text(markdown_to_html(md))
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def _main(args: argparse.Namespace) -> int:
    if args.user_trace and args.windows:
        print("sponge experiment: give --trace (your own trace) or --windows (Twitter windows), not both",
              file=sys.stderr)
        return 2
    try:
        base = scenario_from_args(args)
        warn_notes(replace(base, trace=args.user_trace) if args.user_trace else base, "sponge experiment")
        res = run_experiment(args.out, base=base, windows=args.windows or ALL_WINDOWS,
                             peak_rps=args.busiest_peak_rps, policies=args.policies, profile=args.profile,
                             quiet=args.quiet, plots=not args.no_plots, trace=args.user_trace)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"sponge experiment: {e}", file=sys.stderr)
        return 2
    print(summary_markdown(res).split("## (a)")[0])
    print(f"wrote {args.out}/summary.md, summary.html, summary.json and one directory per window "
          f"({res['wall_s']:.0f} s)")
    compact = {w["window"]: {n: {"attainment": s["attainment"], "attainment_saveable": s.get("attainment_saveable"),
                                 "misses": s["misses"],
                                 "core_seconds": round(s["core_seconds_exact"], 1),
                                 "ratio_to_oracle": s["ratio_to_oracle"], "oracle": s.get("oracle")}
                             for n, s in w["runs"].items()}
               for w in res["windows"]}
    print(json.dumps({"out": str(args.out), "wall_s": res["wall_s"], "scale": res["scale"], "windows": compact},
                     separators=(",", ":")))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `experiment` sub-command; the parser's `func(args) -> int` runs it."""
    p = subparsers.add_parser("experiment", help="regenerate every figure of the evaluation (simulated, paper scale)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/experiment")
    p.add_argument("--windows", nargs="+", default=None, choices=list(ALL_WINDOWS),
                   help=f"Twitter 2021-08 windows to run (default: all: {' '.join(ALL_WINDOWS)}); the *_unscaled "
                        f"ones are the bursty window at damping 8 and 5, unscaled, on {UNSCALED_NODES} nodes of "
                        f"{UNSCALED_NODE_CPU_M} m with the multi-replica policies ({', '.join(UNSCALED_POLICIES)}, "
                        f"those registered)")
    p.add_argument("--trace", dest="user_trace", metavar="SPEC", default=None,
                   help="your own trace instead of the Twitter windows: any `sponge simulate --trace` (e.g. "
                        "counts:my.txt, times:arrivals.csv:1), run as one window named after the file and scaled "
                        "to --peak-rps")
    p.add_argument("--policies", nargs="+", default=None,
                   help=f"policies to compare ('clairvoyant' is the simulator-only reference; default: "
                        f"{' '.join(POLICIES)}, and themis once registered)")
    p.add_argument("--profile", default="yolov5s", help="built-in profile or profile JSON for the simulations")
    p.add_argument("--peak-rps", dest="busiest_peak_rps", metavar="RPS", type=float, default=24.0,
                   help="the busiest window (or your --trace) is scaled to this peak; the others by the same factor")
    add_scenario_args(p, omit=("trace", "scale", "peak_rps"))
    p.add_argument("--no-plots", action="store_true", help="skip the timeline PNGs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_main)
