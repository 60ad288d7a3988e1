"""A clairvoyant vertical policy: an ACHIEVABLE reference, to bracket the optimum from above.

The oracle (sponge.sim.oracle) bounds the least possible cost from below; this policy shows what perfect
knowledge buys in practice. Each interval it knows the true arrivals and budgets of the next `lookahead_intervals` intervals
and picks the least CPU on the millicore grid (then the least batch) under which a replay of that
interval — the queue in force plus those arrivals, served in EDF order in greedy batches of up to b,
after the running batch (re-timed by the resize as the simulator does, its own deadlines checked) —
meets every saveable deadline. Whatever it spends in the simulator is spent by a real schedule, so when it meets
every budget its cost is an upper bound on the optimum of the vertical action space: the optimum lies
between the oracle bound and this.

It reads the future, so it lives in the simulator, never in sponge.policy, and cannot run live.
"""

from __future__ import annotations

import heapq

import numpy as np

from sponge.perf.latency_model import LatencyModel
from sponge.policy.types import Decision, Observation
from sponge.sim.inputs import RequestSet
from sponge.sim.oracle import ActionSpace

BATCHES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16)


class ClairvoyantVertical:
    """Least CPU per interval with hindsight, one replica (see the module docstring)."""

    name = "clairvoyant"

    def __init__(self, requests: RequestSet, model: LatencyModel, space: ActionSpace, *, step_m: int = 50,
                 batches: tuple[int, ...] = BATCHES, lookahead_intervals: float = 2.0) -> None:
        self.lookahead = lookahead_intervals
        self.model, self.space = model, space
        self.send = requests.send_ms
        self.dl = requests.send_ms + requests.budget_ms
        self.grid = np.arange(space.min_cpu_m, space.max_cpu_m + 1, step_m)
        if self.grid[-1] != space.max_cpu_m:
            self.grid = np.append(self.grid, space.max_cpu_m)
        self.batches = tuple(b for b in batches if b <= space.max_batch)
        bmax = max(self.batches)
        # lat[ci][k] = l(k, grid[ci]) for k = 0..bmax
        self.lat = [[0.0] + [float(model.latency_ms(k, float(c))) for k in range(1, bmax + 1)] for c in self.grid]
        self.hopeless_ms = float(model.latency_ms(1, space.max_cpu_m))
        self.sim = None

    def bind_simulator(self, sim) -> None:  # noqa: ANN001 - the engine's Simulator
        """Called by the engine: lets the reference policy see the running batch (not in Observation)."""
        self.sim = sim

    def _running(self, t: float, cpu_new: float) -> tuple[float, bool]:
        """(time the replica is free, whether the running batch still meets its deadlines) at cpu_new."""
        sim = self.sim
        if sim is None:
            return t, True
        free, ok = t, True
        delay = sim.cfg.resize_delay_ms
        for rep in sim.live:
            if not rep.busy:
                continue
            rem = rep.finish - t
            if rem > delay and cpu_new != sim.cpu:
                scale = float(self.model.latency_ms(rep.size, cpu_new)) / float(self.model.latency_ms(rep.size, sim.cpu))
                rem = delay + (rem - delay) * scale
            fin = t + rem
            tight = min(sim._deadline[i] for i in rep.batch)
            if fin > tight and rep.finish <= tight:
                ok = False  # this allocation would make a batch that was on time late
            free = max(free, fin)
        return free, ok

    def _misses(self, ci: int, b: int, start: float, jobs: list[tuple[float, float]], stop_at: int = 1) -> int:
        """Replay: jobs (arrival, deadline) sorted by arrival, replica free at `start`; the number of late
        jobs, counting stops at `stop_at` (1: a feasibility test)."""
        lat = self.lat[ci]
        heap: list[float] = []
        f, i, n, late = start, 0, len(jobs), 0
        while i < n or heap:
            while i < n and jobs[i][0] <= f:
                heapq.heappush(heap, jobs[i][1])
                i += 1
            if not heap:
                f = jobs[i][0]
                continue
            k = min(b, len(heap))
            fin = f + lat[k]
            for _ in range(k):
                if heapq.heappop(heap) < fin:
                    late += 1
                    if late >= stop_at:
                        return late
            f = fin
        return late

    def decide(self, obs: Observation) -> Decision:
        t, interval = obs.now_ms, obs.interval_ms
        lo = int(np.searchsorted(self.send, t, side="right"))
        hi = int(np.searchsorted(self.send, t + self.lookahead * interval, side="right"))
        jobs = [(t, t + r) for r in obs.queue_remaining_ms if r >= self.hopeless_ms]
        jobs += [(float(a), float(d)) for a, d in zip(self.send[lo:hi], self.dl[lo:hi]) if d - a >= self.hopeless_ms]
        cur = obs.current
        if self.sim is None:  # unbound: assume one whole batch at the current allocation is running
            block = float(self.model.latency_ms(cur.batch, float(cur.cpu_m)))
            starts = [(t + block, True)] * len(self.grid)
        else:
            starts = [self._running(t, float(c)) for c in self.grid]

        def feasible(ci: int, b: int) -> bool:
            start, ok = starts[ci]
            return ok and self._misses(ci, b, start, jobs) == 0

        best: tuple[int, int] | None = None
        top = len(self.grid) - 1
        for b in self.batches:
            if best is not None and not feasible(best[0], b):
                continue  # cannot beat the best so far
            if not feasible(top, b):
                continue
            lo_i, hi_i = -1, top if best is None else best[0]  # hi_i feasible
            while hi_i - lo_i > 1:
                mid = (lo_i + hi_i) // 2
                if feasible(mid, b):
                    hi_i = mid
                else:
                    lo_i = mid
            if best is None or hi_i < best[0]:
                best = (hi_i, b)
        if best is None:  # nothing replays cleanly: full speed, the batch that loses fewest
            start = starts[top][0]
            late = {b: self._misses(top, b, start, jobs, stop_at=len(jobs) + 1) for b in self.batches}
            b = min(late, key=lambda k: (late[k], k))
            return Decision(int(self.grid[-1]), b, 1, False,
                            f"clairvoyant: {len(jobs)} jobs infeasible even at max CPU; b={b} loses {late[b]}")
        ci, b = best
        return Decision(int(self.grid[ci]), b, 1, True,
                        f"clairvoyant: {len(jobs)} jobs of the next {self.lookahead * interval:g} ms -> {int(self.grid[ci])}m b={b}")


def clairvoyant_policy(requests: RequestSet, model: LatencyModel, space: ActionSpace, **kw: object) -> ClairvoyantVertical:
    return ClairvoyantVertical(requests, model, space, **kw)  # type: ignore[arg-type]


__all__ = ["ClairvoyantVertical", "clairvoyant_policy"]
