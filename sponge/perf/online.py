"""Learn l(b, c) online from every served batch (DESIGN §4: a poor or missing model never stops serving).

Why: an offline profile is measured once, on a host whose neighbours and clock change; a server that
serves at a safe allocation and keeps measuring needs no profile to start and follows drift. Pure: no
clocks, no I/O; times come in the samples (`BatchSample.t_ms`), so the simulator drives it the same way.

Cells are keyed by (images, cpu_m). Each keeps a bounded window of its most recent samples (`window`,
64 by default) and at most `max_cells` cells are kept (the least recently measured is dropped), so
memory is bounded however long the server runs. Samples older than `horizon_ms` before the newest
sample seen are dropped, except each cell's `min_samples` most recent ones: a cell served often
follows a neighbour or a frequency change within the horizon, a cell not served lately keeps its last
word (with few samples it ranks first in `wanted_cells`, so a prober refreshes it).

Per-cell statistic: the p95 of the window (linear interpolation). The policies need a latency that
batches rarely exceed, so not the median; the p99 of <= 64 samples is about the window's maximum, which
one disturbed batch sets; the p95 is the 3rd-4th largest of 64, stable yet a tail. What the p95 still
misses is measured (held-out under-prediction) and paid for by `safety()`. It reacts within a few
samples when latency rises (a few slow batches move a p95) and slowly when it falls (the window must
turn over): the cautious direction.

Readiness (`quality().ready`, defaults for a 2-core host): at least `min_cells` (6) cells with
>= `min_samples` (5) samples each, spanning >= `min_cpu_levels` (3) CPU allocations and
>= `min_batch_sizes` (2) batch sizes, and a leave-one-cell-out p95 relative error of the fitted
`StepLatencyModel` <= `max_heldout_p95` (50 %). Below that, serve at a safe allocation and keep learning.
Why 50 % and not tighter: the policy's margin is sized by the measured under-prediction (`safety()`,
down to 0.5, i.e. a batch may run twice its prediction), so the bound only has to rule out a model the
margin cannot cover. On this 2-core host, shared with other work, real grids measured 25-38 %
leave-one-cell-out (the same cell measured twice differed by 31 % p95): a 25 % bound kept a live
server in its safe allocation indefinitely. A quiet host is held to the same rule and gets a smaller
margin.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from sponge.perf.fit import ProfilePoint
from sponge.perf.latency_model import LatencyModel
from sponge.perf.samples import BatchSample
from sponge.perf.step_model import DEFAULT_PRIOR_CELLS, StepLatencyModel, fit_coefficients, loco_predictions

__all__ = ["LearnerQuality", "OnlineLatencyLearner", "safety_for"]

QUANTILE = 95.0
SAFETY_MIN, SAFETY_MAX = 0.5, 0.95


def safety_for(under_p95: float | None) -> float:
    """Deadline scale factor for a measured p95 under-prediction u (measured/predicted - 1): a plan at
    s*budget with s = 1/(1+u) still meets the budget when the batch runs (1+u) times the prediction.
    Clipped to [0.5, 0.95]; unknown error -> 0.5."""
    if under_p95 is None or not math.isfinite(under_p95):
        return SAFETY_MIN
    return float(min(SAFETY_MAX, max(SAFETY_MIN, 1.0 / (1.0 + max(0.0, under_p95)))))


@dataclass(frozen=True)
class LearnerQuality:
    """What the learner knows and how well its model predicts cells it did not fit.

    cells: cells with >= min_samples samples (the fitted ones); cells_seen: all cells held;
    samples: samples held (seed copies included). Held-out figures are leave-one-cell-out over the
    fitted cells: heldout_p95 is the p95 of |pred - meas| / meas; under_fraction the share of cells
    predicted below their measurement; under_p95 / under_max the p95 / max of max(0, meas/pred - 1)
    (how much longer than predicted a batch ran). None where there is too little to fit.
    """

    cells: int
    cells_seen: int
    cpu_levels: int
    batch_sizes: int
    samples: int
    heldout_p95: float | None
    heldout_r2: float | None
    under_fraction: float | None
    under_p95: float | None
    under_max: float | None
    ready: bool
    reason: str

    def safety(self) -> float:
        """See `safety_for`."""
        return safety_for(self.under_p95)


@dataclass
class _Cell:
    lat: deque[float]
    t: deque[float]
    seeds: int = 0  # the first `seeds` entries are copies of an offline profile's value
    stat: float | None = None  # cached p95 (None = recompute)

    @property
    def last_t(self) -> float:
        return self.t[-1] if self.t else -math.inf


_Held = tuple[float, float | None, float, float, float]  # p95, R², under fraction, under p95, under max


@dataclass
class _Fit:
    keys: tuple[tuple[int, int], ...]
    y: np.ndarray
    model: StepLatencyModel | None
    held: _Held | None = None
    judged: bool = False


@dataclass
class OnlineLatencyLearner:
    """Cells of served batches -> a StepLatencyModel, its held-out quality and a safety factor.

    Refits lazily: `model()` / `quality()` reuse the last fit unless the set of fitted cells changed or
    some cell's p95 moved by more than `refit_tolerance` (relative) since; a refit costs ~2 ms of CPU
    for 40 cells (leave-one-cell-out over at most `max_folds` cells).
    """

    window: int = 64
    max_cells: int = 256
    min_samples: int = 5
    horizon_ms: float = 600_000.0
    min_cells: int = 6
    min_cpu_levels: int = 3
    min_batch_sizes: int = 2
    max_heldout_p95: float = 0.5
    max_threads: int | None = None
    prior_cells: float = DEFAULT_PRIOR_CELLS
    refit_tolerance: float = 0.02
    max_folds: int = 40
    _cells: dict[tuple[int, int], _Cell] = field(default_factory=dict, init=False, repr=False)
    _newest: float = field(default=-math.inf, init=False, repr=False)
    _fit: _Fit | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.window < 1 or self.max_cells < 1 or not 1 <= self.min_samples <= self.window:
            raise ValueError("need window >= 1, max_cells >= 1 and 1 <= min_samples <= window")
        if not self.horizon_ms > 0 or not self.max_heldout_p95 > 0 or self.refit_tolerance < 0 or self.max_folds < 1:
            raise ValueError("need horizon_ms > 0, max_heldout_p95 > 0, refit_tolerance >= 0, max_folds >= 1")
        if self.max_threads is not None and self.max_threads < 1:
            raise ValueError("max_threads must be >= 1 (or None: from the cells)")

    # -- input ---------------------------------------------------------------------------------------
    def observe(self, sample: BatchSample) -> None:
        """Add one served batch (refuses nonsense with ValueError: a caller bug, not a measurement)."""
        if not (sample.images >= 1 and sample.cpu_m >= 1):
            raise ValueError(f"invalid batch sample {sample}: need images >= 1 and cpu_m >= 1")
        if not (math.isfinite(sample.latency_ms) and sample.latency_ms > 0 and math.isfinite(sample.t_ms)):
            raise ValueError(f"invalid batch sample {sample}: latency_ms must be finite > 0, t_ms finite")
        cell = self._cell((int(sample.images), int(sample.cpu_m)))
        if cell.seeds and len(cell.lat) == self.window:
            cell.seeds -= 1  # the append below pushes the oldest (a seed copy) out of the window
        cell.lat.append(float(sample.latency_ms))
        cell.t.append(float(sample.t_ms))
        if cell.seeds and len(cell.lat) - cell.seeds >= self.min_samples:
            self._drop_left(cell, cell.seeds)  # live data now speaks for this cell
        cell.stat = None
        self._newest = max(self._newest, float(sample.t_ms))

    def observe_many(self, samples: Iterable[BatchSample]) -> None:
        """`observe` each sample (e.g. an Observation's batches)."""
        for s in samples:
            self.observe(s)

    def seed(self, points: Iterable[ProfilePoint], n: int | None = None, t_ms: float | None = None) -> None:
        """Start from an offline profile: each point becomes `n` (default min_samples) copies of its
        latency at time `t_ms` (default: the newest sample seen, else 0). Live samples then correct
        it: once a cell has min_samples live samples its seed copies are dropped."""
        n = self.min_samples if n is None else int(n)
        if not 1 <= n <= self.window:
            raise ValueError(f"n must be in [1, window={self.window}], got {n}")
        t = (self._newest if math.isfinite(self._newest) else 0.0) if t_ms is None else float(t_ms)
        for p in points:
            if not (p.batch >= 1 and p.cpu_m >= 1 and math.isfinite(p.latency_ms) and p.latency_ms > 0):
                raise ValueError(f"invalid profile point {p}")
            key = (int(p.batch), int(round(p.cpu_m)))
            cell = self._cells.get(key)
            if cell is not None and len(cell.lat) > cell.seeds:
                continue  # live samples already speak for this cell
            cell = self._cell(key)
            cell.lat.clear()
            cell.t.clear()
            cell.lat.extend([float(p.latency_ms)] * n)
            cell.t.extend([t] * n)
            cell.seeds, cell.stat = n, None

    def _cell(self, key: tuple[int, int]) -> _Cell:
        cell = self._cells.get(key)
        if cell is None:
            if len(self._cells) >= self.max_cells:
                oldest = min(self._cells, key=lambda k: self._cells[k].last_t)
                del self._cells[oldest]
            cell = self._cells[key] = _Cell(deque(maxlen=self.window), deque(maxlen=self.window))
        return cell

    @staticmethod
    def _drop_left(cell: _Cell, k: int) -> None:
        for _ in range(k):
            cell.lat.popleft()
            cell.t.popleft()
            if cell.seeds:
                cell.seeds -= 1

    def _prune(self) -> None:
        """Drop samples older than the horizon (keeping each cell's min_samples newest)."""
        if not math.isfinite(self._newest):
            return
        cutoff = self._newest - self.horizon_ms
        for cell in self._cells.values():
            k = 0
            while len(cell.t) - k > self.min_samples and cell.t[k] < cutoff:
                k += 1
            if k:
                self._drop_left(cell, k)
                cell.stat = None

    # -- state ---------------------------------------------------------------------------------------
    def cell_stats(self) -> dict[tuple[int, int], tuple[int, float]]:
        """(images, cpu_m) -> (samples held, p95 ms) for every cell held."""
        self._prune()
        return {k: (len(c.lat), self._stat(c)) for k, c in sorted(self._cells.items())}

    @property
    def samples(self) -> int:
        """Samples held in all cells (seed copies included)."""
        return sum(len(c.lat) for c in self._cells.values())

    def _stat(self, cell: _Cell) -> float:
        if cell.stat is None:
            cell.stat = float(np.percentile(np.fromiter(cell.lat, dtype=float, count=len(cell.lat)), QUANTILE))
        return cell.stat

    def _current(self) -> _Fit:
        """The fit for the current cells, refitted only when they changed enough."""
        self._prune()
        keys = tuple(sorted(k for k, c in self._cells.items() if len(c.lat) >= self.min_samples))
        y = np.array([self._stat(self._cells[k]) for k in keys], dtype=float)
        f = self._fit
        if f is not None and f.keys == keys and (
            not keys or float(np.max(np.abs(y / f.y - 1.0))) <= self.refit_tolerance
        ):
            return f
        model = None
        if keys:
            b = np.array([k[0] for k in keys], dtype=float)
            c = np.array([k[1] for k in keys], dtype=float)
            if np.unique(b).size >= 2 and np.unique(c).size >= 2:
                mt = self.max_threads or int(np.ceil(c.max() / 1000.0))
                model = StepLatencyModel.from_coefficients(*fit_coefficients(b, c, y, mt, self.prior_cells),
                                                           max_threads=mt)
        self._fit = _Fit(keys, y, model)
        return self._fit

    # -- output --------------------------------------------------------------------------------------
    def model(self) -> StepLatencyModel | None:
        """The StepLatencyModel of the cells with >= min_samples samples; None until they span two batch
        sizes and two CPU allocations. Check `quality().ready` before trusting it."""
        return self._current().model

    def provisional_model(self) -> LatencyModel | None:
        """A conservative stand-in while the model is not ready: measurements at one CPU level c0 scaled
        as if latency grew like 1/c below it, l(b, c) = (a*b + k) * c0 / c, with a the least-squares
        per-image slope of the cells' p95 there and k lifted until the line bounds every measured cell. CPU-bound work slows at most ~1/c when its quota shrinks (fewer runtime threads
        slow it less: they stop contending), so a policy planning on it errs towards more CPU, and the
        batches it serves at the new allocation are new cells: the served load itself explores the CPU
        axis even when the server is never idle (no idle gap for the prober). c0 is the level with the
        most cells (the highest among equals). None before any cell has min_samples samples."""
        self._prune()
        levels: dict[int, list[tuple[int, float]]] = {}
        for (b, c), cell in self._cells.items():
            if len(cell.lat) >= self.min_samples:
                levels.setdefault(c, []).append((b, self._stat(cell)))
        if not levels:
            return None
        c0 = max(levels, key=lambda c: (len(levels[c]), c))
        b = np.array([x for x, _ in sorted(levels[c0])], dtype=float)
        y = np.array([v for _, v in sorted(levels[c0])], dtype=float)
        if b.size == 1:
            a = float(y[0] / b[0])  # through the origin: an upper bound for larger batches
        else:
            a = max(0.0, float(np.polyfit(b, y, 1)[0]))  # the measured per-image slope ...
        k = max(0.0, float(np.max(y - a * b)))  # ... lifted until no measured cell lies above the line
        cores0 = c0 / 1000.0
        return LatencyModel(g=a * cores0, d=0.0, e=k * cores0, h=0.0)

    def quality(self, max_heldout_p95: float | None = None) -> LearnerQuality:
        """Cells, coverage, held-out error and readiness (criterion: see the module docstring), judged
        against `max_heldout_p95` if given (a caller's hysteresis: a looser bound to stay ready)."""
        f = self._current()
        if not f.judged:  # the held-out error is the expensive part: once per fit
            f.held, f.judged = self._heldout(f), True
        return self._judge(f, self.max_heldout_p95 if max_heldout_p95 is None else max_heldout_p95)

    def safety(self) -> float:
        """Deadline scale factor in [0.5, 0.95] that grows the margin with the measured error:
        1 / (1 + p95 held-out under-prediction); 0.5 while that is unknown."""
        return self.quality().safety()

    def _heldout(self, f: _Fit) -> _Held | None:
        """Leave-one-cell-out errors of the fit's cells (at most max_folds cells held out, evenly spread)."""
        keys = f.keys
        n = len(keys)
        held = None
        if f.model is not None and n >= 3:
            b = np.array([k[0] for k in keys], dtype=float)
            c = np.array([k[1] for k in keys], dtype=float)
            folds = np.arange(n) if n <= self.max_folds else np.unique(np.linspace(0, n - 1, self.max_folds).round())
            pred = loco_predictions(b, c, f.y, f.model.max_threads, self.prior_cells, folds.astype(np.int64))
            ok = np.isfinite(pred)
            if ok.any():
                meas, pred = f.y[folds.astype(np.int64)][ok], pred[ok]
                rel = np.abs(pred - meas) / meas
                under = np.maximum(0.0, meas / pred - 1.0)
                ss_tot = float(np.sum((meas - meas.mean()) ** 2))
                r2 = 1.0 - float(np.sum((meas - pred) ** 2)) / ss_tot if ss_tot > 0 else None
                held = (float(np.percentile(rel, 95)), r2, float(np.mean(meas > pred)),
                        float(np.percentile(under, 95)), float(under.max()))
        return held

    def _judge(self, f: _Fit, bound: float) -> LearnerQuality:
        keys, held = f.keys, f.held
        n = len(keys)
        levels = len({k[1] for k in keys})
        sizes = len({k[0] for k in keys})
        problems = []
        if n < self.min_cells:
            problems.append(f"{n}/{self.min_cells} cells with >= {self.min_samples} samples")
        if levels < self.min_cpu_levels:
            problems.append(f"{levels}/{self.min_cpu_levels} CPU levels")
        if sizes < self.min_batch_sizes:
            problems.append(f"{sizes}/{self.min_batch_sizes} batch sizes")
        if held is None:
            problems.append("no held-out error yet")
        elif not held[0] <= bound:
            problems.append(f"held-out p95 error {held[0]:.0%} > {bound:.0%}")
        if problems:
            reason = "not ready: " + "; ".join(problems)
        else:
            assert held is not None
            reason = (f"ready: {n} cells over {levels} CPU levels and {sizes} batch sizes, held-out p95 error "
                      f"{held[0]:.0%} <= {bound:.0%}")
        return LearnerQuality(
            cells=n,
            cells_seen=len(self._cells),
            cpu_levels=levels,
            batch_sizes=sizes,
            samples=self.samples,
            heldout_p95=None if held is None else held[0],
            heldout_r2=None if held is None else held[1],
            under_fraction=None if held is None else held[2],
            under_p95=None if held is None else held[3],
            under_max=None if held is None else held[4],
            ready=not problems,
            reason=reason,
        )

    def wanted_cells(
        self, cpu_levels: Sequence[int], batch_sizes: Sequence[int], limit: int = 4
    ) -> list[tuple[int, int]]:
        """(batch, cpu_m) cells a background prober should measure next, at most `limit`: cells with the
        fewest samples first (unmeasured before thin, thin before full); among equals, full cells
        measured longest ago first, then the cheapest (least predicted latency; b*1000/c without a
        model). Cells already holding min_samples fresh samples are still listed, last."""
        if limit <= 0:
            return []
        self._prune()
        model = self._current().model
        out = []
        for b in sorted({int(x) for x in batch_sizes}):
            for c in sorted({int(x) for x in cpu_levels}):
                if b < 1 or c < 1:
                    raise ValueError(f"batch sizes and CPU levels must be >= 1, got b={b}, c={c}")
                cell = self._cells.get((b, c))
                n = 0 if cell is None else len(cell.lat) - cell.seeds
                full = n >= self.min_samples
                age = cell.last_t if (full and cell is not None) else 0.0
                cost = float(model.latency_ms(b, c)) if model is not None else b * 1000.0 / c
                out.append(((min(n, self.min_samples), age, cost), (b, c)))
        out.sort()
        return [key for _, key in out[:limit]]
