"""The controller loop after an event-loop stall: missed ticks are skipped (the schedule re-anchors), and no
tick computes a rate over a sliver of time. Fake clock, fake sleep: no real time passes."""

from __future__ import annotations

import asyncio

import pytest

from sponge.control import Controller
from sponge.policy.types import Decision, Observation

INTERVAL = 1000.0


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class SteadyView:
    """10 requests per second, forever."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def arrivals_total(self) -> int:
        return int(self.clock.t // 100)

    def take_budgets(self):
        return []

    def queue_remaining_ms(self, now_ms: float):
        return []

    def cpu_usage_ns(self):
        return [None]


class Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[Observation] = []

    def decide(self, obs: Observation) -> Decision:
        self.seen.append(obs)
        return obs.current


class NoApply:
    def apply(self, decision: Decision) -> None:
        raise AssertionError("nothing changes")


def run_with_stall(monkeypatch, stall_ms: float, stall_at_sleep: int, ticks: int) -> list[Observation]:
    clock = Clock()
    policy = Recorder()
    sleeps = 0

    async def fake_sleep(seconds: float) -> None:
        nonlocal sleeps
        sleeps += 1
        if len(policy.seen) >= ticks or sleeps > 10 * ticks:
            raise asyncio.CancelledError
        clock.t += max(0.0, seconds) * 1000.0
        if sleeps == stall_at_sleep:
            clock.t += stall_ms  # the event loop was blocked: this sleep returns late

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    c = Controller(policy, SteadyView(clock), NoApply(), Decision(1000, 1), interval_ms=INTERVAL, clock=clock)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(c.run())
    return policy.seen


@pytest.mark.parametrize("stall_ms", [5000.0, 5500.0, 1700.0, 600.0])
def test_after_a_stall_missed_ticks_are_skipped_and_rates_stay_sane(monkeypatch, stall_ms):
    seen = run_with_stall(monkeypatch, stall_ms, stall_at_sleep=3, ticks=10)
    assert len(seen) == 10
    times = [o.now_ms for o in seen]
    gaps = [b - a for a, b in zip([0.0] + times, times)]
    assert min(gaps) >= INTERVAL / 2, gaps  # never a rate over a sliver
    assert all(9.0 <= o.arrival_rate_rps <= 11.0 for o in seen), [o.arrival_rate_rps for o in seen]
    # one long interval covers the stall, then the schedule goes on from there
    assert sum(g > 1.5 * INTERVAL for g in gaps) <= 1
    assert all(g == INTERVAL for g in gaps[-5:])


def test_without_a_stall_the_schedule_is_exact(monkeypatch):
    seen = run_with_stall(monkeypatch, 0.0, stall_at_sleep=3, ticks=6)
    assert [o.now_ms for o in seen] == [1000.0 * k for k in range(1, 7)]
    assert all(o.arrival_rate_rps == 10.0 for o in seen)
