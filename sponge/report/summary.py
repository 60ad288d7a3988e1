"""The figures of one run: SLO attainment, latency, latency relative to budget, and CPU cost (DESIGN §5).

Conventions:
  * attainment = fraction of *all* requests with outcome "ok"; late, expired, rejected and error are
    misses (a request the server never answered still counts against it).
  * latency percentiles are over *served* requests (outcome ok or late, finite server_ms): an
    expired/rejected request's quick error reply is not a latency.
  * `p99_server_over_budget` = p99 of server_ms / budget_ms (DESIGN's "p99 of latency/budget": > 1 means
    the p99 request overran what the network left it); budgets under 1 ms count as 1 ms so the ratio
    stays finite. `p99_e2e_over_slo` = p99 of e2e_ms / slo_ms, the user's view.
  * core-seconds = integral of total_cpu_m over time / 1000, each timeline row covering the interval
    since the previous row (the first since t=0): the replicas' allocation, what the runs have always
    been compared by. `front_door_core_seconds` is the same integral of `front_door_cpu_m` — the CPU the
    front door itself (the server process: HTTP, decoding, queue, controller) used, measured live, modelled
    as a cost per request in the simulator — and `core_seconds_with_front_door` the sum of both (NaN when
    a row lacks the front door's figure: an older run).
  * saveable (DESIGN §5): a request is *unsaveable* if it arrived already late (budget <= 0) or its budget
    is shorter than one inference at full allocation, l(1, max CPU) of the deployment's latency model
    (`saveable_floor_ms`); no policy can meet those. `attainment_saveable` = ok among the saveable ones.
    Without a floor only budget <= 0 counts as unsaveable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from sponge.report.results import RequestRecord, TimelineRecord

OUTCOMES = ("ok", "late", "expired", "rejected", "error")
SERVED = ("ok", "late")
MIN_BUDGET_MS = 1.0


@dataclass(frozen=True)
class Summary:
    requests: int
    attainment: float  # fraction ok (NaN if no requests)
    counts: dict[str, int] = field(default_factory=dict)  # per outcome
    p50_server_ms: float = math.nan
    p99_server_ms: float = math.nan
    p50_e2e_ms: float = math.nan
    p99_e2e_ms: float = math.nan
    p99_server_over_budget: float = math.nan
    p99_e2e_over_slo: float = math.nan
    p50_budget_ms: float = math.nan
    core_seconds: float = math.nan  # NaN without a timeline
    front_door_core_seconds: float = math.nan  # the front door's own CPU (NaN: not measured)
    core_seconds_with_front_door: float = math.nan  # core_seconds + front_door_core_seconds
    mean_cpu_m: float = math.nan  # time-weighted mean of total_cpu_m
    max_cpu_m: float = math.nan
    duration_s: float = math.nan  # span of the timeline (or of send times if there is none)
    mean_rps: float = math.nan
    unsaveable: int = 0  # arrived late (budget <= 0) or budget < saveable_floor_ms
    attainment_saveable: float = math.nan  # fraction ok among the saveable requests (NaN if none)
    saveable_floor_ms: float = math.nan  # l(1, max CPU) the split used (NaN: budget <= 0 only)

    @property
    def misses(self) -> int:
        return self.requests - self.counts.get("ok", 0)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (NaN becomes None)."""
        d = asdict(self)
        d["misses"] = self.misses
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else math.nan


def core_seconds(timeline: Sequence[TimelineRecord]) -> tuple[float, float]:
    """(core-seconds, covered duration in s) of a timeline; each row covers the time since the previous."""
    rows = sorted(timeline, key=lambda r: r.t_ms)
    total_m_ms, prev = 0.0, 0.0
    for r in rows:
        total_m_ms += r.total_cpu_m * max(r.t_ms - prev, 0.0)
        prev = max(prev, r.t_ms)
    return total_m_ms / 1000.0 / 1000.0, prev / 1000.0


def front_door_core_seconds(timeline: Sequence[TimelineRecord]) -> float:
    """Integral of the timeline's `front_door_cpu_m` as `core_seconds` integrates `total_cpu_m`; NaN when
    there is no timeline or a row has no figure (a run recorded before the front door was measured)."""
    rows = sorted(timeline, key=lambda r: r.t_ms)
    total_m_ms, prev = 0.0, 0.0
    for r in rows:
        v = float(getattr(r, "front_door_cpu_m", math.nan))
        if not math.isfinite(v):
            return math.nan
        total_m_ms += v * max(r.t_ms - prev, 0.0)
        prev = max(prev, r.t_ms)
    return total_m_ms / 1e6 if rows else math.nan


def saveable_floor_ms(model: Any, max_cpu_m: float) -> float:
    """l(1, max CPU): the shortest budget any policy of the deployment can meet (one image, all the CPU).
    `model` is anything with `latency_ms(batch, cpu_m)` (sponge.perf's models)."""
    return float(model.latency_ms(1, max_cpu_m))


def is_saveable(budget_ms: float, floor_ms: float | None = None) -> bool:
    """The one definition (DESIGN §5): not already late, and at least one inference at full allocation."""
    return budget_ms > 0 and (floor_ms is None or budget_ms >= floor_ms)


def summarize(requests: Sequence[RequestRecord], timeline: Sequence[TimelineRecord] = (),
              saveable_floor_ms: float | None = None) -> Summary:
    """All figures of one run from its request and timeline records.

    `saveable_floor_ms` = l(1, max CPU) of the deployment's model (see `saveable_floor_ms()`): requests
    with a shorter budget are counted apart as unsaveable. Without it (None), only requests that arrived
    already late (budget <= 0) are unsaveable, so `attainment_saveable` is then an upper bound.
    """
    n = len(requests)
    counts = {o: 0 for o in OUTCOMES}
    for r in requests:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    served = [r for r in requests if r.outcome in SERVED and math.isfinite(r.server_ms)]
    srv = np.array([r.server_ms for r in served], dtype=np.float64)
    e2e = np.array([r.e2e_ms for r in served if math.isfinite(r.e2e_ms)], dtype=np.float64)
    over_budget = np.array([r.server_ms / max(r.budget_ms, MIN_BUDGET_MS) for r in served])
    over_slo = np.array([r.e2e_ms / r.slo_ms for r in served if math.isfinite(r.e2e_ms) and r.slo_ms > 0])
    budgets = np.array([r.budget_ms for r in requests], dtype=np.float64)
    saveable = [r for r in requests if is_saveable(r.budget_ms, saveable_floor_ms)]
    saved = sum(1 for r in saveable if r.outcome == "ok")

    fd = front_door_core_seconds(timeline)
    if timeline:
        cs, dur = core_seconds(timeline)
        mean_cpu = cs * 1000.0 / dur if dur > 0 else math.nan
        max_cpu = float(max(r.total_cpu_m for r in timeline))
    else:
        cs = mean_cpu = max_cpu = math.nan
        dur = (max(r.sent_ms for r in requests) / 1000.0) if requests else math.nan
    return Summary(
        requests=n,
        attainment=counts["ok"] / n if n else math.nan,
        counts=counts,
        p50_server_ms=_pct(srv, 50),
        p99_server_ms=_pct(srv, 99),
        p50_e2e_ms=_pct(e2e, 50),
        p99_e2e_ms=_pct(e2e, 99),
        p99_server_over_budget=_pct(over_budget, 99),
        p99_e2e_over_slo=_pct(over_slo, 99),
        p50_budget_ms=_pct(budgets, 50),
        core_seconds=cs,
        front_door_core_seconds=fd,
        core_seconds_with_front_door=cs + fd,
        mean_cpu_m=mean_cpu,
        max_cpu_m=max_cpu,
        duration_s=dur,
        mean_rps=n / dur if dur and dur > 0 else math.nan,
        unsaveable=n - len(saveable),
        attainment_saveable=saved / len(saveable) if saveable else math.nan,
        saveable_floor_ms=math.nan if saveable_floor_ms is None else float(saveable_floor_ms),
    )


# (label, attribute, format) rows of the side-by-side table
_ROWS: list[tuple[str, str, str]] = [
    ("requests", "requests", "{:.0f}"),
    ("SLO attainment", "attainment", "{:.2%}"),
    ("  of saveable requests", "attainment_saveable", "{:.2%}"),
    ("unsaveable", "unsaveable", "{:.0f}"),
    ("saveable floor (ms)", "saveable_floor_ms", "{:.1f}"),
    ("misses", "misses", "{:.0f}"),
    *[(f"  {o}", f"count:{o}", "{:.0f}") for o in OUTCOMES],
    ("server p50 (ms)", "p50_server_ms", "{:.1f}"),
    ("server p99 (ms)", "p99_server_ms", "{:.1f}"),
    ("e2e p50 (ms)", "p50_e2e_ms", "{:.1f}"),
    ("e2e p99 (ms)", "p99_e2e_ms", "{:.1f}"),
    ("p99 server/budget", "p99_server_over_budget", "{:.3f}"),
    ("p99 e2e/slo", "p99_e2e_over_slo", "{:.3f}"),
    ("budget p50 (ms)", "p50_budget_ms", "{:.1f}"),
    ("core-seconds", "core_seconds", "{:.1f}"),
    ("  front door", "front_door_core_seconds", "{:.2f}"),
    ("  with front door", "core_seconds_with_front_door", "{:.1f}"),
    ("mean CPU (m)", "mean_cpu_m", "{:.0f}"),
    ("max CPU (m)", "max_cpu_m", "{:.0f}"),
    ("duration (s)", "duration_s", "{:.1f}"),
    ("mean rate (req/s)", "mean_rps", "{:.2f}"),
]


def _cell(s: Summary, attr: str, fmt: str) -> str:
    v = s.counts.get(attr.split(":", 1)[1], 0) if attr.startswith("count:") else getattr(s, attr)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return fmt.format(v)


def format_table(summaries: dict[str, Summary]) -> str:
    """A plain-text table: one row per figure, one column per run."""
    names = list(summaries)
    label_w = max(len(r[0]) for r in _ROWS)
    cells = [[_cell(summaries[n], attr, fmt) for n in names] for _, attr, fmt in _ROWS]
    widths = [max([len(n)] + [len(row[i]) for row in cells]) for i, n in enumerate(names)]
    lines = [" " * label_w + "  " + "  ".join(n.rjust(w) for n, w in zip(names, widths))]
    lines.append("-" * len(lines[0]))
    for (label, _, _), row in zip(_ROWS, cells):
        lines.append(label.ljust(label_w) + "  " + "  ".join(c.rjust(w) for c, w in zip(row, widths)))
    return "\n".join(lines)


def format_markdown(summaries: dict[str, Summary]) -> str:
    """The same table as Markdown."""
    names = list(summaries)
    out = ["| figure | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for label, attr, fmt in _ROWS:
        out.append(f"| {label.strip()} | " + " | ".join(_cell(summaries[n], attr, fmt) for n in names) + " |")
    return "\n".join(out)
