"""The adaptation loop (DESIGN §1): observe -> decide (a pure policy) -> act, every interval.

I/O lives at the edges: a `ServingView` reads what the server measured, an `Applier` changes it.
The policy object is the same one the simulator calls; the controller never knows which policy runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from sponge.policy.types import Decision, Observation, Policy

log = logging.getLogger("sponge.control")

BUDGET_WINDOW_MS = 10_000.0  # budgets of requests that arrived in the last 10 s describe "recent"
MAX_BUDGETS = 5_000  # ... but never more than this many (bounded memory, bounded decide() time)
RATE_HISTORY = 60  # intervals of arrival rate kept for predictors


class ServingView(Protocol):
    """What the controller reads from the server (or a fake, in tests)."""

    def arrivals_total(self) -> int: ...

    def take_budgets(self) -> Sequence[float]:
        """Budgets (ms) of requests that arrived since the last call."""
        ...

    def queue_remaining_ms(self, now_ms: float) -> Sequence[float]: ...

    def cpu_usage_ns(self) -> Sequence[int | None]:
        """Cumulative CPU time of each replica (None where it cannot be measured)."""
        ...


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
        self._rates: deque[float] = deque(maxlen=RATE_HISTORY)
        self._budgets: deque[tuple[float, float]] = deque(maxlen=MAX_BUDGETS)  # (arrival tick ms, budget)
        self._last_t = clock()
        self._last_arrivals = view.arrivals_total()
        self._last_usage = list(view.cpu_usage_ns())

    def observe(self) -> Observation:
        now = self.clock()
        elapsed_ms = max(1e-6, now - self._last_t)
        arrivals = self.view.arrivals_total()
        rate = (arrivals - self._last_arrivals) * 1000.0 / elapsed_ms
        self._rates.append(rate)
        for b in self.view.take_budgets():
            self._budgets.append((now, b))
        while self._budgets and self._budgets[0][0] < now - BUDGET_WINDOW_MS:
            self._budgets.popleft()
        usage = list(self.view.cpu_usage_ns())
        cpu_usage_m = tuple(
            (u - u0) / 1e6 / elapsed_ms * 1000.0 if u is not None and u0 is not None else float("nan")
            for u, u0 in zip(usage, self._last_usage)
        )
        self._last_t, self._last_arrivals, self._last_usage = now, arrivals, usage
        return Observation(
            now_ms=now,
            interval_ms=self.interval_ms,
            arrival_rate_rps=rate,
            rate_history_rps=tuple(self._rates),
            budgets_ms=tuple(b for _, b in self._budgets),
            queue_remaining_ms=tuple(self.view.queue_remaining_ms(now)),
            current=self.current,
            cpu_usage_m=cpu_usage_m,
        )

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
                                 decision.explanation, decide_us)
        self.decisions.append(entry)
        if self.on_decision is not None:
            self.on_decision(entry)
        log.info("decision %s: %d m, batch %d, %d replica(s)%s — %s", self.policy.name, decision.cpu_m,
                 decision.batch, decision.replicas, "" if decision.feasible else " (INFEASIBLE)",
                 decision.explanation)
        return entry

    async def run(self) -> None:
        """Tick every interval until cancelled; a failing tick is logged, never fatal."""
        next_t = self.clock() + self.interval_ms
        while True:
            await asyncio.sleep(max(0.0, (next_t - self.clock()) / 1000.0))
            next_t += self.interval_ms
            try:
                self.tick()
            except Exception:
                log.exception("controller tick failed; keeping the current allocation until the next one")
