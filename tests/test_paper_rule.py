"""`paper` is the published rule (saeid93/sponge `Optimizer.dynainf`): hand-computed cases.

Toy model  l(b, c) = (50 b + 50) / c  ms, truncated to whole ms as published:
    c = 1: l(1..4) = 100, 150, 200, 250        c = 2: 50, 75, 100, 125
    c = 3: 33, 50, 66, 83, 100                 c = 4: 25, 37, 50, 62
Published test, SLO 1000 ms: ceil(load / b) * l(b, c) + (SLO - budget) <= 0.9 * SLO,
i.e. ceil(load / b) * l(b, c) <= budget - 100 ms ("the limit").
"""

from __future__ import annotations

import pytest

from sponge.observe import ObservationBuilder
from sponge.perf.latency_model import LatencyModel
from sponge.policy import Decision, Observation, PaperOptimizer, make_policy

TOY = LatencyModel(g=50.0, d=0.0, e=50.0, h=0.0)


def obs(load: float, budgets: tuple[float, ...], ages: tuple[float, ...] = (),
        current: Decision = Decision(1000, 1), history: tuple[float, ...] | None = None) -> Observation:
    return Observation(now_ms=10_000.0, interval_ms=1000.0, arrival_rate_rps=load,
                       rate_history_rps=history if history is not None else (load,), budgets_ms=budgets,
                       queue_remaining_ms=(), current=current, budget_ages_ms=ages)


def pick(d: Decision) -> tuple[int, int, bool]:
    return d.cpu_m, d.batch, d.feasible


def test_the_published_inequality_passes_at_equality() -> None:
    # budget 500 -> limit 400. load 4, 1 core, b=1: 4 batches x 100 ms = 400 <= 400: passes (the published
    # code fails only on '>').
    p = PaperOptimizer(TOY, max_cores=4, max_batch=8)
    assert pick(p.decide(obs(4.0, (500.0,)))) == (1000, 1, True)
    # budget 499.5 -> limit 399.5: b=1 (400) fails, b=2: 2 x 150 = 300 fits on the same core.
    assert pick(p.decide(obs(4.0, (499.5,)))) == (1000, 2, True)


def test_margin_is_a_tenth_of_the_slo_not_of_the_budget() -> None:
    # budget 200: the published limit is 200 - 100 = 100 ms (0.9 * 200 = 180 would be the old reading).
    # load 2: 1 core b=1 200, b=2 150 -> no; 2 cores b=1 2 x 50 = 100 <= 100 -> 2000 m b=1.
    d = PaperOptimizer(TOY, max_cores=4, max_batch=8).decide(obs(2.0, (200.0,)))
    assert pick(d) == (2000, 1, True)
    # With another SLO the margin moves with it: SLO 500 -> limit 200 - 50 = 150: 1 core b=2 fits.
    d = PaperOptimizer(TOY, max_cores=4, max_batch=8, slo_ms=500.0).decide(obs(2.0, (200.0,)))
    assert pick(d) == (1000, 2, True)


def test_least_cores_then_least_batch() -> None:
    # load 10, budget 400 -> limit 300.
    # 1 core: b=1 1000, b=2 750, b=3 800, b=4 750, b=5 600, b=6..8 2 x (350..450)   -> no
    # 2 cores: b=1 500, b=2 375, b=3 400, b=4 375, b=5 2 x 150 = 300                 -> yes (b=5)
    # (3 cores, b=2 would also fit, 5 x 50 = 250, but fewer cores come first.)
    d = PaperOptimizer(TOY, max_cores=4, max_batch=8).decide(obs(10.0, (400.0,)))
    assert pick(d) == (2000, 5, True)
    assert d.replicas == 1 and "2 cores b=5" in d.explanation


def test_latency_is_truncated_to_whole_ms_as_published() -> None:
    # load 9, budget 397 -> limit 297, batch <= 4. 2 cores: 450, 375, 300, 375 -> no.
    # 3 cores b=1: l = int(33.3) = 33, 9 x 33 = 297 <= 297 -> fits (untruncated 300 would not; b=2 would).
    d = PaperOptimizer(TOY, max_cores=4, max_batch=4).decide(obs(9.0, (397.0,)))
    assert pick(d) == (3000, 1, True)


def test_latest_budget_by_default_min_of_last_second_by_flag() -> None:
    # budgets in arrival order, newest last: 150 ms arrived 2.5 s ago, 300 ms 0.4 s ago, 800 ms 50 ms ago.
    budgets, ages = (150.0, 300.0, 800.0), (2500.0, 400.0, 50.0)
    o = obs(4.0, budgets, ages)
    # latest: 800 -> limit 700: 1 core b=1, 4 x 100 = 400.
    assert pick(PaperOptimizer(TOY, max_cores=4, max_batch=8).decide(o)) == (1000, 1, True)
    # min of the last second: 300 (150 is older) -> limit 200: 1 core: 400, 300, 400, 250 -> no;
    # 2 cores b=1: 4 x 50 = 200 -> yes.
    p = PaperOptimizer(TOY, max_cores=4, max_batch=8, budget="min_last_second")
    assert p.budget_of(o) == 300.0
    assert pick(p.decide(o)) == (2000, 1, True)
    # Nobody in the last second: the latest budget stands (a sampled gauge keeps its last value).
    assert p.budget_of(obs(4.0, budgets, (3000.0, 2500.0, 1200.0))) == 800.0
    # Without arrival times the whole window is all there is: its minimum.
    assert p.budget_of(obs(4.0, budgets)) == 150.0
    with pytest.raises(ValueError):
        PaperOptimizer(TOY, budget="p10")  # type: ignore[arg-type]


def test_nothing_fits_keeps_the_configuration_in_force() -> None:
    # budget 120 -> limit 20 ms: load 10 needs at least 2 x 62 ms (4 cores, b=8). dynainf returns None and
    # the published adapter keeps the pipeline as it is; so does this rule, and says it is infeasible.
    cur = Decision(3000, 4, 2)
    d = PaperOptimizer(TOY, max_cores=4, max_batch=8).decide(obs(10.0, (120.0,), current=cur))
    assert (d.cpu_m, d.batch, d.replicas, d.feasible) == (3000, 4, 2, False)
    assert "INFEASIBLE" in d.explanation
    # A budget under 0.1 * SLO leaves a negative limit: nothing fits for any load ...
    assert not PaperOptimizer(TOY).decide(obs(1.0, (90.0,), current=cur)).feasible
    # ... except no load at all: the published loop over the load's batches is empty, the first
    # configuration (1 core, batch 1) passes whatever the budget.
    assert pick(PaperOptimizer(TOY).decide(obs(0.0, (90.0,), current=cur))) == (1000, 1, True)


def test_lambda_is_the_last_seconds_count() -> None:
    # Reactive: the last interval's rate, rounded to a whole load as the published range() needs.
    p = PaperOptimizer(TOY, max_cores=4, max_batch=8)
    d = p.decide(obs(3.6, (500.0,), history=(20.0, 20.0, 3.6)))  # not the window's peak, not its mean
    assert "lambda 4" in d.explanation
    # load 4 at budget 500 fits 1 core b=1 exactly (first test); load 5 would not (5 x 100 > 400).
    assert pick(d) == (1000, 1, True)
    # 4.6 -> 5: b=1 500, b=2 3 x 150 = 450 > 400; b=3 2 x 200 = 400 fits.
    assert pick(p.decide(obs(4.6, (500.0,)))) == (1000, 3, True)


def test_from_the_observation_builder_latest_arrival_and_last_second() -> None:
    # Five arrivals in the second ending at t = 11 s (and one older), fed in arrival order with their
    # arrival times, as the simulator and the live controller feed the builder.
    b = ObservationBuilder(interval_ms=1000.0, now_ms=9000.0, arrivals_total=0)
    b.observe(10_000.0, 1, [(9500.0, 150.0)], (), {}, Decision(1000, 1))
    fed = [(10_100.0, 700.0), (10_300.0, 350.0), (10_500.0, 650.0), (10_700.0, 600.0), (10_900.0, 500.0)]
    o = b.observe(11_000.0, 6, fed, (), {}, Decision(1000, 1))
    assert o.budgets_ms == (150.0, 700.0, 350.0, 650.0, 600.0, 500.0)
    assert o.budget_ages_ms == pytest.approx((1500.0, 900.0, 700.0, 500.0, 300.0, 100.0))
    assert o.arrival_rate_rps == pytest.approx(5.0)
    latest = make_policy("paper", TOY, max_cores=4, max_batch=8)
    assert latest.budget_of(o) == 500.0  # the newest arrival's
    # lambda 5 at limit 400: 1 core b=1 500 no, b=2 3 x 150 = 450 no, b=3 2 x 200 = 400 yes.
    assert pick(latest.decide(o)) == (1000, 3, True)
    tight = make_policy("paper", TOY, max_cores=4, max_batch=8, budget="min_last_second")
    assert tight.budget_of(o) == 350.0  # 150 arrived 1.5 s ago
    # limit 250: 1 core: 500, 450, 400, 2 x 250 = 500, b=5 300 -> no; 2 cores b=1 5 x 50 = 250 -> yes.
    assert pick(tight.decide(o)) == (2000, 1, True)
