"""Stage 2 of the Sponge decision: the deadline demand — the work the next interval must serve, as
EDF-ordered deadlines (ms from now). Pure, stateless.

The jobs are the backlog (each queued request's remaining time) and the forecast arrivals: a stream at
the envelope's rate whose budgets follow the measured budget distribution (recent requests' budgets),
placed as early as they come with probability eps' only, and as many as the upper quantile of the count
(sponge.policy.feasibility.BudgetProfile.arrival_deadlines; clumped by the envelope's dispersion).
eps' = arrival_eps / (1 + T / median budget): the envelope is a window starting now, but a burst may start
anywhere in the interval, about 1 + T / budget independent windows (a scan-statistic correction: short
budgets need a rarer quantile). Every deadline is scaled by `safety`, the latency model's margin
(sponge.policy.margins). A deadline below `floor_ms` (one request alone at full CPU) is beyond saving: it
stays as work, not as a constraint (feasibility.py, point 4).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from sponge.policy.envelope import LoadForecast
from sponge.policy.feasibility import BudgetProfile, Workload, build_workload, poisson_envelope


class DeadlineDemand:
    """Stage 2: `workload(budgets, backlog, forecast, interval, safety) -> Workload`."""

    def __init__(self, floor_ms: float, *, arrival_eps: float | None = 0.005, burst_z: float = 1.0) -> None:
        """arrival_eps: the chance per interval of a burst beyond the plan (None: the Gaussian allowance
        of `burst_z` standard deviations, the earlier rule, kept for comparison)."""
        if arrival_eps is not None and not 0.0 < arrival_eps < 1.0:
            raise ValueError("arrival_eps must be in (0, 1), or None for the Gaussian allowance")
        if burst_z < 0 or floor_ms < 0:
            raise ValueError("burst_z and floor_ms must be >= 0")
        self.floor_ms, self.arrival_eps, self.burst_z = floor_ms, arrival_eps, burst_z
        if arrival_eps is not None:
            poisson_envelope(1.0, arrival_eps)  # loads scipy.special now, not in the first decision

    def eps(self, interval_ms: float, profile: BudgetProfile) -> float | None:
        """eps' (module docstring) on a log grid (1/40 decade) so that the envelope table stays cached."""
        if self.arrival_eps is None:
            return None
        med = float(profile.sorted_ms[profile.size // 2]) if profile.size else interval_ms
        e = self.arrival_eps / (1.0 + max(interval_ms, 0.0) / max(med, 1.0))
        return float(10.0 ** (round(math.log10(e) * 40.0) / 40.0))

    def workload(self, budgets_ms: Sequence[float] | BudgetProfile, queue_remaining_ms: Sequence[float],
                 forecast: LoadForecast | float, interval_ms: float, safety: float,
                 serves_late: bool = False) -> Workload:
        """The jobs of the next interval. `forecast` may be a bare rate (rps, dispersion 1).

        Budgets below the floor are requests beyond saving when they arrive (a link that stalled for
        seconds leaves budgets of minus minutes). They must not enter the count n(L) = rate * mean(L - x):
        a budget of -200 s would count arrivals long after the horizon. Answered at once (expiry reject),
        they are no work: the rate is scaled by the saveable fraction and the profile is the saveable
        budgets'. Served anyway (serves_late), they are work due at once: their budget counts as 0."""
        rate, disp = ((forecast.rate_rps, forecast.dispersion) if isinstance(forecast, LoadForecast)
                      else (float(forecast), 1.0))
        if not isinstance(budgets_ms, BudgetProfile) and len(budgets_ms):
            b = np.asarray(budgets_ms, dtype=float)
            if serves_late:
                budgets_ms = np.maximum(b, 0.0)
            else:
                keep = b >= self.floor_ms
                if not keep.all():
                    rate *= float(keep.mean())
                    budgets_ms = b[keep]
        profile = BudgetProfile.of(budgets_ms, safety)
        return build_workload(profile, queue_remaining_ms, rate, interval_ms=interval_ms, safety=safety,
                              burst_z=self.burst_z, floor_ms=self.floor_ms, eps=self.eps(interval_ms, profile),
                              dispersion=disp)
