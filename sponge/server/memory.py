"""Give the memory a burst freed back to the OS once the server is idle again (issue 9: memory back to its
pre-load level after an overload).

glibc's malloc keeps what a burst of requests freed (bodies, tensors, connection buffers) in its heap for
reuse, so the front door's RSS stayed at the burst's peak: measured on the default model, 181 MB before
10 s of 3x overload, 369 MB 5 s after it, 182 MB right after a `malloc_trim(0)` (nothing was leaked; the
heap kept it). `IdleTrimmer`, called once per controller interval, collects garbage (cyclic garbage of
the burst, e.g. closed connections, waits for allocations that an idle server does not make) and calls
`malloc_trim(0)`, once after each busy period, when an interval saw no arrival and left nothing queued.
Elsewhere than glibc: the collection only.

`freeze_startup_objects` keeps full collections short under load (issue 13): see there.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import time
from typing import Callable

log = logging.getLogger("sponge.memory")


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def freeze_startup_objects() -> int:
    """Move every object alive now (modules, FastAPI's routes and models, ONNX metadata: ~150k) out of the
    cyclic collector's reach (`gc.freeze`), once the server is up. Without it each full (gen-2) collection
    walks them all: 20-30 ms with the event loop stopped on a quiet host, 50-350 ms on a busy one, about
    once a second at ~3000 req/s — the tiny model's p99 at concurrency 64 (docs/results/tiny_p99.md).
    Returns how many objects were frozen. They are never freed: they live as long as the server anyway."""
    gc.collect()  # what is garbage now is not frozen
    gc.freeze()
    return gc.get_freeze_count()


def rss_mb() -> float:
    """This process's resident set (MB); nan where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class IdleTrimmer:
    """`__call__(arrivals_total, queued)` each controller interval; trims once per busy period, at most
    every `min_gap_s`. Returns True when it trimmed."""

    def __init__(self, min_gap_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 trim: Callable[[int], int] | None = None) -> None:
        self.min_gap_s = min_gap_s
        self.clock = clock
        self._trim = trim if trim is not None else _malloc_trim()
        self._last_arrivals: int | None = None
        self._dirty = False  # something was allocated since the last trim
        self._last_trim = float("-inf")
        self.trims = 0

    def __call__(self, arrivals_total: int, queued: int) -> bool:
        busy = queued > 0 or (self._last_arrivals is not None and arrivals_total != self._last_arrivals)
        self._last_arrivals = arrivals_total
        if busy:
            self._dirty = True
            return False
        now = self.clock()
        if not self._dirty or now - self._last_trim < self.min_gap_s:
            return False
        before = rss_mb()
        gc.collect()  # cycles (e.g. closed connections) are only collected as allocations go on: not when idle
        if self._trim is not None:
            try:
                self._trim(0)
            except Exception:  # never let housekeeping break the controller's tick
                log.exception("malloc_trim failed; not trying again")
                self._trim = None
        log.info("idle after a busy period: gave freed heap back to the OS, RSS %.0f -> %.0f MB", before, rss_mb())
        self._dirty = False
        self._last_trim = now
        self.trims += 1
        return True
