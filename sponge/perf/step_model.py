"""Sponge's own latency model: the four-term model per runtime thread count (DESIGN §4); pure.

Why: a replica runs ONNX Runtime with threads = ceil(cpu_m / 1000) (`scaling/self_limit.threads_for`)
under a CFS quota of cpu_m. When the allocation crosses a whole core the thread count steps, and with
it the work per batch (two threads synchronise and share caches), so one smooth
l(b, c) = g*b/c + d*b + e/c + h over all allocations is biased on both sides of every step.

The model: cells are grouped by thread count t = ceil(c / 1000) (clamped to [1, max_threads]) and each
group gets its own four-term fit, l_t(b, c) = g_t*b/c + d_t*b + e_t/c + h_t. A group with few or no
cells is pinned by a weak prior: the global four-term fit, evaluated at a small anchor grid inside the
group's CPU range, is added as pseudo-cells worth `prior_cells` measured cells in total. A group with
no cells therefore IS the global fit; a group measured at one CPU level only takes its c-dependence
from the global fit and its level from its own cells; a well-measured group is its own fit.

Chosen by held-out error on real grids (EfficientNet-Lite0, this 2-core host, 10 ms CFS period, three
8x5 grids measured while other processes used ~0.5-1.2 cores): on serve's 6-level grid the four-term
fit's leave-one-cell-out p95 relative error was 39 % (cell p99) / 33 % (cell p95), this model's 31 % /
28 %; on the profiler's held-back cells 37 % / 32 % against 27 % / 22 %. Also measured: per-group fits
without a prior (no answer for a thread count measured at one CPU level), a shared shape with one scale
per thread count (cannot express a changed slope), and a log-residual interpolation over the measured
grid (best on cell medians, no better on tails, not monotone by construction). The same cell measured
twice differed by ~30-50 % (p95 over cells) on that busy host, so those figures are mostly noise; on a
synthetic step surface the model is within 0.4 % where the four-term fit misses by ~20 % (p95)
(tests/test_online_model.py).

Guarantees the optimizers rely on (all coefficients are >= 0, fitted by non-negative least squares):
finite, positive latencies for batch >= 1 and cpu_m >= 1; non-increasing in cpu_m within a thread
count (flat above max_threads cores: more quota than threads cannot be used); non-decreasing in batch.
Across a thread step the latency may rise (two threads on 1.1 cores can be slower than one on 1.0):
that is the measured truth, and the optimizers search the whole grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.optimize import nnls

from sponge.perf.fit import ProfilePoint
from sponge.perf.latency_model import COEFFICIENTS, LatencyModel

__all__ = [
    "DEFAULT_PRIOR_CELLS", "KIND", "StepLatencyModel", "ThreadGroup", "fit_coefficients", "loco_predictions",
    "threads_of",
]

KIND = "step"
DEFAULT_PRIOR_CELLS = 0.25  # the global fit counts as a quarter of a measured cell in each thread group
_ANCHOR_FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # pseudo-cells at these fractions of a group's last core
_MIN_LATENCY_MS = 1e-6  # floor so that a (never fitted) all-zero group still answers positive


def threads_of(cpu_m: Any, max_threads: int) -> np.ndarray:
    """Runtime thread count of an allocation: clamp(ceil(cpu_m / 1000), 1, max_threads) (as threads_for)."""
    return np.clip(np.ceil(np.asarray(cpu_m, dtype=float) / 1000.0), 1, max_threads).astype(np.int64)


def _features(b: np.ndarray, c_m: np.ndarray) -> np.ndarray:
    c = c_m / 1000.0
    return np.column_stack([b / c, b, 1.0 / c, np.ones_like(b)])


def _nnls_relative(b: np.ndarray, c_m: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """(g, d, e, h) >= 0 minimising sum w * ((pred - y) / y)^2 (relative error, as fit.py's default)."""
    a = _features(b, c_m) / y[:, None]
    t = np.ones_like(y)
    if w is not None:
        s = np.sqrt(w)
        a, t = a * s[:, None], t * s
    x, _ = nnls(a, t)
    return x


def _predict(coef: np.ndarray, b: np.ndarray, c_m: np.ndarray) -> np.ndarray:
    return _features(b, c_m) @ coef


def _group_fit(base: np.ndarray, b: np.ndarray, c_m: np.ndarray, y: np.ndarray, k: int, anchor_b: np.ndarray,
               prior_cells: float) -> np.ndarray:
    """Thread group k's coefficients: its cells plus the global fit as pseudo-cells worth prior_cells."""
    anchor_c = 1000.0 * (k - 1) + 1000.0 * np.array(_ANCHOR_FRACTIONS)
    ab, ac = (v.ravel() for v in np.meshgrid(anchor_b, anchor_c))
    ay = np.maximum(_predict(base, ab, ac), _MIN_LATENCY_MS)
    w = np.concatenate([np.ones(b.size), np.full(ab.size, prior_cells / ab.size)])
    return _nnls_relative(np.concatenate([b, ab]), np.concatenate([c_m, ac]), np.concatenate([y, ay]), w)


def fit_coefficients(
    b: np.ndarray,
    c_m: np.ndarray,
    y: np.ndarray,
    max_threads: int,
    prior_cells: float = DEFAULT_PRIOR_CELLS,
) -> tuple[np.ndarray, dict[int, tuple[np.ndarray, int]]]:
    """The fit on plain arrays: (global coefficients, {threads: (group coefficients, cells)}).

    Exposed for the online learner, which refits often and skips the ProfilePoint round trip.
    Callers validate; groups without cells are left out (they use the global coefficients).
    """
    base = _nnls_relative(b, c_m, y)
    t = threads_of(c_m, max_threads)
    anchor_b = np.unique(np.concatenate([b, [1.0]]))
    groups: dict[int, tuple[np.ndarray, int]] = {}
    for k in np.unique(t):
        m = t == k
        groups[int(k)] = (_group_fit(base, b[m], c_m[m], y[m], int(k), anchor_b, prior_cells), int(m.sum()))
    return base, groups


def loco_predictions(
    b: np.ndarray,
    c_m: np.ndarray,
    y: np.ndarray,
    max_threads: int,
    prior_cells: float = DEFAULT_PRIOR_CELLS,
    folds: np.ndarray | None = None,
) -> np.ndarray:
    """Leave-one-cell-out: for each cell i in `folds` (default all), the prediction at cell i of the
    model fitted to all other cells (exactly `StepLatencyModel.fit` on them); NaN where the others
    lack two batch sizes or two CPU allocations.

    Only the global fit and cell i's own group are refitted per fold (the other groups cannot change
    the prediction at i), and the design rows are built once, which keeps this at ~30 us a fold: cheap
    enough to rerun whenever the online learner's cells change.
    """
    n = y.size
    idx = np.arange(n) if folds is None else np.asarray(folds, dtype=np.int64)
    out = np.full(idx.size, np.nan)
    t = threads_of(c_m, max_threads)
    rows = _features(b, c_m) / y[:, None]  # relative residual rows, target 1
    ub, nb = np.unique(b, return_counts=True)
    uc, nc = np.unique(c_m, return_counts=True)
    count_b = dict(zip(ub.tolist(), nb.tolist()))
    count_c = dict(zip(uc.tolist(), nc.tolist()))
    full_anchor_b = np.unique(np.concatenate([b, [1.0]]))
    frac = 1000.0 * np.array(_ANCHOR_FRACTIONS)
    anchors: dict[tuple[int, int], np.ndarray] = {}  # (group, anchor set id) -> anchor design rows
    keep = np.ones(n, dtype=bool)
    for j, i in enumerate(idx):
        bi, ci = float(b[i]), float(c_m[i])
        lone_b, lone_c = count_b[bi] == 1, count_c[ci] == 1
        if len(count_b) - lone_b < 2 or len(count_c) - lone_c < 2:
            continue
        keep[i] = False
        base, _ = nnls(rows[keep], np.ones(n - 1))
        k = int(t[i])
        drop_anchor = lone_b and bi != 1.0
        key = (k, int(i) if drop_anchor else -1)
        fa = anchors.get(key)
        if fa is None:
            ab = full_anchor_b[full_anchor_b != bi] if drop_anchor else full_anchor_b
            gb, gc = (v.ravel() for v in np.meshgrid(ab, 1000.0 * (k - 1) + frac))
            fa = _features(gb, gc)
            if not drop_anchor:
                anchors[key] = fa
        ay = np.maximum(fa @ base, _MIN_LATENCY_MS)
        sw = math.sqrt(prior_cells / ay.size)
        m = keep & (t == k)
        a = np.vstack([rows[m], fa * (sw / ay)[:, None]])
        coef, _ = nnls(a, np.concatenate([np.ones(int(m.sum())), np.full(ay.size, sw)]))
        out[j] = max(float(_features(b[i : i + 1], c_m[i : i + 1])[0] @ coef), _MIN_LATENCY_MS)
        keep[i] = True
    return out


@dataclass(frozen=True)
class ThreadGroup:
    """The four-term coefficients for allocations that run `threads` runtime threads; `cells` = measured
    cells behind them (0 would mean the prior alone)."""

    threads: int
    g: float
    d: float
    e: float
    h: float
    cells: int = 0

    def coefficients(self) -> tuple[float, float, float, float]:
        return (self.g, self.d, self.e, self.h)


def _check_coefficients(what: str, values: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k in COEFFICIENTS:
        if k not in values:
            raise ValueError(f"{what} is missing coefficient {k!r}; got keys {sorted(values)}")
        v = values[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{what} coefficient {k}={v!r} is not a finite number >= 0")
        out[k] = float(v)
    if not any(out.values()):
        raise ValueError(f"{what} has all coefficients zero (it would predict zero latency)")
    return out


def _check_int(what: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{what}={v!r} is not an integer >= {lo}")
    return v


@dataclass(frozen=True)
class StepLatencyModel(LatencyModel):
    """l(b, c) with its own four-term coefficients per runtime thread count (see the module docstring).

    The inherited g, d, e, h are the global four-term fit: used for thread counts without a group and
    by code that needs one smooth model (a log line, the closed-form fast path stays off because the
    type differs). `max_threads`: the most threads the replica runs; allocations above
    1000*max_threads are predicted as at 1000*max_threads.
    """

    groups: tuple[ThreadGroup, ...] = ()
    max_threads: int = 1
    _table: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        table = np.tile(np.array([self.g, self.d, self.e, self.h], dtype=float), (self.max_threads + 1, 1))
        for grp in self.groups:
            if 1 <= grp.threads <= self.max_threads:
                table[grp.threads] = grp.coefficients()
        object.__setattr__(self, "_table", table)

    # -- prediction --------------------------------------------------------------------------------------
    def latency_ms(self, batch: Any, cpu_m: Any) -> Any:  # type: ignore[override]
        """Milliseconds for `batch` images on `cpu_m` millicores; numpy arrays broadcast (a float for scalars)."""
        b = np.asarray(batch, dtype=float)
        c = np.clip(np.asarray(cpu_m, dtype=float), 1.0, 1000.0 * self.max_threads)
        k = self._table[threads_of(c, self.max_threads)]
        u = 1000.0 / c
        out = np.maximum(k[..., 0] * b * u + k[..., 1] * b + k[..., 2] * u + k[..., 3], _MIN_LATENCY_MS)
        return float(out) if out.ndim == 0 else out

    def throughput_rps(self, batch: Any, cpu_m: Any) -> Any:  # type: ignore[override]
        """1000 * b / l(b, c): requests per second when batches run back to back (broadcasts)."""
        out = 1000.0 * np.asarray(batch, dtype=float) / np.asarray(self.latency_ms(batch, cpu_m))
        return float(out) if np.ndim(out) == 0 else out

    def group(self, threads: int) -> ThreadGroup | None:
        """The fitted group for `threads`, or None (then the global coefficients apply)."""
        return next((grp for grp in self.groups if grp.threads == threads), None)

    # -- fitting -----------------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        points: Sequence[ProfilePoint],
        max_threads: int | None = None,
        prior_cells: float = DEFAULT_PRIOR_CELLS,
    ) -> StepLatencyModel:
        """Fit to measured cells (relative least squares, coefficients >= 0).

        Needs >= 2 distinct batch sizes and >= 2 distinct CPU allocations (the global fit separates the
        four terms). `max_threads` defaults to the most threads among the points (the model then does
        not promise that more quota than was measured helps).
        """
        if len(points) == 0:
            raise ValueError("no profile points given")
        for p in points:
            if not (p.batch >= 1 and math.isfinite(p.cpu_m) and p.cpu_m >= 1):
                raise ValueError(f"invalid profile point {p}: need batch >= 1 and cpu_m >= 1")
            if not (math.isfinite(p.latency_ms) and p.latency_ms > 0):
                raise ValueError(f"invalid profile point {p}: latency_ms must be a finite number > 0")
        if not (math.isfinite(prior_cells) and prior_cells > 0):
            raise ValueError(f"prior_cells must be > 0, got {prior_cells}")
        b = np.array([p.batch for p in points], dtype=float)
        c = np.array([p.cpu_m for p in points], dtype=float)
        y = np.array([p.latency_ms for p in points], dtype=float)
        if np.unique(b).size < 2 or np.unique(c).size < 2:
            raise ValueError(
                "need at least two distinct batch sizes and two distinct CPU allocations; got batches "
                f"{sorted(set(b.astype(int).tolist()))}, cpu_m {sorted(set(c.tolist()))}"
            )
        mt = int(np.ceil(c.max() / 1000.0)) if max_threads is None else _check_int("max_threads", max_threads, 1)
        return cls.from_coefficients(*fit_coefficients(b, c, y, mt, prior_cells), max_threads=mt)

    @classmethod
    def from_coefficients(
        cls, base: Sequence[float], groups: Mapping[int, tuple[Sequence[float], int]], max_threads: int
    ) -> StepLatencyModel:
        """Build from `fit_coefficients`' output."""
        g, d, e, h = (float(v) for v in base)
        grps = tuple(
            ThreadGroup(int(k), *(float(v) for v in coef), cells=int(n)) for k, (coef, n) in sorted(groups.items())
        )
        return cls(g, d, e, h, groups=grps, max_threads=int(max_threads))

    # -- storage -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """JSON-able: global coefficients, max_threads and one entry per thread group."""
        return {
            "kind": KIND,
            **{k: float(getattr(self, k)) for k in COEFFICIENTS},
            "max_threads": self.max_threads,
            "groups": [
                {"threads": grp.threads, "cells": grp.cells, **{k: float(getattr(grp, k)) for k in COEFFICIENTS}}
                for grp in self.groups
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepLatencyModel:  # type: ignore[override]
        """Inverse of `to_dict`; a ValueError naming the problem for anything corrupt."""
        if not isinstance(data, Mapping):
            raise ValueError(f"step latency model must be a JSON object, got {type(data).__name__}")
        if data.get("kind") != KIND:
            raise ValueError(f"not a step latency model (kind={data.get('kind')!r}, want {KIND!r})")
        base = _check_coefficients("step latency model", data)
        mt = _check_int("step latency model max_threads", data.get("max_threads"), 1)
        raw = data.get("groups")
        if not isinstance(raw, list):
            raise ValueError(f"step latency model groups must be a list, got {type(raw).__name__}")
        groups, seen = [], set()
        for i, grp in enumerate(raw):
            if not isinstance(grp, Mapping):
                raise ValueError(f"step latency model group {i} is not an object")
            t = _check_int(f"group {i} threads", grp.get("threads"), 1)
            if t > mt or t in seen:
                raise ValueError(f"group {i} threads={t} is duplicated or above max_threads={mt}")
            seen.add(t)
            coef = _check_coefficients(f"step latency model group threads={t}", grp)
            groups.append(ThreadGroup(t, cells=_check_int(f"group {i} cells", grp.get("cells", 0), 0), **coef))
        return cls(groups=tuple(sorted(groups, key=lambda x: x.threads)), max_threads=mt, **base)
