"""Stage 1 of the Sponge decision: the load envelope — what arrival rate to provision for, and how
bursty the arrivals around it are, measured rather than assumed. Pure: state in, state out.

Rate. The predictor's rate (default: the mean of the last 10 intervals; a rate estimated from one
interval's count is noisy, at 4 req/s the count is 4 +- 2), unless the rate has risen: if the mean
count of the last m = 1, 2 or 3 intervals exceeds the prediction by more than `jump_z` Poisson standard
errors (sqrt(count / m)), the largest such recent mean is used (a burst lasting seconds is followed
within 1-3 intervals, not 10).

Dispersion (the predictor's measured error). Each decision compares the count the previous forecast
expected with the count that arrived: r = max(0, x - p)^2 / max(p, 1), the one-sided squared error in
units of the Poisson variance. The dispersion is phi = 2 * mean(r) over the last `error_window`
intervals, clipped to [1, `max_dispersion`]: 1 when the forecast errs no more than Poisson noise does
(what the arrival envelope already covers), larger when the workload moves faster than the predictor
follows. The deadline demand (stage 2) treats arrivals as clumps of phi requests, a Poisson stream of
rate/phi clumps: the same mean, phi times the variance. Until `min_samples` intervals have been
compared, phi = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sponge.policy.predictors import Predictor, history_of, make_predictor
from sponge.policy.types import Observation

JUMP_SEGMENTS = 3  # the last 1, 2 and 3 intervals are tested for a rise of the rate


@dataclass(frozen=True)
class LoadForecast:
    """The rate to provision for over the next interval and the arrivals' measured dispersion."""

    rate_rps: float
    predicted_rps: float  # the predictor's own rate (rate_rps differs after a jump)
    dispersion: float = 1.0  # variance / mean of the count around the forecast (1 = Poisson)
    jumped: bool = False

    def describe(self) -> str:
        jump = f" (rose: {self.rate_rps:.1f})" if self.jumped else ""
        disp = f", dispersion {self.dispersion:.2f}" if self.dispersion > 1.0 else ""
        return f"predicted {self.predicted_rps:.1f} rps{jump}{disp}"


@dataclass(frozen=True)
class EnvelopeState:
    """What the envelope remembers between decisions: the count it forecast for the interval now closing,
    and the recent one-sided squared errors (bounded by `error_window`)."""

    forecast_count: float | None = None
    errors: tuple[float, ...] = ()


class LoadEnvelope:
    """Stage 1: `forecast(obs, state) -> (LoadForecast, state')`. See the module docstring."""

    def __init__(self, predictor: str | Predictor = "mean", predictor_params: dict[str, Any] | None = None, *,
                 jump_z: float | None = 2.5, measure_dispersion: bool = True, error_window: int = 60,
                 min_samples: int = 10, max_dispersion: float = 8.0) -> None:
        if jump_z is not None and jump_z < 0:
            raise ValueError("jump_z must be >= 0 (or 0/None: never trust one interval over the predictor)")
        if error_window < 1 or min_samples < 1 or max_dispersion < 1:
            raise ValueError("error_window, min_samples >= 1 and max_dispersion >= 1")
        self.predictor = make_predictor(predictor, **(predictor_params or {}))
        self.jump_z = jump_z or None
        self.measure_dispersion = measure_dispersion
        self.error_window, self.min_samples, self.max_dispersion = error_window, min_samples, max_dispersion

    def predicted_rate(self, obs: Observation) -> tuple[float, float, bool]:
        """(rate to provision for, the predictor's rate, whether a recent rise overrode it)."""
        hist = history_of(obs.rate_history_rps, obs.arrival_rate_rps)
        pred = max(self.predictor.predict(hist), 0.0)
        rate, jumped = pred, False
        if self.jump_z is not None and len(hist) and obs.interval_ms > 0:
            scale = obs.interval_ms / 1000.0  # rate -> count
            mean = pred * scale
            for m in range(1, min(JUMP_SEGMENTS, len(hist)) + 1):
                recent = sum(float(x) for x in hist[-m:]) / m
                if recent * scale > mean + self.jump_z * math.sqrt(max(mean, 1.0) / m) and recent > rate:
                    rate, jumped = recent, True
        return rate, pred, jumped

    def dispersion(self, errors: tuple[float, ...]) -> float:
        if not self.measure_dispersion or len(errors) < self.min_samples:
            return 1.0
        return min(max(1.0, 2.0 * sum(errors) / len(errors)), self.max_dispersion)

    def forecast(self, obs: Observation, state: EnvelopeState) -> tuple[LoadForecast, EnvelopeState]:
        errors = state.errors
        if state.forecast_count is not None and math.isfinite(obs.arrival_rate_rps):
            seen = obs.arrival_rate_rps * obs.interval_ms / 1000.0
            p = state.forecast_count
            errors = (errors + (max(0.0, seen - p) ** 2 / max(p, 1.0),))[-self.error_window:]
        rate, pred, jumped = self.predicted_rate(obs)
        fc = LoadForecast(rate, pred, self.dispersion(errors), jumped)
        return fc, EnvelopeState(rate * obs.interval_ms / 1000.0, errors)
