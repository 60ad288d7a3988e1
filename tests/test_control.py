"""The controller loop with a fake clock, a fake server view and a fake actuator (no real time)."""

from __future__ import annotations

import asyncio

import pytest

from sponge.control import BUDGET_WINDOW_MS, Controller
from sponge.perf.latency_model import LatencyModel
from sponge.policy.registry import make_policy
from sponge.policy.types import Decision, Observation


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeView:
    def __init__(self) -> None:
        self.arrivals = 0
        self.budgets: list[float] = []
        self.queue: list[float] = []  # absolute deadlines
        self.usage = [0]

    def arrivals_total(self) -> int:
        return self.arrivals

    def take_budgets(self) -> list[float]:
        b, self.budgets = self.budgets, []
        return b

    def queue_remaining_ms(self, now_ms: float) -> list[float]:
        return sorted(d - now_ms for d in self.queue)

    def cpu_usage_ns(self) -> list[int]:
        return list(self.usage)


class FakeActuator:
    def __init__(self) -> None:
        self.applied: list[Decision] = []

    def apply(self, decision: Decision) -> None:
        self.applied.append(decision)


class Recorder:
    """A policy that records what it saw and answers a scripted decision."""

    name = "recorder"

    def __init__(self, answers: list[Decision]) -> None:
        self.answers = answers
        self.seen: list[Observation] = []

    def decide(self, obs: Observation) -> Decision:
        self.seen.append(obs)
        return self.answers[min(len(self.seen) - 1, len(self.answers) - 1)]


def make(policy, clock=None, view=None):
    clock = clock or FakeClock()
    view = view or FakeView()
    act = FakeActuator()
    c = Controller(policy, view, act, Decision(2000, 4), interval_ms=1000, clock=clock)
    return c, clock, view, act


def test_observation_rate_budgets_backlog_and_usage():
    policy = Recorder([Decision(1000, 2)])
    c, clock, view, _ = make(policy)
    clock.t = 1000
    view.arrivals = 30
    view.budgets = [400.0, 250.0]
    view.queue = [1300.0, 1100.0]
    view.usage = [500_000_000]  # 0.5 core-seconds in 1 s = 500 m
    c.tick()
    obs = policy.seen[0]
    assert obs.arrival_rate_rps == pytest.approx(30)
    assert obs.rate_history_rps == (30,)
    assert sorted(obs.budgets_ms) == [250, 400]
    assert obs.queue_remaining_ms == (100, 300)
    assert obs.cpu_usage_m == (pytest.approx(500),)
    assert obs.current == Decision(2000, 4)


def test_applies_only_changes_and_tracks_current():
    policy = Recorder([Decision(1000, 2), Decision(1000, 2), Decision(1500, 2)])
    c, clock, _, act = make(policy)
    for i in range(3):
        clock.t += 1000
        c.tick()
    assert [d.cpu_m for d in act.applied] == [1000, 1500]  # the repeated 1000 m was not re-applied
    assert c.current.cpu_m == 1500
    assert policy.seen[2].current.cpu_m == 1000
    assert len(c.decisions) == 3 and c.decisions[-1].cpu_m == 1500


def test_old_budgets_leave_the_window():
    policy = Recorder([Decision(1000, 2)])
    c, clock, view, _ = make(policy)
    clock.t = 1000
    view.budgets = [100.0]
    c.tick()
    clock.t += BUDGET_WINDOW_MS + 1000
    view.budgets = [900.0]
    c.tick()
    assert policy.seen[-1].budgets_ms == (900.0,)


def test_real_sponge_policy_scales_down_when_idle_and_up_under_load():
    model = LatencyModel(g=10.0, d=1.0, e=2.0, h=1.0)  # ms; ~11 ms per image at 1 core
    policy = make_policy("sponge", model, min_cpu_m=100, max_cpu_m=2000, max_batch=8, down_window=2)
    c, clock, view, act = make(policy)
    for _ in range(4):  # idle: no arrivals -> the least CPU after the hysteresis window
        clock.t += 1000
        c.tick()
    assert c.current.cpu_m == 100
    for _ in range(2):  # 80 req/s with 200 ms budgets needs far more than 100 m
        clock.t += 1000
        view.arrivals += 80
        view.budgets = [200.0] * 80
        c.tick()
    assert c.current.cpu_m > 1000 and c.current.feasible
    assert act.applied[-1].cpu_m == c.current.cpu_m


def test_a_failing_policy_does_not_stop_the_loop():
    class Broken:
        name = "broken"
        calls = 0

        def decide(self, obs):
            Broken.calls += 1
            raise RuntimeError("boom")

    c, clock, _, act = make(Broken())

    async def run_briefly():
        c.interval_ms = 1  # real asyncio sleep of ~1 ms per tick
        c.clock = lambda: asyncio.get_running_loop().time() * 1000
        task = asyncio.create_task(c.run())
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run_briefly())
    assert Broken.calls >= 3 and act.applied == []
