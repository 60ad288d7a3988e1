"""Arrival times from a per-second rate trace.

The trace gives a rate per second; within a second the arrivals are either a Poisson process (random,
the usual open-loop model) or evenly spaced (what a paced load tester does). A trace read from a file
of arrival times carries them, and they are used as they are. Deterministic under a
seed so the live load generator and the simulator can replay the same arrivals.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from sponge.workload.traces import RateTrace

ArrivalMode = Literal["poisson", "uniform"]


def _rates(trace: RateTrace | np.ndarray) -> np.ndarray:
    r = trace.rps if isinstance(trace, RateTrace) else np.asarray(trace, dtype=np.float64)
    if r.ndim != 1 or (r.size and (not np.all(np.isfinite(r)) or r.min() < 0)):
        raise ValueError("rates must be a 1-D array of finite values >= 0")
    return r


def uniform_counts(rates: np.ndarray) -> np.ndarray:
    """Integer count per second whose running total tracks the running total of the rates.

    Fractional rates carry over (0.5 req/s gives one request every other second) instead of rounding
    each second independently, so the total stays within one request of sum(rates).
    """
    cum = np.floor(np.cumsum(rates) + 1e-9).astype(np.int64)
    return np.diff(np.concatenate(([0], cum)))


def arrival_times_ms(
    trace: RateTrace | np.ndarray,
    mode: ArrivalMode = "poisson",
    seed: int | np.random.Generator | None = 0,
    start_ms: float = 0.0,
) -> np.ndarray:
    """Sorted arrival times in ms (from `start_ms`) for a per-second rate trace.

    poisson: second i gets N_i ~ Poisson(rate_i) arrivals at independent uniform times in it, which is
             exactly a Poisson process with piecewise-constant intensity.
    uniform: second i gets its carried-over integer count, evenly spaced from the second's start.
    A trace read from arrival times (`RateTrace.times_ms`) gives exactly those times, whatever the mode.
    """
    if isinstance(trace, RateTrace) and trace.times_ms is not None:
        return np.array(trace.times_ms, dtype=np.float64) + float(start_ms)
    rates = _rates(trace)
    secs = np.arange(rates.size, dtype=np.float64)
    if mode == "poisson":
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        counts = rng.poisson(rates)
        base = np.repeat(secs, counts) * 1000.0
        times = base + rng.random(int(counts.sum())) * 1000.0
        times.sort()
    elif mode == "uniform":
        counts = uniform_counts(rates)
        base = np.repeat(secs, counts) * 1000.0
        # position j of n within its second: j/n of the way through
        first = np.repeat(np.cumsum(counts) - counts, counts)
        j = np.arange(int(counts.sum())) - first
        times = base + j * 1000.0 / np.repeat(np.maximum(counts, 1), counts)
    else:
        raise ValueError(f"mode must be 'poisson' or 'uniform', got {mode!r}")
    return times + float(start_ms)


def rate_of(times_ms: np.ndarray, duration_s: int | None = None) -> np.ndarray:
    """Observed arrivals per second (the inverse of arrival_times_ms, for checks and plots)."""
    t = np.asarray(times_ms, dtype=np.float64)
    n = duration_s if duration_s is not None else (int(t.max() // 1000) + 1 if t.size else 0)
    return np.bincount((t // 1000).astype(np.int64), minlength=n)[:n].astype(np.float64)
