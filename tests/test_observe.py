"""One observation builder for the live controller and the simulator: fed the same events, both hand the
policy identical Observations (rates, budgets stamped by arrival time, backlog, usage, served batches)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from sponge.config import ServerConfig
from sponge.control import Controller
from sponge.observe import ObservationBuilder
from sponge.perf.latency_model import LatencyModel
from sponge.perf.samples import BatchSample
from sponge.policy.types import Decision, Observation
from sponge.scheduling.batcher import Batcher
from sponge.scheduling.estimate import OnlineServiceEstimate
from sponge.sim import RequestSet, SimConfig, Simulator


@dataclass
class Recorder:
    name: str = "recorder"
    seen: list[Observation] = field(default_factory=list)

    def decide(self, obs: Observation) -> Decision:
        self.seen.append(obs)
        return obs.current


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# l(b, c) = 100 b / c + 20 ms: one image at 2000 m takes 70 ms.
MODEL = LatencyModel(g=100.0, d=0.0, e=0.0, h=20.0)
SEND = [50.0 + 100.0 * k for k in range(30)]  # 10 req/s, never at a tick instant
BUDGET = [500.0 + k for k in range(30)]
SERVICE, CPU = 70.0, 2000


class ScriptedServer:
    """The live view of a server that saw exactly what the simulator will simulate: request k arrives at
    SEND[k] and is served alone at once on 2000 m, in 70 ms (nothing ever queues)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._budgets_seen = 0
        self._batches_seen = 0.0

    def arrivals_total(self) -> int:
        return sum(s <= self.clock.t for s in SEND)

    def take_budgets(self):
        now, k0 = self.clock.t, self._budgets_seen
        new = [(s, b) for s, b in zip(SEND, BUDGET) if s <= now][k0:]
        self._budgets_seen += len(new)
        return new

    def queue_remaining_ms(self, now_ms: float):
        return []

    def cpu_usage_ns(self):
        now = self.clock.t
        busy_ms = sum(max(0.0, min(now, s + SERVICE) - s) for s in SEND if s <= now)
        return [int(round(busy_ms * CPU * 1000))]  # millicore-ms -> ns

    def take_batches(self):
        now, last = self.clock.t, self._batches_seen
        self._batches_seen = now
        return [BatchSample(1, CPU, SERVICE, s + SERVICE) for s in SEND if last < s + SERVICE <= now]

    def cpu_allocated_mms(self, now_ms: float) -> float:
        return CPU * now_ms


def test_live_controller_and_simulator_build_identical_observations():
    cfg = SimConfig(initial_cpu_m=CPU, initial_batch=1)
    sim_policy = Recorder()
    sim = Simulator(RequestSet.from_arrays(SEND, BUDGET, duration_ms=3000.0), MODEL, sim_policy, cfg)
    res = sim.run()
    assert res.counts()["ok"] == 30 and np.all(res.server_ms == SERVICE)

    clock = Clock()
    live_policy = Recorder()
    ctl = Controller(live_policy, ScriptedServer(clock), applier=None, initial=cfg.initial(),  # type: ignore[arg-type]
                     interval_ms=cfg.interval_ms, clock=clock)
    for t in (1000.0, 2000.0, 3000.0):
        clock.t = t
        ctl.tick()

    assert len(sim_policy.seen) == 3
    for live, simulated in zip(live_policy.seen, sim_policy.seen):
        assert live == simulated
    first = live_policy.seen[0]
    assert first.arrival_rate_rps == 10.0 and first.budgets_ms == tuple(BUDGET[:10])
    assert first.cpu_usage_m == (1360.0,)  # 9 batches of 70 ms + 50 ms of the running one, at 2000 m
    assert [b.t_ms for b in first.batches] == [120.0 + 100.0 * k for k in range(9)]
    assert len(live_policy.seen[1].batches) == 10
    assert [e.total_cpu_m for e in ctl.decisions] == [r.total_cpu_m for r in res.timeline[:3]] == [CPU] * 3


def test_budgets_are_stamped_with_their_arrival_time_not_the_tick():
    # Collected at the tick at 1000: budgets that arrived at 100 and at 990. At a (late) tick at 11 500 the
    # window (the last 10 s + one interval, by arrival time) holds the one of 990 but not the one of 100 —
    # whenever the ticks happened to be (stamped with the tick, both would count as 1000: both dropped).
    b = ObservationBuilder(interval_ms=1000.0)
    d = Decision(1000, 1)
    b.observe(1000.0, 2, [(100.0, 300.0), (990.0, 400.0)], (), {}, d)
    obs = b.observe(11_500.0, 2, [], (), {}, d)
    assert obs.budgets_ms == (400.0,)


def test_builder_bounds_budgets_keeping_the_newest():
    b = ObservationBuilder(interval_ms=1000.0, max_budgets=3)
    obs = b.observe(1000.0, 5, [(100.0 * k, float(k)) for k in range(5)], (), {}, Decision(1000, 1))
    assert obs.budgets_ms == (2.0, 3.0, 4.0)


def test_live_core_records_batches_and_the_view_drains_them():
    from sponge.scheduling.batcher import ExpiryPolicy
    from sponge.server.core import ServingCore
    from sponge.server.live import LiveView
    from sponge.server.metrics import Metrics

    class Rep:
        name = "r0"
        on_start = None

    core = ServingCore("m", [Rep()], 4, 8, ExpiryPolicy.REJECT, 0.0, Metrics(), 1000, clock=lambda: 0.0)
    view = LiveView(core, scaler=None)  # type: ignore[arg-type]
    core.record_batch(BatchSample(3, 1000, 12.0, 5.0))
    assert view.take_batches() == [BatchSample(3, 1000, 12.0, 5.0)]
    assert view.take_batches() == []


def test_batcher_waits_the_same_by_default_live_and_simulated():
    assert SimConfig().max_wait_ms == ServerConfig().max_batch_wait_ms == Batcher(1, lambda b: 0.0).max_wait_ms


def test_service_estimate_after_a_resize_is_a_lower_bound_not_nothing():
    # Live, samples taken at the old allocation still bound the new latency from below (it is never
    # faster than proportionally): no request is expired on a guess, yet the estimate is not 0.
    est = OnlineServiceEstimate(cpu_m=1000)
    est.observe(2, 40.0)
    est.resized(2000)  # more CPU: at most 2x faster
    assert est(2) == pytest.approx(20.0)
    est.resized(500)  # less CPU: at least as slow as measured at 1000 m
    assert est(2) == pytest.approx(40.0)
    est.resized(1000)  # and back: the samples hold again as they are
    assert est(2) == pytest.approx(40.0)
    est.resized(2000)
    est.observe(2, 25.0)  # a sample at the new allocation replaces the old ones
    assert est(2) == 25.0 and est(4) == 50.0
