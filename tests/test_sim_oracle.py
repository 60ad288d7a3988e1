"""The oracle is a lower bound: below every policy that meets all budgets, tight where it can be checked."""

from __future__ import annotations

import numpy as np
import pytest

from sponge.perf.latency_model import LatencyModel
from sponge.policy import make_policy
from sponge.sim import RequestSet, SimConfig, simulate
from sponge.sim.oracle import ActionSpace, cost_envelope, lp_bound, oracle_bound

MODEL = LatencyModel(g=100.0, d=10.0, e=0.0, h=20.0)


def _poisson(rate: float, seconds: int, budget: float | tuple[float, float], seed: int = 0) -> RequestSet:
    rng = np.random.default_rng(seed)
    n = rng.poisson(rate * seconds)
    send = np.sort(rng.uniform(0, seconds * 1000.0, n))
    b = rng.uniform(*budget, n) if isinstance(budget, tuple) else np.full(n, budget)
    return RequestSet.from_arrays(send, b, slo_ms=1000.0, duration_ms=seconds * 1000.0)


def test_envelope_is_convex_increasing_from_the_floor():
    env = cost_envelope(MODEL, ActionSpace(250, 4000, 8, 1, 3), max_budget_ms=800.0)
    assert env.rates[0] == 0.0 and env.costs[0] == 250.0
    slopes = np.diff(env.costs) / np.diff(env.rates)
    assert np.all(np.diff(env.rates) > 0) and np.all(slopes >= 0) and np.all(np.diff(slopes) >= -1e-9)
    # every configuration costs at least the envelope at its rate
    for c in (250, 1000, 4000):
        for b in (1, 4, 8):
            lat = MODEL.latency_ms(b, c)
            if lat <= 800:
                for r in (1, 2, 3):
                    assert r * c >= float(env(r * b / lat)) - 1e-6


def test_work_bound_is_tight_for_a_pure_work_model():
    # l(b, c) = 200*b/c: every request needs 200 core-ms whatever b and c, so with the load above the floor
    # the least cost is the work itself, N * 0.2 core-s. The bound must be below and close.
    model = LatencyModel(g=200.0, d=0.0, e=0.0, h=0.0)
    req = _poisson(20.0, 60, 900.0, seed=1)
    ob = oracle_bound(req, model, ActionSpace(100, 16000, 16))
    work = 0.2 * ob.requests
    assert ob.core_seconds <= work + 1e-9
    assert ob.core_seconds >= 0.97 * work
    assert ob.kind.startswith("lower bound")


def test_bound_is_below_every_policy_that_meets_every_budget():
    req = _poisson(8.0, 60, (300.0, 900.0), seed=2)
    space = ActionSpace(500, 4000, 8)
    ob = oracle_bound(req, MODEL, space)
    assert ob.excluded == 0
    met = []
    for cpu in range(500, 4001, 250):  # every static allocation that meets every budget, the cheapest included
        for b in (1, 2, 4):
            r = simulate(req, MODEL, make_policy("static", MODEL, cpu_m=cpu, batch=b),
                         SimConfig(initial_cpu_m=cpu, initial_batch=b))
            if r.attainment == 1.0:
                met.append(r.core_seconds)
    s = simulate(req, MODEL, make_policy("sponge", MODEL, min_cpu_m=500, max_cpu_m=4000, max_batch=8),
                 SimConfig(initial_cpu_m=2000, initial_batch=2))
    if s.attainment == 1.0:
        met.append(s.core_seconds)
    assert len(met) >= 3
    assert min(met) >= ob.core_seconds
    # an idle deployment still pays its floor
    assert ob.core_seconds >= ob.floor_core_seconds * 0.999


def test_dual_matches_the_primal_lp_on_a_small_case():
    req = _poisson(10.0, 20, (400.0, 900.0), seed=3)
    space = ActionSpace(500, 4000, 8)
    dual = oracle_bound(req, MODEL, space, slot_ms=100.0, iterations=600)
    primal = lp_bound(req, MODEL, space, slot_ms=100.0, full_windows_s=20.0, max_lines=200)
    # same relaxation; both are bounds; the dual stops early and the LP drops some constraints
    assert dual.core_seconds == pytest.approx(primal.core_seconds, rel=0.03)


def test_hopeless_requests_are_excluded_and_no_requests_cost_the_floor():
    space = ActionSpace(1000, 2000, 4)
    req = RequestSet.from_arrays([100.0, 200.0], budget_ms=[10.0, 800.0], duration_ms=2000.0)
    ob = oracle_bound(req, MODEL, space)
    assert ob.excluded == 1 and ob.requests == 1
    empty = RequestSet.from_arrays([], budget_ms=[], duration_ms=5000.0)
    ob0 = oracle_bound(empty, MODEL, space)
    assert ob0.core_seconds == pytest.approx(1.0 * 5.0)


def test_clairvoyant_reference_sits_between_the_bound_and_a_static_allocation():
    from sponge.sim.clairvoyant import ClairvoyantVertical

    req = _poisson(8.0, 60, (300.0, 900.0), seed=4)
    space = ActionSpace(500, 4000, 8)
    ob = oracle_bound(req, MODEL, space)
    cv = simulate(req, MODEL, ClairvoyantVertical(req, MODEL, space), SimConfig(initial_cpu_m=2000, initial_batch=2))
    st = simulate(req, MODEL, make_policy("static", MODEL, cpu_m=4000, batch=4), SimConfig(initial_cpu_m=4000,
                                                                                             initial_batch=4))
    assert cv.attainment >= 0.99
    assert ob.core_seconds <= cv.core_seconds < st.core_seconds
