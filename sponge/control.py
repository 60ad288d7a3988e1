"""The adaptation loop (DESIGN §1): observe -> decide (a pure policy) -> act, every interval.

I/O lives at the edges: a `ServingView` reads what the server measured, an `Applier` changes it.
The policy object is the same one the simulator calls; the controller never knows which policy runs.
The Observation is built by `sponge.observe.ObservationBuilder`, as in the simulator.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

from sponge.observe import BUDGET_WINDOW_MS, MAX_BUDGETS, RATE_HISTORY, ObservationBuilder
from sponge.perf.samples import BatchSample
from sponge.policy.types import Decision, Observation, Policy

log = logging.getLogger("sponge.control")

__all__ = ["BUDGET_WINDOW_MS", "MAX_BUDGETS", "RATE_HISTORY", "Controller", "DecisionLogEntry", "ServingView"]


class ServingView(Protocol):
    """What the controller reads from the server (or a fake, in tests)."""

    def arrivals_total(self) -> int: ...

    def take_budgets(self) -> Sequence[tuple[float, float]]:
        """(arrival ms, budget ms) of requests that arrived since the last call (a bare budget is taken
        as arriving now)."""
        ...

    def queue_remaining_ms(self, now_ms: float) -> Sequence[float]: ...

    def cpu_usage_ns(self) -> Sequence[int | None] | Mapping[str, int | None]:
        """Cumulative CPU time of each replica (None where it cannot be measured); by name where replicas
        come and go."""
        ...

    # Optional (a view without them observes no batches, and bills the decision in force):
    #   take_batches() -> Sequence[BatchSample]: batches served since the last call;
    #   cpu_allocated_mms(now_ms) -> float: cumulative allocated CPU as applied, all replicas, millicore-ms;
    #   replicas_starting() -> int: replicas ordered and still in their cold start.
    #   front_door_cpu_s() -> float: cumulative CPU seconds the front door (server process, not its
    #   replicas) has used.


class Applier(Protocol):
    """Applies a decision in place (resize replicas, set batch size)."""

    def apply(self, decision: Decision) -> None: ...


@dataclass
class DecisionLogEntry:
    t_ms: float
    policy: str
    arrival_rate_rps: float
    queue_len: int
    cpu_m: int
    batch: int
    replicas: int
    feasible: bool
    explanation: str
    decide_us: float
    total_cpu_m: int = 0  # allocated CPU as applied (all replicas), time-weighted over the interval ending here
    # CPU the front door used over the interval ending here (millicores: CPU ms per second), beside the
    # replicas' allocation; None where the view cannot measure it
    front_door_cpu_m: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Controller:
    """Every `interval_ms`: build an Observation, ask the policy, apply the answer, log it."""

    def __init__(self, policy: Policy, view: ServingView, applier: Applier, initial: Decision,
                 interval_ms: float, clock: Callable[[], float], perf_counter: Callable[[], float] | None = None,
                 log_size: int = 3600, on_decision: Callable[[DecisionLogEntry], None] | None = None) -> None:
        self.policy = policy
        self.view = view
        self.applier = applier
        self.current = initial
        self.interval_ms = interval_ms
        self.clock = clock
        self._perf = perf_counter or time.perf_counter
        self.decisions: deque[DecisionLogEntry] = deque(maxlen=log_size)
        self.on_decision = on_decision
        now = clock()
        self.builder = ObservationBuilder(interval_ms, now, view.arrivals_total(), self._usage_mms(),
                                          self._allocated_mms(now))
        self._front_door_s = self._front_door_cpu_s()
        self.front_door_cpu_m: float | None = None  # over the interval the last observe() closed

    def _front_door_cpu_s(self) -> float | None:
        read = getattr(self.view, "front_door_cpu_s", None)
        return None if read is None else float(read())

    def _usage_mms(self) -> dict[object, float | None]:
        """Per replica, keyed by name when the view gives a mapping (replicas come and go), else by index."""
        usage = self.view.cpu_usage_ns()
        items = usage.items() if isinstance(usage, Mapping) else enumerate(usage)
        return {k: None if u is None else u / 1000.0 for k, u in items}

    def _replicas_starting(self) -> int:
        starting = getattr(self.view, "replicas_starting", None)
        return 0 if starting is None else int(starting())

    def _allocated_mms(self, now: float) -> float | None:
        meter = getattr(self.view, "cpu_allocated_mms", None)
        return None if meter is None else float(meter(now))

    def _batches(self) -> Sequence[BatchSample]:
        take = getattr(self.view, "take_batches", None)
        return () if take is None else take()

    def observe(self) -> Observation:
        now = self.clock()
        view = self.view
        budgets = [b if isinstance(b, tuple) else (now, b) for b in view.take_budgets()]
        since = self.builder.last_t
        fd0, self._front_door_s = self._front_door_s, self._front_door_cpu_s()
        self.front_door_cpu_m = (None if fd0 is None or self._front_door_s is None
                                 else (self._front_door_s - fd0) * 1e6 / max(1e-6, now - since))
        return self.builder.observe(now, view.arrivals_total(), budgets, view.queue_remaining_ms(now),
                                    self._usage_mms(), self.current, replicas_starting=self._replicas_starting(),
                                    batches=self._batches(),
                                    allocated_mms=self._allocated_mms(now))

    def tick(self) -> DecisionLogEntry:
        obs = self.observe()
        t0 = self._perf()
        decision = self.policy.decide(obs)
        decide_us = (self._perf() - t0) * 1e6
        if (decision.cpu_m, decision.batch, decision.replicas) != (
                self.current.cpu_m, self.current.batch, self.current.replicas):
            self.applier.apply(decision)
        self.current = decision
        entry = DecisionLogEntry(obs.now_ms, self.policy.name, obs.arrival_rate_rps, len(obs.queue_remaining_ms),
                                 decision.cpu_m, decision.batch, decision.replicas, decision.feasible,
                                 decision.explanation, decide_us, int(round(self.builder.total_cpu_m)),
                                 None if self.front_door_cpu_m is None else round(self.front_door_cpu_m, 3))
        self.decisions.append(entry)
        if self.on_decision is not None:
            self.on_decision(entry)
        log.info("decision %s: %d m, batch %d, %d replica(s)%s — %s", self.policy.name, decision.cpu_m,
                 decision.batch, decision.replicas, "" if decision.feasible else " (INFEASIBLE)",
                 decision.explanation)
        return entry

    async def run(self) -> None:
        """Tick every interval until cancelled; a failing tick is logged, never fatal.

        After a stall (a blocked event loop, a slow tick) the missed ticks are skipped, not fired back to
        back: the schedule re-anchors on the late tick. No tick comes less than half an interval after the
        previous observation (a rate over a sliver of time is noise: 0, or a spike)."""
        half = self.interval_ms / 2.0
        next_t = self.clock() + self.interval_ms
        while True:
            await asyncio.sleep(max(0.0, (next_t - self.clock()) / 1000.0))
            now = self.clock()
            if now - self.builder.last_t < half:  # too soon: merge into the next tick
                next_t = self.builder.last_t + self.interval_ms
                continue
            next_t += self.interval_ms
            if next_t <= now:  # slept through whole intervals: skip them
                log.warning("controller tick %.0f ms late (event loop stalled?): skipping the missed ticks",
                            now - (next_t - self.interval_ms))
                next_t = now + self.interval_ms
            try:
                self.tick()
            except Exception:
                log.exception("controller tick failed; keeping the current allocation until the next one")
