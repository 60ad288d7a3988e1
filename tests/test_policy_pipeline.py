"""The Sponge pipeline, one stage at a time, on cases small enough to compute by hand.

SpongeOptimizer (sponge/policy/sponge_opt.py) is a chain of small pure stages:

    LoadEnvelope.forecast -> DeadlineDemand.workload -> LeastAllocation.plan -> stabilise
    (+ ModelErrorMargin for the safety factor, and BatchCpuSizer.size between two decisions)

Each section below feeds one stage by hand and checks its answer against arithmetic written in the
comments; the last sections check that `step` is pure and what the simulator does with per-batch CPU.

Models used (c in cores, l in ms):
  TOY = l(b, c) = (50 b + 50) / c     l(1, 1) = 100, l(b, 2) = 25 b + 25, h(b, 2) = 40 b / (b + 1) rps
  G   = l(b, c) = 100 b / c           l(1, c) = 100 / c: l(1, 100 m) = 1000 ms, l(1, 2000 m) = 50 ms
  SIM = l(b, c) = 100 b / c + 20      (the simulator's tests: l(1, 100 m) = 1020, l(1, 2000 m) = 70)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest

from sponge.perf.latency_model import LatencyModel
from sponge.perf.samples import BatchSample
from sponge.policy import SpongeOptimizer
from sponge.policy.allocation import LeastAllocation, cpu_grid
from sponge.policy.batch_cpu import BatchCpuSizer
from sponge.policy.demand import DeadlineDemand
from sponge.policy.envelope import EnvelopeState, LoadEnvelope, LoadForecast
from sponge.policy.feasibility import BudgetProfile, Workload, poisson_envelope
from sponge.policy.hysteresis import stabilise
from sponge.policy.margins import MarginState, ModelErrorMargin
from sponge.policy.sponge_opt import SpongeState
from sponge.policy.types import BatchCpu, Decision, Observation, QueueView, RunningBatch
from sponge.sim import RequestSet, SimConfig, simulate
from sponge.sim.engine import OK

TOY = LatencyModel(g=50.0, d=0.0, e=50.0, h=0.0)
G = LatencyModel(g=100.0, d=0.0, e=0.0, h=0.0)
SIM = LatencyModel(g=100.0, d=0.0, e=0.0, h=20.0)


def obs(
    history: tuple[float, ...],
    *,
    budgets: tuple[float, ...] = (300.0,) * 50,
    queue: tuple[float, ...] = (),
    current: Decision = Decision(1000, 1),
    batches: tuple[BatchSample, ...] = (),
    serves_late: bool = False,
) -> Observation:
    """An observation at the end of a 1 s interval whose rate history is `history` (newest last)."""
    return Observation(
        now_ms=1000.0 * len(history),
        interval_ms=1000.0,
        arrival_rate_rps=history[-1],
        rate_history_rps=history,
        budgets_ms=budgets,
        queue_remaining_ms=queue,
        current=current,
        batches=batches,
        serves_late=serves_late,
    )


def workload(deadlines: list[float], load_rps: float = 0.0) -> Workload:
    """A backlog of queued requests (deadlines already scaled), in EDF order, and a rate to sustain."""
    d = np.asarray(deadlines, dtype=float)
    return Workload(d, 0, load_rps, d.size, 0, np.ones(d.size, dtype=bool))


# ------------------------------------------------------------------------------------------ 1 envelope
def test_envelope_rate_is_the_mean_of_the_last_ten_intervals() -> None:
    env = LoadEnvelope()  # predictor "mean" (10 intervals), jump_z 2.5
    # the last 10 of (9, 1, 2, 4, 6, 8, 2, 5, 3, 4, 5): 40 / 10 = 4 rps; no interval stands out
    fc, state = env.forecast(obs((9.0, 1.0, 2.0, 4.0, 6.0, 8.0, 2.0, 5.0, 3.0, 4.0, 5.0)), EnvelopeState())
    assert (fc.rate_rps, fc.predicted_rps, fc.jumped, fc.dispersion) == (pytest.approx(4.0), pytest.approx(4.0),
                                                                          False, 1.0)
    # the state remembers the count forecast for the next interval (4 rps x 1 s); no error yet: nothing
    # had been forecast for the interval that just closed
    assert state == EnvelopeState(forecast_count=pytest.approx(4.0), errors=())


def test_envelope_follows_a_rise_beyond_jump_z_poisson_errors() -> None:
    env = LoadEnvelope()
    # nine 4s then 9: mean 4.5; 9 <= 4.5 + 2.5 sqrt(4.5) = 9.80: Poisson noise, the mean stands
    fc, _ = env.forecast(obs((4.0,) * 9 + (9.0,)), EnvelopeState())
    assert fc.rate_rps == pytest.approx(4.5) and not fc.jumped
    # nine 4s then 10: mean 4.6; 10 > 4.6 + 2.5 sqrt(4.6) = 9.96: the rate rose, provision for 10
    fc, state = env.forecast(obs((4.0,) * 9 + (10.0,)), EnvelopeState())
    assert (fc.rate_rps, fc.jumped) == (10.0, True) and fc.predicted_rps == pytest.approx(4.6)
    assert state.forecast_count == 10.0  # the next error is measured against what was provisioned for
    # jump_z=None never trusts one interval over the predictor
    fc, _ = LoadEnvelope(jump_z=None).forecast(obs((4.0,) * 9 + (40.0,)), EnvelopeState())
    assert fc.rate_rps == pytest.approx(7.6) and not fc.jumped


def test_envelope_dispersion_from_one_sided_squared_errors() -> None:
    # Reactive predictor (forecast = last count), no jump rule, min_samples 3, window 3. Per interval the
    # error is r = max(0, seen - forecast)^2 / max(forecast, 1); dispersion = 2 * mean(r), at least 1.
    env = LoadEnvelope("reactive", jump_z=None, min_samples=3, error_window=3)
    state, history = EnvelopeState(), ()
    seen = []
    for rate in (4.0, 8.0, 6.0, 9.0, 12.0):
        history += (rate,)
        fc, new = env.forecast(obs(history), state)
        seen.append((fc.dispersion, new.errors))
        state = new
    assert seen[0] == (1.0, ())  # nothing was forecast before the first interval
    assert seen[1] == (1.0, (4.0,))  # forecast 4, saw 8: (8 - 4)^2 / 4 = 4; 1 sample < 3: dispersion 1
    assert seen[2] == (1.0, (4.0, 0.0))  # forecast 8, saw 6: fewer than forecast costs nothing (one-sided)
    # forecast 6, saw 9: (9 - 6)^2 / 6 = 1.5; three samples: 2 * (4 + 0 + 1.5) / 3 = 11/3
    assert seen[3][1] == (4.0, 0.0, 1.5) and seen[3][0] == pytest.approx(11.0 / 3.0)
    # forecast 9, saw 12: 9 / 9 = 1; the window keeps the last 3: 2 * (0 + 1.5 + 1) / 3 = 5/3
    assert seen[4][1] == (0.0, 1.5, 1.0) and seen[4][0] == pytest.approx(5.0 / 3.0)
    # a forecast below 1 is compared in units of 1 (a Poisson variance never below one count)
    _, s = env.forecast(obs((2.0,)), EnvelopeState(forecast_count=0.5))
    assert s.errors == (2.25,)  # (2 - 0.5)^2 / 1
    # measure_dispersion=False: always 1 (Poisson)
    off = LoadEnvelope("reactive", jump_z=None, min_samples=1, measure_dispersion=False)
    assert off.forecast(obs((9.0,)), EnvelopeState(forecast_count=1.0, errors=(50.0,)))[0].dispersion == 1.0


def test_envelope_forecast_is_pure() -> None:
    env = LoadEnvelope(min_samples=1)
    before = EnvelopeState(forecast_count=2.0, errors=(1.0,))
    o = obs((2.0, 2.0, 6.0))
    a = env.forecast(o, before)
    b = env.forecast(o, before)
    assert a == b  # same input, same answer
    assert before == EnvelopeState(forecast_count=2.0, errors=(1.0,))  # the input state is unchanged
    assert a[1].errors == (1.0, 8.0)  # forecast 2, saw 6: 16 / 2 = 8, appended to a new state
    # 2 * (1 + 8) / 2 = 9, clipped at max_dispersion (8 by default)
    assert a[0].dispersion == 8.0
    assert LoadEnvelope(min_samples=1, max_dispersion=20.0).forecast(o, before)[0].dispersion == pytest.approx(9.0)


# ------------------------------------------------------------------------------------------- 2 demand
def test_demand_scales_deadlines_by_safety_and_merges_the_backlog_in_edf_order() -> None:
    # Expected arrivals (arrival_eps None, burst_z 0): at zero load one arrival at the tightest budget.
    exact = DeadlineDemand(0.0, arrival_eps=None, burst_z=0.0)
    w = exact.workload((300.0,) * 50, (200.0, 100.0), 0.0, 1000.0, 0.5)
    assert list(w.deadlines_ms) == [50.0, 100.0, 150.0]  # 100, 200 (queued) and 300 (arriving) x 0.5
    assert list(w.is_backlog) == [True, True, False] and (w.n_backlog, w.n_arrivals) == (2, 1)
    # 10 rps with 300 ms budgets (270 at safety 0.9): arrival i has deadline 270 + 100 i (11 jobs up to the
    # horizon 1000 + 270). Three queued requests (400, 100, 250 ms left -> 360, 90, 225) slot in by deadline.
    w = exact.workload((300.0,) * 50, (400.0, 100.0, 250.0), 10.0, 1000.0, 0.9)
    assert np.allclose(w.deadlines_ms[:6], [90.0, 225.0, 270.0, 360.0, 370.0, 470.0])
    assert list(w.is_backlog[:6]) == [True, True, False, True, False, False]
    assert (w.n_jobs, w.n_backlog, w.n_arrivals, w.load_rps) == (14, 3, 11, 10.0)


def test_demand_writes_off_deadlines_below_the_floor() -> None:
    # floor 60 ms (one request alone at max CPU): a queued request with 50 ms left cannot be saved; it is
    # work at the head of the EDF order, not a constraint
    w = DeadlineDemand(60.0, arrival_eps=None, burst_z=0.0).workload((300.0,), (50.0, 80.0), 0.0, 1000.0, 1.0)
    assert list(w.deadlines_ms) == [50.0, 80.0, 300.0] and w.n_written_off == 1


def test_demand_budgets_beyond_saving() -> None:
    # Half the recent budgets are -1 s (a stalled link), below the 50 ms floor. 10 rps, safety 1.
    exact = DeadlineDemand(50.0, arrival_eps=None, burst_z=0.0)
    budgets = (300.0,) * 5 + (-1000.0,) * 5
    # reject: the batcher answers them at once, no work: the other half, 5 rps with 300 ms budgets, arrive
    # at 300 + 200 i up to the horizon 1000 + 300 ms
    w = exact.workload(budgets, (), 10.0, 1000.0, 1.0)
    assert list(w.deadlines_ms) == [300.0, 500.0, 700.0, 900.0, 1100.0, 1300.0] and w.load_rps == 5.0
    # serve_late: they are work due at once (budget 0). n(L) = 0.01 (5 L + 5 (L - 300)+) / 10: the first job
    # at 0 (written off: below the floor), the second at n(L) = 1 -> L = 200, then past 300 ms one job per
    # 100 ms from n(300) = 1.5: 350, 450, ..., 1250 (n = 11.5 at the horizon 1300: 12 jobs)
    w = exact.workload(budgets, (), 10.0, 1000.0, 1.0, serves_late=True)
    assert np.allclose(w.deadlines_ms, [0.0, 200.0] + [350.0 + 100.0 * k for k in range(10)])
    assert (w.load_rps, w.n_written_off) == (10.0, 1)


def test_demand_eps_scan_correction() -> None:
    # eps' = arrival_eps / (1 + T / median budget): 250 ms budgets in a 1 s interval are 5 windows, so each
    # is planned at 0.005 / 5 = 0.001 (on the 1/40-decade grid: 10^-3 exactly); 1000 ms budgets at
    # 0.005 / 2 = 0.0025 -> 10^(-104/40) = 0.00251.
    dd = DeadlineDemand(0.0, arrival_eps=0.005)
    assert dd.eps(1000.0, BudgetProfile.of((250.0,) * 10)) == pytest.approx(0.001)
    assert dd.eps(1000.0, BudgetProfile.of((1000.0,) * 10)) == pytest.approx(10 ** (-104 / 40))
    assert DeadlineDemand(0.0, arrival_eps=None).eps(1000.0, BudgetProfile.of((250.0,))) is None
    # 10 rps, 250 ms budgets: n(L) = 0.01 (L - 250) arrivals by deadline L, horizon 1250 ms = a mean count of
    # 10; job i sits at 250 + 100 x_i, x_i the count by which it has come with probability 0.001 only
    w = dd.workload((250.0,) * 10, (), 10.0, 1000.0, 1.0)
    x = poisson_envelope(10.0, 0.001)
    assert np.allclose(w.deadlines_ms, 250.0 + 100.0 * x)
    assert w.n_jobs == x.size == 21  # the upper 0.001-quantile of Poisson(10), not 10


def test_demand_dispersion_clumps_arrivals() -> None:
    # Dispersion phi = 2: a Poisson stream of clumps of 2 at half the rate (mean 5 clumps by the horizon).
    # Clump k comes at y_k = poisson_envelope(5, eps')[k] clump counts = 2 y_k requests, and both its jobs
    # are there: job i at 2 * y[floor(i / 2)].
    dd = DeadlineDemand(0.0, arrival_eps=0.005)  # eps' = 0.001 for these budgets (test above)
    poisson = dd.workload((250.0,) * 10, (), LoadForecast(10.0, 10.0, 1.0), 1000.0, 1.0)
    clumped = dd.workload((250.0,) * 10, (), LoadForecast(10.0, 10.0, 2.0), 1000.0, 1.0)
    y = poisson_envelope(5.0, 0.001)
    i = np.arange(2 * y.size)
    assert np.allclose(clumped.deadlines_ms, 250.0 + 100.0 * 2.0 * y[i // 2])
    # same mean, twice the variance: more jobs (26 against 21), and from the second job on each at least as
    # early (the first clump, at 2 y_0 = 0.002 counts, is 0.1 ms after the lone first job at 0.001, but its
    # second job comes with it)
    assert clumped.n_jobs == 26 > poisson.n_jobs == 21
    assert np.all(clumped.deadlines_ms[1:poisson.n_jobs] <= poisson.deadlines_ms[1:])
    # a bare rate is dispersion 1
    assert np.array_equal(dd.workload((250.0,) * 10, (), 10.0, 1000.0, 1.0).deadlines_ms, poisson.deadlines_ms)


# --------------------------------------------------------------------------------------- 3 allocation
def test_allocation_least_cpu_then_largest_batch() -> None:
    # Three queued requests with 300 ms left; one batch may be running (blocking 1): batch k ends at
    # (k + 2) l(b, c) and must beat its first job's deadline.
    #   b=1: the third request is batch 2: 4 l <= 300 -> l <= 75  -> 100/75  = 1.33 cores -> 1350 m
    #   b=2: the third request is batch 1: 3 l <= 300 -> l <= 100 -> 150/100 = 1.5 cores  -> 1500 m
    #   b=3: one batch:                    2 l <= 300 -> l <= 150 -> 200/150 = 1.33 cores -> 1350 m
    # least CPU 1350 m, where b=1 and b=3 both fit: the largest (the batch is only a cap).
    alloc = LeastAllocation(TOY, min_cpu_m=100, max_cpu_m=4000, step_m=50, max_batch=8)
    p = alloc.plan(workload([300.0, 300.0, 300.0]))
    assert (p.cpu_m, p.batch, p.feasible, p.given_up) == (1350, 3, True, 0)
    assert np.allclose(p.bounds_ms[:3], [75.0, 100.0, 150.0])
    assert p.worst_slack_ms == pytest.approx(300.0 - 2 * 200.0 / 1.35)
    least = LeastAllocation(TOY, min_cpu_m=100, max_cpu_m=4000, step_m=50, max_batch=8, batch_rule="least")
    assert (least.plan(workload([300.0] * 3)).cpu_m, least.plan(workload([300.0] * 3)).batch) == (1350, 1)
    # the table lookup: l(b, c) for every candidate, and the least grid index meeting a bound
    assert alloc.lat[0, 0] == pytest.approx(TOY.latency_ms(1, 100.0))
    assert alloc.grid[alloc.first_feasible(np.array([75.0] + [0.0] * 7))[0]] == 1350


# max 2 cores: l(b, 2000 m) = 25 b + 25 = 50, 75, 100, 125 ms for b = 1..4
REJECT_CASE = [60.0, 60.0, 300.0]


def test_allocation_infeasible_gives_up_the_fewest() -> None:
    # Queued deadlines 60, 60, 300 at max 2 cores. By t = 60 ms at most b * floor(60 / l - 1) requests are
    # done: b=1: floor(0.2) = 0, b=2: floor(-0.2) -> 0, ...: both 60 ms requests are lost whatever the batch.
    # What is left, [300]: b=1: 2 l <= 300 -> 100/150 = 0.67 cores -> 700 m (b=2 needs 1000 m, b=3 1350 m).
    alloc = LeastAllocation(TOY, min_cpu_m=100, max_cpu_m=2000, step_m=50, max_batch=8)
    p = alloc.plan(workload(REJECT_CASE))
    assert (p.cpu_m, p.batch, p.feasible, p.given_up) == (700, 1, False, 2)
    assert list(p.workload.deadlines_ms) == [300.0] and p.workload.n_written_off == 0


def test_allocation_serves_late_keeps_the_given_up_work() -> None:
    # The same input where the server serves late requests anyway: the two given-up requests stay at the
    # head of the EDF order, written off (no deadline), but their work is done first:
    #   b=1: the 300 ms request is batch 2: 4 l <= 300 -> 75 -> 1350 m
    #   b=2: batch 1: 3 l <= 300 -> 100 -> 1500 m;   b=3: batch 0: 2 l <= 300 -> 150 -> 1350 m
    # 1350 m, b=3 — more than the 700 m of the plan that drops them.
    alloc = LeastAllocation(TOY, min_cpu_m=100, max_cpu_m=2000, step_m=50, max_batch=8)
    reject = alloc.plan(workload(REJECT_CASE), serves_late=False)
    late = alloc.plan(workload(REJECT_CASE), serves_late=True)
    assert (late.cpu_m, late.batch, late.feasible, late.given_up) == (1350, 3, False, 2)
    assert late.cpu_m >= reject.cpu_m
    assert late.workload.n_written_off == 2 and late.workload.n_jobs == 3
    assert list(late.workload.deadlines_ms) == [-math.inf, -math.inf, 300.0]


def test_allocation_overload_max_cpu_and_the_least_batch_that_keeps_up() -> None:
    # The same queue with 25 rps arriving. Giving up the two 60 ms requests leaves 700 m b=1, which serves
    # 1000 / l(1, 700 m) = 7 rps < 25: the queue would grow without bound. Overload: max CPU (2 cores,
    # h(b) = 40 b / (b + 1) = 20, 26.7, 30, ... rps) and the least batch that keeps up: b=2.
    alloc = LeastAllocation(TOY, min_cpu_m=100, max_cpu_m=2000, step_m=50, max_batch=8)
    p = alloc.plan(workload(REJECT_CASE, load_rps=25.0))
    assert (p.cpu_m, p.batch, p.feasible, p.given_up) == (2000, 2, False, 2)
    # beyond what any batch keeps up with (h(8, 2 cores) = 35.6 rps): the largest batch
    p = alloc.plan(workload(REJECT_CASE, load_rps=50.0))
    assert (p.cpu_m, p.batch) == (2000, 8)


# ------------------------------------------------------------------------------------------ margins
def _batches(factor: float, n: int) -> tuple[BatchSample, ...]:
    """n served batches whose measured latency is `factor` times the model's."""
    out = []
    for k in range(n):
        b, c = 1 + k % 4, 500 + 250 * (k % 5)
        out.append(BatchSample(b, c, factor * TOY.latency_ms(b, float(c)), float(k)))
    return tuple(out)


def test_margin_is_the_prior_until_enough_batches() -> None:
    m = ModelErrorMargin(TOY)  # prior 0.9, min_samples 20
    assert m.safety(MarginState()) == 0.9
    st = m.update(MarginState(), _batches(2.0, 19))
    assert len(st.ratios) == 19 and m.safety(st) == 0.9


def test_margin_exact_model_gets_none() -> None:
    m = ModelErrorMargin(TOY)
    assert m.safety(m.update(MarginState(), _batches(1.0, 20))) == pytest.approx(1.0)
    # faster than predicted is no reason for a margin either (one-sided)
    assert m.safety(m.update(MarginState(), _batches(0.7, 20))) == pytest.approx(1.0)


def test_margin_for_a_model_that_under_predicts_by_a_quarter() -> None:
    # measured = 1.25 x predicted at every batch: r - 1 = 0.25 at every quantile -> 1 / 1.25 = 0.8
    m = ModelErrorMargin(TOY)
    st = m.update(MarginState(), _batches(1.25, 40))
    assert m.safety(st) == pytest.approx(0.8)
    # the state is returned, the input unchanged; updates accumulate
    assert m.update(st, ()) is st
    assert len(m.update(st, _batches(1.25, 5)).ratios) == 45 and len(st.ratios) == 40


def test_margin_clipped_at_min_safety() -> None:
    # 3x slower than the model: 1 / 3 < min_safety 0.5 -> 0.5
    m = ModelErrorMargin(TOY, min_safety=0.5)
    assert m.safety(m.update(MarginState(), _batches(3.0, 20))) == 0.5


# ------------------------------------------------------------------------------------------ 4 stabiliser
def test_stabilise_up_at_once() -> None:
    assert stabilise(1500, 1000, (), 3) == (1500, (1500,))
    assert stabilise(1500, 1000, (200, 300), 3) == (1500, (200, 300, 1500))


def test_stabilise_down_only_after_the_window() -> None:
    # window 3, 1000 m in force: lower plans 600, 800, 700. The first two are held (fewer than 3 seen); at
    # the third, down to the highest of the last three: 800.
    recent: tuple[int, ...] = ()
    out = []
    for plan in (600, 800, 700):
        cpu, recent = stabilise(plan, 1000, recent, 3)
        out.append(cpu)
    assert out == [1000, 1000, 800] and recent == (600, 800, 700)
    # a higher plan among the last three holds the allocation
    assert stabilise(500, 1000, (1200, 600), 3) == (1000, (1200, 600, 500))
    # window 1: down at once
    assert stabilise(500, 1000, (), 1) == (500, (500,))


def test_stabilise_max_step() -> None:
    assert stabilise(500, 1000, (), 1, max_step=100) == (900, (500,))
    assert stabilise(950, 1000, (), 1, max_step=100) == (950, (950,))
    assert stabilise(2000, 900, (), 1, max_step=100) == (2000, (2000,))  # up is never limited


# ------------------------------------------------------------------------------------- per-batch CPU
GRID = cpu_grid(100, 2000, 100)


def sizer(model: LatencyModel = G) -> BatchCpuSizer:
    return BatchCpuSizer(model, GRID, max_batch=4)


def test_sizer_idle_replica_drops_to_idle_cpu() -> None:
    got = sizer().size((), (), batch=2, current_cpu_m=1000, floor_cpu_m=500, idle_cpu_m=100)
    assert got == BatchCpu(100, 2)  # below the floor too: an idle replica needs no CPU


def test_sizer_one_request_pays_the_resize_delay() -> None:
    # One request with 260 ms left arrives at an idle replica on 100 m (G: l(1, 100 m) = 1000 ms). It starts
    # at once on 100 m; the new allocation c lands 15 ms later and runs the 985 ms of work left at
    # l(1, c) / l(1, 100 m) = 100 / c_m of the time:  15 + 985 * 100 / c <= 260  ->  c >= 402 m -> 500 m.
    # Without the delay: 100000 / c <= 260 -> c >= 385 m -> 400 m.
    kw = dict(batch=1, current_cpu_m=100, floor_cpu_m=100, idle_cpu_m=100)
    assert sizer().size((260.0,), (1,), delay_ms=15.0, **kw) == BatchCpu(500, 1)
    assert sizer().size((260.0,), (1,), delay_ms=0.0, **kw) == BatchCpu(400, 1)
    # the model's measured error: latencies / safety. At 0.8: 15 + (1250 - 15) * 100 / c <= 260 -> 504 -> 600
    assert sizer().size((260.0,), (1,), delay_ms=15.0, safety=0.8, **kw) == BatchCpu(600, 1)


def test_sizer_protects_the_running_batch() -> None:
    # A batch of 2 with 100 ms left at 1000 m, its tightest member due in 80 ms; the resize lands after
    # 10 ms: 10 + 90 * 1000 / c <= 80 -> c >= 1286 m -> 1300 m.
    got = sizer().size((), (), batch=1, current_cpu_m=1000, floor_cpu_m=100, idle_cpu_m=100,
                       running=RunningBatch(2, 100.0, 80.0), delay_ms=10.0)
    assert got == BatchCpu(1300, 1)
    # due in 50 ms: even 2000 m ends it at 10 + 90 / 2 = 55 ms. Beyond saving: no constraint (the floor).
    got = sizer().size((), (), batch=1, current_cpu_m=1000, floor_cpu_m=300, idle_cpu_m=100,
                       running=RunningBatch(2, 100.0, 50.0), delay_ms=10.0)
    assert got == BatchCpu(300, 1)


def test_sizer_respects_the_floor() -> None:
    # a request with 5 s left needs almost nothing, but never less than the interval decision (650 m, the
    # next grid point at or above it: 700 m)
    got = sizer().size((5000.0,), (1,), batch=1, current_cpu_m=1000, floor_cpu_m=650, idle_cpu_m=100)
    assert got == BatchCpu(700, 1)


def test_sizer_unsaveable_requests_impose_no_constraint() -> None:
    # Queue: 30 ms left (below l(1, 2000 m) = 50 ms: beyond saving) then 90 ms left; 2000 m in force.
    # Reject: the batcher answers the first at once; the second alone: 100000 / c <= 90 -> 1111 -> 1200 m.
    kw = dict(batch=1, current_cpu_m=2000, floor_cpu_m=100, idle_cpu_m=100)
    assert sizer().size((30.0, 90.0), (1, 1), **kw) == BatchCpu(1200, 1)
    # serve_late: the first is served anyway, first (EDF), and takes its 50 ms at the top: the second ends at
    # 100 > 90 with batches of 1, and at 100 with a batch of 2. Overload: the top allocation, and among the
    # caps that miss the fewest (one miss each) the largest.
    assert sizer().size((30.0, 90.0), (1, 1), serves_late=True, **kw) == BatchCpu(2000, 4)


def test_sizer_chooses_a_larger_cap_when_the_cap_in_force_cannot_keep_up() -> None:
    # TOY at 2000 m: l(1..4) = 50, 75, 100, 125. Four requests with 160 ms left, cap 1 in force: at the top
    # they end at 50, 100, 150, 200 -> the fourth misses. Larger caps at the least CPU:
    #   cap 2: 2 batches of 2: 2 * 150 / c <= 160 -> 1.875 cores -> 1900 m
    #   cap 3: l(3) + l(1) = 300 / c <= 160      -> 1900 m
    #   cap 4: one batch: 250 / c <= 160         -> 1.5625 cores -> 1600 m   <- least CPU
    got = sizer(TOY).size((160.0,) * 4, (1,) * 4, batch=1, current_cpu_m=2000, floor_cpu_m=100, idle_cpu_m=100)
    assert got == BatchCpu(1600, 4)


def test_sizer_infeasible_top_cpu_and_the_cap_with_fewest_misses() -> None:
    # Four requests with 105 ms left, TOY at 2000 m: misses per cap at the top:
    #   cap 1: ends 50, 100, 150, 200 -> 2;  cap 2: 75, 75, 150, 150 -> 2;
    #   cap 3: 100, 100, 100, 150     -> 1;  cap 4: 125 for all        -> 4.
    # A larger batch is not always better: cap 3.
    got = sizer(TOY).size((105.0,) * 4, (1,) * 4, batch=1, current_cpu_m=2000, floor_cpu_m=100, idle_cpu_m=100)
    assert got == BatchCpu(2000, 3)


def test_sizer_keeps_up_with_recent_arrivals() -> None:
    # One request with plenty of slack, but 14.5 rps arrived over the last second: a cap-1 queue at c serves
    # 1000 / l(1, c) = 10 c rps, so c >= 1.45 cores -> 1500 m (keep_up); without it the floor suffices.
    kw = dict(batch=1, current_cpu_m=1000, floor_cpu_m=100, idle_cpu_m=100)
    assert sizer().size((5000.0,), (1,), recent_rate_rps=14.5, **kw) == BatchCpu(1500, 1)
    assert BatchCpuSizer(G, GRID, 4, keep_up=False).size((5000.0,), (1,), recent_rate_rps=14.5, **kw) \
        == BatchCpu(100, 1)


# -------------------------------------------------------------------------------- SpongeOptimizer.step
def test_step_is_pure() -> None:
    opt = SpongeOptimizer(TOY, max_cpu_m=4000)
    o = obs((8.0, 10.0, 12.0), queue=(250.0, 400.0), batches=_batches(1.1, 25))
    s0 = SpongeState()
    d1, s1 = opt.step(o, s0)
    d2, s2 = opt.step(o, s0)
    assert d1 == d2 and s1 == s2  # same (obs, state) -> same (decision, state)
    assert s0 == SpongeState() and opt.state == SpongeState()  # nothing hidden was changed
    assert s1.floor_cpu_m == d1.cpu_m and s1.batch == d1.batch
    assert len(s1.margin.ratios) == 25 and s1.safety == pytest.approx(1 / 1.1)  # measured margin
    assert s1.envelope.forecast_count == pytest.approx(10.0)  # the 3-interval mean, for the next error


def test_decide_threads_the_state_through_step() -> None:
    opt = SpongeOptimizer(TOY, max_cpu_m=4000)
    o1 = obs((4.0,) * 5, batches=_batches(1.0, 10))
    o2 = obs((4.0,) * 5 + (9.0,), current=Decision(800, 2), batches=_batches(1.0, 10))
    d1 = opt.decide(o1)
    e1, t1 = opt.step(o1, SpongeState())
    assert d1 == e1 and opt.state == t1
    d2 = opt.decide(o2)
    e2, t2 = opt.step(o2, t1)
    assert d2 == e2 and opt.state == t2
    assert len(t2.margin.ratios) == 20 and t2.envelope.errors == (25.0 / 4.0,)  # (9 - 4)^2 / 4


def test_batch_cpu_between_decisions() -> None:
    opt = SpongeOptimizer(TOY, max_cpu_m=4000)
    view = QueueView((300.0,), (1,), None, 1000)
    assert opt.batch_cpu_m(view) is None  # no decision yet: keep what is in force
    d = opt.decide(obs((10.0,) * 3))
    # idle: min CPU, whatever the decision
    assert opt.batch_cpu_m(QueueView((), (), None, d.cpu_m)) == BatchCpu(100, d.batch)
    # work queued: never below the decision (a loose request gets exactly the decision's CPU)
    assert opt.batch_cpu_m(QueueView((10_000.0,), (1,), None, d.cpu_m)).cpu_m == d.cpu_m
    rng = np.random.default_rng(4)
    for _ in range(50):
        q = tuple(np.sort(rng.uniform(-50, 1500, int(rng.integers(1, 12)))))
        running = RunningBatch(2, float(rng.uniform(0, 200)), float(rng.uniform(0, 800))) if rng.random() < 0.5 \
            else None
        got = opt.batch_cpu_m(QueueView(q, (1,) * len(q), running, int(rng.choice([100, d.cpu_m, 4000])), 16.0))
        assert d.cpu_m <= got.cpu_m <= 4000
    # a tight request raises it (TOY: l(1, c) = 100 / c; 60 ms left at safety 0.9: far above the decision)
    assert opt.batch_cpu_m(QueueView((60.0,), (1,), None, d.cpu_m, 0.0)).cpu_m > d.cpu_m
    assert SpongeOptimizer(TOY, per_batch=False).batch_cpu_m(view) is None


# ------------------------------------------------------------------------------------------- simulator
@dataclass
class BusyIdle:
    """A hand policy for the simulator's per-batch path: 2000 m while there is work, 100 m when idle."""

    name: str = "busy-idle"
    max_cpu_m: int = 2000
    views: list[tuple[QueueView, BatchCpu]] = field(default_factory=list)

    def decide(self, obs: Observation) -> Decision:
        return Decision(500, 1)  # never applied as such: per-batch CPU decides the allocation

    def batch_cpu_m(self, view: QueueView) -> BatchCpu:
        busy = view.running is not None or len(view.queue_remaining_ms) > 0
        got = BatchCpu(2000 if busy else 100, 1)
        self.views.append((view, got))
        return got


def test_sim_resizes_land_decision_plus_resize_delay_after_the_event() -> None:
    # SIM model: l(1, 100 m) = 1020 ms, l(1, 2000 m) = 70 ms. Delay = decision 1 + resize 15 = 16 ms.
    #   0     initial 1000 m; the tick at 1000 asks the sizer: idle -> 100 m, in force at 1016
    #   1500  request 0 arrives: sizer -> 2000 m (lands 1516); the batch starts at once on 100 m (1020 ms)
    #   1516  2000 m: the 1004 ms of work left take 1004 * 70 / 1020 = 68.9 ms -> ends 1584.9
    #   1584.9 idle -> 100 m, in force at 1600.9;   request 1 at 2500: the same, 1000 ms later
    #   the run ends at the tick of 3000.
    left = 1004.0 * 70.0 / 1020.0
    end0, end1 = 1516.0 + left, 2516.0 + left
    req = RequestSet.from_arrays([1500.0, 2500.0], budget_ms=5000.0, duration_ms=3000.0)
    pol = BusyIdle()
    r = simulate(req, SIM, pol, SimConfig(initial_cpu_m=1000, decision_ms=1.0, resize_delay_ms=15.0))
    assert r.counts()["ok"] == 2 and r.end_ms == 3000.0
    assert r.server_ms == pytest.approx([end0 - 1500.0, end1 - 2500.0])
    mcore_ms = (1000 * 1016.0 + 100 * (1516.0 - 1016.0) + 2000 * (end0 + 16.0 - 1516.0)
                + 100 * (2516.0 - end0 - 16.0) + 2000 * (end1 + 16.0 - 2516.0) + 100 * (3000.0 - end1 - 16.0))
    assert r.core_seconds == pytest.approx(mcore_ms / 1e6)
    # the sizer saw the delay it must plan with, and the allocation in force when it was asked
    assert all(v.delay_ms == 16.0 for v, _ in pol.views)
    assert [v.current_cpu_m for v, got in pol.views if got.cpu_m == 2000][0] == 100


def _sparse(budget_ms: float, every_ms: float = 2000.0, total_ms: float = 30_000.0) -> RequestSet:
    send = np.arange(500.0, total_ms, every_ms)
    return RequestSet.from_arrays(send, budget_ms=budget_ms, duration_ms=total_ms)


def test_sim_per_batch_cpu_bills_an_idle_replica_at_min_cpu() -> None:
    # One request every 2 s (at 500, 2500, 4500, ... ms) with a 400 ms budget: with per-batch CPU the
    # replica idles at 100 m between them; without, it holds the interval plan (450-500 m) all second long.
    req = _sparse(400.0)
    on = simulate(req, SIM, SpongeOptimizer(SIM, max_cpu_m=4000), SimConfig())
    off = simulate(req, SIM, SpongeOptimizer(SIM, max_cpu_m=4000), SimConfig(per_batch=False))
    assert on.attainment == 1.0 and off.attainment == 1.0
    assert on.core_seconds < 0.5 * off.core_seconds
    # idle at every tick after the first decision (no request is in flight at a whole second), and every
    # interval without an arrival, (3000, 4000], (5000, 6000], ..., billed at exactly 100 m
    assert all(t.cpu_m == 100 for t in on.timeline[1:])
    quiet = [t.total_cpu_m for t in on.timeline if t.t_ms >= 4000.0 and t.t_ms % 2000.0 == 0.0]
    assert len(quiet) == 14 and set(quiet) == {100}


def test_sim_a_lone_tight_request_is_met_from_idle() -> None:
    # After 5 quiet seconds at 100 m, one request with 120 ms: it starts on 100 m (l = 1020 ms); the sizer
    # plans the 16 ms delay at 100 m and the rest at c (latencies / 0.9, the prior margin):
    #   16 + (1133.3 - 16) * l(1, c) / 1020 <= 120 -> l(1, c) <= 94.9 ms -> c >= 1335 -> 1350 m
    # served in 16 + 1004 * l(1, 1350 m) / 1020 = 108.6 ms.
    req = RequestSet.from_arrays([5500.0], budget_ms=120.0, duration_ms=8000.0)
    r = simulate(req, SIM, SpongeOptimizer(SIM, max_cpu_m=4000), SimConfig(decision_ms=1.0, resize_delay_ms=15.0))
    assert r.outcome[0] == OK
    assert r.server_ms[0] == pytest.approx(16.0 + 1004.0 * SIM.latency_ms(1, 1350.0) / 1020.0)


class Recording(SpongeOptimizer):
    """The real optimizer, with the observations it was given."""

    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.seen: list[Observation] = []

    def decide(self, obs: Observation) -> Decision:
        self.seen.append(obs)
        return super().decide(obs)


def test_sim_serve_late_reaches_the_policy() -> None:
    req = _sparse(400.0, total_ms=4000.0)
    late, reject = Recording(SIM), Recording(SIM)
    simulate(req, SIM, late, SimConfig(expiry="serve_late"))
    simulate(req, SIM, reject, SimConfig())
    assert late.seen and all(o.serves_late for o in late.seen) and late.state.serves_late
    assert reject.seen and not any(o.serves_late for o in reject.seen) and not reject.state.serves_late
