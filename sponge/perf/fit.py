"""Fit l(b, c) = g*b/c + d*b + e/c + h to profiled cells, judge the fit, and refuse bad ones.

The model is linear in (g, d, e, h) with features (b/c, b, 1/c, 1), so the fit is a linear
least-squares problem. Coefficients are bounded at >= 0: a negative term would make predicted
latency fall (or go negative) outside the profiled range, which a policy would happily exploit.
Pure: no I/O (DESIGN §2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
from scipy.optimize import lsq_linear

from sponge.perf.latency_model import LatencyModel

Weighting = Literal["relative", "absolute"]

METHOD = "bounded linear least squares (scipy.optimize.lsq_linear, method='bvls', g,d,e,h >= 0)"
DEFAULT_MIN_R2 = 0.95
DEFAULT_MAX_P95_REL_ERR = 0.15


@dataclass(frozen=True)
class ProfilePoint:
    """One measured cell: a batch of `batch` requests on `cpu_m` millicores took `latency_ms`
    (typically the cell's p99)."""

    batch: int
    cpu_m: float
    latency_ms: float


@dataclass(frozen=True)
class FitQuality:
    """How well a model predicts a set of cells.

    rel_errors are signed, (predicted - measured) / measured, in the order of the points, so an
    under-prediction (the dangerous direction for deadlines) shows as negative. max/p95 are of
    their absolute values (p95 linearly interpolated).
    """

    n: int
    r2: float
    rel_errors: tuple[float, ...]
    max_rel_err: float
    p95_rel_err: float

    def to_dict(self) -> dict[str, object]:
        return {
            "n": self.n,
            "r2": self.r2,
            "max_rel_err": self.max_rel_err,
            "p95_rel_err": self.p95_rel_err,
            "rel_errors": list(self.rel_errors),
        }


@dataclass(frozen=True)
class FitResult:
    """A fitted model and its quality on the cells it was fitted to."""

    model: LatencyModel
    quality: FitQuality
    weighting: Weighting

    @property
    def n(self) -> int:
        return self.quality.n

    @property
    def r2(self) -> float:
        return self.quality.r2

    @property
    def rel_errors(self) -> tuple[float, ...]:
        return self.quality.rel_errors

    @property
    def max_rel_err(self) -> float:
        return self.quality.max_rel_err

    @property
    def p95_rel_err(self) -> float:
        return self.quality.p95_rel_err


class PoorFitError(ValueError):
    """The model does not describe the measurements well enough to base decisions on."""


def _validate(points: Sequence[ProfilePoint]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(points) == 0:
        raise ValueError("no profile points given")
    for p in points:
        if not (p.batch >= 1 and p.cpu_m > 0 and math.isfinite(p.cpu_m)):
            raise ValueError(f"invalid profile point {p}: need batch >= 1 and cpu_m > 0")
        if not (math.isfinite(p.latency_ms) and p.latency_ms > 0):
            raise ValueError(f"invalid profile point {p}: latency_ms must be a finite number > 0")
    b = np.array([p.batch for p in points], dtype=float)
    c = np.array([p.cpu_m for p in points], dtype=float) / 1000.0
    y = np.array([p.latency_ms for p in points], dtype=float)
    return b, c, y


def _features(b: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.column_stack([b / c, b, 1.0 / c, np.ones_like(b)])


def _quality(y: np.ndarray, pred: np.ndarray) -> FitQuality:
    rel = (pred - y) / y
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot > 0:
        r2 = 1.0 - ss_res / ss_tot
    else:  # all measurements equal: R² is undefined; call it perfect only if the fit is exact
        r2 = 1.0 if ss_res <= 1e-18 * max(1.0, float(np.sum(y**2))) else 0.0
    abs_rel = np.abs(rel)
    return FitQuality(
        n=int(y.size),
        r2=float(r2),
        rel_errors=tuple(float(v) for v in rel),
        max_rel_err=float(abs_rel.max()),
        p95_rel_err=float(np.percentile(abs_rel, 95)),
    )


def fit_latency_model(points: Sequence[ProfilePoint], weighting: Weighting = "relative") -> FitResult:
    """Fit (g, d, e, h) >= 0 to the points by bounded linear least squares.

    weighting="relative" minimises the squared *relative* residuals (each row divided by its
    measurement). Latency noise is roughly multiplicative and the acceptance check is on relative
    error, so this fits what is checked and keeps the fast cells (large c, small b) from being
    ignored. weighting="absolute" minimises squared milliseconds, as the Sponge paper does.
    """
    b, c, y = _validate(points)
    if len(np.unique(b)) < 2 or len(np.unique(c)) < 2:
        raise ValueError(
            "need at least two distinct batch sizes and two distinct CPU allocations to separate "
            f"the four terms; got batches {sorted(set(b.astype(int).tolist()))}, "
            f"cpu_m {sorted(set((c * 1000).tolist()))}"
        )
    a = _features(b, c)
    if weighting == "relative":
        a_w, y_w = a / y[:, None], np.ones_like(y)
    elif weighting == "absolute":
        a_w, y_w = a, y
    else:
        raise ValueError(f"unknown weighting {weighting!r}; use 'relative' or 'absolute'")
    sol = lsq_linear(a_w, y_w, bounds=(0.0, np.inf), method="bvls")
    if not sol.success:
        raise PoorFitError(f"least-squares solver did not converge: {sol.message}")
    coef = np.maximum(sol.x, 0.0)  # bvls honours bounds; clip tiny float excursions anyway
    model = LatencyModel(*(float(v) for v in coef))
    return FitResult(model=model, quality=_quality(y, a @ coef), weighting=weighting)


def evaluate(model: LatencyModel, points: Sequence[ProfilePoint]) -> FitQuality:
    """Quality of `model` on cells it may not have seen (held-back validation)."""
    b, c, y = _validate(points)
    pred = np.array([model.latency_ms(int(bi), ci * 1000.0) for bi, ci in zip(b, c)])
    return _quality(y, pred)


def check_fit(
    result: FitResult | FitQuality,
    min_r2: float = DEFAULT_MIN_R2,
    max_p95_rel_err: float = DEFAULT_MAX_P95_REL_ERR,
    what: str = "latency model",
) -> None:
    """Raise PoorFitError, naming the numbers, unless R² >= min_r2 and p95 |rel err| <= the limit."""
    q = result.quality if isinstance(result, FitResult) else result
    problems = []
    if not (q.r2 >= min_r2):  # also catches NaN
        problems.append(f"R²={q.r2:.4f} < {min_r2}")
    if not (q.p95_rel_err <= max_p95_rel_err):
        problems.append(f"p95 relative error={q.p95_rel_err:.1%} > {max_p95_rel_err:.1%}")
    if problems:
        raise PoorFitError(
            f"{what} fits badly on {q.n} cells: {'; '.join(problems)} "
            f"(max relative error {q.max_rel_err:.1%}); re-profile or widen the grid"
        )


def holdout_split(
    points: Sequence[ProfilePoint], every: int = 4
) -> tuple[list[ProfilePoint], list[ProfilePoint]]:
    """Split cells into (train, held_back), deterministically, for held-back validation.

    A cell is held back when (rank of its batch + rank of its cpu_m) % every == every - 1: a
    diagonal pattern, so on a grid the held-back cells spread over every batch size and CPU
    allocation instead of emptying one column (plain "every k-th in order" does that when k
    divides the number of CPU values). Order within each part follows the input.
    """
    if every < 2:
        raise ValueError(f"every must be >= 2 (got {every}); every=k holds back about 1/k of the cells")
    b_rank = {v: i for i, v in enumerate(sorted({p.batch for p in points}))}
    c_rank = {v: i for i, v in enumerate(sorted({p.cpu_m for p in points}))}
    train: list[ProfilePoint] = []
    held: list[ProfilePoint] = []
    for p in points:
        (held if (b_rank[p.batch] + c_rank[p.cpu_m]) % every == every - 1 else train).append(p)
    return train, held
