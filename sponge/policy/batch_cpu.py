"""Per-batch CPU: the least allocation that serves the work actually present by its deadlines. Pure.

The controller's interval decision provisions for the load it expects (`SpongeOptimizer`); between two
decisions, requests arrive and batches start. An in-place resize takes effect within one 10 ms CFS period
on a local cgroup (`bench/resize.py`: in effect p99 5 ms, threads follow p99 13 ms), so the allocation can
follow the queue itself: at every arrival, batch start and batch end the server asks `BatchCpuSizer.size` for the
least CPU on the grid, never below the interval decision (`floor_cpu_m`), under which

  * the running batch (if any) still finishes by its tightest saveable deadline, and
  * the queued requests, served after it in EDF order in greedy batches of at most `batch` images
    (what the batcher forms), each finish by their own deadline,

where the new allocation takes effect only `delay_ms` after the call (the work until then runs at the
allocation in force) and latencies are the model's divided by `safety` (its measured error). With nothing
running and nothing queued it answers `idle_cpu_m`: an idle replica needs no CPU, and the next arrival
raises it again within `delay_ms` (that cost is in the arithmetic above).

Two more conditions keep just-in-time sizing from deferring work it will need later: while work is
queued, the batches must keep up with the last second's arrivals (`recent_rate_rps`: a queue served just
in time falls behind in overload), and besides the batch cap in force it tries larger caps on a doubling
ladder, taking the one that needs the least CPU (a larger batch keeps up at less).

Requests that no allocation can save (deadline sooner than one batch of their own at full CPU) impose no
constraint; the batcher answers them at once and they take no time. Where the server serves late
requests anyway (`serves_late`), such a request in the queue means overload: the answer is the top
allocation, with the cap that loses the fewest of the others. If even the top allocation misses a
saveable deadline, the answer is the top allocation and the cap that misses the fewest saveable requests
there (a larger batch is not always better: it also takes longer).

Only the first `max_queued` queued requests are checked (later ones are the interval decision's
business: a queue that long is already served at a high allocation).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from sponge.perf.latency_model import LatencyModel
from sponge.policy.types import BatchCpu, RunningBatch

DEFAULT_MAX_QUEUED = 128


class BatchCpuSizer:
    """Least grid CPU meeting the present work's deadlines (see the module docstring)."""

    def __init__(self, model: LatencyModel, grid_m: Sequence[int] | np.ndarray, max_batch: int,
                 max_queued: int = DEFAULT_MAX_QUEUED, keep_up: bool = True, search_caps: str = "none") -> None:
        if search_caps not in ("none", "larger", "all"):
            raise ValueError("search_caps must be none, larger or all")
        self.search_caps = search_caps
        self.keep_up = keep_up
        self.grid = np.asarray(grid_m, dtype=np.int64)
        if self.grid.size == 0 or np.any(np.diff(self.grid) <= 0):
            raise ValueError("grid_m must be non-empty and increasing")
        self.max_batch = int(max_batch)
        self.max_queued = int(max_queued)
        sizes = np.arange(1, self.max_batch + 1)
        # lat[s, ci] = l(s, grid[ci]) for s = 1..max_batch (row 0 unused): one table for every call
        lat = np.asarray(model.latency_ms(sizes[:, None], self.grid[None, :].astype(float)), dtype=float)
        self.lat = np.vstack([np.zeros((1, self.grid.size)), lat])
        self.model = model

    def _row(self, images: int) -> np.ndarray:
        """l(images, c) over the grid; a request larger than the table is one batch of its own size."""
        if images <= self.max_batch:
            return self.lat[images]
        return np.asarray(self.model.latency_ms(images, self.grid.astype(float)), dtype=float)

    def _index(self, cpu_m: float) -> int:
        """Grid index of the allocation in force (the nearest grid point at or below; at least 0)."""
        return int(max(0, min(np.searchsorted(self.grid, cpu_m, side="right") - 1, self.grid.size - 1)))

    def size(
        self,
        queue_remaining_ms: Sequence[float],
        queue_images: Sequence[int],
        *,
        batch: int,
        current_cpu_m: float,
        floor_cpu_m: float,
        idle_cpu_m: float,
        running: RunningBatch | None = None,
        delay_ms: float = 0.0,
        safety: float = 1.0,
        serves_late: bool = False,
        recent_rate_rps: float = 0.0,
    ) -> BatchCpu:
        """The allocation to apply now and the batch cap for the next batches; see the module docstring."""
        n = min(len(queue_remaining_ms), self.max_queued)
        if running is None and n == 0:
            return BatchCpu(int(idle_cpu_m), batch)
        grid, top = self.grid, self.grid.size - 1
        lo = int(np.searchsorted(grid, floor_cpu_m, side="left"))
        if lo > top:
            return BatchCpu(int(grid[top]), batch)
        inv = 1.0 / safety
        c0 = self._index(current_cpu_m)
        free = np.zeros(grid.size)  # when the replica is free, per candidate allocation
        ok = np.ones(grid.size, dtype=bool)
        if running is not None and running.remaining_ms > 0:
            row = self._row(running.images)
            free = self._switch(running.remaining_ms * inv, row / row[c0], delay_ms)
            if running.deadline_ms >= free[top]:  # saveable: protect it
                ok &= free <= running.deadline_ms
            starts_now = False
        else:
            starts_now = True  # the next batch starts now, at the allocation in force until the resize
        rem = np.asarray(queue_remaining_ms[:n], dtype=float)
        img = [int(x) for x in queue_images[:n]]
        saveable = rem >= self.lat[1, top] * inv  # below: beyond saving at any allocation
        rate = recent_rate_rps if self.keep_up else 0.0
        args = (rem, img, saveable, free, ok, c0, starts_now, delay_ms, inv, serves_late, rate)
        if serves_late and not saveable.all():
            # requests beyond saving are queued and will be served anyway, first (EDF): overload. Drain
            # at the top allocation with the cap that loses the fewest of the others.
            got = self._fewest_misses(args)
            return BatchCpu(got.cpu_m, max(got.batch, batch))  # never below the cap that keeps up
        first = self._least(self._feasible(batch, *args), lo)
        if self.search_caps != "none" and first is not None and first > lo:
            # Another cap may meet the same work at less CPU (a larger one keeps up at less, a smaller one
            # finishes the head sooner): the least CPU wins, the cap in force among equals.
            best = (first, batch)
            start = 1 if self.search_caps == "all" else batch + 1
            for cap in self._caps(start):
                if cap == batch:
                    continue
                i = self._least(self._feasible(cap, *args), lo)
                if i is not None and i < best[0]:
                    best = (i, cap)
            if best[0] < top:
                return BatchCpu(int(grid[best[0]]), best[1])
            first = best[0]
        if first is not None and (first < top or batch >= self.max_batch):
            return BatchCpu(int(grid[first]), batch)
        if first is None and batch >= self.max_batch:
            return self._fewest_misses(args)
        # The cap in force cannot keep up even at the top: a larger cap (more throughput) may, and at less
        # CPU; the least CPU wins, the largest cap among equals (it drains faster). If none does, the top
        # allocation and the cap that misses the fewest saveable requests there (a larger batch is not
        # always better: it also takes longer).
        # (At the top allocation a larger cap costs no CPU and keeps up with more: the largest that meets.)
        best: tuple[int, int] | None = (top, batch) if first is not None else None
        for cap in self._caps(batch + 1):
            i = self._least(self._feasible(cap, *args), lo)
            if i is not None and (best is None or i <= best[0]):
                best = (i, cap)
        if best is not None:
            return BatchCpu(int(grid[best[0]]), best[1])
        return self._fewest_misses(args)

    def _fewest_misses(self, args: tuple) -> BatchCpu:
        """The top allocation and the cap that misses the fewest saveable queued requests there (ties: the
        largest, which drains fastest)."""
        caps = range(1, self.max_batch + 1) if self.max_batch <= 16 else self._caps(1)
        misses = {cap: self._misses_at_top(cap, *args) for cap in caps}
        fewest = min(misses.values())
        return BatchCpu(int(self.grid[-1]), max(c for c, m in misses.items() if m == fewest))

    def _misses_at_top(self, cap: int, rem: np.ndarray, img: list[int], saveable: np.ndarray, free: np.ndarray,
                       ok: np.ndarray, c0: int, starts_now: bool, delay_ms: float, inv: float,
                       serves_late: bool, rate: float) -> int:
        """Saveable queued requests that miss their deadline at the top allocation with batches of `cap`."""
        top = self.grid.size - 1
        lat = self.lat[:, top] * inv
        t = float(free[top])
        missed = 0
        first = starts_now
        for i, j, images, keep in self._batches(img, cap, saveable, serves_late):
            l_top = float(lat[images]) if images <= self.max_batch else float(self._row(images)[top]) * inv
            if first:
                l_old = float(self._row(images)[c0]) * inv
                t = l_old if l_old <= delay_ms else delay_ms + (l_old - delay_ms) * l_top / l_old
                first = False
            else:
                t += l_top
            missed += int(np.count_nonzero(rem[i:j][keep] < t))
        return missed

    @staticmethod
    def _batches(img: list[int], cap: int, saveable: np.ndarray,
                 serves_late: bool) -> Iterator[tuple[int, int, int, np.ndarray]]:
        """The greedy EDF batches the batcher forms from the queue: (first, end, images, saveable mask) of
        each, at most `cap` images, never splitting a request. Batches of requests beyond saving are
        skipped unless the server serves late (the batcher answers them at once: no work)."""
        n, i = len(img), 0
        while i < n:
            j, images = i + 1, img[i]
            while j < n and images + img[j] <= cap:
                images += img[j]
                j += 1
            keep = saveable[i:j]
            if keep.any() or serves_late:
                yield i, j, images, keep
            i = j

    def _caps(self, lo: int) -> list[int]:
        """Caps from `lo` to max_batch on a doubling ladder (lo, lo+1, lo+2, lo+4, ...; max_batch always):
        a handful of evaluations however large max_batch is, so a call stays well under a millisecond."""
        caps, step = [], 1
        c = lo
        while c < self.max_batch:
            caps.append(c)
            c, step = lo + step, step * 2
        if lo <= self.max_batch:
            caps.append(self.max_batch)
        return caps

    @staticmethod
    def _least(ok: np.ndarray, lo: int) -> int | None:
        idx = np.flatnonzero(ok[lo:])
        return lo + int(idx[0]) if idx.size else None

    def _feasible(self, cap: int, rem: np.ndarray, img: list[int], saveable: np.ndarray, free: np.ndarray,
                  ok: np.ndarray, c0: int, starts_now: bool, delay_ms: float, inv: float,
                  serves_late: bool, rate: float) -> np.ndarray:
        """Per grid allocation: do the queued requests, in greedy EDF batches of at most `cap` images after
        the running batch, all meet their saveable deadlines?"""
        ok = ok.copy()
        if rate > 0:  # a queue served just in time falls behind arrivals faster than a batch
            ok &= 1000.0 * cap / (self._row(cap) * inv) >= rate
        finish = free
        for i, j, images, keep in self._batches(img, cap, saveable, serves_late):
            row = self._row(images) * inv
            if starts_now:
                finish = self._switch(row[c0], row / row[c0], delay_ms)
                starts_now = False
            else:
                finish = finish + row
            if keep.any():
                ok &= finish <= float(rem[i:j][keep].min())
        return ok

    @staticmethod
    def _switch(remaining_at_old_ms: float, scale: np.ndarray, delay_ms: float) -> np.ndarray:
        """Finish time of work that needs `remaining_at_old_ms` at the allocation in force when the new
        one (per candidate: time multiplied by `scale`) takes effect only after `delay_ms`."""
        if remaining_at_old_ms <= delay_ms:
            return np.full(scale.shape, remaining_at_old_ms)
        return delay_ms + (remaining_at_old_ms - delay_ms) * scale
