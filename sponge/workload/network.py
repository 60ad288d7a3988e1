"""Network traces and the per-request network delay that shrinks each request's server budget.

README §C: `d_net(t) = RTT_base + d_tx(S, t)` and `budget = SLO - d_net`. Two kinds of link trace:
  * `BandwidthTrace` — piecewise-constant bandwidth samples (Ghent 4G/LTE log, 5Gophers throughput),
    with three transfer rules: `sponge` (barazmoon's exact integer arithmetic), `simple`
    (S*8 / bw(t), the README's form of Sponge's rule) and `exact` (walk the samples, consuming bits).
  * `MahimahiTrace` — packet-delivery opportunities (one 1500-byte packet per listed millisecond).
Trace time is experiment time shifted and wrapped: `(t + offset) mod duration`.
All times are ms, bandwidth is bit/s.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Union

import numpy as np

from sponge.workload.paths import data_file

GHENT_BUS = "network/belgium_4g_lte/report_bus_0001.log"
GOPHERS_RTT = "network/5gophers/All-Carriers/02-Round-Trip-Times/data.csv"
GOPHERS_TPUT = "network/5gophers/All-Carriers/01-Throughput/data.csv"
MTU_BYTES = 1500
DEFAULT_MIN_BPS = 1e4  # 0.01 Mbit/s floor: a zero sample must not give an infinite delay

TxRule = Literal["simple", "exact", "sponge"]


def _wrap(t_ms: np.ndarray, duration_ms: float) -> np.ndarray:
    return np.mod(t_ms, duration_ms)


@dataclass(frozen=True, eq=False)
class BandwidthTrace:
    """Piecewise-constant bandwidth: sample i covers [start_ms[i], start_ms[i] + dur_ms[i])."""

    start_ms: np.ndarray
    dur_ms: np.ndarray
    bps: np.ndarray
    description: str = ""
    notes: tuple[str, ...] = ()  # what the reader found in the file and did about it (for warnings, reports)
    _cum: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        s, d, b = (np.asarray(x, dtype=np.float64) for x in (self.start_ms, self.dur_ms, self.bps))
        if not (s.ndim == d.ndim == b.ndim == 1 and s.size == d.size == b.size and s.size > 0):
            raise ValueError(f"{self.description or 'BandwidthTrace'}: start_ms, dur_ms, bps must be equal-length 1-D")
        if np.any(d <= 0) or np.any(b < 0) or not np.all(np.isfinite(b)):
            raise ValueError(f"{self.description or 'BandwidthTrace'}: durations must be > 0, bandwidth >= 0")
        if not np.allclose(s[1:], s[:-1] + d[:-1]) or s[0] != 0:
            raise ValueError(f"{self.description or 'BandwidthTrace'}: samples must be contiguous from 0")
        for name, arr in (("start_ms", s), ("dur_ms", d), ("bps", b)):
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    @classmethod
    def from_samples(cls, bps: np.ndarray, dur_ms: float | np.ndarray = 1000.0, description: str = "") -> BandwidthTrace:
        """Contiguous samples of equal (or given) duration, starting at 0."""
        b = np.asarray(bps, dtype=np.float64)
        d = np.broadcast_to(np.asarray(dur_ms, dtype=np.float64), b.shape).copy()
        s = np.concatenate(([0.0], np.cumsum(d)[:-1]))
        return cls(s, d, b, description)

    @property
    def duration_ms(self) -> float:
        return float(self.start_ms[-1] + self.dur_ms[-1])

    def scaled(self, factor: float) -> BandwidthTrace:
        """Bandwidth multiplied by `factor` (e.g. < 1 to turn a downlink trace into an uplink guess)."""
        if factor <= 0:
            raise ValueError(f"scale factor must be > 0, got {factor}")
        if factor == 1.0:
            return self
        return BandwidthTrace(self.start_ms, self.dur_ms, self.bps * factor, f"{self.description} x{factor:g}",
                              self.notes)

    def index_at(self, t_ms: np.ndarray | float) -> np.ndarray:
        """Sample index covering trace time t (after wrapping)."""
        tt = _wrap(np.asarray(t_ms, dtype=np.float64), self.duration_ms)
        return np.clip(np.searchsorted(self.start_ms, tt, side="right") - 1, 0, self.bps.size - 1)

    def bps_at(self, t_ms: np.ndarray | float) -> np.ndarray:
        return self.bps[self.index_at(t_ms)]

    def _cumulative(self, min_bps: float) -> tuple[np.ndarray, np.ndarray]:
        """Floored bandwidth and bits delivered before each sample's start (one extra entry: total)."""
        if min_bps not in self._cum:
            b = np.maximum(self.bps, min_bps)
            cum = np.concatenate(([0.0], np.cumsum(b * self.dur_ms / 1000.0)))
            self._cum[min_bps] = (b, cum)
        return self._cum[min_bps]

    def tx_ms(
        self,
        t_ms: np.ndarray | float,
        size_bytes: np.ndarray | float,
        rule: TxRule = "simple",
        min_bps: float = DEFAULT_MIN_BPS,
    ) -> np.ndarray:
        """Transfer time (ms) of `size_bytes` starting at trace time `t_ms` (wrapped), vectorised."""
        t = np.asarray(t_ms, dtype=np.float64)
        bits = np.asarray(size_bytes, dtype=np.float64) * 8.0
        b, cum = self._cumulative(min_bps)
        i = self.index_at(t)
        if rule == "simple":
            return bits / b[i] * 1000.0
        if rule == "sponge":
            # barazmoon: bw_Bpms = int(bytes / interval_ms); cost_ms = image_bytes / bw_Bpms
            bytes_per_ms = np.maximum(np.floor(b[i] / 8000.0 + 1e-9), 1.0)
            return (bits / 8.0) / bytes_per_ms
        if rule != "exact":
            raise ValueError(f"rule must be 'simple', 'exact' or 'sponge', got {rule!r}")
        d = self.duration_ms
        tt = _wrap(t, d)
        total = cum[-1]
        target = cum[i] + b[i] * (tt - self.start_ms[i]) / 1000.0 + bits
        cycles = np.floor(target / total)
        rem = target - cycles * total
        j = np.clip(np.searchsorted(cum, rem, side="right") - 1, 0, b.size - 1)
        t_end = cycles * d + self.start_ms[j] + (rem - cum[j]) / b[j] * 1000.0
        return t_end - tt


@dataclass(frozen=True, eq=False)
class MahimahiTrace:
    """Packet-delivery opportunities (ms timestamps, one MTU-sized packet each), repeating with period T[-1]."""

    times_ms: np.ndarray
    description: str = ""
    notes: tuple[str, ...] = ()  # what the reader found in the file (long silences), for warnings and reports

    def __post_init__(self) -> None:
        t = np.asarray(self.times_ms, dtype=np.float64)
        name = self.description or "MahimahiTrace"
        if t.ndim != 1 or t.size == 0:
            raise ValueError(f"{name}: needs at least one timestamp")
        if np.any(np.diff(t) < 0) or t[0] < 0:
            raise ValueError(f"{name}: timestamps must be non-negative and non-decreasing")
        if t[-1] <= 0:
            raise ValueError(f"{name}: last timestamp (the period) must be > 0")
        t.setflags(write=False)
        object.__setattr__(self, "times_ms", t)

    @property
    def duration_ms(self) -> float:
        return float(self.times_ms[-1])

    def tx_ms(self, t_ms: np.ndarray | float, size_bytes: np.ndarray | float, rule: str = "", **_: object) -> np.ndarray:
        """README §C: k = ceil(S/1500); i = first T[i] >= t in T, T+P, ...; d_tx = T[i+k-1] - t."""
        T = self.times_ms
        n, period = T.size, self.duration_ms
        tt = _wrap(np.asarray(t_ms, dtype=np.float64), period)
        k = np.maximum(np.ceil(np.asarray(size_bytes, dtype=np.float64) / MTU_BYTES), 1).astype(np.int64)
        i0 = np.searchsorted(T, tt, side="left")  # <= n-1 because tt < period = T[-1]
        g = i0 + k - 1
        return T[g % n] + (g // n) * period - tt


LinkTrace = Union[BandwidthTrace, MahimahiTrace]


# ---------------------------------------------------------------------------------------------
# Readers


def read_ghent_log(path: str | Path | None = None) -> BandwidthTrace:
    """Ghent 4G/LTE log: `unix_ts_ms elapsed_ms lat lon bytes_received interval_ms` per line.

    Sample i lasts interval_ms at bytes_received*8/interval_ms kbit/s; samples are back to back.
    """
    p = Path(path) if path is not None else data_file(GHENT_BUS)
    byts, ivs = [], []
    for lineno, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        cols = line.split()
        if len(cols) != 6:
            raise ValueError(f"{p}:{lineno}: expected 6 columns, got {len(cols)}")
        try:
            b, iv = float(cols[4]), float(cols[5])
        except ValueError:
            raise ValueError(f"{p}:{lineno}: bytes_received/interval_ms not numeric: {cols[4]!r} {cols[5]!r}") from None
        if iv <= 0 or b < 0:
            raise ValueError(f"{p}:{lineno}: need interval_ms > 0 and bytes_received >= 0")
        byts.append(b)
        ivs.append(iv)
    if not byts:
        raise ValueError(f"{p}: no samples")
    dur = np.array(ivs)
    bps = np.array(byts) * 8.0 / (dur / 1000.0)
    return BandwidthTrace.from_samples(bps, dur, f"ghent-4g {p.name}")


def _norm(s: str) -> str:
    return "".join(ch for ch in s.upper() if ch.isalnum())


def _match(value: str, wanted: str | None) -> bool:
    """Case/punctuation-insensitive match; 'East' matches 'US-East', 'T-Mobile' matches 'TMOBILE'."""
    return wanted is None or _norm(value) == _norm(wanted) or _norm(value).endswith(_norm(wanted))


def _read_csv(p: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    with p.open(newline="") as fh:
        r = csv.DictReader(fh)
        missing = [c for c in required if c not in (r.fieldnames or [])]
        if missing:
            raise ValueError(f"{p}: missing column(s) {missing}; header is {r.fieldnames}")
        return list(r)


def read_5gophers_rtt(
    path: str | Path | None = None, carrier: str | None = None, server: str | None = None
) -> np.ndarray:
    """RTT samples (ms) from 5Gophers `rtt_ms,carrier,server_location`, filtered by carrier/server."""
    p = Path(path) if path is not None else data_file(GOPHERS_RTT)
    out = []
    for n, row in enumerate(_read_csv(p, ("rtt_ms", "carrier", "server_location")), 2):
        if _match(row["carrier"], carrier) and _match(row["server_location"], server):
            try:
                out.append(float(row["rtt_ms"]))
            except ValueError:
                raise ValueError(f"{p}:{n}: rtt_ms not numeric: {row['rtt_ms']!r}") from None
    if not out:
        raise ValueError(f"{p}: no RTT rows for carrier={carrier!r} server={server!r}")
    return np.array(out)


def read_5gophers_throughput(
    path: str | Path | None = None,
    carrier: str | None = None,
    server: str | None = None,
    num_tcp_conn: int | None = 1,
) -> BandwidthTrace:
    """5Gophers per-second TCP throughput as a bandwidth trace (runs concatenated in file order)."""
    p = Path(path) if path is not None else data_file(GOPHERS_TPUT)
    cols = ("carrier", "num_tcp_conn", "server_location", "throughput_mbps")
    mbps = []
    for n, row in enumerate(_read_csv(p, cols), 2):
        if not (_match(row["carrier"], carrier) and _match(row["server_location"], server)):
            continue
        try:
            if num_tcp_conn is not None and int(row["num_tcp_conn"]) != num_tcp_conn:
                continue
            mbps.append(float(row["throughput_mbps"]))
        except ValueError:
            raise ValueError(f"{p}:{n}: num_tcp_conn/throughput_mbps not numeric") from None
    if not mbps:
        raise ValueError(f"{p}: no throughput rows for carrier={carrier!r} server={server!r} conns={num_tcp_conn}")
    desc = f"5gophers {carrier or 'all'}-{server or 'all'} x{num_tcp_conn or 'any'}"
    return BandwidthTrace.from_samples(np.array(mbps) * 1e6, 1000.0, desc)


MAHIMAHI_SILENCE_MS = 1000  # a wait this long for the next delivery opportunity is reported


def read_mahimahi(path: str | Path) -> MahimahiTrace:
    """A mahimahi link trace: one integer ms timestamp per line (a 1500-byte delivery opportunity).

    For uploads, pass the `.up` file of a pair. Repeated timestamps are several packets in the same ms
    (normal); a decreasing one is an error, as in mahimahi itself. Long silences are reported in `notes`.
    """
    p = Path(path)
    times = []
    for lineno, line in enumerate(p.read_text().splitlines(), 1):
        s = line.strip()
        if not s:
            continue
        try:
            times.append(int(s))
        except ValueError:
            raise ValueError(f"{p}:{lineno}: expected an integer millisecond timestamp, got {s!r}") from None
        if times[-1] < 0:
            raise ValueError(f"{p}:{lineno}: negative timestamp {times[-1]}")
        if len(times) > 1 and times[-1] < times[-2]:
            raise ValueError(f"{p}:{lineno}: timestamps must be non-decreasing ({times[-1]} < {times[-2]})")
    if not times:
        raise ValueError(f"{p}: no timestamps")
    if times[-1] <= 0:
        raise ValueError(f"{p}: the last timestamp (the period) must be > 0")
    t = np.array(times, dtype=np.float64)
    return MahimahiTrace(t, f"mahimahi {p.name}", _mahimahi_notes(p, t))


def _mahimahi_notes(p: Path, t: np.ndarray) -> tuple[str, ...]:
    """A finding when the link offers no delivery for >= MAHIMAHI_SILENCE_MS (uploads wait across it)."""
    waits = np.diff(np.concatenate(([0.0], t)))
    long = np.flatnonzero(waits >= MAHIMAHI_SILENCE_MS)
    if not long.size:
        return ()
    i = int(long[np.argmax(waits[long])])
    return (f"{p}: {long.size} silence(s) of >= {MAHIMAHI_SILENCE_MS} ms without a delivery opportunity "
            f"(longest {waits[i]:.0f} ms, before {t[i]:.0f} ms); kept: uploads wait across them",)


# ---------------------------------------------------------------------------------------------
# RTT and the network model


@dataclass(frozen=True, eq=False)
class RttModel:
    """Base round-trip time: none (Sponge), a constant, or drawn per request from samples."""

    kind: Literal["zero", "constant", "sampled"] = "zero"
    value_ms: float = 0.0
    samples_ms: tuple[float, ...] = ()
    one_way: bool = False  # use RTT/2 when only the upload is modelled

    def __post_init__(self) -> None:
        if self.kind not in ("zero", "constant", "sampled"):
            raise ValueError(f"RttModel.kind must be zero/constant/sampled, got {self.kind!r}")
        if self.kind == "sampled" and not self.samples_ms:
            raise ValueError("RttModel(kind='sampled') needs samples_ms")
        if self.value_ms < 0:
            raise ValueError("RttModel.value_ms must be >= 0")

    @classmethod
    def constant(cls, ms: float, one_way: bool = False) -> RttModel:
        return cls("constant", float(ms), (), one_way)

    @classmethod
    def sampled(cls, samples_ms: np.ndarray | list[float], one_way: bool = False) -> RttModel:
        return cls("sampled", 0.0, tuple(float(x) for x in samples_ms), one_way)

    @classmethod
    def from_5gophers(
        cls, carrier: str | None = None, server: str | None = None, median: bool = False, one_way: bool = False
    ) -> RttModel:
        """Per-request samples from 5Gophers (or their median as a constant)."""
        s = read_5gophers_rtt(carrier=carrier, server=server)
        return cls.constant(float(np.median(s)), one_way) if median else cls.sampled(s, one_way)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n RTTs in ms (a 'zero'/'constant' model draws nothing from rng)."""
        if self.kind == "zero":
            out = np.zeros(n)
        elif self.kind == "constant":
            out = np.full(n, self.value_ms)
        else:
            out = rng.choice(np.asarray(self.samples_ms), size=n)
        return out / 2.0 if self.one_way else out

    def describe(self) -> str:
        half = " one-way" if self.one_way else ""
        if self.kind == "constant":
            return f"rtt {self.value_ms:g} ms{half}"
        if self.kind == "sampled":
            return f"rtt sampled (n={len(self.samples_ms)}, median {np.median(self.samples_ms):.1f} ms){half}"
        return "rtt 0"


@dataclass(frozen=True, eq=False)
class NetworkModel:
    """Per-request network delay: RTT_base + d_tx(S, (t + offset) mod duration).

    uplink_scale multiplies the link's bandwidth (the Ghent log is downlink; Sponge applied it to the
    upload unscaled, so 1.0 reproduces Sponge). For a mahimahi trace the transfer time is divided by it.
    """

    link: LinkTrace | None = None
    rule: TxRule = "simple"
    rtt: RttModel = field(default_factory=RttModel)
    uplink_scale: float = 1.0
    offset_ms: float = 0.0
    min_bps: float = DEFAULT_MIN_BPS
    _eff: LinkTrace | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.rule not in ("simple", "exact", "sponge"):
            raise ValueError(f"rule must be 'simple', 'exact' or 'sponge', got {self.rule!r}")
        if self.uplink_scale <= 0:
            raise ValueError(f"uplink_scale must be > 0, got {self.uplink_scale}")
        eff = self.link.scaled(self.uplink_scale) if isinstance(self.link, BandwidthTrace) else self.link
        object.__setattr__(self, "_eff", eff)

    @property
    def duration_ms(self) -> float:
        return self.link.duration_ms if self.link is not None else 0.0

    def with_offset(self, offset_ms: float) -> NetworkModel:
        return replace(self, offset_ms=float(offset_ms))

    def random_offset(self, rng: np.random.Generator) -> float:
        """A uniform offset into the link trace, to decorrelate clients."""
        return float(rng.uniform(0.0, self.duration_ms)) if self.link is not None else 0.0

    def tx_ms(self, send_ms: np.ndarray | float, size_bytes: np.ndarray | float) -> np.ndarray:
        """Transfer time only (no RTT), vectorised."""
        t = np.asarray(send_ms, dtype=np.float64)
        if self._eff is None:
            return np.zeros(np.broadcast(t, np.asarray(size_bytes)).shape)
        d = self._eff.tx_ms(t + self.offset_ms, size_bytes, rule=self.rule, min_bps=self.min_bps)
        if isinstance(self._eff, MahimahiTrace) and self.uplink_scale != 1.0:
            d = d / self.uplink_scale
        return d

    def network_ms_many(
        self, send_ms: np.ndarray, size_bytes: np.ndarray | float, rng: np.random.Generator
    ) -> np.ndarray:
        """Vectorised network delay for many requests (RTT drawn from rng when sampled)."""
        t = np.atleast_1d(np.asarray(send_ms, dtype=np.float64))
        return self.tx_ms(t, size_bytes) + self.rtt.draw(rng, t.size)

    def network_ms(self, send_time_ms: float, size_bytes: float, rng: np.random.Generator) -> float:
        """Network delay (ms) of one request sent at experiment time `send_time_ms`."""
        return float(self.network_ms_many(np.array([send_time_ms]), size_bytes, rng)[0])

    def describe(self) -> str:
        link = "no link" if self.link is None else f"{self.link.description} ({self.rule})"
        scale = f", uplink x{self.uplink_scale:g}" if self.uplink_scale != 1.0 else ""
        return f"{link}{scale}, {self.rtt.describe()}, offset {self.offset_ms:.0f} ms"


def budget_ms(slo_ms: float | np.ndarray, network_ms: float | np.ndarray) -> float | np.ndarray:
    """The server's budget: what is left of the end-to-end objective after the network (may be < 0)."""
    return np.subtract(slo_ms, network_ms)


def sponge_network_model() -> NetworkModel:
    """Sponge's setup: Ghent bus log, barazmoon's rule, no RTT, trace time = experiment time."""
    return NetworkModel(read_ghent_log(), rule="sponge")


__all__ = [
    "BandwidthTrace",
    "MahimahiTrace",
    "LinkTrace",
    "RttModel",
    "NetworkModel",
    "read_ghent_log",
    "read_5gophers_rtt",
    "read_5gophers_throughput",
    "read_mahimahi",
    "budget_ms",
    "sponge_network_model",
    "MTU_BYTES",
]
