"""PaperOptimizer: the published Sponge rule (`dynainf`), kept as a named baseline (DESIGN §4).

Source: github.com/saeid93/sponge, release commit aa00b56ca91ec95dd69675c6b5a6e861f4143f67 (the code
library holds no copy of these files keyed to that commit, only earlier versions; the one read is the
only stored `optimizer/optimizer.py` whose `dynainf` is the vertical rule the paper describes):
  * `optimizer/optimizer.py` at commit d3774c003e2ef580600183297234e17678ce994b, class `Optimizer`:
    method `dynainf` (lines 238-273), the latency model `batch_cost_latency_calculation` (lines 74-75),
    its coefficients fitted by `curve_fit` on the profiled states in `__init__` (lines 48-61);
  * the loop that calls it: `optimizer/adapter.py`, `Adapter.start_adaptation` (stored version of commit
    052a6f80dc0ac6e96f2786bc6ee696abf8fc9495: the per-second budgets at lines 219-221, the call at
    228-236, the no-solution branch at 270-273; that version still passes the whole `sla_series`, the
    one passing `latest_sla` is not in the library) and `experiments/utils/prometheus.py`
    `PromClient.get_input_sla` (commit d3774c0: the gauge `model_infer_request_sla[<d>m:1s]`).
What they do, in words:

  * latency model  l(b, c) = int(gamma*b/c + delta*b + epsilon/c + eta)  ms, c in whole cores; the
    published code truncates to an integer millisecond, and so does this rule;
  * inputs per decision: `arrival_rate` (an integer load, requests per second) and `latest_sla`, the
    server-side budget of the latest request (a Prometheus gauge sampled once a second, `[...:1s]`);
    `SLO` is the deployment's configured objective (`pipeline.sla`) and `cl_max = SLO - latest_sla` the
    communication time the latest request lost;
  * search: cores c = 1 .. cpu_cap (outer loop), then batch b = 1 .. batching_cap (inner loop); the first
    configuration that passes is returned, so it is the least cores, then the least batch;
  * test: the load is served as back-to-back batches of b, batch k = 0 .. ceil(load/b) - 1 finishing at
    (k+1)*l(b, c); the configuration fails as soon as  (k+1)*l + cl_max > 0.9 * SLO,  i.e. it passes iff
        ceil(load / b) * l(b, c) <= 0.9 * SLO - (SLO - budget) = budget - 0.1 * SLO
    (equality passes). The 0.9 multiplies the SLO, not the budget: the margin is a constant 0.1 * SLO
    (100 ms at SLO 1000 ms) taken off the latest budget. A load of 0 passes at once (1 core, batch 1);
  * no throughput test h(b, c) >= load (it is implied when budget <= SLO: the whole second's load then
    drains within 0.9 s);
  * nothing fits: `dynainf` returns None and the adapter logs "optimizer couldn't find any optimal
    solution the pipeline will stay the same": the configuration in force is kept.

Where this module departs from the published code, and why:
  * λ = round(predicted rate), the predictor `reactive` by default: the count of the last interval (one
    second by default). The stored adapter passes a load set in the experiment's config (constant, "TODO
    since the load is constant for now we input it through the configs"); earlier adapters used
    round(predictor(rate series)). The last second's count is what a live deployment can measure.
  * `slo_ms` is a constructor parameter (1000 ms, the paper's setting), as `pipeline.sla` is a config value.
  * `budget="min_last_second"` takes the tightest budget of the requests that arrived in the last second
    instead of the latest one (not published; offered to compare).
  * with no budget observed and load > 0 (the published code would fail on a missing Prometheus value)
    the configuration in force is kept.

What the previous version of this module did instead: the tightest budget of the ~10 s budget window
rather than the latest request's; the test n * l <= 0.9 * budget_min (margin proportional to the
budget rather than 0.1 * SLO); an extra throughput test h(b, c) >= load; a fractional λ; l(b, c) not
truncated. The search order and the keep-on-infeasible rule were already the published ones.
It ignores the backlog, the budget distribution and fractional CPU, and has no hysteresis: those are
what SpongeOptimizer adds.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

from sponge.perf.latency_model import LatencyModel
from sponge.policy.predictors import Predictor, history_of, make_predictor
from sponge.policy.types import Decision, Observation

BudgetChoice = Literal["latest", "min_last_second"]
LAST_SECOND_MS = 1000.0  # "the last second" of budgets for budget="min_last_second"


class PaperOptimizer:
    """The published rule: least whole cores, then least batch, the load at the latest budget - 0.1 SLO."""

    name = "paper"

    def __init__(
        self,
        model: LatencyModel,
        *,
        max_cores: int = 4,
        max_batch: int = 16,
        slack_factor: float = 0.9,
        slo_ms: float = 1000.0,
        budget: BudgetChoice = "latest",
        predictor: str | Predictor = "reactive",
        predictor_params: dict[str, Any] | None = None,
    ) -> None:
        if max_cores < 1 or max_batch < 1 or not 0 < slack_factor <= 1 or not slo_ms > 0:
            raise ValueError("invalid PaperOptimizer parameters")
        if budget not in ("latest", "min_last_second"):
            raise ValueError(f"budget must be 'latest' or 'min_last_second', got {budget!r}")
        self.model = model
        self.max_cores, self.max_batch, self.slack_factor = max_cores, max_batch, slack_factor
        self.slo_ms, self.budget = float(slo_ms), budget
        self.predictor = make_predictor(predictor, **(predictor_params or {}))
        self.batches = np.arange(1, max_batch + 1)
        self.cores = np.arange(1, max_cores + 1)
        # l(b, c) truncated to whole ms as published; rows = batch, columns = cores (computed once).
        lat = model.latency_ms(self.batches[:, None], 1000.0 * self.cores[None, :])
        self._lat = np.trunc(np.asarray(lat, dtype=np.float64))

    def choose(self, load: int, budget_ms: float) -> tuple[int, int] | None:
        """(cores, batch) of the published rule for an integer load and one budget, or None."""
        n_batches = -(-max(int(load), 0) // self.batches)  # ceil(load / b): len(range(0, load, b))
        if not n_batches.any():
            return 1, 1  # no batch to test: the first candidate passes, as in the published loop
        cl = self.slo_ms - budget_ms  # communication time the request lost
        ok = n_batches[:, None] * self._lat + cl <= self.slack_factor * self.slo_ms
        cols = np.flatnonzero(ok.any(axis=0))
        if not cols.size:
            return None
        ci = int(cols[0])  # least cores
        bi = int(np.flatnonzero(ok[:, ci])[0])  # then least batch
        return ci + 1, bi + 1

    def budget_of(self, obs: Observation) -> float:
        """The budget the rule plans for: the latest request's, or the least of the last second's."""
        budgets = obs.budgets_ms
        if not len(budgets):
            return math.nan
        latest = float(budgets[-1])  # ObservationBuilder keeps them in arrival order, newest last
        if self.budget == "latest":
            return latest
        ages = obs.budget_ages_ms
        if len(ages) != len(budgets):  # no arrival times: the whole window is all there is
            return float(min(budgets))
        recent = [b for b, a in zip(budgets, ages) if a < LAST_SECOND_MS]
        return float(min(recent)) if recent else latest  # nobody in the last second: the gauge holds

    def decide(self, obs: Observation) -> Decision:
        rate = max(self.predictor.predict(history_of(obs.rate_history_rps, obs.arrival_rate_rps)), 0.0)
        load = int(round(rate))
        budget = self.budget_of(obs)
        cur = obs.current
        head = (f"paper: load {obs.arrival_rate_rps:.1f} rps, lambda {load}, "
                f"{self.budget} budget {budget:.0f} ms, SLO {self.slo_ms:.0f} ms")
        if math.isnan(budget) and load > 0:
            return Decision(cur.cpu_m, cur.batch, cur.replicas, True,
                            f"{head} -> no budgets observed: keep {cur.cpu_m}m b={cur.batch}")
        pick = self.choose(load, budget if not math.isnan(budget) else self.slo_ms)
        limit = self.slack_factor * self.slo_ms - (self.slo_ms - budget)
        if pick is None:
            return Decision(
                cur.cpu_m,
                cur.batch,
                cur.replicas,
                False,
                f"{head} -> INFEASIBLE up to {self.max_cores} cores (limit {limit:.0f} ms): keep "
                f"{cur.cpu_m}m b={cur.batch} (as published)",
            )
        cores, batch = pick
        lat = float(self._lat[batch - 1, cores - 1])
        n_b = -(-load // batch)
        return Decision(
            1000 * cores,
            batch,
            1,
            True,
            f"{head} -> {cores} cores b={batch}: {n_b} batches x {lat:.0f} ms vs "
            f"{self.slack_factor:g}*{self.slo_ms:.0f} - ({self.slo_ms:.0f} - {budget:.0f}) = {limit:.0f} ms",
        )
