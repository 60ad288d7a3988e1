"""Measure l(b, c) on this machine: one real replica, resized in place through the real actuator.

How a profile is measured (issue 3):

1. ONE replica worker process is started (the same `Replica` the server uses) and attached to the
   CPU actuator `select_actuator` picks (cgroup v2 / v1 quota; the affinity fallback can only grant
   whole cores, so fractional allocations are rounded up and de-duplicated, with a warning). By
   default its cgroup sits under a parent with a high CPU weight (`guaranteed_roots`), as a
   Kubernetes Guaranteed pod's does, so other processes on a shared host cannot take the CPU it is
   allocated; the quota still caps it.
2. For each CPU allocation (largest first) the quota is applied IN PLACE (same pid, no restart),
   and the profiler waits until the replica's runtime threads follow (the worker notices its own
   quota; the `threads` field of each BatchResult says what it runs with). If it has not followed
   within `FOLLOW_TIMEOUT_S` it is told with `set_threads` (and a warning says so).
3. For each batch size: `warmup` untimed batches, then timed batches back to back (random inputs
   of the model's input specs) until `cell_seconds` of timed work or `reps` batches, whichever
   comes first, but at least `min_reps`. A cell records the median and p99 of `infer_ms`. The CPU
   other processes used meanwhile is measured (`HostLoad`); a disturbed cell is measured again.
4. `l(b, c) = g*b/c + d*b + e/c + h` is fitted to the p99 (or the median) of the cells that are not
   held back (`holdout_split`), the held-back cells validate it, and the profile is saved next to
   the model (`<model>.profile.json`, or `*.profile.rejected.json` when the fit is refused)
   together with a picture of the fit (`<model>.profile.png`). The measuring conditions (actuator,
   CFS period, weight) are stored in the profile's `machine["profiled_with"]`.

What the CFS period does to the numbers (measured on this 2-core host, see bench/profile.py): a
quota is granted per period (100 ms by default, as in Kubernetes). A replica at 500 m runs at full
speed for 50 ms, then waits for the next period. A batch shorter than the quota mostly runs
unthrottled but sometimes waits out the rest of the period, so its p99 carries up to
100*(1 - c/ceil(c)) ms of waiting (b=1: ~86 ms at 250 m, ~60 ms at 500 m, 10 ms at 1000 m) and its
median does not grow with 1/c at all; neither is of the four-term form, so at 100 ms the fit of
small batches at fractional CPU is poor. With a 10 ms period (`period_us=10_000`) the wait shrinks
tenfold and the p99 follows the model (held-back p95 error ~10 %). A profile holds only for the
period it was measured with, so the default is the actuators' own.

This module does I/O (processes, cgroups, files): it is the measuring side of `sponge/perf/`, the
pure model and fit live in `latency_model.py` and `fit.py`. Scaling and runtime modules are imported
lazily so that importing the fit does not pull them in.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Coroutine, Sequence, TypeVar

import numpy as np

from sponge.perf.fit import (
    DEFAULT_MAX_P95_REL_ERR,
    DEFAULT_MIN_R2,
    FitQuality,
    FitResult,
    PoorFitError,
    Weighting,
    check_fit,
    evaluate,
    fit_latency_model,
    holdout_split,
)
from sponge.perf.profile_store import GridCell, Profile, Statistic, build_profile, profile_path_for, save_profile
from sponge.perf.step_model import StepLatencyModel

log = logging.getLogger("sponge.profiler")

__all__ = [
    "DEFAULT_BATCHES",
    "CellStats",
    "HostLoad",
    "ProfileRejected",
    "ProfileRun",
    "default_cpu_grid",
    "describe_run",
    "format_fit",
    "format_grid",
    "guaranteed_roots",
    "open_actuator",
    "measure_grid",
    "png_path_for",
    "profile_model",
    "profile_model_async",
    "quick_profile",
    "random_inputs",
    "run_profile",
    "wait_threads_follow",
]

DEFAULT_BATCHES: tuple[int, ...] = (1, 2, 4, 8, 16)
DEFAULT_WARMUP = 2
DEFAULT_REPS = 40  # at most this many timed batches per cell ...
DEFAULT_MIN_REPS = 5  # ... at least this many ...
DEFAULT_CELL_SECONDS = 1.5  # ... and stop once this much timed work has been done (whichever first)
DEFAULT_HOLDOUT_EVERY = 4
FOLLOW_TIMEOUT_S = 2.0  # the worker polls its quota every 100 ms; 2 s means it is not following
PREWARM_SECONDS = 1.0
DEFAULT_RETRIES = 2  # re-measure a cell disturbed by other processes at most this often ...
DEFAULT_RETRY_BUDGET_S = 60.0  # ... and spend at most this long on re-measuring in one profile

_NP_TYPES = {
    "FP32": np.float32, "FP16": np.float16, "FP64": np.float64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_,
}

T = TypeVar("T")


# -- grid and inputs --------------------------------------------------------------------------------


def default_cpu_grid(max_cpu_m: int | None = None) -> tuple[int, ...]:
    """250, 500, 750, 1000, 1500, 2000, then every 1000 m up to `max_cpu_m` (default: all usable CPUs)."""
    if max_cpu_m is None:
        max_cpu_m = 1000 * _usable_cpus()
    if max_cpu_m < 250:
        raise ValueError(f"max_cpu_m={max_cpu_m} is below the smallest profiled allocation (250 m)")
    grid = [250, 500, 750, 1000, 1500, 2000]
    grid += list(range(3000, max_cpu_m + 1, 1000))
    out = [c for c in grid if c <= max_cpu_m]
    if out[-1] != max_cpu_m:
        out.append(max_cpu_m)
    return tuple(out)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def random_inputs(specs: Sequence[Any], batch: int, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Random tensors for the model's input specs: a -1 first dimension is the batch, other -1s are 1.

    Integers are drawn over their type's range (uint8: 0..255; wider types 0..99, valid indices for
    most embedding-like inputs), floats from a standard normal, booleans fairly.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.datatype not in _NP_TYPES:
            raise ValueError(f"cannot make random inputs for tensor {spec.name!r} of type {spec.datatype}")
        dt = np.dtype(_NP_TYPES[spec.datatype])
        shape = [batch if i == 0 and d < 0 else (1 if d < 0 else d) for i, d in enumerate(spec.shape)]
        if dt == np.bool_:
            arr = rng.random(shape) < 0.5
        elif dt.kind in "ui":
            hi = 256 if dt.itemsize == 1 and dt.kind == "u" else 100
            arr = rng.integers(0, hi, size=shape).astype(dt)
        else:
            arr = rng.standard_normal(shape).astype(dt)
        out[spec.name] = arr
    return out


from sponge.scaling.guaranteed import GUARANTEED_ROOT, guaranteed_roots, open_actuator  # noqa: E402,F401


def _cfs_period_us(actuator: Any) -> int | None:
    return getattr(actuator, "period_us", None) if str(getattr(actuator, "kind", "")).startswith("cgroup") else None

# -- measuring ----------------------------------------------------------------------------------------


@dataclass
class CellStats:
    """Everything measured in one (batch, cpu_m) cell (a GridCell keeps only the summary)."""

    batch: int
    cpu_m: int
    samples_ms: list[float]
    threads: int
    wall_s: float
    ext_cores: float = 0.0  # CPU used by other processes on the host while the cell was measured
    contended: bool = False  # ext_cores left the replica less than its allocation (see HostLoad)
    attempts: int = 1

    @property
    def n(self) -> int:
        return len(self.samples_ms)

    @property
    def median_ms(self) -> float:
        return float(np.median(self.samples_ms))

    @property
    def p99_ms(self) -> float:
        return float(np.percentile(self.samples_ms, 99))

    @property
    def mean_ms(self) -> float:
        return float(np.mean(self.samples_ms))

    def grid_cell(self, holdout: bool = False) -> GridCell:
        return GridCell(self.batch, self.cpu_m, self.median_ms, self.p99_ms, self.n, holdout)


class HostLoad:
    """CPU used on this host by everything except the profiled replica and this process.

    A profile measured while other processes compete for the cores describes the neighbours, not
    the model. `sample()` returns the cores used by others since the previous call: busy time of
    /proc/stat minus the replica's cgroup usage (the actuator's `cpu_usage_ns`, when it has one)
    minus this process's own CPU time. A cell is *contended* when others used more than the cores
    the replica's allocation leaves over, n_cpus - min(allocation, threads), plus a small tolerance:
    at 2000 m on 2 cores any neighbour above 0.15 cores disturbs it, at 500 m one above 1.65 does.
    """

    # Even under a high CPU weight (`guaranteed_roots`) a neighbour runs in the replica's idle gaps
    # (between batches, at the barriers of a 2-thread run), and that is not harmless: on this 2-core
    # host b=1 at 2000 m took 8.9 ms while neighbours got 0.28 cores, 5.8 ms when they got none.
    TOLERANCE_CORES = 0.15

    def __init__(self, actuator: Any, n_cpus: int | None = None, tolerance_cores: float | None = None) -> None:
        self.tolerance_cores = self.TOLERANCE_CORES if tolerance_cores is None else tolerance_cores
        self._usage = getattr(actuator, "cpu_usage_ns", None)
        self.n_cpus = n_cpus or _usable_cpus()
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = self._now()

    def _now(self) -> tuple[float, float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
            mine = float(self._usage()) / 1e9 if self._usage is not None else 0.0
        except (OSError, ValueError, RuntimeError):
            return None
        busy = (sum(v) - v[3] - v[4]) / self._hz  # minus idle and iowait
        return time.monotonic(), busy, mine, time.process_time()

    def sample(self) -> float:
        """Cores used by other processes since the last call (0.0 when /proc/stat is unreadable)."""
        now, last = self._now(), self._last
        self._last = now
        if now is None or last is None or now[0] - last[0] <= 0:
            return 0.0
        wall = now[0] - last[0]
        other = (now[1] - last[1]) - (now[2] - last[2]) - (now[3] - last[3])
        return max(0.0, other / wall)

    def contended(self, ext_cores: float, cpu_m: int, threads: int) -> bool:
        demand = min(cpu_m / 1000.0, float(threads), float(self.n_cpus))
        return ext_cores > self.n_cpus - demand + self.tolerance_cores

    async def wait_quiet(self, cpu_m: int, threads: int, timeout_s: float, window_s: float = 0.5) -> float:
        """Wait (up to `timeout_s`) for a `window_s` window in which the cell would not be contended."""
        t0 = time.monotonic()
        ext = self.sample()
        while time.monotonic() - t0 < timeout_s:
            await asyncio.sleep(window_s)
            ext = self.sample()
            if not self.contended(ext, cpu_m, threads):
                break
        return ext


async def wait_threads_follow(replica: Any, want: int, probe: dict[str, np.ndarray],
                              timeout_s: float = FOLLOW_TIMEOUT_S) -> tuple[float, bool]:
    """Run `probe` batches until the replica reports `want` runtime threads.

    Returns (seconds it took, whether the replica followed by itself). On timeout the replica is
    told with set_threads (and then waited for again), so the grid is never measured with the
    wrong thread count.
    """
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        res = await replica.infer(probe)
        if res.threads == want:
            return time.monotonic() - t0, True
    log.warning("replica %s did not follow its CPU limit within %.1f s (threads=%s, want %d); telling it",
                replica.name, timeout_s, res.threads, want)
    replica.set_threads(want)
    while (await replica.infer(probe)).threads != want:
        if time.monotonic() - t0 > 3 * timeout_s:
            raise RuntimeError(f"replica {replica.name} does not switch to {want} threads")
    return time.monotonic() - t0, False


async def _measure_cell(replica: Any, inputs: dict[str, np.ndarray], batch: int, cpu_m: int, threads: int,
                        warmup: int, reps: int, min_reps: int, cell_seconds: float) -> CellStats:
    t_start = time.monotonic()
    for _ in range(warmup):
        await replica.infer(inputs)
    samples: list[float] = []
    busy_ms = 0.0
    seen_threads = threads
    while len(samples) < reps and (len(samples) < min_reps or busy_ms < cell_seconds * 1000.0):
        res = await replica.infer(inputs)
        samples.append(float(res.infer_ms))
        busy_ms += res.infer_ms
        seen_threads = res.threads
    if seen_threads != threads:
        log.warning("cell b=%d c=%d m ran with %d threads, expected %d", batch, cpu_m, seen_threads, threads)
    return CellStats(batch, cpu_m, samples, seen_threads, time.monotonic() - t_start)


async def measure_grid(
    replica: Any,
    actuator: Any,
    batches: Sequence[int],
    cpu_ms: Sequence[int],
    *,
    warmup: int = DEFAULT_WARMUP,
    reps: int = DEFAULT_REPS,
    min_reps: int = DEFAULT_MIN_REPS,
    cell_seconds: float = DEFAULT_CELL_SECONDS,
    progress: bool = True,
    seed: int = 0,
    on_cell: Callable[[CellStats], None] | None = None,
    retries: int = DEFAULT_RETRIES,
    retry_budget_s: float = DEFAULT_RETRY_BUDGET_S,
    contention_tolerance_cores: float | None = None,
) -> list[CellStats]:
    """Measure every (batch, cpu_m) cell on a started, attached replica (resized in place).

    Allocations are visited from the largest down, each applied once, so the replica's runtime
    switches thread count only when the allocation crosses a whole core. A cell measured while
    other processes left the replica less CPU than its allocation (`HostLoad`) is measured again,
    after waiting briefly for a quiet moment, up to `retries` times and `retry_budget_s` seconds in
    all; the least disturbed attempt is kept and flagged `contended` if it still was.
    """
    from tqdm import tqdm

    from sponge.scaling.self_limit import threads_for

    rng = np.random.default_rng(seed)
    inputs = {b: random_inputs(replica.inputs, b, rng) for b in batches}
    probe = inputs[min(batches)]
    cells: list[CellStats] = []
    load = HostLoad(actuator, tolerance_cores=contention_tolerance_cores)
    retry_left_s = retry_budget_s
    bar = tqdm(total=len(batches) * len(cpu_ms), desc="profiling", unit="cell", file=sys.stderr,
               disable=not progress, leave=False)
    try:
        for cpu_m in sorted(cpu_ms, reverse=True):
            actuator.apply(int(cpu_m))
            want = threads_for(int(cpu_m))
            took, by_itself = await wait_threads_follow(replica, want, probe)
            log.debug("cpu %d m: threads %d after %.0f ms (%s)", cpu_m, want, took * 1000,
                      "followed by itself" if by_itself else "told")
            for b in sorted(batches):
                bar.set_postfix_str(f"b={b} c={cpu_m}m")
                load.sample()
                cell = await _measure_cell(replica, inputs[b], b, int(cpu_m), want, warmup, reps, min_reps,
                                           cell_seconds)
                cell.ext_cores = load.sample()
                cell.contended = load.contended(cell.ext_cores, int(cpu_m), want)
                attempt = 1
                while cell.contended and attempt <= retries and retry_left_s > 0:
                    t_retry = time.monotonic()
                    await load.wait_quiet(int(cpu_m), want, timeout_s=min(2.0, retry_left_s))
                    load.sample()
                    again = await _measure_cell(replica, inputs[b], b, int(cpu_m), want, warmup, reps, min_reps,
                                                cell_seconds)
                    again.ext_cores = load.sample()
                    again.contended = load.contended(again.ext_cores, int(cpu_m), want)
                    attempt += 1
                    if again.ext_cores < cell.ext_cores:
                        cell = again
                    retry_left_s -= time.monotonic() - t_retry
                cell.attempts = attempt
                if cell.contended:
                    log.warning("cell b=%d c=%d m: other processes used %.2f of %d cores while it was measured",
                                b, cpu_m, cell.ext_cores, load.n_cpus)
                cells.append(cell)
                if on_cell is not None:
                    on_cell(cell)
                bar.update(1)
    finally:
        bar.close()
    cells.sort(key=lambda c: (c.batch, c.cpu_m))
    return cells


# -- the whole run ------------------------------------------------------------------------------------


class ProfileRejected(PoorFitError):
    """The measured profile fits badly; `run` holds everything measured (saved as *.rejected.json)."""

    def __init__(self, message: str, run: "ProfileRun") -> None:
        super().__init__(message)
        self.run = run


@dataclass
class ProfileRun:
    """A profile and how it was obtained."""

    profile: Profile
    cells: list[CellStats]
    fit: FitResult
    holdout: FitQuality | None
    overall: FitQuality  # the model on every cell (what load_profile checks)
    profile_path: Path | None
    png_path: Path | None
    actuator: str  # the selection reason
    pid: int  # the replica process that was resized in place
    elapsed_s: float
    problems: list[str] = field(default_factory=list)
    # Sponge's thread-step model on the same cells (reported next to the four-term one; not judged).
    step_holdout: FitQuality | None = None
    step_overall: FitQuality | None = None

    @property
    def contended_cells(self) -> list[CellStats]:
        """Cells measured while other processes took CPU the replica was allocated (even after retries)."""
        return [c for c in self.cells if c.contended]

    @property
    def accepted(self) -> bool:
        return not self.problems

    def figures(self) -> dict[str, Any]:
        """The numbers a benchmark quotes (JSON-able)."""
        m = self.profile.model
        return {
            "model_file": self.profile.model_file.name,
            "statistic": self.profile.statistic,
            "weighting": self.profile.weighting,
            "batches": sorted({c.batch for c in self.cells}),
            "cpu_m": sorted({c.cpu_m for c in self.cells}),
            "cells": len(self.cells),
            "held_back_cells": 0 if self.holdout is None else self.holdout.n,
            "g": m.g, "d": m.d, "e": m.e, "h": m.h,
            "r2_fit": self.fit.r2,
            "p95_rel_err_fit": self.fit.p95_rel_err,
            "r2_holdout": None if self.holdout is None else self.holdout.r2,
            "p95_rel_err_holdout": None if self.holdout is None else self.holdout.p95_rel_err,
            "max_rel_err_holdout": None if self.holdout is None else self.holdout.max_rel_err,
            "r2_all": self.overall.r2,
            "p95_rel_err_all": self.overall.p95_rel_err,
            "accepted": self.accepted,
            "problems": self.problems,
            "step_model": None if self.profile.step_model is None else self.profile.step_model.to_dict(),
            "step_r2_fit": None if self.profile.step_fit is None else self.profile.step_fit.r2,
            "step_p95_rel_err_fit": None if self.profile.step_fit is None else self.profile.step_fit.p95_rel_err,
            "step_r2_holdout": None if self.step_holdout is None else self.step_holdout.r2,
            "step_p95_rel_err_holdout": None if self.step_holdout is None else self.step_holdout.p95_rel_err,
            "step_max_rel_err_holdout": None if self.step_holdout is None else self.step_holdout.max_rel_err,
            "step_r2_all": None if self.step_overall is None else self.step_overall.r2,
            "step_p95_rel_err_all": None if self.step_overall is None else self.step_overall.p95_rel_err,
            "contended_cells": len(self.contended_cells),
            "max_other_cores": round(max((c.ext_cores for c in self.cells), default=0.0), 2),
            "mean_other_cores": round(float(np.mean([c.ext_cores for c in self.cells])) if self.cells else 0.0, 2),
            "profile_path": None if self.profile_path is None else str(self.profile_path),
            "png_path": None if self.png_path is None else str(self.png_path),
            "actuator": self.actuator,
            "replica_pid": self.pid,
            "elapsed_s": round(self.elapsed_s, 1),
        }


def png_path_for(profile_path: str | os.PathLike[str]) -> Path:
    """`x.profile.json` -> `x.profile.png` (the fit picture lives next to the profile)."""
    p = Path(profile_path)
    return p.with_name(p.name.removesuffix(".json") + ".png")


def _rejected_path(profile_path: Path) -> Path:
    return profile_path.with_name(profile_path.name.removesuffix(".json") + ".rejected.json")


def _actuator_cpu_grid(cpu_ms: Sequence[int], granularity_m: int) -> list[int]:
    """Allocations the actuator can really grant (rounded up to its granularity), de-duplicated."""
    out: list[int] = []
    for c in cpu_ms:
        g = granularity_m * math.ceil(c / granularity_m) if granularity_m > 1 else int(c)
        if g not in out:
            out.append(g)
    return out


async def profile_model_async(
    model_path: str | os.PathLike[str],
    batches: Sequence[int] = DEFAULT_BATCHES,
    cpu_ms: Sequence[int] | None = None,
    *,
    warmup: int = DEFAULT_WARMUP,
    reps: int = DEFAULT_REPS,
    min_reps: int = DEFAULT_MIN_REPS,
    cell_seconds: float = DEFAULT_CELL_SECONDS,
    statistic: Statistic = "p99_ms",
    weighting: Weighting = "relative",
    holdout_every: int = DEFAULT_HOLDOUT_EVERY,
    out: str | os.PathLike[str] | None = None,
    png: str | os.PathLike[str] | bool | None = True,
    actuator: str = "auto",
    progress: bool = True,
    save: bool = True,
    min_r2: float = DEFAULT_MIN_R2,
    max_p95_rel_err: float = DEFAULT_MAX_P95_REL_ERR,
    replica_name: str = "profiler",
    retries: int = DEFAULT_RETRIES,
    retry_budget_s: float = DEFAULT_RETRY_BUDGET_S,
    guaranteed: bool = True,
    period_us: int | None = None,
) -> ProfileRun:
    """Measure, fit, validate and (if `save`) store a profile; never raises for a poor fit (see
    `ProfileRun.problems`; a rejected profile is saved as `*.profile.rejected.json` instead).

    `png`: True = next to the profile, a path, or False/None for no picture. `guaranteed`: run the
    replica's cgroup under a high-weight parent (see `guaranteed_roots`), so that other processes on
    the host do not take the CPU it is allocated while it is measured. `period_us`: CFS period of
    the replica's cgroup (None: the actuator's default, 100 ms, which `sponge serve` uses).
    """
    from sponge.runtime.replica import Replica

    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"model file not found: {model_path}")
    batches = sorted({int(b) for b in batches})
    if not batches or batches[0] < 1:
        raise ValueError(f"batch sizes must be >= 1, got {batches}")
    cpu_ms = sorted({int(c) for c in (cpu_ms if cpu_ms is not None else default_cpu_grid())})
    if not cpu_ms or cpu_ms[0] < 10:
        raise ValueError(f"CPU allocations must be >= 10 m (the kernel's 1 ms quota minimum), got {cpu_ms}")
    if statistic not in ("p99_ms", "median_ms"):
        raise ValueError(f"statistic must be 'p99_ms' or 'median_ms', got {statistic!r}")
    if warmup < 0 or min_reps < 1 or reps < min_reps:
        raise ValueError(f"need warmup >= 0 and 1 <= min_reps <= reps (got {warmup}, {min_reps}, {reps})")

    t0 = time.monotonic()
    sel = open_actuator(replica_name, prefer=actuator, guaranteed=guaranteed, period_us=period_us)
    act = sel.actuator
    replica = None
    try:
        gran = int(getattr(act, "granularity_m", 1))
        real_cpu = _actuator_cpu_grid(cpu_ms, gran)
        if real_cpu != cpu_ms:
            log.warning("actuator %s grants multiples of %d m only: profiling %s instead of %s",
                        act.kind, gran, real_cpu, cpu_ms)
            cpu_ms = sorted(real_cpu)
        max_threads = _usable_cpus()
        replica = Replica(replica_name, str(model_path), threads=max_threads, max_threads=max_threads)
        await replica.start()
        pid = replica.pid
        assert pid is not None
        act.attach(pid)
        # Untimed pre-warm at full allocation: the worker builds its per-thread-count sessions in the
        # background right after start; let that finish before anything is timed.
        act.apply(1000 * max_threads)
        rng = np.random.default_rng(1)
        t_warm = time.monotonic()
        while time.monotonic() - t_warm < PREWARM_SECONDS:
            for b in batches:
                if b <= 4 or time.monotonic() - t_warm < PREWARM_SECONDS / 2:
                    await replica.infer(random_inputs(replica.inputs, b, rng))
        cells = await measure_grid(replica, act, batches, cpu_ms, warmup=warmup, reps=reps, min_reps=min_reps,
                                   cell_seconds=cell_seconds, progress=progress, retries=retries,
                                   retry_budget_s=retry_budget_s)
        if replica.pid != pid:
            raise RuntimeError(f"replica restarted during profiling (pid {pid} -> {replica.pid})")
    finally:
        if replica is not None:
            await replica.stop()
        act.close()

    conditions = {"actuator": act.kind, "cfs_period_us": _cfs_period_us(act), "guaranteed": bool(guaranteed),
                  "replica_threads": "ceil(cpu_m/1000)", "load": "back-to-back batches"}
    run = _fit_and_store(model_path, cells, conditions=conditions, statistic=statistic, weighting=weighting,
                         holdout_every=holdout_every, out=out, png=png, save=save, min_r2=min_r2,
                         max_p95_rel_err=max_p95_rel_err, actuator_reason=sel.reason, pid=pid)
    run.elapsed_s = time.monotonic() - t0
    return run


def _fit_and_store(model_path: Path, cells: list[CellStats], *, conditions: dict[str, Any], statistic: Statistic,
                   weighting: Weighting, holdout_every: int, out: str | os.PathLike[str] | None, png: Any,
                   save: bool, min_r2: float, max_p95_rel_err: float, actuator_reason: str,
                   pid: int) -> ProfileRun:
    from sponge.perf.plot import plot_fit

    grid0 = [c.grid_cell() for c in cells]
    points = [g.point(statistic) for g in grid0]
    train, held = holdout_split(points, every=holdout_every) if len(points) >= 2 * holdout_every else (points, [])
    held_keys = {(p.batch, int(p.cpu_m)) for p in held}
    grid = [replace(g, holdout=(g.batch, g.cpu_m) in held_keys) for g in grid0]
    fit = fit_latency_model(train, weighting=weighting)
    hq = evaluate(fit.model, held) if held else None
    overall = evaluate(fit.model, points)
    profile = build_profile(model_path, grid, fit, hq, statistic=statistic)
    # How it was measured belongs with the numbers: a profile holds only under the same conditions.
    profile = replace(profile, machine={**profile.machine, "profiled_with": conditions})
    # Sponge's thread-step model on the same split, stored and reported beside the four-term one.
    step_hq = step_all = None
    try:
        step = StepLatencyModel.fit(train)
    except ValueError as exc:
        log.warning("no thread-step model: %s", exc)
    else:
        step_hq, step_all = (evaluate(step, held) if held else None), evaluate(step, points)
        profile = replace(profile, step_model=step, step_fit=evaluate(step, train), step_holdout=step_hq)

    problems: list[str] = []
    for q, what in ((fit, "fit cells"), (hq, "held-back cells"), (overall, "all cells")):
        if q is None:
            continue
        try:
            check_fit(q, min_r2, max_p95_rel_err, what=f"latency model on {what}")
        except PoorFitError as exc:
            problems.append(str(exc))

    profile_path = Path(out) if out is not None else profile_path_for(model_path)
    png_path: Path | None = None
    if png:
        png_path = Path(png) if not isinstance(png, bool) else png_path_for(profile_path)
        png_path.parent.mkdir(parents=True, exist_ok=True)
        period = conditions.get("cfs_period_us")
        title = (f"{profile.model_file.name} on {profile.machine.get('usable_cpus', '?')} CPUs, "
                 f"{conditions.get('actuator', '?')}"
                 + ("" if period is None else f", CFS period {period / 1000:g} ms")
                 + f"; fitted to {statistic.removesuffix('_ms')}")
        plot_fit(profile, path_png=png_path, title=title)
    saved: Path | None = None
    if save:
        profile_path.parent.mkdir(parents=True, exist_ok=True)
        saved = save_profile(profile, profile_path if not problems else _rejected_path(profile_path))
    return ProfileRun(profile=profile, cells=cells, fit=fit, holdout=hq, overall=overall, profile_path=saved,
                      png_path=png_path, actuator=actuator_reason, pid=pid, elapsed_s=0.0, problems=problems,
                      step_holdout=step_hq, step_overall=step_all)


def _run_sync(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from sync code, even if this thread already runs an event loop
    (then in a helper thread with its own loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(factory())
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    th = threading.Thread(target=target, name="sponge-profiler")
    th.start()
    th.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def run_profile(model_path: str | os.PathLike[str], *args: Any, **kwargs: Any) -> ProfileRun:
    """Synchronous `profile_model_async` (same arguments); returns the whole run, accepted or not."""
    return _run_sync(lambda: profile_model_async(model_path, *args, **kwargs))


def profile_model(
    model_path: str | os.PathLike[str],
    batches: Sequence[int] = DEFAULT_BATCHES,
    cpu_ms: Sequence[int] | None = None,
    warmup: int = DEFAULT_WARMUP,
    reps: int = DEFAULT_REPS,
    progress: bool = True,
    **kwargs: Any,
) -> Profile:
    """Profile `model_path` on this machine and save `<model>.profile.json` (+ `.png`); return it.

    Raises ProfileRejected (a PoorFitError) when the fit misses R² >= 0.95 or p95 relative error
    <= 15 % on the fitted, held-back or all cells; the measurements are then saved as
    `<model>.profile.rejected.json` and available as `exc.run`. Other keyword arguments: see
    `profile_model_async`.
    """
    run = run_profile(model_path, batches, cpu_ms, warmup=warmup, reps=reps, progress=progress, **kwargs)
    if not run.accepted:
        raise ProfileRejected("; ".join(run.problems), run)
    return run.profile


def quick_profile(
    model_path: str | os.PathLike[str],
    max_cpu_m: int | None = None,
    out: str | os.PathLike[str] | None = None,
    actuator: str = "auto",
    progress: bool = False,
    **kwargs: Any,
) -> Profile:
    """A shorter profile for `sponge serve`'s auto-profiling at start (~30-40 s on 2 cores).

    Batches 1..8, the default CPU grid up to `max_cpu_m`, ~0.6 s of timed work per cell (enough
    repetitions for a stable p99 of small batches). Other keywords (period_us, guaranteed, min_r2,
    max_p95_rel_err ...) as `profile_model_async`. Raises ProfileRejected like `profile_model`.
    """
    if actuator == "none":
        actuator = "auto"
    return profile_model(model_path, batches=(1, 2, 4, 8), cpu_ms=default_cpu_grid(max_cpu_m), reps=150,
                         progress=progress, min_reps=4, cell_seconds=0.6, out=out, actuator=actuator, **kwargs)


# -- text output --------------------------------------------------------------------------------------


def format_grid(cells: Sequence[CellStats] | Sequence[GridCell], model: Any | None = None,
                statistic: Statistic = "p99_ms") -> str:
    """A table: one row per batch size, one column per CPU allocation; each entry `median/p99 ms`,
    followed by the model's prediction of `statistic` when `model` is given; `*` = held back."""
    batches = sorted({c.batch for c in cells})
    cpus = sorted({c.cpu_m for c in cells})
    by = {(c.batch, c.cpu_m): c for c in cells}
    head = "batch " + "".join(f"{f'{c} m':>22}" for c in cpus)
    lines = [f"cells: median/p99 ms" + (f" (model {statistic.removesuffix('_ms')})" if model else "")
             + "; * = held back from the fit, ! = disturbed by other processes", head]
    for b in batches:
        row = f"{b:>5} "
        for c in cpus:
            cell = by.get((b, c))
            if cell is None:
                row += f"{'-':>22}"
                continue
            txt = f"{cell.median_ms:.1f}/{cell.p99_ms:.1f}"
            if model is not None:
                txt += f" ({model.latency_ms(b, c):.1f})"
            if getattr(cell, "holdout", False):
                txt += "*"
            if getattr(cell, "contended", False):
                txt += "!"
            row += f"{txt:>22}"
        lines.append(row)
    return "\n".join(lines)


def format_fit(run: ProfileRun) -> str:
    m = run.profile.model
    lines = [
        f"fit ({run.profile.statistic}, {run.profile.weighting} least squares): "
        f"l(b,c) = {m.g:.4g}*b/c + {m.d:.4g}*b + {m.e:.4g}/c + {m.h:.4g} ms   (c in cores)",
        f"  fitted cells   n={run.fit.n:<3} R²={run.fit.r2:.4f}  |rel err| p95 {run.fit.p95_rel_err:.1%}"
        f"  max {run.fit.max_rel_err:.1%}",
    ]
    if run.holdout is not None:
        h = run.holdout
        lines.append(f"  held-back cells n={h.n:<2} R²={h.r2:.4f}  |rel err| p95 {h.p95_rel_err:.1%}"
                     f"  max {h.max_rel_err:.1%}")
    o = run.overall
    lines.append(f"  all cells      n={o.n:<3} R²={o.r2:.4f}  |rel err| p95 {o.p95_rel_err:.1%}"
                 f"  max {o.max_rel_err:.1%}")
    if run.profile.step_model is not None and run.step_overall is not None:
        groups = ", ".join(f"{g.threads} thread{'s' if g.threads > 1 else ''}: {g.cells} cells"
                           for g in run.profile.step_model.groups)
        lines.append(f"thread-step model (four terms per thread count; {groups}), not used to accept:")
        for q, what in ((run.step_holdout, "held-back cells"), (run.step_overall, "all cells     ")):
            if q is not None:
                lines.append(f"  {what} n={q.n:<3} R²={q.r2:.4f}  |rel err| p95 {q.p95_rel_err:.1%}"
                             f"  max {q.max_rel_err:.1%}")
    lines.append("  ACCEPTED" if run.accepted else "  REJECTED: " + "; ".join(run.problems))
    return "\n".join(lines)


def _cells_with_holdout(run: ProfileRun) -> list[Any]:
    """CellStats decorated with the holdout flag of the profile's grid, for format_grid."""
    flags = {(g.batch, g.cpu_m): g.holdout for g in run.profile.grid}
    out = []
    for c in run.cells:
        d = _Row(c.batch, c.cpu_m, c.median_ms, c.p99_ms, flags.get((c.batch, c.cpu_m), False), c.contended)
        out.append(d)
    return out


@dataclass(frozen=True)
class _Row:
    batch: int
    cpu_m: int
    median_ms: float
    p99_ms: float
    holdout: bool
    contended: bool = False


def describe_run(run: ProfileRun) -> str:
    """Grid table, fit and where things were written: what `sponge profile` prints."""
    cond = run.profile.machine.get("profiled_with", {})
    period = cond.get("cfs_period_us")
    parts = [f"actuator: {run.actuator}",
             f"replica pid {run.pid}, resized in place; CFS period "
             f"{'-' if period is None else f'{period / 1000:g} ms'}; {run.elapsed_s:.0f} s"]
    busy = run.contended_cells
    if busy:
        parts.append(f"WARNING: {len(busy)} of {len(run.cells)} cells were measured while other processes used "
                     f"up to {max(c.ext_cores for c in busy):.2f} cores of this host (marked !); "
                     "re-profile on a quiet machine for numbers that describe the model alone")
    parts += ["",
             format_grid(_cells_with_holdout(run), run.profile.model, run.profile.statistic), "", format_fit(run), ""]
    if run.profile_path is not None:
        parts.append(f"profile: {run.profile_path}" + ("" if run.accepted else "  (rejected; not used by serve)"))
    if run.png_path is not None:
        parts.append(f"fit picture: {run.png_path}")
    return "\n".join(parts)
