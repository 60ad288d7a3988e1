"""Live core-seconds bill the CPU in force over each interval, as applied (clamped, rounded by the actuator,
changed mid-interval by someone else), time-weighted — the quantity the simulator bills exactly.

The live chain is real (Controller -> LiveApplier -> ReplicaScaler -> actuator; LiveView; the decision
log as `sponge load` fetches it); only the clock, the replica processes and the actuator are fakes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sponge.control import Controller
from sponge.perf.latency_model import LatencyModel
from sponge.policy.types import Decision
from sponge.report.summary import core_seconds
from sponge.scheduling.batcher import ExpiryPolicy
from sponge.server.core import ServingCore
from sponge.server.live import LiveApplier, LiveView
from sponge.server.metrics import Metrics
from sponge.server.scaler import ReplicaScaler
from sponge.sim import RequestSet, SimConfig, simulate
from sponge.workload import loadgen
from test_sim import Scripted


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeReplica:
    def __init__(self, name: str) -> None:
        self.name = name
        self.threads = 1
        self.on_start = None
        self.on_death = None
        self.ready = True

    def set_threads(self, n: int) -> None:
        self.threads = n


class RoundingActuator:
    """Rounds up to 100 m, as a coarse actuator would."""

    kind = "fake"
    granularity_m = 100

    def __init__(self, cpu_m: int) -> None:
        self._cpu = cpu_m

    def attach(self, pid: int) -> None:
        pass

    def apply(self, cpu_m: int) -> None:
        self._cpu = math.ceil(cpu_m / 100) * 100

    def current(self) -> int:
        return self._cpu

    def close(self) -> None:
        pass




def live_setup(policy, initial: Decision, replicas: int = 1, min_cpu_m: int = 200, max_cpu_m: int = 3000):
    clock = Clock()
    reps = [FakeReplica(f"r{i}") for i in range(replicas)]
    core = ServingCore("m", reps, initial.batch, 16, ExpiryPolicy.REJECT, 0.0, Metrics(), initial.cpu_m,
                       clock=clock)
    scaler = ReplicaScaler(core, {r.name: RoundingActuator(initial.cpu_m) for r in reps}, min_cpu_m, max_cpu_m)
    ctl = Controller(policy, LiveView(core, scaler), LiveApplier(core, scaler, max_batch=8), initial,
                     interval_ms=1000.0, clock=clock)
    return clock, scaler, ctl


def fetched_timeline(monkeypatch, ctl: Controller, since_ms: float = 0.0):
    """What `sponge load` makes of the server's decision log (fetch_timeline over a faked HTTP GET)."""

    class Resp:
        def raise_for_status(self) -> None:
            pass

        def json(self):
            return {"decisions": [e.as_dict() for e in ctl.decisions if e.t_ms > since_ms]}

    monkeypatch.setattr(loadgen.httpx, "get", lambda *a, **kw: Resp())
    return loadgen.fetch_timeline("http://server", "token", since_ms)


def test_billed_core_seconds_are_the_integral_of_the_applied_cpu(monkeypatch):
    policy = Scripted({1000.0: Decision(1550, 1), 2000.0: Decision(5000, 1), 4000.0: Decision(100, 1)})
    clock, scaler, ctl = live_setup(policy, Decision(1000, 1))
    for t in (1000.0, 2000.0, 2500.0, 3000.0, 4000.0, 5000.0):
        clock.t = t
        if t == 2500.0:
            scaler.resize_all(450)  # someone else (the admin API, a prober) resizes mid-interval
        else:
            ctl.tick()
    # applied: 1000 m until 1000; 1600 (1550 rounded up) until 2000; 3000 (5000 clamped) until 2500;
    # 500 (450 rounded) until 4000 (the decision at 3000 repeats 5000: nothing re-applied); then 200 (clamped)
    exact_m_ms = 1000 * 1000 + 1600 * 1000 + 3000 * 500 + 500 * 500 + 500 * 1000 + 200 * 1000
    assert [e.total_cpu_m for e in ctl.decisions] == [1000, 1600, 1750, 500, 200]
    timeline = fetched_timeline(monkeypatch, ctl)
    cs, dur = core_seconds(timeline)
    assert dur == 5.0
    assert cs == pytest.approx(exact_m_ms / 1e6, abs=1e-9)


def test_all_replicas_are_billed(monkeypatch):
    policy = Scripted({1000.0: Decision(700, 1, 2)})
    clock, scaler, ctl = live_setup(policy, Decision(1000, 1, 2), replicas=2)
    for t in (1000.0, 2000.0):
        clock.t = t
        ctl.tick()
    assert [e.total_cpu_m for e in ctl.decisions] == [2000, 1400]
    assert core_seconds(fetched_timeline(monkeypatch, ctl))[0] == pytest.approx(3.4)


def test_live_and_simulator_bill_the_same_schedule_alike(monkeypatch):
    # One replica, decisions at the ticks (in range, on the actuator's 100 m grid), resized at once.
    script = {1000.0: Decision(1600, 1), 2000.0: Decision(3000, 2), 3000.0: Decision(500, 1),
              4000.0: Decision(200, 1)}
    initial = SimConfig(initial_cpu_m=1000).initial()
    clock, _, ctl = live_setup(Scripted(dict(script)), initial)
    for t in (1000.0, 2000.0, 3000.0, 4000.0, 5000.0):
        clock.t = t
        ctl.tick()
    live_cs = core_seconds(fetched_timeline(monkeypatch, ctl))[0]

    model = LatencyModel(g=100.0, d=0.0, e=0.0, h=20.0)
    no_requests = RequestSet.from_arrays(np.zeros(0), budget_ms=100.0, duration_ms=5000.0)
    sim = simulate(no_requests, model, Scripted(dict(script)), SimConfig(initial_cpu_m=1000, resize_delay_ms=0.0))
    exact = (1000 + 1600 + 3000 + 500 + 200) * 1000 / 1e6
    assert sim.core_seconds == pytest.approx(exact)
    assert core_seconds(sim.timeline)[0] == pytest.approx(exact)
    assert live_cs == pytest.approx(exact)
    assert [r.total_cpu_m for r in sim.timeline] == [e.total_cpu_m for e in ctl.decisions]
