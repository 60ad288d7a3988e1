"""The simulator: exact hand-computed cases, conservation, determinism, delays, and the real policies."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import Scripted

from sponge.perf.latency_model import LatencyModel
from sponge.policy import HPALikePolicy, SpongeOptimizer, make_policy
from sponge.policy.types import Decision, Observation
from sponge.report.results import read_run
from sponge.report.summary import summarize
from sponge.sim import ConservationError, RequestSet, SimConfig, simulate
from sponge.sim.engine import OK, PENDING, Simulator

# l(b, c) = 100*b/c + 20 ms (c in cores): l(1, 1000 m) = 120, l(2, 1000 m) = 220, l(1, 2000 m) = 70.
MODEL = LatencyModel(g=100.0, d=0.0, e=0.0, h=20.0)


def static(cpu_m: int, batch: int = 1, replicas: int = 1):
    return make_policy("static", MODEL, cpu_m=cpu_m, batch=batch, replicas=replicas)


def cfg(cpu_m: int, batch: int = 1, **kw) -> SimConfig:
    return SimConfig(initial_cpu_m=cpu_m, initial_batch=batch, **kw)




# ---- exact, hand-computed cases --------------------------------------------------------------------------
def test_single_replica_no_queueing_is_exact():
    # One request every 100 ms for 10 s, b = 1 at 2000 m: l(1, 2000) = 100*1/2 + 20 = 70 ms < 100 ms, so
    # every request starts on arrival and spends exactly 70 ms; the replica costs 2 cores x 10 s = 20 core-s.
    send = np.arange(100) * 100.0
    req = RequestSet.from_arrays(send, budget_ms=500.0, duration_ms=10_000.0)
    r = simulate(req, MODEL, static(2000), cfg(2000))
    assert r.counts() == {"ok": 100, "late": 0, "expired": 0, "rejected": 0, "error": 0}
    assert np.all(r.server_ms == 70.0)
    assert np.all(r.batch == 1) and np.all(r.cpu_m == 2000)
    assert r.core_seconds == pytest.approx(20.0, abs=1e-12)
    assert r.end_ms == 10_000.0
    assert [t.t_ms for t in r.timeline] == [1000.0 * k for k in range(1, 11)]
    # arrivals at the instant of a tick belong to the interval that ends there: 0..1000 holds 11
    assert [t.arrival_rps for t in r.timeline] == [11.0] + [10.0] * 8 + [9.0]
    assert all(t.total_cpu_m == 2000 for t in r.timeline)


def test_single_replica_batches_and_queueing_are_exact():
    # Two requests at once every 200 ms, b = 2 at 1000 m: l(2, 1000) = 100*2/1 + 20 = 220 ms > 200 ms, so
    # pair k arrives at 200k, starts when pair k-1 is done, at 220k, and ends at 220(k+1):
    #   server time of pair k = 220(k+1) - 200k = 220 + 20k.
    # With a 1000 ms budget pairs 0..39 are ok (220 + 20*39 = 1000 <= 1000); pairs 40..44 still pass the
    # batcher's check (now + l(1) = 220k + 120 <= 200k + 1000 for k <= 44) and are served late.
    # The batcher may wait 5 ms for a fuller batch (the default, as live, is greedy: 0 ms, and the first
    # of a simultaneous pair would leave alone).
    k = np.arange(45)
    send = np.repeat(k * 200.0, 2)
    req = RequestSet.from_arrays(send, budget_ms=1000.0, duration_ms=9000.0)
    r = simulate(req, MODEL, static(1000, batch=2), cfg(1000, batch=2, max_wait_ms=5.0))
    expect = np.repeat(220.0 + 20.0 * k, 2)
    np.testing.assert_array_equal(r.server_ms, expect)
    assert np.all(r.batch == 2)
    outcome = np.array(r.records(), dtype=object)
    assert [x.outcome for x in outcome[:80]] == ["ok"] * 80
    assert [x.outcome for x in outcome[80:]] == ["late"] * 10
    # the last pair ends at 220*45 = 9900 ms; the run stops at the first tick after: 10 s at 1 core
    assert r.end_ms == 10_000.0
    assert r.core_seconds == pytest.approx(10.0, abs=1e-12)


def test_expiry_reject_answers_hopeless_requests_at_once():
    # budget 100 ms < l(1, 1000) = 120 ms: expired at admission (server time 0), never served
    req = RequestSet.from_arrays([0.0, 500.0], budget_ms=[100.0, 300.0], duration_ms=1000.0)
    r = simulate(req, MODEL, static(1000), cfg(1000))
    assert [x.outcome for x in r.records()] == ["expired", "ok"]
    assert r.server_ms[0] == 0.0 and r.server_ms[1] == 120.0


# ---- invariants ------------------------------------------------------------------------------------------
def _random_requests(n_s: int = 60, rate: float = 12.0, seed: int = 3) -> RequestSet:
    rng = np.random.default_rng(seed)
    n = rng.poisson(rate * n_s)
    send = np.sort(rng.uniform(0, n_s * 1000.0, n))
    budget = rng.uniform(50.0, 900.0, n)
    return RequestSet.from_arrays(send, budget, slo_ms=1000.0, duration_ms=n_s * 1000.0)


@pytest.mark.parametrize("policy,params,expiry", [
    ("sponge", {"max_cpu_m": 4000}, "reject"),
    ("hpa", {"cpu_m": 1000, "sync_period_ms": 3000.0}, "reject"),
    ("joint", {"max_cpu_m": 2000, "max_replicas": 4}, "serve_late"),
    ("static", {"cpu_m": 600, "batch": 4}, "serve_late"),
])
def test_conservation_every_request_ends_exactly_once(policy, params, expiry):
    req = _random_requests()
    r = simulate(req, MODEL, make_policy(policy, MODEL, **params),
                 SimConfig(noise_sigma=0.2, expiry=expiry, queue_capacity=30, cold_start_ms=2000.0, seed=5))
    assert not np.any(r.outcome == PENDING)
    assert sum(r.counts().values()) == len(req)
    served = np.isin(r.outcome, (1, 2))
    assert np.all(r.batch[served] >= 1) and np.all(r.batch[~served] == 0)
    assert np.all(np.isfinite(r.server_ms[served]))


def test_ending_twice_is_caught():
    sim = Simulator(RequestSet.from_arrays([0.0], [500.0], duration_ms=1000.0), MODEL, static(1000), cfg(1000))
    sim._end(0, OK, 1.0)
    with pytest.raises(ConservationError):
        sim._end(0, OK, 1.0)


def test_deterministic_under_a_seed():
    req = _random_requests()

    def run(seed: int):
        return simulate(req, MODEL, make_policy("sponge", MODEL, max_cpu_m=4000), SimConfig(noise_sigma=0.3, seed=seed))

    a, b, c = run(7), run(7), run(8)
    np.testing.assert_array_equal(a.outcome, b.outcome)
    np.testing.assert_array_equal(a.server_ms, b.server_ms)
    assert a.core_seconds == b.core_seconds
    assert [d for _, d in a.decisions] == [d for _, d in b.decisions]
    assert not np.array_equal(a.server_ms, c.server_ms)


# ---- delays ------------------------------------------------------------------------------------------------
def test_resize_takes_effect_after_its_delay_and_retimes_the_running_batch():
    # 1000 m until the decision at t=1000 asks for 2000 m; with a 300 ms delay it applies at 1300.
    #   arrives 1100: starts at 1000 m, would end at 1220 (< 1300): 120 ms.
    #   arrives 1250: starts at 1000 m (ends 1370 if nothing changed); at 1300 the 70 ms of work left at
    #                 1000 m take 70 * l(1,2000)/l(1,1000) = 70 * 70/120 ms: ends 1300 + 40.833..
    #   arrives 1500: 2000 m: 70 ms.
    req = RequestSet.from_arrays([1100.0, 1250.0, 1500.0], budget_ms=800.0, duration_ms=3000.0)
    pol = Scripted({1000.0: Decision(2000, 1)})
    r = simulate(req, MODEL, pol, cfg(1000, resize_delay_ms=300.0))
    assert r.server_ms[0] == 120.0
    assert r.server_ms[1] == pytest.approx(1300.0 + 70.0 * 70.0 / 120.0 - 1250.0, abs=1e-9)
    assert r.server_ms[2] == 70.0
    assert r.cpu_m.tolist() == [1000, 1000, 2000]  # CPU in force when the batch started
    # cost: 1 core until 1300, 2 cores after, until the run ends at 3000
    assert r.core_seconds == pytest.approx((1300 * 1000 + 1700 * 2000) / 1e6)


def test_cold_start_delays_a_new_replica():
    # At t=1000 the policy asks for a second replica; it is ready at 1000 + 2000 = 3000.
    # 30 requests arrive at 1500 (b = 1, 120 ms each): replica 1 finishes 12 of them by 2940 alone;
    # at 3000 replica 2 takes the next one (ends 3120) while replica 1 ends its 13th at 3060.
    req = RequestSet.from_arrays(np.full(30, 1500.0), budget_ms=10_000.0, duration_ms=5000.0)
    pol = Scripted({1000.0: Decision(1000, 1, 2)})
    r = simulate(req, MODEL, pol, cfg(1000, cold_start_ms=2000.0))
    finish = np.sort(1500.0 + r.server_ms)
    np.testing.assert_allclose(finish[:12], 1500.0 + 120.0 * np.arange(1, 13))
    assert finish[12] == 3060.0 and finish[13] == 3120.0
    assert pol.seen[1].replicas_starting == 1 and pol.seen[1].current.replicas == 2  # at t = 2000
    assert pol.seen[3].replicas_starting == 0  # at t = 4000
    # the starting replica costs from the decision on: 1 core x 1 s + 2 cores until the end
    assert r.core_seconds == pytest.approx(1.0 + 2.0 * (r.end_ms - 1000.0) / 1000.0)


# ---- policies: the real ones, and what they must do -----------------------------------------------------
def test_static_too_little_cpu_misses_enough_cpu_meets():
    send = np.arange(0, 60_000, 125.0)  # 8 req/s
    req = RequestSet.from_arrays(send, budget_ms=500.0, duration_ms=60_000.0)
    low = simulate(req, MODEL, static(500), cfg(500))  # l(1, 500 m) = 220 ms: 4.5 req/s < 8
    high = simulate(req, MODEL, static(2000), cfg(2000))  # 70 ms per request
    assert low.attainment < 0.7
    assert high.attainment == 1.0
    assert high.core_seconds == pytest.approx(120.0)


def test_the_simulator_calls_the_live_policy_objects_with_live_observations():
    class Recording(SpongeOptimizer):  # the real optimizer, observed
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.obs: list[Observation] = []

        def decide(self, obs: Observation) -> Decision:
            self.obs.append(obs)
            return super().decide(obs)

    req = _random_requests(n_s=20, rate=20.0)
    pol = Recording(MODEL, max_cpu_m=4000)
    assert isinstance(make_policy("sponge", MODEL), SpongeOptimizer)
    # per-batch CPU off: the usage bound below is the interval decision's (per-batch boosts exceed it)
    r = simulate(req, MODEL, pol, SimConfig(budget_window_ms=3000.0, per_batch=False))
    assert len(pol.obs) >= 20
    prev_cpu = 0
    for o in pol.obs:
        assert isinstance(o, Observation) and isinstance(o.current, Decision)
        assert list(o.queue_remaining_ms) == sorted(o.queue_remaining_ms)
        assert o.rate_history_rps[-1] == o.arrival_rate_rps
        assert len(o.cpu_usage_m) == o.current.replicas - o.replicas_starting
        # the previous allocation stays in force for the resize delay at the start of the interval
        assert all(0.0 <= u <= max(o.current.cpu_m, prev_cpu) + 1e-9 for u in o.cpu_usage_m)
        prev_cpu = o.current.cpu_m
        recent = (req.send_ms > o.now_ms - 3000.0 - 1000.0) & (req.send_ms <= o.now_ms)  # as sponge.control
        assert sorted(o.budgets_ms) == sorted(req.budget_ms[recent].tolist())
    assert sum(o.arrival_rate_rps for o in pol.obs) == pytest.approx(len(req) - np.sum(req.send_ms > pol.obs[-1].now_ms))
    assert r.policy == "sponge"


def _step_load(low: float, high: float, step_s: int, total_s: int) -> RequestSet:
    # uniform arrivals: `low` req/s before the step, `high` after, budget 800 ms
    a = np.arange(0, step_s * 1000.0, 1000.0 / low)
    b = np.arange(step_s * 1000.0, total_s * 1000.0, 1000.0 / high)
    return RequestSet.from_arrays(np.concatenate((a, b)), budget_ms=800.0, duration_ms=total_s * 1000.0)


def test_hpa_scales_out_on_a_step_and_waits_before_scaling_in():
    req = _step_load(2.0, 20.0, 20, 60)  # l(1, 1000) = 120 ms: one replica serves ~8 req/s
    pol = HPALikePolicy(cpu_m=1000, batch=1, sync_period_ms=5000.0, scale_down_window_ms=300_000.0, max_replicas=8)
    r = simulate(req, MODEL, pol, SimConfig(cold_start_ms=3000.0))
    reps = {int(t.t_ms): t.replicas for t in r.timeline}
    assert reps[20_000] == 1  # before the step
    assert max(reps.values()) >= 3  # it scaled out after it
    first_out = min(t for t, n in reps.items() if n > 1)
    assert 20_000 < first_out <= 20_000 + 5000 + 1000  # within one sync period (+ the interval)
    after = [n for t, n in reps.items() if t >= first_out]
    assert after == sorted(after)  # no scale-in within the 300 s stabilisation window


def test_fa2_and_static_and_paper_on_a_step():
    req = _step_load(4.0, 16.0, 20, 40)
    fa2 = simulate(req, MODEL, make_policy("fa2", MODEL, cpu_m=1000, max_batch=8), SimConfig(cold_start_ms=1000.0))
    # FA2: the largest b with l(b, 1000) <= 0.9 * 800 = 720 -> b = 7 (720 ms); h = 7000/720 req/s per
    # replica, so ceil(16 / 9.72) = 2 replicas at the high load and 1 at the low one.
    low = [t for t in fa2.timeline if 5_000 <= t.t_ms <= 20_000]
    high = [t for t in fa2.timeline if 25_000 <= t.t_ms <= 40_000]
    assert {t.replicas for t in low} == {1} and {t.replicas for t in high} == {2}
    assert {t.batch for t in high} == {7}
    st = simulate(req, MODEL, static(3000, 2), cfg(3000, 2))
    assert {t.cpu_m for t in st.timeline} == {3000} and st.attainment == 1.0
    paper = simulate(req, MODEL, make_policy("paper", MODEL, max_cores=4, max_batch=8), cfg(1000))
    cores = {int(t.t_ms): t.cpu_m for t in paper.timeline}
    assert cores[30_000] > cores[15_000]  # more load, more (whole) cores
    assert all(c % 1000 == 0 for c in cores.values())


def test_written_run_reads_back_for_sponge_report(tmp_path):
    req = _random_requests(n_s=10)
    r = simulate(req, MODEL, static(2000, 2), cfg(2000, 2))
    d = r.write(tmp_path / "run")
    reqs, tl, meta = read_run(d)
    assert len(reqs) == len(req) and [x.id for x in reqs] == list(range(len(req)))
    s = summarize(reqs, tl)
    assert s.attainment == pytest.approx(r.attainment)
    assert s.core_seconds == pytest.approx(r.core_seconds, rel=1e-3)
    assert meta["kind"] == "simulation" and meta["policy"] == "static"
    assert (d / "decisions.jsonl").is_file()
    assert all(math.isclose(x.e2e_ms, x.network_ms + x.server_ms) for x in reqs if x.outcome == "ok")
