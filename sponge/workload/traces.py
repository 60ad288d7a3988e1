"""Request-rate traces: per-second request counts from the public Twitter traces.

A `RateTrace` is what the arrival generator consumes: one rate (requests/s) per second. Readers here
reproduce what Sponge's load tester (barazmoon) did — divide by a damping factor and truncate, then
slice a window — and also deal with the archive's gaps, which are missing data, not silence.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np

from sponge.workload.paths import cache_dir, data_file

TWITTER_2021 = "workload/twitter_2021_08/workload.tbz2"
TWITTER_2018_DIR = "workload/twitter_2018_04_25_sponge"
GAP_MIN_S = 60  # runs of zeros at least this long are archive gaps (README §A1)

GapMode = Literal["skip", "interpolate", "keep"]


@dataclass(frozen=True, eq=False)
class RateTrace:
    """Per-second request rates (req/s, float, >= 0) and a human-readable description.

    `notes` carries what a reader found in the file and did about it (gaps, sorting, duplicates), so a
    command can warn about it and a report can show it. A trace read from a list of arrival times keeps
    them in `times_ms` (sorted, ms from 0): the request plan then sends at exactly those times, and
    `rps` is recomputed as their per-second counts (the `rps` given only sets the minimum length).
    """

    rps: np.ndarray
    description: str = ""
    notes: tuple[str, ...] = ()
    times_ms: np.ndarray | None = None

    def __post_init__(self) -> None:
        a = np.array(self.rps, dtype=np.float64)  # own copy: callers cannot mutate it behind us
        if a.ndim != 1:
            raise ValueError(f"RateTrace.rps must be 1-D, got shape {a.shape}")
        if self.times_ms is not None:
            t = np.array(self.times_ms, dtype=np.float64)
            if t.ndim != 1 or (t.size and (not np.all(np.isfinite(t)) or t[0] < 0 or np.any(np.diff(t) < 0))):
                raise ValueError("RateTrace.times_ms must be 1-D, finite, >= 0 and sorted")
            t.setflags(write=False)
            object.__setattr__(self, "times_ms", t)
            a = np.bincount((t // 1000.0).astype(np.int64), minlength=a.size).astype(np.float64)
        if a.size and (not np.all(np.isfinite(a)) or a.min() < 0):
            raise ValueError("RateTrace.rps must be finite and >= 0")
        a.setflags(write=False)
        object.__setattr__(self, "rps", a)
        object.__setattr__(self, "notes", tuple(self.notes))

    @classmethod
    def constant(cls, rps: float, seconds: int) -> RateTrace:
        return cls(np.full(int(seconds), float(rps)), f"constant {rps:g} req/s for {seconds} s")

    @classmethod
    def from_times(cls, times_ms: np.ndarray, description: str = "", notes: tuple[str, ...] = (),
                   duration_s: int = 0) -> RateTrace:
        """Exact arrival times (sorted ms from 0); the trace lasts at least `duration_s`."""
        return cls(np.zeros(int(duration_s)), description, notes, np.asarray(times_ms, dtype=np.float64))

    @property
    def duration_s(self) -> int:
        return int(self.rps.size)

    @property
    def mean_rps(self) -> float:
        return float(self.rps.mean()) if self.rps.size else 0.0

    @property
    def peak_rps(self) -> float:
        return float(self.rps.max()) if self.rps.size else 0.0

    @property
    def total(self) -> float:
        return float(self.rps.sum())

    def window(self, start: int, end: int | None = None) -> RateTrace:
        """Seconds [start, end) of this trace (relative to its own start); arrival times are rebased to start."""
        desc = f"{self.description} [{start}:{'' if end is None else end}]"
        if self.times_ms is None:
            return RateTrace(self.rps[start:end], desc, self.notes)
        lo, hi, _ = slice(start, end).indices(self.duration_s)
        t = self.times_ms
        kept = t[(t >= lo * 1000.0) & (t < hi * 1000.0)] - lo * 1000.0
        return RateTrace.from_times(kept, desc, self.notes, max(hi - lo, 0))

    def scaled(self, factor: float, seed: int = 0) -> RateTrace:
        """Rates multiplied by `factor`; arrival times thinned or replicated (`scale_times`, seeded)."""
        if not (factor >= 0 and np.isfinite(factor)):
            raise ValueError(f"scale factor must be finite and >= 0, got {factor}")
        desc = f"{self.description}, x{factor:.3g}"
        if self.times_ms is None:
            return RateTrace(self.rps * factor, desc, self.notes)
        t = scale_times(self.times_ms, factor, np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(SCALE_STREAM,))))
        return RateTrace.from_times(t, desc, self.notes, self.duration_s)

    def __len__(self) -> int:
        return self.duration_s

    def __repr__(self) -> str:
        kind = f", {self.times_ms.size} exact arrivals" if self.times_ms is not None else ""
        return (
            f"RateTrace({self.description!r}, {self.duration_s} s, mean {self.mean_rps:.2f}, "
            f"peak {self.peak_rps:.2f} req/s{kind})"
        )


SCALE_STREAM = 7  # spawn key of the seeded stream that thins/replicates arrival times (plan streams are 0-3)


def scale_times(times_ms: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times scaled in number by `factor`, keeping the time axis and the per-second shape.

    factor < 1: each arrival is kept with probability `factor` (seeded thinning; kept ones keep their
    exact time). factor >= 1: every arrival is kept, plus floor(factor) - 1 copies and one more with
    probability factor - floor(factor); each copy lands uniformly at random within its original's
    second. So the expected count of every second is multiplied by `factor` (exactly, for integers),
    and no arrival leaves its second.
    """
    t = np.asarray(times_ms, dtype=np.float64)
    if factor < 1.0:
        return t[rng.random(t.size) < factor]
    whole = int(np.floor(factor))
    copies = np.full(t.size, whole - 1, dtype=np.int64) + (rng.random(t.size) < factor - whole)
    base = np.repeat(np.floor(t / 1000.0) * 1000.0, copies)
    extra = base + rng.random(base.size) * 1000.0
    return np.sort(np.concatenate((t, extra)), kind="stable")


# ---------------------------------------------------------------------------------------------
# Twitter 2021-08 (barazmoon / Sponge / IPA / InfAdapter trace)


def _parse_twitter_tbz2(path: Path) -> np.ndarray:
    try:
        with tarfile.open(path, "r:bz2") as tf:
            try:
                member = tf.extractfile("workload.txt")
            except KeyError:
                raise ValueError(f"{path}: no member 'workload.txt' (members: {tf.getnames()[:5]})") from None
            if member is None:
                raise ValueError(f"{path}: 'workload.txt' is not a regular file")
            raw = member.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable bzip2 tar archive ({e})") from e
    try:
        counts = np.array(raw.split(), dtype=np.int64)
    except ValueError as e:
        raise ValueError(f"{path}:workload.txt: expected space-separated integers ({e})") from e
    if counts.size == 0:
        raise ValueError(f"{path}:workload.txt: empty")
    if counts.min() < 0:
        raise ValueError(f"{path}:workload.txt: negative count at second {int(np.argmin(counts))}")
    return counts


@functools.lru_cache(maxsize=4)
def _load_twitter_cached(path_str: str, size: int, mtime_ns: int) -> np.ndarray:
    path = Path(path_str)
    tag = hashlib.sha1(path_str.encode()).hexdigest()[:10]
    cache = cache_dir() / f"twitter_2021_08-{tag}-{size}-{mtime_ns}.npy"
    counts: np.ndarray | None = None
    if cache.is_file():
        try:
            counts = np.load(cache, allow_pickle=False)
        except (OSError, ValueError):
            counts = None  # corrupt cache: re-parse below
    if counts is None:
        counts = _parse_twitter_tbz2(path)
        try:  # atomic write so parallel test workers never read a half-written file
            cache.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".npy.tmp")
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, counts, allow_pickle=False)
            os.replace(tmp, cache)
        except OSError:
            pass  # caching is an optimisation only
    counts.setflags(write=False)
    return counts


def twitter_2021_counts(path: str | Path | None = None) -> np.ndarray:
    """The raw per-second event counts of the 22-day Twitter 2021-08 trace (read-only int64 array).

    Parsing 1.9 M integers takes a while, so the array is cached as .npy in the cache dir and in memory.
    """
    p = Path(path) if path is not None else data_file(TWITTER_2021)
    st = p.stat()
    return _load_twitter_cached(str(p.resolve()), st.st_size, st.st_mtime_ns)


def find_gaps(counts: np.ndarray, min_len: int = GAP_MIN_S) -> list[tuple[int, int]]:
    """Runs of at least `min_len` zeros as (start_second, length), in order."""
    z = np.concatenate(([0], (np.asarray(counts) == 0).astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(z))
    starts, ends = edges[0::2], edges[1::2]
    return [(int(s), int(e - s)) for s, e in zip(starts, ends) if e - s >= min_len]


def gap_mask(counts: np.ndarray, min_len: int = GAP_MIN_S) -> np.ndarray:
    """Boolean mask of the seconds that fall in archive gaps."""
    mask = np.zeros(len(counts), dtype=bool)
    for s, n in find_gaps(counts, min_len):
        mask[s : s + n] = True
    return mask


def _fill_gaps(counts: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Linear interpolation over gap seconds from the nearest real seconds on each side."""
    out = counts.astype(np.float64)
    if mask.any() and (~mask).any():
        idx = np.arange(len(counts))
        out[mask] = np.interp(idx[mask], idx[~mask], out[~mask])
    return out


def twitter_2021(
    start: int = 0,
    end: int | None = None,
    damping_factor: float = 1.0,
    gaps: GapMode = "skip",
    path: str | Path | None = None,
) -> RateTrace:
    """Seconds [start, end) of the Twitter 2021-08 trace, as barazmoon served it.

    Each value is divided by `damping_factor` and truncated (barazmoon's `int(v / damping)`).
    `start`/`end` are seconds of the original trace. Archive gaps (>= 60 s of zeros, detected on the
    whole trace so a window that cuts a gap still sees it) are dropped (`skip`, the result is then
    shorter than end-start), linearly interpolated (`interpolate`) or left as zeros (`keep`).
    """
    if damping_factor <= 0:
        raise ValueError(f"damping_factor must be > 0, got {damping_factor}")
    if gaps not in ("skip", "interpolate", "keep"):
        raise ValueError(f"gaps must be 'skip', 'interpolate' or 'keep', got {gaps!r}")
    counts = twitter_2021_counts(path)
    n = len(counts)
    stop = n if end is None else end
    if not 0 <= start < stop <= n:
        raise ValueError(f"window [{start}, {stop}) outside the trace's {n} seconds")
    mask = gap_mask(counts) if gaps != "keep" else np.zeros(n, dtype=bool)
    if gaps == "interpolate":
        values = _fill_gaps(counts, mask)[start:stop]
    else:
        values = counts[start:stop].astype(np.float64)
        if gaps == "skip":
            values = values[~mask[start:stop]]
    rates = np.floor(values / damping_factor)
    desc = f"twitter-2021-08 [{start}:{stop}) damping {damping_factor:g}, gaps {gaps}"
    return RateTrace(rates, desc)


@dataclass(frozen=True)
class NamedWindow:
    """A window of the Twitter 2021-08 trace that Sponge's experiments used."""

    parts: tuple[tuple[int, int], ...]  # [start, end) seconds, concatenated in order
    damping_factor: float  # the damping Sponge's trace script selected it with
    note: str


# From saeid93/sponge experiments/runner/trace.py (windows found with damping 5) and the README §A1.
NAMED_WINDOWS: dict[str, NamedWindow] = {
    "bursty": NamedWindow(((1_301_160, 1_302_360),), 5.0, "20 min; damping 8: mean 12.0, 3-34 req/s"),
    "steady_low": NamedWindow(((1_299_600, 1_300_800),), 5.0, "20 min; damping 5: 5-13 req/s"),
    "steady_high": NamedWindow(((1_768_800, 1_769_400),), 5.0, "10 min; damping 5: 38-55 req/s"),
    "fluctuating": NamedWindow(
        ((1_301_400, 1_302_000), (1_308_600, 1_309_200)), 5.0, "two 10-min windows back to back"
    ),
}


def named_window(name: str, damping_factor: float | None = None, gaps: GapMode = "skip") -> RateTrace:
    """One of Sponge's windows ('bursty', 'steady_low', 'steady_high', 'fluctuating')."""
    key = name.replace("-", "_").replace(" ", "_").lower()
    if key not in NAMED_WINDOWS:
        raise KeyError(f"unknown window {name!r}; known: {', '.join(NAMED_WINDOWS)}")
    w = NAMED_WINDOWS[key]
    damp = w.damping_factor if damping_factor is None else damping_factor
    parts = [twitter_2021(s, e, damp, gaps).rps for s, e in w.parts]
    return RateTrace(np.concatenate(parts), f"twitter-2021-08 '{key}' damping {damp:g} ({w.note})")


# ---------------------------------------------------------------------------------------------
# Twitter 2018-04-25 (Sponge's preprocessing: 86,400 per-second counts, 30 busy minutes)


def twitter_2018(
    kind: Literal["create", "delete", "both"] = "create",
    start: int | None = None,
    end: int | None = None,
    damping_factor: float = 1.0,
    directory: str | Path | None = None,
) -> RateTrace:
    """Seconds [start, end) of the 2018 second-of-day counts; default window = the non-zero span."""
    kinds = ("create", "delete") if kind == "both" else (kind,)
    if any(k not in ("create", "delete") for k in kinds):
        raise ValueError(f"kind must be 'create', 'delete' or 'both', got {kind!r}")
    arrays = []
    for k in kinds:
        rel = Path(TWITTER_2018_DIR) / f"workload_{k}.txt"
        p = Path(directory) / rel.name if directory is not None else data_file(rel)
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not a JSON list of integers ({e})") from e
        if not isinstance(data, list) or not all(isinstance(v, int) and v >= 0 for v in data):
            raise ValueError(f"{p}: expected a JSON list of non-negative integers")
        arrays.append(np.asarray(data, dtype=np.int64))
    if len({a.size for a in arrays}) != 1:
        raise ValueError(f"{TWITTER_2018_DIR}: create and delete files differ in length")
    counts = np.sum(arrays, axis=0)
    nz = np.flatnonzero(counts)
    lo = start if start is not None else (int(nz[0]) if nz.size else 0)
    hi = end if end is not None else (int(nz[-1]) + 1 if nz.size else counts.size)
    if not 0 <= lo < hi <= counts.size:
        raise ValueError(f"window [{lo}, {hi}) outside the trace's {counts.size} seconds")
    if damping_factor <= 0:
        raise ValueError(f"damping_factor must be > 0, got {damping_factor}")
    rates = np.floor(counts[lo:hi] / damping_factor)
    return RateTrace(rates, f"twitter-2018-04-25 {kind} [{lo}:{hi}) damping {damping_factor:g}")


# ---------------------------------------------------------------------------------------------

T = TypeVar("T", RateTrace, np.ndarray)


def scale_to_peak(rates: T, peak_rps: float, seed: int = 0) -> T:
    """Scale a trace linearly so its maximum equals `peak_rps` (fit a trace to what a machine serves).

    A trace of arrival times is thinned/replicated by the same factor (`scale_times`, seeded), so its
    busiest second lands near `peak_rps`, not exactly on it."""
    arr = rates.rps if isinstance(rates, RateTrace) else np.asarray(rates, dtype=np.float64)
    top = float(arr.max()) if arr.size else 0.0
    if top <= 0:
        raise ValueError("cannot scale a trace whose peak is 0")
    if peak_rps < 0:
        raise ValueError(f"peak_rps must be >= 0, got {peak_rps}")
    if isinstance(rates, RateTrace) and rates.times_ms is not None:
        return replace(rates.scaled(peak_rps / top, seed),
                       description=f"{rates.description}, scaled to peak {peak_rps:g} req/s")
    scaled = arr * (peak_rps / top)
    if isinstance(rates, RateTrace):
        return RateTrace(scaled, f"{rates.description}, scaled to peak {peak_rps:g} req/s", rates.notes)
    return scaled


def scale_to_mean(rates: RateTrace, mean_rps: float, seed: int = 0) -> RateTrace:
    """Scale a trace linearly so its mean equals `mean_rps` (arrival times: in expectation)."""
    if rates.mean_rps <= 0:
        raise ValueError("cannot scale a trace whose mean is 0")
    return replace(rates.scaled(mean_rps / rates.mean_rps, seed),
                   description=f"{rates.description}, scaled to mean {mean_rps:g}")
