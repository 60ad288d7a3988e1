"""Load predictors: the next interval's arrival rate from the per-interval history (pure, stateless).

A predictor sees only `rate_history_rps` (oldest first) and answers one number in requests per second.
They are stateless on purpose: the same history always gives the same forecast, so the live controller
and the simulator agree, and a policy can be replayed from its decision log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence


class Predictor(Protocol):
    """Forecast of the next interval's arrival rate (rps) from past per-interval rates, oldest first."""

    name: str

    def predict(self, history: Sequence[float]) -> float: ...


@dataclass(frozen=True)
class Reactive:
    """The last interval's rate: no lag beyond one interval, no smoothing (the paper's assumption)."""

    name: str = "reactive"

    def predict(self, history: Sequence[float]) -> float:
        return float(history[-1]) if len(history) else 0.0


@dataclass(frozen=True)
class MaxWindow:
    """The maximum of the last `n` intervals: keeps capacity for a recent peak (cheap burst insurance)."""

    n: int = 3
    name: str = "max"

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError("MaxWindow.n must be >= 1")

    def predict(self, history: Sequence[float]) -> float:
        return float(max(history[-self.n :])) if len(history) else 0.0


@dataclass(frozen=True)
class WindowMean:
    """The mean of the last `n` intervals: the best estimate of a steady Poisson rate from n counts (its
    variance is rate / (n * interval), n times less than one interval's), at a lag of (n - 1) / 2
    intervals on a ramp. SpongeOptimizer's default, with n = 10 (and its own test for a rising rate)."""

    n: int = 10
    name: str = "mean"

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError("WindowMean.n must be >= 1")

    def predict(self, history: Sequence[float]) -> float:
        recent = history[-self.n :]
        return float(sum(recent)) / len(recent) if len(recent) else 0.0


@dataclass(frozen=True)
class EWMA:
    """Exponentially weighted mean over the whole history, recomputed from it (so it stays stateless).

    alpha is the weight of the newest interval: 1.0 equals Reactive, small values smooth more (and lag).
    """

    alpha: float = 0.5
    name: str = "ewma"

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError("EWMA.alpha must be in (0, 1]")

    def predict(self, history: Sequence[float]) -> float:
        if not len(history):
            return 0.0
        s = float(history[0])
        for x in history[1:]:
            s = self.alpha * float(x) + (1.0 - self.alpha) * s
        return s


PREDICTORS: dict[str, Callable[..., Predictor]] = {
    "reactive": Reactive,
    "max": MaxWindow,
    "mean": WindowMean,
    "ewma": EWMA,
}


def make_predictor(spec: "str | Predictor", **params: float) -> Predictor:
    """A predictor by registry name (`reactive`, `max`, `mean`, `ewma`) with its parameters, or pass one through."""
    if not isinstance(spec, str):
        return spec
    try:
        factory = PREDICTORS[spec]
    except KeyError:
        raise ValueError(f"unknown predictor {spec!r}; known: {sorted(PREDICTORS)}") from None
    return factory(**params)


def history_of(rate_history_rps: Sequence[float], arrival_rate_rps: float) -> Sequence[float]:
    """The history to predict from; falls back to the last rate when the controller sent none."""
    if len(rate_history_rps):
        return rate_history_rps
    return (arrival_rate_rps,) if math.isfinite(arrival_rate_rps) else ()
