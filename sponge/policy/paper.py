"""PaperOptimizer: the published Sponge rule, kept as a named baseline (DESIGN §4).

Rule (as published): with the predicted load `L` (requests in the next second), served as back-to-back
batches of b, the k-th batch (k = 0 .. ceil(L/b) - 1) finishes at k*l(b,c) + l(b,c); every one must finish
within 0.9 * budget_min, the tightest budget seen, and throughput h(b,c) >= L. The binding batch is the
last one, so the test is  ceil(L/b) * l(b,c) <= 0.9 * budget_min  and  h(b,c) >= L.
Search: the least whole cores c = 1..max_cores, then the least batch b = 1..max_batch.
If nothing fits, the paper keeps the configuration in force; so does this baseline, with feasible=False.
It ignores the backlog, the budget distribution beyond its minimum, and fractional CPU, and has no
hysteresis: those are what SpongeOptimizer adds.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sponge.perf.latency_model import LatencyModel
from sponge.policy.predictors import Predictor, history_of, make_predictor
from sponge.policy.sponge_opt import budget_summary
from sponge.policy.types import Decision, Observation


class PaperOptimizer:
    """The paper's rule: least whole cores, then least batch, all load at budget_min * 0.9."""

    name = "paper"

    def __init__(
        self,
        model: LatencyModel,
        *,
        max_cores: int = 4,
        max_batch: int = 16,
        slack_factor: float = 0.9,
        predictor: str | Predictor = "reactive",
        predictor_params: dict[str, Any] | None = None,
    ) -> None:
        if max_cores < 1 or max_batch < 1 or not 0 < slack_factor <= 1:
            raise ValueError("invalid PaperOptimizer parameters")
        self.model = model
        self.max_cores, self.max_batch, self.slack_factor = max_cores, max_batch, slack_factor
        self.predictor = make_predictor(predictor, **(predictor_params or {}))
        self.batches = np.arange(1, max_batch + 1)
        self.cores = np.arange(1, max_cores + 1)
        # l(b, c) for every candidate, rows = batch, columns = cores (computed once).
        self._lat = np.asarray(model.latency_ms(self.batches[:, None], 1000.0 * self.cores[None, :]))

    def choose(self, load_rps: float, budget_min_ms: float) -> tuple[int, int] | None:
        """(cores, batch) of the paper's rule, or None when nothing fits."""
        n_batches = np.ceil(max(load_rps, 0.0) / self.batches)  # batches needed per batch size
        finish_last = n_batches[:, None] * self._lat  # k = n_batches - 1: (k+1) * l(b, c)
        ok = finish_last <= self.slack_factor * budget_min_ms
        ok &= 1000.0 * self.batches[:, None] / self._lat >= load_rps  # h(b, c) >= load
        cols = np.flatnonzero(ok.any(axis=0))
        if not cols.size:
            return None
        ci = int(cols[0])  # least cores
        bi = int(np.flatnonzero(ok[:, ci])[0])  # then least batch
        return ci + 1, bi + 1

    def decide(self, obs: Observation) -> Decision:
        load = max(self.predictor.predict(history_of(obs.rate_history_rps, obs.arrival_rate_rps)), 0.0)
        budget_min = min(obs.budgets_ms) if len(obs.budgets_ms) else math.inf
        head = f"paper: load {obs.arrival_rate_rps:.1f} rps, predicted {load:.1f}, {budget_summary(obs.budgets_ms)}"
        if not math.isfinite(budget_min) and load > 0:
            cur = obs.current
            keep = f"{head} -> no budgets observed: keep {cur.cpu_m}m b={cur.batch}"
            return Decision(cur.cpu_m, cur.batch, 1, True, keep)
        pick = self.choose(load, budget_min)
        if pick is None:
            cur = obs.current
            return Decision(
                cur.cpu_m,
                cur.batch,
                cur.replicas,
                False,
                f"{head} -> INFEASIBLE up to {self.max_cores} cores: keep {cur.cpu_m}m b={cur.batch} (as published)",
            )
        cores, batch = pick
        lat = self.model.latency_ms(batch, 1000 * cores)
        n_b = math.ceil(load / batch)
        slack = self.slack_factor * budget_min - n_b * lat if math.isfinite(budget_min) else math.inf
        return Decision(
            1000 * cores,
            batch,
            1,
            True,
            f"{head} -> {cores} cores b={batch}: {n_b} batches x {lat:.1f} ms vs "
            f"{self.slack_factor:g}*{budget_min:.0f} ms, slack {slack:.1f} ms, "
            f"h={self.model.throughput_rps(batch, 1000 * cores):.1f} rps",
        )
