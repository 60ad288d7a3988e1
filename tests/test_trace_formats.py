"""Users' own traces (README "Bring your own traces"): every format parses to the hand-computed numbers,
findings (gaps, unsorted or duplicate times) are reported as notes and warnings, malformed files fail
with the file and line named, and the commands run end to end on tiny files. The last tests load the
bundled NASA, Twitter 2018 and 5Gophers files through the same options (they skip without the data)."""

from __future__ import annotations

import argparse
import bz2
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from markers import needs_data, require_data
from sponge import experiment
from sponge.sim import cli as sim_cli
from sponge.sim.scenario import request_set
from sponge.workload import loadgen, userfiles
from sponge.workload.network import BandwidthTrace, MahimahiTrace
from sponge.workload.scenario import Scenario, scenario_from_args


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _tar_bz2(path: Path, member: str, data: bytes) -> Path:
    with tarfile.open(path, "w:bz2") as tf:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return path


def _rates(tmp_path: Path, spec: str, **kw) -> list[float]:
    return Scenario(trace=spec, network="none", **kw).rate_trace().rps.tolist()


def _run(register, argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.func(args)


# ---- counts -------------------------------------------------------------------------------------------
def test_counts_one_a_line_one_line_commas_and_comments(tmp_path) -> None:
    a = _write(tmp_path, "a.txt", "3\n5\n0\n12\n")
    b = _write(tmp_path, "b.txt", "3 5  0\t12\n")
    c = _write(tmp_path, "c.txt", "# requests per second\n3, 5\n\n0,12  # last two\n")
    for p in (a, b, c):
        assert _rates(tmp_path, f"counts:{p}") == [3, 5, 0, 12]
    tr = Scenario(trace=f"counts:{a}").rate_trace()
    assert tr.description == "counts a.txt" and tr.notes == () and tr.times_ms is None


def test_counts_json_list_window_and_damping(tmp_path) -> None:
    p = _write(tmp_path, "w.json", json.dumps([0, 0, 4, 7, 9, 0]))
    assert _rates(tmp_path, f"counts:{p}") == [0, 0, 4, 7, 9, 0]
    assert _rates(tmp_path, f"counts:{p}@2-4") == [4, 7]
    assert _rates(tmp_path, f"counts:{p}@3-") == [7, 9, 0]
    assert _rates(tmp_path, f"counts:{p}@2-5", damping=2) == [2, 3, 4]  # floor(v / 2), as barazmoon
    assert _rates(tmp_path, f"counts:{p}@2-5", scale=0.5) == [2.0, 3.5, 4.5]
    assert _rates(tmp_path, f"counts:{p}", duration_s=3) == [0, 0, 4]


def test_counts_bzip2_tar_and_bare_bzip2(tmp_path) -> None:
    tbz = _tar_bz2(tmp_path / "workload.tbz2", "workload.txt", b"1 0 2 3")
    assert _rates(tmp_path, f"counts:{tbz}") == [1, 0, 2, 3]
    other = _tar_bz2(tmp_path / "one.tbz2", "x/rates.txt", b"[4, 5]")  # a lone member of any name, JSON inside
    assert _rates(tmp_path, f"counts:{other}") == [4, 5]
    bare = tmp_path / "w.txt.bz2"
    bare.write_bytes(bz2.compress(b"6\n7\n"))
    assert _rates(tmp_path, f"counts:{bare}") == [6, 7]


def test_counts_gaps_are_kept_and_reported(tmp_path) -> None:
    p = _write(tmp_path, "g.txt", "\n".join(["0"] * 100 + ["5"] * 10 + ["0"] * 70 + ["2"] * 5) + "\n")
    tr = Scenario(trace=f"counts:{p}").rate_trace()
    assert tr.duration_s == 185 and tr.total == 60  # kept as idle seconds
    (note,) = tr.notes
    assert str(p) in note and "2 run(s) of >= 60 s" in note and "170 s in all" in note
    assert "longest 100 s from second 0" in note and "@100-185" in note
    assert Scenario(trace=f"counts:{p}@100-110").rate_trace().notes == ()  # the window has no gap


# ---- times --------------------------------------------------------------------------------------------
def test_times_numeric_rebased_exact_and_used_as_send_times(tmp_path) -> None:
    p = _write(tmp_path, "t.txt", "10.5\n11\n12.25\n12.5\n")
    sc = Scenario(trace=f"times:{p}", network="none")
    tr = sc.rate_trace()
    assert tr.times_ms.tolist() == [0.0, 500.0, 1750.0, 2000.0]
    assert tr.rps.tolist() == [2, 1, 1] and tr.notes == ()
    for arrivals in ("poisson", "uniform"):  # the file's times, whatever the within-second model
        plan = Scenario(trace=f"times:{p}", network="none", arrivals=arrivals).plan()
        assert [r.send_ms for r in plan] == [0.0, 500.0, 1750.0, 2000.0]
        assert all(r.budget_ms == 1000.0 for r in plan)
    rs, trace = request_set(sc)
    assert rs.send_ms.tolist() == [0.0, 500.0, 1750.0, 2000.0] and rs.duration_ms == 3000.0
    assert "the file's arrival times" in sc.summary()


def test_times_iso8601_and_columns_by_index_and_name(tmp_path) -> None:
    p = _write(tmp_path, "log.csv", "id,when,path\n"
                                    "1,2024-05-01T10:00:01.5Z,/a\n"
                                    "2,2024-05-01T10:00:00+00:00,/b\n"
                                    "3,2024-05-01T12:00:03+02:00,/c\n")  # = 10:00:03 UTC
    by_name = Scenario(trace=f"times:{p}:when", network="none").rate_trace()
    by_index = Scenario(trace=f"times:{p}:1", network="none").rate_trace()
    assert by_name.times_ms.tolist() == by_index.times_ms.tolist() == [0.0, 1500.0, 3000.0]
    assert "when" in by_name.description and "2024-05-01T10:00:00+00:00" in by_name.description
    assert any("sorted" in n for n in by_name.notes)
    numbers = _write(tmp_path, "n.tsv", "a\tt\n9\t100\n9\t101.25\n")  # tab-separated, numeric seconds
    assert Scenario(trace=f"times:{numbers}:t", network="none").rate_trace().times_ms.tolist() == [0.0, 1250.0]
    spaced = _write(tmp_path, "s.txt", "2024-05-01 10:00:00\n2024-05-01 10:00:02\n")  # a space inside
    assert Scenario(trace=f"times:{spaced}", network="none").rate_trace().times_ms.tolist() == [0.0, 2000.0]
    first = _write(tmp_path, "f.csv", "5,x\n7,y\n")  # default: the first column, no header
    assert Scenario(trace=f"times:{first}", network="none").rate_trace().times_ms.tolist() == [0.0, 2000.0]


def test_times_unsorted_duplicates_and_silences_reported(tmp_path, capsys) -> None:
    p = _write(tmp_path, "u.txt", "5\n3\n3\n4\n200\n")
    tr = Scenario(trace=f"times:{p}", network="none").rate_trace()
    assert tr.times_ms.tolist() == [0.0, 0.0, 1000.0, 2000.0, 197000.0]
    assert tr.rps[:3].tolist() == [2, 1, 1]  # duplicates are simultaneous arrivals
    sort, dup, silence = tr.notes
    assert "1 time(s) earlier than the line before (first at line 2); sorted" in sort
    assert "1 arrival(s) share their time" in dup and "simultaneous" in dup
    assert "1 silence(s) of >= 60 s" in silence and "longest 195 s after t = 2 s" in silence
    w = Scenario(trace=f"times:{p}@0-100", network="none").rate_trace()  # a window: its own silences
    assert w.times_ms.tolist() == [0.0, 0.0, 1000.0, 2000.0] and not any("silence" in n for n in w.notes)
    rc = _run(sim_cli.register, ["simulate", "--trace", f"times:{p}", "--network", "none", "--policy", "static",
                                 "--static-cpu-m", "2000", "--no-oracle", "--out", str(tmp_path / "sim")])
    err = capsys.readouterr().err
    assert rc == 0
    warnings = [ln for ln in err.splitlines() if ln.startswith("sponge simulate: warning: ")]
    assert len(warnings) == 3 and all(str(p) in w for w in warnings)


def test_scale_and_peak_on_times_thin_and_replicate_deterministically(tmp_path) -> None:
    rng = np.random.default_rng(1)
    t = np.sort(rng.uniform(0, 60, 600))
    p = _write(tmp_path, "many.txt", "\n".join(f"{x:.6f}" for x in t) + "\n")
    base = Scenario(trace=f"times:{p}", network="none").rate_trace()

    def times(**kw) -> np.ndarray:
        return Scenario(trace=f"times:{p}", network="none", **kw).rate_trace().times_ms

    half = times(scale=0.5, seed=3)
    assert set(half) <= set(base.times_ms) and 240 < half.size < 360  # thinning keeps exact times
    assert np.array_equal(half, times(scale=0.5, seed=3)) and not np.array_equal(half, times(scale=0.5, seed=4))
    double = Scenario(trace=f"times:{p}", network="none", scale=2.0).rate_trace()
    assert double.rps.tolist() == (2 * base.rps).tolist()  # every second exactly doubled, same axis
    assert set(base.times_ms) <= set(double.times_ms) and double.duration_s == base.duration_s
    more = times(scale=2.5, seed=0)
    assert 2 * base.times_ms.size < more.size < 3 * base.times_ms.size
    assert np.all(np.diff(more) >= 0)
    peak = Scenario(trace=f"times:{p}", network="none", peak_rps=3 * base.peak_rps).rate_trace()
    assert peak.rps.tolist() == (3 * base.rps).tolist()  # integer factor: exact
    near = Scenario(trace=f"times:{p}", network="none", scale=7.0, peak_rps=1.5 * base.peak_rps).rate_trace()
    assert base.peak_rps * 1.2 <= near.peak_rps <= base.peak_rps * 2.0  # the peak fit overrides --scale
    with pytest.raises(ValueError, match="--damping"):
        Scenario(trace=f"times:{p}", damping=2.0)


# ---- networks -----------------------------------------------------------------------------------------
def test_mahimahi_transfer_times_by_hand(tmp_path) -> None:
    p = _write(tmp_path, "link.up", "1\n2\n4\n10\n")  # period 10 ms
    sc = Scenario(network=f"mahimahi:{p}")
    link = sc.link()
    assert isinstance(link, MahimahiTrace) and link.notes == ()
    # k = ceil(3000/1500) = 2: from t the 2nd opportunity at or after t (the trace repeats every 10 ms)
    assert link.tx_ms(np.array([0.0, 3.0, 9.0, 12.0]), 3000).tolist() == [2.0, 7.0, 2.0, 2.0]
    assert float(link.tx_ms(0.0, 1)) == 1.0 and float(link.tx_ms(5.0, 4500)) == 7.0  # k=3: 10, 11, 12
    plan = Scenario(trace="constant:1", duration_s=3, arrivals="uniform", clients=1, client_offsets="zero",
                    network=f"mahimahi:{p}", image_kib=3000 / 1024).plan()
    assert [r.network_ms for r in plan] == [2.0, 2.0, 2.0] and [r.budget_ms for r in plan] == [998.0] * 3
    assert "packet deliveries" in Scenario(network=f"mahimahi:{p}").summary()
    quiet = _write(tmp_path, "quiet.up", "1\n1500\n1501\n")
    assert "1 silence(s) of >= 1000 ms" in Scenario(network=f"mahimahi:{quiet}").link().notes[0]


def test_bandwidth_two_columns(tmp_path) -> None:
    p = _write(tmp_path, "bw.txt", "# time_s mbps\n0 8\n1 16\n3 4\n")
    link = Scenario(network=f"bandwidth:{p}").link()
    assert isinstance(link, BandwidthTrace)
    assert link.start_ms.tolist() == [0, 1000, 3000] and link.dur_ms.tolist() == [1000, 2000, 1500]
    assert link.bps.tolist() == [8e6, 16e6, 4e6] and link.notes == ()
    assert float(link.tx_ms(0.0, 1e6, "simple")) == pytest.approx(1000.0)  # 8 Mbit at 8 Mbit/s
    assert float(link.tx_ms(500.0, 1e6, "exact")) == pytest.approx(750.0)  # 4 Mbit at 8, then 4 at 16
    headed = _write(tmp_path, "bw.csv", "t,mbps\n3,4\n0,8\n1,16\n1,20\n")  # a header, unsorted, a duplicate time
    h = Scenario(network=f"bandwidth:{headed}").link()
    assert h.bps.tolist() == [8e6, 18e6, 4e6]
    assert any("sorted" in n for n in h.notes) and any("averaged" in n for n in h.notes)
    one = _write(tmp_path, "one.txt", "10\n0\n30\n")  # one column: Mbit/s, one sample a second
    o = Scenario(network=f"bandwidth:{one}").link()
    assert o.bps.tolist() == [10e6, 0, 30e6] and o.dur_ms.tolist() == [1000] * 3
    assert "1 sample(s) of 0 Mbit/s" in o.notes[0]
    gap = _write(tmp_path, "gap.txt", "0 5\n1 5\n2 5\n30 5\n31 5\n")
    assert "spacing(s) over 5x the median" in Scenario(network=f"bandwidth:{gap}").link().notes[0]


def test_bandwidth_headed_csv_column_and_filters(tmp_path) -> None:
    p = _write(tmp_path, "data.csv",
               "protocol,carrier,num_tcp_conn,server_location,run_num,seq_num,throughput_mbps\n"
               "TCP,VERIZON,1,US-East,1,0,100\n"
               "TCP,VERIZON,1,US-East,1,1,200\n"
               "TCP,VERIZON,8,US-East,1,0,900\n"
               "TCP,SPRINT,1,US-West,1,0,30\n"
               "TCP,VERIZON,1,US-West,2,0,50\n")
    everything = Scenario(network=f"bandwidth:{p}:throughput_mbps").link()
    assert everything.bps.tolist() == [100e6, 200e6, 900e6, 30e6, 50e6] and everything.dur_ms.tolist() == [1000] * 5
    verizon = Scenario(network=f"bandwidth:{p}:throughput_mbps,carrier=Verizon,num_tcp_conn=1").link()
    assert verizon.bps.tolist() == [100e6, 200e6, 50e6]
    east = Scenario(network=f"bandwidth:{p}:6,carrier=verizon,server_location=East,num_tcp_conn=1").link()
    assert east.bps.tolist() == [100e6, 200e6]  # column by index; East matches US-East
    assert "carrier=verizon" in east.description
    with pytest.raises(ValueError, match=r"data.csv: no row matches carrier=ATT"):
        Scenario(network=f"bandwidth:{p}:throughput_mbps,carrier=ATT").link()
    with pytest.raises(ValueError, match=r"data.csv:1: no column 'operator' to filter on"):
        Scenario(network=f"bandwidth:{p}:throughput_mbps,operator=x").link()
    with pytest.raises(ValueError, match=r"data.csv:2: 7 fields; .* name the throughput column"):
        Scenario(network=f"bandwidth:{p}").link()


# ---- malformed files ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, text, spec, message", [
    ("bad.txt", "3\n5\nabc\n", "counts:{p}", r"bad.txt:3: field 1: expected a number \(count\), got 'abc'"),
    ("row.txt", "1 2 3\n4 x 6\n", "counts:{p}", r"row.txt:2: field 2: .*'x'"),
    ("neg.txt", "3\n-2\n", "counts:{p}", r"neg.txt:2: field 1: negative count '-2'"),
    ("nan.txt", "3\nnan\n", "counts:{p}", r"nan.txt:2: field 1: expected a finite number"),
    ("empty.txt", "\n \n", "counts:{p}", r"empty.txt: empty file"),
    ("zeros.txt", "0\n0\n", "counts:{p}", r"zeros.txt: every count .* is 0"),
    ("bad.json", "[1, 2,\n 3, -4]", "counts:{p}", r"bad.json:2: element 3: negative count"),
    ("str.json", '[1, "two"]', "counts:{p}", r"str.json:1: element 1: expected a number"),
    ("broken.json", "[1, 2", "counts:{p}", r"broken.json:1: not valid JSON"),
    ("short.txt", "1\n2\n", "counts:{p}@1-5", r"short.txt: window \[1, 5\) outside the file's 2 seconds"),
    ("t.csv", "when\n1.5\n2\nlater\n", "times:{p}:when", r"t.csv:4: field 'when': 'later' is not a number"),
    ("t2.csv", "when\n2024-01-01T00:00:00\nsoon\n", "times:{p}",
     r"t2.csv:3: field 'when': 'soon' is neither a number of seconds nor an ISO-8601 date-time"),
    ("t3.csv", "a,b\n1,2\n", "times:{p}:c", r"t3.csv:1: no column 'c'; the header is \['a', 'b'\]"),
    ("t4.csv", "1,2\n3\n", "times:{p}:1", r"t4.csv:2: no column 1 \(the line has 1 field\(s\)\)"),
    ("t5.csv", "", "times:{p}", r"t5.csv: empty file"),
    ("t6.csv", "when\n", "times:{p}:when", r"t6.csv: no data lines after the header"),
])
def test_malformed_trace_files_name_the_line(tmp_path, name, text, spec, message) -> None:
    p = _write(tmp_path, name, text)
    with pytest.raises(ValueError, match=message):
        Scenario(trace=spec.format(p=p), network="none").rate_trace()


@pytest.mark.parametrize("name, text, spec, message", [
    ("bw.txt", "0 5\n1 -3\n", "bandwidth:{p}", r"bw.txt:2: field 1 \(Mbit/s\): negative throughput '-3'"),
    ("bw2.txt", "0 5\n1 fast\n", "bandwidth:{p}", r"bw2.txt:2: field 1 \(Mbit/s\): expected a number"),
    ("bw3.txt", "0 5\n1\n", "bandwidth:{p}", r"bw3.txt:2: expected 2 fields \(time s, Mbit/s\), got 1"),
    ("bw4.csv", "a,mbps\nx,5\ny,oops\n", "bandwidth:{p}:mbps", r"bw4.csv:3: field 'mbps': expected a number"),
    ("bw5.csv", "a,mbps\nx,5\n", "bandwidth:{p}:speed", r"bw5.csv:1: no column 'speed'"),
    ("bw6.txt", "0 0\n1 0\n", "bandwidth:{p}", r"bw6.txt: every throughput sample is 0"),
    ("bw7.txt", "", "bandwidth:{p}", r"bw7.txt: empty file"),
    ("m.up", "1\n-4\n", "mahimahi:{p}", r"m.up:2: negative timestamp"),
    ("m2.up", "1\nten\n", "mahimahi:{p}", r"m2.up:2: expected an integer millisecond timestamp"),
    ("m3.up", "5\n3\n", "mahimahi:{p}", r"m3.up:2: timestamps must be non-decreasing"),
    ("m4.up", "", "mahimahi:{p}", r"m4.up: no timestamps"),
])
def test_malformed_network_files_name_the_line(tmp_path, name, text, spec, message) -> None:
    p = _write(tmp_path, name, text)
    with pytest.raises(ValueError, match=message):
        Scenario(network=spec.format(p=p)).link()


def test_bad_specs_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="--network must be one of"):
        Scenario(network="wifi")
    with pytest.raises(ValueError, match="--network must be one of"):
        Scenario(network="mahimahi:")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        Scenario(trace=f"counts:{tmp_path / 'nope.txt'}").rate_trace()
    with pytest.raises(ValueError, match="--trace must be"):
        Scenario(trace="rates:x").rate_trace()
    p = _write(tmp_path, "c.txt", "1\n2\n")
    with pytest.raises(ValueError, match="END must be > START"):
        Scenario(trace=f"counts:{p}@5-2").rate_trace()


def test_file_labels() -> None:
    assert userfiles.file_label("counts:/d/workload/nasa_1995/workload.tbz2") == "nasa_1995_workload"
    assert userfiles.file_label("counts:/d/x/workload_create.txt@23400-25200") == "workload_create@23400-25200"
    assert userfiles.file_label("times:/d/my arrivals.csv:when") == "my_arrivals"
    assert userfiles.file_label("twitter:bursty") == "bursty"


# ---- the commands ------------------------------------------------------------------------------------
@pytest.fixture
def tiny(tmp_path) -> tuple[Path, Path]:
    counts = _write(tmp_path, "my.txt", "4\n6\n9\n5\n3\n8\n12\n7\n5\n4\n")
    bw = _write(tmp_path, "bw.txt", "0 20\n1 12.5\n2 30\n3 8\n")
    return counts, bw


def test_simulate_end_to_end_on_tiny_files(tmp_path, capsys, tiny) -> None:
    counts, bw = tiny
    out = tmp_path / "sim"
    rc = _run(sim_cli.register, ["simulate", "--trace", f"counts:{counts}", "--network", f"bandwidth:{bw}",
                                 "--no-oracle", "--policy", "static,sponge", "--out", str(out)])
    assert rc == 0
    fig = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(fig["runs"]) == {"static", "sponge"} and fig["requests"] > 30
    assert fig["scenario"]["trace"] == f"counts:{counts}" and fig["scenario"]["network"] == f"bandwidth:{bw}"
    assert fig["trace"] == "counts my.txt"
    assert fig["runs"]["static"]["p50_budget_ms"] < 1000  # the bandwidth file shrank the budgets


def test_load_and_simulate_parse_user_traces_to_the_same_plan(tiny) -> None:
    counts, bw = tiny
    flags = ["--trace", f"counts:{counts}@2-8", "--network", f"bandwidth:{bw}", "--tx-rule", "exact", "--seed", "5"]

    def parse(register, cmd: str) -> Scenario:
        p = argparse.ArgumentParser()
        register(p.add_subparsers(dest="command", required=True))
        return scenario_from_args(p.parse_args([cmd, *flags]))

    live, sim = parse(loadgen.register, "load"), parse(sim_cli.register, "simulate")
    assert live == sim
    rs, _ = request_set(sim)
    assert rs.send_ms.tolist() == [r.send_ms for r in live.plan()]
    assert rs.budget_ms.tolist() == [r.budget_ms for r in live.plan()]


@pytest.mark.parametrize("register, cmd, extra", [
    (sim_cli.register, "simulate", ["--no-oracle", "--policy", "static"]),
    (loadgen.register, "load", ["--url", "http://127.0.0.1:9"]),  # fails before any request is sent
    (experiment.register, "experiment", ["--quiet", "--no-plots"]),
])
def test_malformed_file_is_a_one_line_error_with_exit_2(tmp_path, capsys, register, cmd, extra) -> None:
    bad = _write(tmp_path, "bad.txt", "3\n4\nfive\n")
    trace = ["--trace", f"counts:{bad}"]
    rc = _run(register, [cmd, *trace, "--network", "none", "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"sponge {cmd}: {bad}:3: field 1: expected a number (count), got 'five'"]


def test_experiment_runs_a_users_trace_as_one_window(tmp_path, capsys, tiny) -> None:
    counts, bw = tiny
    out = tmp_path / "exp"
    rc = _run(experiment.register, ["experiment", "--trace", f"counts:{counts}", "--network", f"bandwidth:{bw}",
                                    "--policies", "static", "sponge", "--peak-rps", "12", "--out", str(out),
                                    "--quiet", "--no-plots"])
    assert rc == 0
    res = json.loads((out / "summary.json").read_text())
    (w,) = res["windows"]
    assert w["window"] == "my" and w["peak_rps"] == pytest.approx(12.0) and res["scale"] == pytest.approx(1.0)
    assert w["scenario"]["trace"] == f"counts:{counts}" and w["scenario"]["network"] == f"bandwidth:{bw}"
    md = (out / "summary.md").read_text()
    assert f"User trace `counts:{counts}`" in md and f"Budget spread (bandwidth:{bw}" in md
    assert _run(experiment.register, ["experiment", "--trace", f"counts:{counts}", "--windows", "bursty"]) == 2


# ---- the bundled files through the same options ------------------------------------------------------
def _shared(rel: str) -> Path:
    require_data()
    from sponge.workload.paths import shared_data_dir

    p = shared_data_dir() / rel
    if not p.is_file():
        pytest.skip(f"{p} not found")
    return p


@needs_data
def test_bundled_twitter_2018_as_counts() -> None:
    p = _shared("workload/twitter_2018_04_25_sponge/workload_create.txt")
    whole = Scenario(trace=f"counts:{p}").rate_trace()
    assert whole.duration_s == 86_400 and whole.total == 58_454
    assert "the requests lie in seconds 23400-25200" in whole.notes[0]
    busy = Scenario(trace=f"counts:{p}@23400-25200").rate_trace()
    assert busy.duration_s == 1800 and busy.total == 58_454 and busy.notes == ()
    assert round(busy.mean_rps, 1) == 32.5 and busy.peak_rps == 53
    assert np.percentile(busy.rps, [5, 50, 95]).tolist() == [23, 32, 42]


@needs_data
def test_bundled_nasa_1995_as_counts() -> None:
    p = _shared("workload/nasa_1995/workload.tbz2")
    tr = Scenario(trace=f"counts:{p}").rate_trace()
    assert tr.duration_s == 5_059_950 and tr.total == 3_461_610
    assert round(tr.mean_rps, 2) == 0.68 and tr.peak_rps == 20
    assert round(float((tr.rps == 0).mean()), 2) == 0.59
    (note,) = tr.notes
    assert "longest 135851 s" in note  # the 37.7-hour hurricane shutdown
    day = Scenario(trace=f"counts:{p}@0-86400", peak_rps=20.0).rate_trace()
    assert day.duration_s == 86_400 and day.peak_rps == pytest.approx(20.0)


@needs_data
def test_bundled_twitter_2021_as_counts_matches_the_twitter_reader() -> None:
    from sponge.workload.traces import twitter_2021

    p = _shared("workload/twitter_2021_08/workload.tbz2")
    tr = Scenario(trace=f"counts:{p}@1301160-1302360", damping=8).rate_trace()
    assert tr.rps.tolist() == twitter_2021(1_301_160, 1_302_360, 8, gaps="keep").rps.tolist()
    whole = Scenario(trace=f"counts:{p}").rate_trace()
    assert whole.total == 120_774_326 and "22 run(s) of >= 60 s" in whole.notes[0]


@needs_data
def test_bundled_5gophers_throughput_as_bandwidth() -> None:
    from sponge.workload.network import read_5gophers_throughput

    p = _shared("network/5gophers/All-Carriers/01-Throughput/data.csv")
    every = Scenario(network=f"bandwidth:{p}:throughput_mbps").link()
    assert every.bps.size == 7_257
    verizon = Scenario(network=f"bandwidth:{p}:throughput_mbps,carrier=Verizon,num_tcp_conn=1").link()
    assert verizon.bps.tolist() == read_5gophers_throughput(carrier="Verizon", num_tcp_conn=1).bps.tolist()
    ve = Scenario(network=f"bandwidth:{p}:throughput_mbps,carrier=Verizon,server_location=East,num_tcp_conn=8").link()
    assert round(float(np.median(ve.bps)) / 1e6) in range(1400, 1475)  # README: median 1,436 Mbit/s
    sprint = Scenario(network=f"bandwidth:{p}:throughput_mbps,carrier=Sprint,num_tcp_conn=1").link()
    assert 25 <= np.median(sprint.bps) / 1e6 <= 35  # README: Sprint 29-32
    plan = Scenario(trace="constant:5", duration_s=20,
                    network=f"bandwidth:{p}:throughput_mbps,carrier=Sprint,num_tcp_conn=1").plan()
    assert all(r.budget_ms < 1000 for r in plan) and len(plan) > 50
