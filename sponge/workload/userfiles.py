"""Users' own trace files: per-second counts, arrival times, and network links (README "Bring your own traces").

The bundled readers (`traces.py`, `network.py`) know one file each; these read the formats those files
come in — and the plain ones a user writes by hand — so any of them reaches `--trace` and `--network`:

* counts (requests per second): numbers separated by whitespace or commas, one a line or all on one
  line (`#` starts a comment); a JSON list of numbers; either of them inside a (bzip2/gzip/xz) tar
  with one member (`workload.txt` preferred), or compressed on its own.
* times (arrival times): one column of a CSV/whitespace text file, numbers (seconds) or ISO-8601
  date-times; rebased to start at 0, sorted, duplicates kept as simultaneous arrivals.
* bandwidth: two columns (time s, Mbit/s), or one column of Mbit/s at one sample a second — a named
  column of a headed CSV, optionally with KEY=VALUE row filters (the 5Gophers throughput file).
* mahimahi: `network.read_mahimahi`.

A malformed file is a ValueError naming the file, the line and the field. What a reader finds and
fixes or keeps (gaps, silences, unsorted or duplicate times, zero samples) is kept as `notes` on the
trace it returns, one sentence each starting with the file, for a command's warnings and a report.
"""

from __future__ import annotations

import bz2
import csv
import functools
import gzip
import io
import json
import lzma
import math
import re
import tarfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from sponge.workload.network import BandwidthTrace, LinkTrace, read_ghent_log, read_mahimahi
from sponge.workload.traces import GAP_MIN_S, RateTrace, find_gaps

TAR_MEMBER = "workload.txt"  # the member the research group's archives hold
BANDWIDTH_GAP_FACTOR = 5.0  # a spacing this many times the median between bandwidth samples is reported
_WINDOW = re.compile(r"^(?P<rest>.*)@(?P<start>\d*)-(?P<end>\d*)$")


# ---- specs ------------------------------------------------------------------------------------------
def split_window(spec: str) -> tuple[str, int, int | None]:
    """'PATH@START-END' -> (PATH, START, END): seconds [START, END) of the file (either may be empty)."""
    m = _WINDOW.match(spec)
    if not m or Path(spec).is_file():
        return spec, 0, None
    start = int(m["start"] or 0)
    end = int(m["end"]) if m["end"] else None
    if end is not None and end <= start:
        raise ValueError(f"window @{start}-{end} of {m['rest']} is empty (END must be > START)")
    return m["rest"], start, end


def split_column(spec: str) -> tuple[Path, str | None]:
    """'PATH[:COLUMN]' -> (PATH, COLUMN or None); an existing file named with a colon wins."""
    if Path(spec).is_file() or ":" not in spec:
        return _existing(spec), None
    path, _, column = spec.rpartition(":")
    return _existing(path), (column or None)


def _existing(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"trace file {p} not found")
    return p


def file_label(spec: str) -> str:
    """A short name for a trace spec's file (the experiment names its window after it): the file's stem,
    prefixed with its folder's name when the stem alone says little (workload.tbz2, data.csv)."""
    kind, _, arg = spec.partition(":")
    if kind not in ("counts", "times"):
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", arg or kind)
    rest, start, end = split_window(arg)
    path = Path(rest) if Path(rest).is_file() or ":" not in rest else Path(rest.rpartition(":")[0])
    stem = path.name.split(".")[0] or path.name
    if stem.lower() in ("workload", "data", "trace", "times", "counts", "requests") and path.parent.name:
        stem = f"{path.parent.name}_{stem}"
    window = "" if (start, end) == (0, None) else f"@{start}-{'' if end is None else end}"
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", stem + window)


# ---- counts -----------------------------------------------------------------------------------------
def counts_trace(spec: str, damping: float | None = None) -> RateTrace:
    """`counts:` argument 'PATH[@START-END]': per-second counts, windowed, divided by `damping` and
    truncated (barazmoon's rule, as for the Twitter windows; no damping = the counts as they are)."""
    rest, start, end = split_window(spec)
    p = _existing(rest)
    counts = read_counts(p)
    n = counts.size
    stop = n if end is None else end
    if start >= n or stop > n:
        raise ValueError(f"{p}: window [{start}, {stop}) outside the file's {n} seconds")
    values = counts[start:stop]
    if damping is not None:
        if damping <= 0:
            raise ValueError(f"damping must be > 0, got {damping}")
        values = np.floor(values / damping)
    span = "" if (start, end) == (0, None) else f" [{start}:{stop})"
    damp = "" if damping is None else f" damping {damping:g}"
    if not values.any():
        raise ValueError(f"{p}: every count in seconds [{start}, {stop}) is 0{damp}: no requests")
    return RateTrace(values, f"counts {p.name}{span}{damp}", count_notes(p, values))


def count_notes(p: Path, counts: np.ndarray) -> tuple[str, ...]:
    """Long runs of zero seconds (>= GAP_MIN_S): kept as idle time, reported with where the requests are."""
    gaps = find_gaps(counts, GAP_MIN_S)
    if not gaps:
        return ()
    start, length = max(gaps, key=lambda g: g[1])
    nz = np.flatnonzero(counts)
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    hint = (f"; the requests lie in seconds {lo}-{hi} (cut with @{lo}-{hi} or --duration-s)"
            if (lo, hi) != (0, counts.size) else "")
    return (f"{p}: {len(gaps)} run(s) of >= {GAP_MIN_S} s with no requests ({sum(g[1] for g in gaps)} s in all, "
            f"longest {length} s from second {start}); kept as idle seconds{hint}",)


def read_counts(path: str | Path) -> np.ndarray:
    """The per-second counts of a counts file in any of the module's formats (read-only float64 array)."""
    p = _existing(str(path))
    st = p.stat()
    return _counts_cached(str(p.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _counts_cached(path: str, size: int, mtime_ns: int) -> np.ndarray:
    p = Path(path)
    where, text = _unpack(p, p.read_bytes())
    values = _json_numbers(where, text, "count") if text.lstrip().startswith("[") else _text_numbers(where, text, "count")
    if values.size == 0:
        raise ValueError(f"{where}: empty (no counts)")
    values.setflags(write=False)
    return values


def _unpack(p: Path, raw: bytes) -> tuple[str, str]:
    """(where, text) of a plain, compressed or tar-archived text file; `where` names the member."""
    if not raw.strip():
        raise ValueError(f"{p}: empty file")
    if raw[257:262] == b"ustar" or raw[:3] == b"BZh" or raw[:2] == b"\x1f\x8b" or raw[:6] == b"\xfd7zXZ\x00":
        try:
            with tarfile.open(fileobj=io.BytesIO(raw), mode="r:*") as tf:
                return _tar_member(p, tf)
        except tarfile.ReadError:
            raw = _decompress(p, raw)  # compressed, but not a tar: the text itself
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ValueError(f"{p}: not a readable tar archive ({e})") from e
    return str(p), _decode(str(p), raw)


def _tar_member(p: Path, tf: tarfile.TarFile) -> tuple[str, str]:
    files = [m for m in tf.getmembers() if m.isfile()]
    pick = [m for m in files if Path(m.name).name == TAR_MEMBER] or (files if len(files) == 1 else [])
    if not pick:
        raise ValueError(f"{p}: expected a member {TAR_MEMBER!r} or exactly one file; "
                         f"members: {[m.name for m in files][:5]}")
    fh = tf.extractfile(pick[0])
    where = f"{p}:{pick[0].name}"
    return where, _decode(where, fh.read() if fh else b"")


def _decompress(p: Path, raw: bytes) -> bytes:
    for magic, fn in ((b"BZh", bz2.decompress), (b"\x1f\x8b", gzip.decompress), (b"\xfd7zXZ", lzma.decompress)):
        if raw.startswith(magic):
            try:
                return fn(raw)
            except (OSError, EOFError, ValueError, lzma.LZMAError) as e:
                raise ValueError(f"{p}: corrupt compressed file ({e})") from e
    raise ValueError(f"{p}: not a readable tar archive")


def _decode(where: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not a text file (byte {e.start} is not UTF-8)") from None


def _text_numbers(where: str, text: str, what: str) -> np.ndarray:
    """Numbers separated by whitespace or commas, any number a line; fast path, then a located scan."""
    if "#" not in text:
        try:
            values = np.array(text.replace(",", " ").split(), dtype=np.float64)
        except ValueError:
            values = None
        if values is not None and np.all(np.isfinite(values)) and (values.size == 0 or values.min() >= 0):
            return values
    out: list[float] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for field, tok in enumerate(line.split("#", 1)[0].replace(",", " ").split(), 1):
            out.append(_non_negative(f"{where}:{lineno}: field {field}", tok, what))
    return np.array(out, dtype=np.float64)


def _non_negative(at: str, tok: object, what: str) -> float:
    """One value of a counts/bandwidth file: a finite number >= 0, or an error saying where."""
    if isinstance(tok, bool) or not isinstance(tok, (str, int, float)):
        raise ValueError(f"{at}: expected a number ({what}), got {tok!r}")
    try:
        v = float(tok)
    except ValueError:
        raise ValueError(f"{at}: expected a number ({what}), got {tok!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{at}: expected a finite number ({what}), got {tok!r}")
    if v < 0:
        raise ValueError(f"{at}: negative {what} {tok!r}")
    return v


def _json_numbers(where: str, text: str, what: str) -> np.ndarray:
    """A JSON list of numbers; a bad element is named by its index and line."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise ValueError(f"{where}:1: expected a JSON list of numbers, got {type(data).__name__}")
    try:
        values = np.array(data, dtype=np.float64)
        ok = values.ndim == 1 and not any(isinstance(v, bool) for v in data)
    except (TypeError, ValueError):
        ok = False
    if ok and np.all(np.isfinite(values)) and (values.size == 0 or values.min() >= 0):
        return values
    for i, v in enumerate(data):
        _non_negative(f"{where}:{_json_line(text, i)}: element {i}", v, what)
    raise ValueError(f"{where}: expected a flat JSON list of numbers")  # pragma: no cover - caught above


def _json_line(text: str, index: int) -> int:
    """The line of the index-th element of a flat JSON list (for error messages)."""
    tokens = re.finditer(r'"(?:[^"\\]|\\.)*"|[^\s,\[\]]+|[\[\]]', text[text.index("[") + 1:])
    seen = 0
    for m in tokens:
        if m.group() in "[]":
            continue
        if seen == index:
            return text.count("\n", 0, text.index("[") + 1 + m.start()) + 1
        seen += 1
    return 1


# ---- tables (times, bandwidth) ----------------------------------------------------------------------
Row = tuple[int, list[str]]  # (line number, fields)


def _rows(p: Path) -> list[Row]:
    """The data lines of a CSV (',' or tab) or whitespace-separated file, with their line numbers; blank
    and '#' lines skipped. A whitespace file whose first line is one date-time is read as one column."""
    text = _decode(str(p), p.read_bytes())
    lines = [(n, ln) for n, ln in enumerate(text.splitlines(), 1) if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise ValueError(f"{p}: empty file (no data lines)")
    first = lines[0][1]
    delim = "," if "," in first else "\t" if "\t" in first else None
    if delim is not None:
        return [(n, [f.strip() for f in next(csv.reader([ln], delimiter=delim))]) for n, ln in lines]
    if _as_datetime(first.strip()) is not None:
        return [(n, [ln.strip()]) for n, ln in lines]
    return [(n, ln.split()) for n, ln in lines]


def _column(p: Path, rows: list[Row], column: str | None, looks_like_data: Callable[[str], bool],
            need_header: bool = False) -> tuple[int, str, list[Row], list[str] | None]:
    """(index, label, data rows, header) of `column` (0-based index or header name; default the first).
    The first line is a header when a name is asked for or its field at the index is not data."""
    line0, head = rows[0]
    by_name = column is not None and not column.isdigit()
    idx = int(column) if column is not None and column.isdigit() else 0
    has_header = by_name or need_header or (idx < len(head) and not looks_like_data(head[idx]))
    if by_name:
        names = [h.strip() for h in head]
        match = [i for i, h in enumerate(names) if h == column] or [i for i, h in enumerate(names)
                                                                  if h.lower() == str(column).lower()]
        if not match:
            raise ValueError(f"{p}:{line0}: no column {column!r}; the header is {names}")
        idx = match[0]
    data = rows[1:] if has_header else rows
    if not data:
        raise ValueError(f"{p}: no data lines after the header")
    for n, fields in data:
        if idx >= len(fields):
            raise ValueError(f"{p}:{n}: no column {column if by_name else idx} (the line has {len(fields)} field(s))")
    label = head[idx] if has_header else f"column {idx}"
    return idx, label, data, (head if has_header else None)


def _as_datetime(tok: str) -> datetime | None:
    try:
        return datetime.fromisoformat(tok)
    except ValueError:
        return None


def _is_time(tok: str) -> bool:
    try:
        return math.isfinite(float(tok))
    except ValueError:
        return _as_datetime(tok) is not None


def _times_s(p: Path, label: str, data: list[Row], idx: int) -> tuple[np.ndarray, list[str]]:
    """Seconds of one column: all numbers, or all ISO-8601 date-times (naive ones taken as UTC)."""
    toks = [fields[idx] for _, fields in data]
    try:
        t = np.array(toks, dtype=np.float64)
        if np.all(np.isfinite(t)):
            return t, []
    except ValueError:
        pass
    numeric = _is_number(toks[0])
    out, naive, aware = np.empty(len(toks)), 0, 0
    for k, ((n, _), tok) in enumerate(zip(data, toks)):
        at = f"{p}:{n}: field {label!r}"
        if numeric:
            if not _is_number(tok):
                raise ValueError(f"{at}: {tok!r} is not a number (the first time was a number of seconds)")
            out[k] = float(tok)
            continue
        dt = _as_datetime(tok)
        if dt is None:
            raise ValueError(f"{at}: {tok!r} is neither a number of seconds nor an ISO-8601 date-time")
        naive, aware = (naive + 1, aware) if dt.tzinfo is None else (naive, aware + 1)
        out[k] = (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()
    notes = [f"{p}: {naive} date-time(s) without a time zone mixed with {aware} with one; "
             f"those without were taken as UTC"] if naive and aware else []
    return out, notes


def _is_number(tok: str) -> bool:
    try:
        return math.isfinite(float(tok))
    except ValueError:
        return False


def _sorted(p: Path, t: np.ndarray, lines: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Times sorted (stable), with a note when the file had them out of order."""
    back = np.flatnonzero(np.diff(t) < 0)
    if not back.size:
        return t, np.arange(t.size), []
    order = np.argsort(t, kind="stable")
    note = (f"{p}: {back.size} {what} earlier than the line before (first at line {int(lines[back[0] + 1])}); "
            f"sorted")
    return t[order], order, [note]


# ---- times ------------------------------------------------------------------------------------------
def times_trace(spec: str) -> RateTrace:
    """`times:` argument 'PATH[:COLUMN][@START-END]': exact arrival times, rebased to 0, sorted; the
    window (seconds of the rebased times) is rebased to its own start."""
    rest, start, end = split_window(spec)
    p, column = split_column(rest)
    tr = read_times(p, column)
    if (start, end) == (0, None):
        return tr
    if start >= tr.duration_s:
        raise ValueError(f"{p}: window @{start}-{'' if end is None else end} starts after the last arrival "
                         f"({tr.duration_s} s)")
    w = tr.window(start, end)
    if not w.times_ms.size:
        raise ValueError(f"{p}: no arrival in seconds [{start}, {end})")
    notes = tuple(n for n in tr.notes if " silence(s) " not in n) + silence_notes(p, w.times_ms)
    return RateTrace.from_times(w.times_ms, w.description, notes, w.duration_s)


def read_times(path: str | Path, column: str | None = None) -> RateTrace:
    """Arrival times from one column (see the module doc) as a RateTrace carrying them (`times_ms`)."""
    p = _existing(str(path))
    rows = _rows(p)
    idx, label, data, _ = _column(p, rows, column, _is_time)
    t, notes = _times_s(p, label, data, idx)
    lines = np.array([n for n, _ in data])
    t, _, sort_notes = _sorted(p, t, lines, "time(s)")
    notes += sort_notes
    dup = int(np.count_nonzero(np.diff(t) == 0))
    if dup:
        notes.append(f"{p}: {dup} arrival(s) share their time with another; kept as simultaneous arrivals")
    ms = (t - t[0]) * 1000.0
    desc = f"times {p.name}:{label} ({ms.size} arrivals, rebased from {_fmt_origin(t[0], data[0][1][idx])})"
    return RateTrace.from_times(ms, desc, tuple(notes) + silence_notes(p, ms))


def _fmt_origin(t0: float, first_tok: str) -> str:
    return f"{t0:g} s" if _is_number(first_tok) else datetime.fromtimestamp(t0, timezone.utc).isoformat()


def silence_notes(p: Path, t_ms: np.ndarray) -> tuple[str, ...]:
    """Silences of >= GAP_MIN_S between consecutive arrivals: kept as idle time, reported."""
    waits = np.diff(t_ms) / 1000.0
    long = np.flatnonzero(waits >= GAP_MIN_S)
    if not long.size:
        return ()
    i = int(long[np.argmax(waits[long])])
    return (f"{p}: {long.size} silence(s) of >= {GAP_MIN_S} s between arrivals ({waits[long].sum():.0f} s in all, "
            f"longest {waits[i]:.0f} s after t = {t_ms[i] / 1000:.0f} s); kept as idle time",)


# ---- bandwidth --------------------------------------------------------------------------------------
def bandwidth_trace(spec: str) -> BandwidthTrace:
    """`bandwidth:` argument 'PATH[:COLUMN[,KEY=VALUE...]]' (or 'PATH:KEY=VALUE,...')."""
    p, tail = split_column(spec)
    parts = [s.strip() for s in (tail or "").split(",") if s.strip()]
    column = parts.pop(0) if parts and "=" not in parts[0] else None
    filters: dict[str, str] = {}
    for item in parts:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"bandwidth:{spec}: a filter is KEY=VALUE, got {item!r}")
        filters[key.strip()] = value.strip()
    return read_bandwidth(p, column, filters)


def read_bandwidth(path: str | Path, column: str | None = None, filters: dict[str, str] | None = None) -> BandwidthTrace:
    """A bandwidth trace in Mbit/s: with no column, two columns (time s, Mbit/s) or one (Mbit/s, one
    sample a second); with a column (index or header name), that column at one sample a second, in
    file order, from the rows matching every KEY=VALUE filter (case- and punctuation-insensitive; a
    value also matches the last '-' part, so East matches US-East)."""
    p = _existing(str(path))
    rows = _rows(p)
    filters = filters or {}
    if column is None and not filters:
        return _two_columns(p, rows)
    idx, label, data, header = _column(p, rows, column, _is_number, need_header=bool(filters))
    data = _filtered(p, data, header, filters, rows[0][0])
    mbps = np.array([_non_negative(f"{p}:{n}: field {label!r}", f[idx], "throughput") for n, f in data])
    cond = "".join(f", {k}={v}" for k, v in filters.items())
    return _trace(p, np.arange(mbps.size, dtype=np.float64), mbps, f"bandwidth {p.name}:{label}{cond}")


def _filtered(p: Path, data: list[Row], header: list[str] | None, filters: dict[str, str],
              header_line: int) -> list[Row]:
    """The rows whose every filtered column matches (`_same`)."""
    if not filters:
        return data
    names = [h.strip() for h in header or []]
    cols = {}
    for key in filters:
        if key not in names:
            raise ValueError(f"{p}:{header_line}: no column {key!r} to filter on; the header is {names}")
        cols[key] = names.index(key)
    keep = [(n, f) for n, f in data if all(_same(f[cols[k]], v) for k, v in filters.items())]
    if not keep:
        raise ValueError(f"{p}: no row matches {', '.join(f'{k}={v}' for k, v in filters.items())}")
    return keep


def _same(value: str, wanted: str) -> bool:
    def norm(s: str) -> str:
        return "".join(ch for ch in s.upper() if ch.isalnum())
    return norm(value) == norm(wanted) or norm(value.rsplit("-", 1)[-1]) == norm(wanted)


def _two_columns(p: Path, rows: list[Row]) -> BandwidthTrace:
    """(time s, Mbit/s) rows, or one Mbit/s column at a sample a second; an optional header line."""
    _, _, data, _ = _column(p, rows, None, _is_time)
    width = len(data[0][1])
    if width == 1:
        mbps = np.array([_non_negative(f"{p}:{n}: field 0", f[0], "throughput") for n, f in data])
        return _trace(p, np.arange(mbps.size, dtype=np.float64), mbps, f"bandwidth {p.name}")
    if width != 2:
        raise ValueError(f"{p}:{data[0][0]}: {width} fields; a bandwidth file has two (time s, Mbit/s) — "
                         f"or name the throughput column: bandwidth:{p}:<column>")
    for n, f in data:
        if len(f) != 2:
            raise ValueError(f"{p}:{n}: expected 2 fields (time s, Mbit/s), got {len(f)}")
    t, notes = _times_s(p, "time", data, 0)
    mbps = np.array([_non_negative(f"{p}:{n}: field 1 (Mbit/s)", f[1], "throughput") for n, f in data])
    return _trace(p, t, mbps, f"bandwidth {p.name}", notes, np.array([n for n, _ in data]))


def _trace(p: Path, t_s: np.ndarray, mbps: np.ndarray, desc: str, notes: list[str] | None = None,
           lines: np.ndarray | None = None) -> BandwidthTrace:
    """Samples at times t (s) -> contiguous samples from 0: sorted, equal times averaged, the last
    sample as long as the median spacing; long spacings and zero samples reported."""
    lines = np.arange(1, t_s.size + 1) if lines is None else lines
    t_s, order, sort_notes = _sorted(p, t_s, lines, "sample time(s)")
    mbps, notes = mbps[order], (notes or []) + sort_notes
    uniq, inv = np.unique(t_s, return_inverse=True)
    if uniq.size < t_s.size:
        notes.append(f"{p}: {t_s.size - uniq.size} sample(s) at a time already seen; averaged with it")
        mbps = np.bincount(inv, weights=mbps) / np.bincount(inv)
    step = np.diff(uniq)
    typical = float(np.median(step)) if step.size else 1.0
    dur = np.append(step, typical)
    long = np.flatnonzero(step > BANDWIDTH_GAP_FACTOR * typical)
    if long.size:
        i = int(long[np.argmax(step[long])])
        notes.append(f"{p}: {long.size} spacing(s) over {BANDWIDTH_GAP_FACTOR:g}x the median {typical:g} s between "
                     f"samples (longest {step[i]:g} s after t = {uniq[i] - uniq[0]:g} s); the sample before each "
                     f"holds across it")
    zeros = int(np.count_nonzero(mbps == 0))
    if zeros:
        notes.append(f"{p}: {zeros} sample(s) of 0 Mbit/s; transfers through them run at the 0.01 Mbit/s floor")
    if mbps.size and not mbps.any():
        raise ValueError(f"{p}: every throughput sample is 0")
    return BandwidthTrace(np.concatenate(([0.0], np.cumsum(dur)[:-1])) * 1000.0, dur * 1000.0, mbps * 1e6,
                          desc, tuple(notes))


# ---- the --network spec -----------------------------------------------------------------------------
def link_trace(spec: str) -> LinkTrace:
    """A user's link for `--network`: mahimahi:PATH, bandwidth:PATH[...], or ghent:PATH (a log in the
    Ghent format)."""
    kind, _, arg = spec.partition(":")
    if not arg:
        raise ValueError(f"--network {kind}: needs a file, e.g. {kind}:path/to/file")
    if kind == "mahimahi":
        return read_mahimahi(_existing(arg))
    if kind == "bandwidth":
        return bandwidth_trace(arg)
    if kind == "ghent":
        return read_ghent_log(_existing(arg))
    raise ValueError(f"--network must be ghent, none, ghent:PATH, mahimahi:PATH or bandwidth:PATH[:COLUMN], "
                     f"got {spec!r}")
