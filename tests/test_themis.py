"""The `themis` baseline (sponge/policy/themis.py) on hand-computed cases: vertical for a surge, the cap
binding adds the fewest replicas at once, horizontal (the cheapest replica count) once the load is stable,
scale-in only then, starting replicas never counted as capacity.

Exact arithmetic as in tests/test_policy.py: the last interval's rate, safety 0.9, no dispersion, expected
arrivals (DeadlineDemand with arrival_eps=None, burst_z=0), b = 1, budgets 1000 ms (x 0.9 = 900 ms).
Model D: l(1, c) = 100/c + 20 ms (c in cores) — a per-request term, so small replicas are more efficient:
  10 rps on 1 replica: l <= 100 ms (throughput)  -> c >= 1.25 cores -> 1300 m
  10 rps on 2 replicas: l <= 200 ms               -> c >= 0.56      -> 2 x 600 m = 1200 m (the cheapest;
      3 x 400 m ties at 1200, fewer wins)
  20 rps on 1 replica: at most 1000 / (50 + 20) = 14.3 rps at 2000 m: the cap binds; 2 x 1300 m carry it
   3 rps on 1 replica: pooled deadlines 900 + 333 i (i = 0..3), bound min(450, 411, 392, 380, 333 thr.)
      -> l <= 333 ms -> c >= 0.319 -> 400 m (2 replicas: 2 x 300 m = 600 m)
"""

from __future__ import annotations

import numpy as np
import pytest

from sponge.perf.latency_model import LatencyModel
from sponge.policy import ThemisPolicy, make_policy
from sponge.policy.demand import DeadlineDemand
from sponge.policy.themis import is_stable
from sponge.policy.types import Decision, Observation
from sponge.sim import RequestSet, SimConfig, simulate
from sponge.sim.engine import PENDING

D = LatencyModel(g=100.0, d=20.0, e=0.0, h=0.0)


def themis(**kw: object) -> ThemisPolicy:
    params = dict(max_cpu_m=2000, step_m=100, max_batch=1, max_replicas=8, safety=0.9, predictor="reactive",
                  jump_z=None, measure_dispersion=False, stable_window=3, stable_tolerance=0.2, stable_z=0.0)
    params.update(kw)
    t = ThemisPolicy(D, **params)  # type: ignore[arg-type]
    t.planner.demand = DeadlineDemand(t.alloc.floor_ms, arrival_eps=None, burst_z=0.0)
    return t


def obs(history: tuple[float, ...], current: Decision, starting: int = 0) -> Observation:
    return Observation(now_ms=0.0, interval_ms=1000.0, arrival_rate_rps=history[-1], rate_history_rps=history,
                       budgets_ms=(1000.0,) * 50, queue_remaining_ms=(), current=current,
                       replicas_starting=starting)


def test_stability_is_one_level_within_a_relative_or_poisson_band() -> None:
    # window 3, tolerance 0.2, z 0: mean 10, band 2
    assert is_stable((10.0, 11.0, 9.0), 3, 0.2, 0.0, 1000.0) == (True, 10.0)
    assert not is_stable((10.0, 14.0, 6.0), 3, 0.2, 0.0, 1000.0)[0]
    # at 5 rps a one-second count is 5 +- 2.2: z = 2 widens the band to 2 sqrt(5) = 4.47
    assert is_stable((5.0, 9.0, 1.0), 3, 0.2, 2.0, 1000.0)[0]
    assert not is_stable((5.0, 10.0, 0.0), 3, 0.2, 2.0, 1000.0)[0]
    # the older history does not count; too short a history is not stable
    assert is_stable((50.0, 10.0, 10.0, 10.0), 3, 0.2, 0.0, 1000.0)[0]
    assert not is_stable((10.0, 10.0), 3, 0.2, 0.0, 1000.0)[0]


def test_a_surge_is_met_vertically() -> None:
    # 1 replica at 600 m; the rate jumps 5 -> 10 rps: not stable (mean 6.7, 10 is 3.3 away > 1.3), so the
    # count stays and the replica grows to 1300 m, although 2 x 600 m would be cheaper.
    d = themis().decide(obs((5.0, 5.0, 10.0), Decision(600, 1, replicas=1)))
    assert (d.replicas, d.cpu_m, d.feasible) == (1, 1300, True)
    assert "vertical (load not stable)" in d.explanation


def test_the_cap_binding_adds_the_fewest_replicas_at_once() -> None:
    # 20 rps, not stable: one replica cannot carry it even at 2000 m; 2 can (2 x 1300 m). The new one
    # starts; the ready replica carries what it can meanwhile (max CPU, infeasible).
    d = themis().decide(obs((5.0, 5.0, 20.0), Decision(1300, 1, replicas=1)))
    assert (d.replicas, d.cpu_m, d.feasible) == (2, 2000, False)
    assert "cap binds" in d.explanation


def test_a_stable_level_turns_horizontal_then_vertical_back_down() -> None:
    t = themis()
    # stable at 10 rps on 1 x 1300 m: the cheapest count is 2 (2 x 600 m). While the second starts the
    # ready one keeps 1300 m (starting capacity is not counted); once both serve, 600 m each.
    d = t.decide(obs((10.0, 10.0, 10.0), Decision(1300, 1, replicas=1)))
    assert (d.replicas, d.cpu_m) == (2, 1300)
    assert "horizontal (stable at 10.0 rps): 2 x 600m" in d.explanation
    d = t.decide(obs((10.0, 10.0, 10.0), d, starting=1))
    assert (d.replicas, d.cpu_m) == (2, 1300)
    d = t.decide(obs((10.0, 10.0, 10.0), d))
    assert (d.replicas, d.cpu_m) == (2, 600)


def test_scale_in_waits_until_the_low_load_is_stable() -> None:
    t = themis()
    # 2 x 600 m at 10 rps; the load drops to 3 rps. Not stable yet: 2 replicas stay, each drops vertically
    # to what 1.5 rps needs: pooled deadlines 900, 1233, 1567, 1900 -> share 900, 1567: bound
    # min(900/2, 1567/3, 1000/1.5) = 450 ms -> 100/c <= 430 -> 300 m.
    d = t.decide(obs((10.0, 10.0, 3.0), Decision(600, 1, replicas=2)))
    assert (d.replicas, d.cpu_m) == (2, 300)
    d = t.decide(obs((10.0, 3.0, 3.0), d))
    assert d.replicas == 2
    # stable at 3 rps: 1 x 400 m (cheaper than 2 x 300 m)
    d = t.decide(obs((3.0, 3.0, 3.0), d))
    assert (d.replicas, d.cpu_m) == (1, 400)


def test_registry_and_simulator_run_themis() -> None:
    p = make_policy("themis", D, max_cpu_m=2000, max_replicas=4)
    assert isinstance(p, ThemisPolicy) and p.name == "themis"
    # a step 4 -> 24 rps -> 4 rps: one replica carries at most 14.3 rps, so themis must scale out and,
    # once the low load is stable again, back in; every request ends exactly once.
    rng = np.random.default_rng(2)
    send = []
    for s, rate in enumerate([4.0] * 20 + [24.0] * 40 + [4.0] * 60):
        send += list(s * 1000.0 + np.sort(rng.uniform(0.0, 1000.0, rng.poisson(rate))))
    req = RequestSet.from_arrays(np.array(send), np.full(len(send), 900.0), slo_ms=1000.0, duration_ms=120_000.0)
    r = simulate(req, D, make_policy("themis", D, max_cpu_m=2000, max_replicas=4, stable_window=20),
                 SimConfig(cold_start_ms=2000.0))
    assert not np.any(r.outcome == PENDING)
    reps = [d.replicas for _, d in r.decisions]
    assert max(reps) >= 2 and reps[-1] == 1
    assert r.attainment > 0.95


@pytest.mark.parametrize("bad", [dict(stable_window=0), dict(stable_tolerance=-0.1),
                                 dict(min_replicas=3, max_replicas=2)])
def test_invalid_parameters(bad: dict) -> None:
    with pytest.raises(ValueError):
        ThemisPolicy(D, **bad)
