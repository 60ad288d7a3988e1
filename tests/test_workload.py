"""Workload traces, arrivals and network delay, checked against the figures in ../shared/data/README.md.

Tests of the traces themselves are marked `needs_data` (they skip on a clone without the traces); the
arrival, network-rule and cache tests use synthetic inputs and always run."""

from __future__ import annotations

import numpy as np
import pytest

from markers import needs_data, require_data
from sponge.workload import arrivals, network, requests, traces
from sponge.workload.network import BandwidthTrace, MahimahiTrace, NetworkModel, RttModel
from sponge.workload.traces import RateTrace

KIB = 1024


@pytest.fixture(scope="module")
def counts() -> np.ndarray:
    require_data()
    return traces.twitter_2021_counts()  # parsed once, then cached (.npy + in-process)


@pytest.fixture(scope="module")
def ghent() -> BandwidthTrace:
    require_data()
    return network.read_ghent_log()


# --- Twitter 2021-08 -----------------------------------------------------------------------------


@needs_data
def test_twitter_whole_trace_stats(counts: np.ndarray) -> None:
    assert counts.size == 1_899_061
    assert int(counts.sum()) == 120_774_326
    assert round(float(counts.mean()), 1) == 63.6
    assert int(counts.max()) == 388 and int(counts.argmax()) == 1_147_158
    assert int((counts == 0).sum()) == 37_899
    assert not counts.flags.writeable  # the shared cached array cannot be corrupted by a caller


@needs_data
def test_twitter_gaps(counts: np.ndarray) -> None:
    gaps = traces.find_gaps(counts)
    assert len(gaps) == 22
    assert sum(n for _, n in gaps) == 36_671
    daily = [(s, n) for s, n in gaps if n != 150]
    assert len(daily) == 21
    expected = [84_661 + k * 86_400 for k in range(21)]
    # README: start 84,661 + k*86,400; two of them are 1,740 s long and start one second earlier
    assert all(abs(s - e) <= 1 and s + n == e + 1_739 for (s, n), e in zip(daily, expected))
    assert all(1_739 <= n <= 1_740 for _, n in daily)
    assert (1_089_596, 150) in gaps


@needs_data
def test_bursty_window_matches_readme() -> None:
    w8 = traces.named_window("bursty", damping_factor=8)
    assert w8.duration_s == 1_200
    assert round(w8.mean_rps, 1) == 12.0 and w8.rps.min() == 3 and w8.rps.max() == 34
    w5 = traces.named_window("bursty", damping_factor=5)
    assert (w5.rps.min(), w5.rps.max()) == (5, 54)
    low, high = traces.named_window("steady_low"), traces.named_window("steady-high")
    assert (low.rps.min(), low.rps.max()) == (5, 13)
    assert (high.rps.min(), high.rps.max()) == (38, 55)
    assert traces.named_window("fluctuating").duration_s == 1_200
    with pytest.raises(KeyError, match="unknown window"):
        traces.named_window("nope")


@needs_data
def test_damping_is_barazmoons_int_division(counts: np.ndarray) -> None:
    w = traces.twitter_2021(1_000_000, 1_000_500, damping_factor=3, gaps="keep")
    assert w.rps.tolist() == [int(v / 3) for v in counts[1_000_000:1_000_500].tolist()]


@needs_data
def test_gap_modes_on_a_window_that_cuts_a_gap(counts: np.ndarray) -> None:
    s, n = 84_661, 1_739
    start, end = s + 1_000, s + n + 100  # starts inside the gap: the gap is still recognised
    keep = traces.twitter_2021(start, end, gaps="keep")
    skip = traces.twitter_2021(start, end, gaps="skip")
    interp = traces.twitter_2021(start, end, gaps="interpolate")
    assert keep.duration_s == interp.duration_s == end - start
    assert skip.duration_s == 100 and skip.rps.tolist() == counts[s + n : end].tolist()
    assert (keep.rps[: n - 1_000] == 0).all()
    inside = interp.rps[: n - 1_000]
    lo, hi = sorted((counts[s - 1], counts[s + n]))
    assert inside.min() >= lo - 1 and inside.max() <= hi and (inside > 0).all()


@needs_data
def test_twitter_2018_sponge_files() -> None:
    c = traces.twitter_2018("create")
    assert c.duration_s == 1_800 and c.total == 58_454
    assert round(c.mean_rps, 1) == 32.5 and c.peak_rps == 53
    d = traces.twitter_2018("delete", 23_400, 25_200)
    assert round(d.mean_rps, 1) == 9.7 and d.peak_rps == 37


def test_scale_to_peak() -> None:
    t = RateTrace(np.array([1.0, 2.0, 4.0]), "x")
    s = traces.scale_to_peak(t, 10)
    assert isinstance(s, RateTrace) and s.rps.tolist() == [2.5, 5.0, 10.0]
    assert traces.scale_to_peak(np.array([0.0, 2.0]), 3).tolist() == [0.0, 3.0]
    with pytest.raises(ValueError):
        traces.scale_to_peak(np.zeros(3), 5)


def test_malformed_twitter_archive_names_the_file(tmp_path) -> None:
    import io
    import tarfile

    bad = tmp_path / "bad.tbz2"
    with tarfile.open(bad, "w:bz2") as tf:
        data = b"1 2 x 4"
        info = tarfile.TarInfo("workload.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="bad.tbz2"):
        traces._parse_twitter_tbz2(bad)


# --- arrivals ------------------------------------------------------------------------------------


def test_arrivals_deterministic_and_counts() -> None:
    rates = np.array([0, 5, 20, 3, 50, 10], dtype=float)
    a = arrivals.arrival_times_ms(rates, "poisson", seed=7)
    assert np.array_equal(a, arrivals.arrival_times_ms(rates, "poisson", seed=7))
    assert not np.array_equal(a, arrivals.arrival_times_ms(rates, "poisson", seed=8))
    assert np.all(np.diff(a) >= 0) and a.min() >= 1000 and a.max() < 6000  # second 0 has rate 0

    u = arrivals.arrival_times_ms(rates, "uniform")
    assert arrivals.rate_of(u, 6).tolist() == rates.tolist()
    assert np.allclose(u[u < 2000], 1000 + np.arange(5) * 200)

    frac = arrivals.arrival_times_ms(np.full(10, 0.5), "uniform")
    assert frac.size == 5  # carried over, not rounded away


def test_poisson_counts_follow_rates() -> None:
    rates = np.full(2_000, 12.0)
    per_s = arrivals.rate_of(arrivals.arrival_times_ms(rates, "poisson", seed=1), 2_000)
    assert abs(per_s.mean() - 12.0) < 4 * np.sqrt(12.0 / 2_000)
    assert abs(per_s.var() - 12.0) < 1.5  # Poisson: variance = mean


# --- network: Ghent, 5Gophers ----------------------------------------------------------------------


@needs_data
def test_ghent_throughput_stats(ghent: BandwidthTrace) -> None:
    mbps = ghent.bps / 1e6
    assert mbps.size == 607
    assert round(float(np.percentile(mbps, 50)), 1) == 26.8
    assert round(float(mbps.mean()), 1) == 27.6
    assert round(float(mbps.min()), 2) == 3.46 and round(float(mbps.max()), 1) == 56.0
    assert round(float(np.percentile(mbps, 5)), 1) == 10.6 and round(float(np.percentile(mbps, 95)), 1) == 46.4


@needs_data
@pytest.mark.parametrize("rule,tol", [("simple", 0), ("sponge", 1)])
def test_ghent_transfer_percentiles(ghent: BandwidthTrace, rule: str, tol: int) -> None:
    """README B1 figures use S*8/bw; barazmoon's int(bytes/interval_ms) differs by under 1 ms."""

    def pct(kib: int, q: float) -> float:
        return float(np.percentile(ghent.tx_ms(ghent.start_ms, kib * KIB, rule=rule), q))

    readme = {(100, 50): 31, (100, 95): 77, (100, 100): 237, (200, 50): 61, (200, 95): 154,
              (500, 50): 153, (500, 95): 385, (500, 99): 578}
    for (kib, q), ms in readme.items():
        assert abs(round(pct(kib, q)) - ms) <= tol, (kib, q, pct(kib, q))


@needs_data
def test_5gophers_rtt_and_throughput() -> None:
    rtt = network.read_5gophers_rtt()
    assert rtt.size == 720
    assert [round(float(np.percentile(rtt, q)), 1) for q in (5, 50, 95)] == [36.4, 84.6, 164.5]
    assert round(float(np.median(network.read_5gophers_rtt(carrier="T-Mobile", server="East"))), 1) == 82.5
    assert round(float(np.median(network.read_5gophers_rtt(carrier="sprint", server="US-West"))), 1) == 86.1
    sprint = network.read_5gophers_throughput(carrier="Sprint", server="East")
    assert 29 <= np.median(sprint.bps) / 1e6 <= 32 and sprint.duration_ms == 600_000
    with pytest.raises(ValueError, match="no RTT rows"):
        network.read_5gophers_rtt(carrier="AT&T")


@needs_data
def test_worked_example_budget_856(ghent: BandwidthTrace) -> None:
    rtt = RttModel.from_5gophers("T-Mobile", "East", median=True)
    median_link = BandwidthTrace.from_samples(np.array([26.8e6]))
    nm = NetworkModel(median_link, rule="simple", rtt=rtt)
    net = nm.network_ms(0.0, 200 * KIB, np.random.default_rng(0))
    assert net == pytest.approx(204_800 * 8 / 26.8e6 * 1000 + 82.45)
    assert round(float(network.budget_ms(1000, net))) == 856
    # the same on the real trace at its median second
    i = int(np.argmin(np.abs(ghent.bps - np.median(ghent.bps))))
    real = NetworkModel(ghent, rule="simple", rtt=rtt).network_ms(ghent.start_ms[i], 200 * KIB, np.random.default_rng(0))
    assert abs(1000 - real - 856) < 1.5


# --- network: rules ------------------------------------------------------------------------------


def test_exact_rule_walks_into_a_bandwidth_drop() -> None:
    link = BandwidthTrace.from_samples(np.array([100e6, 1e6]), 1000.0)
    size = 1_000_000  # 8 Mbit
    simple = float(link.tx_ms(990.0, size, "simple"))
    exact = float(link.tx_ms(990.0, size, "exact"))
    assert simple == pytest.approx(80.0)
    # 10 ms at 100 Mbit/s (1 Mbit), 1000 ms at 1 Mbit/s (1 Mbit), wrap, 6 Mbit at 100 Mbit/s = 60 ms
    assert exact == pytest.approx(10 + 1000 + 60)
    assert exact >= simple
    flat = BandwidthTrace.from_samples(np.full(5, 8e6), 1000.0)
    assert float(flat.tx_ms(4_500.0, 2_000_000, "exact")) == pytest.approx(float(flat.tx_ms(4_500.0, 2_000_000, "simple")))


def test_exact_rule_floors_zero_bandwidth() -> None:
    link = BandwidthTrace.from_samples(np.array([0.0, 8e6]), 1000.0)
    d = float(link.tx_ms(0.0, 1_000, "exact", min_bps=1e4))
    assert d == pytest.approx(800.0)  # 8000 bits at 10 kbit/s, finite despite the zero sample
    assert np.isfinite(link.tx_ms(0.0, 1_000, "simple"))


@needs_data
def test_exact_ge_simple_whenever_bandwidth_only_falls(ghent: BandwidthTrace) -> None:
    t = ghent.start_ms[:-1] + 500.0
    falls = ghent.bps[1:] <= ghent.bps[:-1]
    ex = ghent.tx_ms(t, 500 * KIB, "exact")
    si = ghent.tx_ms(t, 500 * KIB, "simple")
    short = si < 500  # transfer ends within the next sample, so only that sample matters
    sel = falls & short
    assert sel.sum() > 100 and np.all(ex[sel] >= si[sel] - 1e-9)


def test_mahimahi_rule_by_hand(tmp_path) -> None:
    p = tmp_path / "link.up"
    p.write_text("1\n3\n3\n7\n10\n")
    m = network.read_mahimahi(p)
    assert m.duration_ms == 10
    assert float(m.tx_ms(2.0, 3_000)) == 1.0  # k=2: opportunities at 3, 3
    assert float(m.tx_ms(4.0, 3_000)) == 6.0  # 7, 10
    assert float(m.tx_ms(9.0, 3_000)) == 2.0  # 10, then 1+10 in the next period
    assert float(m.tx_ms(9.0, 1)) == 1.0  # k=1
    assert float(m.tx_ms(12.0, 3_000)) == 1.0  # t wraps to 2
    assert float(m.tx_ms(0.0, 7_500)) == 10.0  # k=5: 1, 3, 3, 7, 10
    assert float(m.tx_ms(0.0, 9_000)) == 11.0  # k=6: the 6th opportunity is T[0] + period
    (tmp_path / "bad.up").write_text("1\n5\n4\n")
    with pytest.raises(ValueError, match=r"bad.up:3"):
        network.read_mahimahi(tmp_path / "bad.up")


def test_network_model_options() -> None:
    link = BandwidthTrace.from_samples(np.array([8e6, 16e6]), 1000.0)  # 1 MB/s then 2 MB/s
    rng = np.random.default_rng(0)
    assert NetworkModel(link).network_ms(100.0, 1_000, rng) == pytest.approx(1.0)
    assert NetworkModel(link).network_ms(2_100.0, 1_000, rng) == pytest.approx(1.0)  # wraps
    assert NetworkModel(link, offset_ms=1_000).network_ms(100.0, 1_000, rng) == pytest.approx(0.5)
    assert NetworkModel(link, uplink_scale=0.5).network_ms(100.0, 1_000, rng) == pytest.approx(2.0)
    assert NetworkModel(link, rtt=RttModel.constant(40)).network_ms(100.0, 1_000, rng) == pytest.approx(41.0)
    assert NetworkModel(link, rtt=RttModel.constant(40, one_way=True)).network_ms(100.0, 1_000, rng) == pytest.approx(21.0)
    sampled = NetworkModel(None, rtt=RttModel.sampled([10.0, 20.0]))
    draws = {sampled.network_ms(0.0, 1, rng) for _ in range(50)}
    assert draws == {10.0, 20.0}
    assert NetworkModel().network_ms(5.0, 10_000, rng) == 0.0
    mm = MahimahiTrace(np.array([1.0, 2.0]))
    assert NetworkModel(mm, uplink_scale=0.5).network_ms(0.0, 100, rng) == pytest.approx(2.0)


# --- the request plan ----------------------------------------------------------------------------


@needs_data
def test_generate_requests_deterministic_and_consistent(ghent: BandwidthTrace) -> None:
    trace = RateTrace(np.array([5.0, 10.0, 0.0, 20.0]), "t")
    nm = NetworkModel(ghent, rule="exact", rtt=RttModel.from_5gophers("Verizon", "East"))
    a = requests.generate_requests(trace, nm, 1000, {100 * KIB: 1, 500 * KIB: 1}, seed=3, clients=3)
    b = requests.generate_requests(trace, nm, 1000, {100 * KIB: 1, 500 * KIB: 1}, seed=3, clients=3)
    assert a == b and len(a) > 0
    assert [r.id for r in a] == list(range(len(a)))
    assert all(r.budget_ms == pytest.approx(r.slo_ms - r.network_ms) for r in a)
    assert all(r.network_ms > 0 for r in a)
    assert {r.size_bytes for r in a} <= {100 * KIB, 500 * KIB}
    c = requests.generate_requests(trace, nm, 1000, 200 * KIB, seed=3, clients=3)
    assert [r.send_ms for r in c] == [r.send_ms for r in a]  # sizes do not perturb arrivals
    assert requests.generate_requests(trace, nm, 1000, 200 * KIB, seed=4) != c
    none = requests.generate_requests(trace, None, 750, 1, seed=3, arrivals="uniform")
    assert len(none) == 35 and all(r.budget_ms == 750 for r in none)


@needs_data
def test_sponge_setup_reproduces_its_budget_spread(ghent: BandwidthTrace) -> None:
    """Offset 0, no RTT, barazmoon's rule: budgets are SLO minus the README's transfer times."""
    nm = NetworkModel(ghent, rule="sponge")
    plan = requests.generate_requests(RateTrace.constant(10, 600), nm, 1000, 100 * KIB, seed=0, random_offsets=False)
    b = requests.budgets_of(plan)
    assert round(1000 - float(np.percentile(b, 50))) in (30, 31, 32)
    assert 1000 - 238 < b.min() < 1000 - 230  # the worst second of the trace


def test_twitter_cache_roundtrip(tmp_path, monkeypatch) -> None:
    import io
    import tarfile

    src = tmp_path / "w.tbz2"
    with tarfile.open(src, "w:bz2") as tf:
        data = b"3 0 7 12"
        info = tarfile.TarInfo("workload.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    monkeypatch.setenv("SPONGE_CACHE_DIR", str(tmp_path / "cache"))
    first = traces.twitter_2021_counts(src)
    assert first.tolist() == [3, 0, 7, 12]
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    traces._load_twitter_cached.cache_clear()  # force the .npy path
    assert traces.twitter_2021_counts(src).tolist() == [3, 0, 7, 12]
    w = traces.twitter_2021(0, 4, damping_factor=2, gaps="keep", path=src)
    assert w.rps.tolist() == [1, 0, 3, 6]
