"""Run summaries, plots and the `sponge report` command on small hand-made runs."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from sponge.report import cli, plots, summary
from sponge.report.results import RequestRecord, TimelineRecord, write_run

NAN = float("nan")


def _rec(i: int, outcome: str, server: float, budget: float = 500.0, net: float = 100.0) -> RequestRecord:
    e2e = net + server if math.isfinite(server) else NAN
    return RequestRecord(i, i * 100.0, budget + net, net, budget, server, e2e, outcome, 2 if math.isfinite(server) else 0, 1000)


@pytest.fixture()
def records() -> list[RequestRecord]:
    # 6 ok, 1 late, 1 expired (answered fast with a deadline error), 1 rejected, 1 error
    ok = [_rec(i, "ok", s) for i, s in enumerate([100, 200, 300, 400, 450, 250])]
    return ok + [
        _rec(6, "late", 600.0),
        _rec(7, "expired", 5.0),
        _rec(8, "rejected", NAN),
        _rec(9, "error", NAN),
    ]


@pytest.fixture()
def timeline() -> list[TimelineRecord]:
    return [
        TimelineRecord(1_000, 5.0, 1_000, 1, 1_000, 1, 0),
        TimelineRecord(2_000, 5.0, 1_000, 2, 2_000, 2, 3),
        TimelineRecord(4_000, 2.0, 500, 1, 500, 1, 0),
    ]


def test_summary_by_hand(records: list[RequestRecord], timeline: list[TimelineRecord]) -> None:
    s = summary.summarize(records, timeline)
    assert s.requests == 10
    assert s.attainment == pytest.approx(0.6)  # late, expired, rejected, error are all misses
    assert s.misses == 4
    assert s.counts == {"ok": 6, "late": 1, "expired": 1, "rejected": 1, "error": 1}
    served = np.array([100, 200, 300, 400, 450, 250, 600.0])  # ok + late; not the expired error reply
    assert s.p50_server_ms == pytest.approx(np.percentile(served, 50)) == pytest.approx(300.0)
    assert s.p99_server_ms == pytest.approx(np.percentile(served, 99))
    assert s.p50_e2e_ms == pytest.approx(400.0)
    assert s.p99_server_over_budget == pytest.approx(np.percentile(served / 500.0, 99))
    assert s.p99_e2e_over_slo == pytest.approx(np.percentile((served + 100) / 600.0, 99))
    # 1 s at 1000 m + 1 s at 2000 m + 2 s at 500 m = 1 + 2 + 1 core-seconds over 4 s
    assert s.core_seconds == pytest.approx(4.0)
    assert s.mean_cpu_m == pytest.approx(1_000.0)
    assert s.max_cpu_m == 2_000 and s.duration_s == pytest.approx(4.0)


def test_core_seconds_ignores_row_order(timeline: list[TimelineRecord]) -> None:
    assert summary.core_seconds(list(reversed(timeline))) == pytest.approx((4.0, 4.0))
    assert summary.core_seconds([]) == (0.0, 0.0)


def test_ratio_with_nonpositive_budget_stays_finite() -> None:
    recs = [_rec(0, "late", 50.0, budget=-20.0), _rec(1, "ok", 10.0, budget=100.0)]
    s = summary.summarize(recs)
    assert math.isfinite(s.p99_server_over_budget) and s.p99_server_over_budget > 1
    assert math.isnan(s.core_seconds)  # no timeline, no cost


def test_empty_run_summary() -> None:
    s = summary.summarize([])
    assert s.requests == 0 and math.isnan(s.attainment)
    assert "-" in summary.format_table({"empty": s})
    assert json.dumps(s.as_dict())  # NaN -> None keeps it valid JSON


def test_format_table(records: list[RequestRecord], timeline: list[TimelineRecord]) -> None:
    t = summary.format_table({"sponge": summary.summarize(records, timeline), "static-2c": summary.summarize(records)})
    lines = t.splitlines()
    assert "sponge" in lines[0] and "static-2c" in lines[0]
    row = next(line for line in lines if line.startswith("SLO attainment"))
    assert row.split()[-2:] == ["60.00%", "60.00%"]
    assert any(line.startswith("core-seconds") and "4.0" in line for line in lines)
    assert "| SLO attainment | 60.00% | 60.00% |" in summary.format_markdown(
        {"a": summary.summarize(records), "b": summary.summarize(records)}
    )


def _is_png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plots_write_pngs(tmp_path, records: list[RequestRecord], timeline: list[TimelineRecord]) -> None:
    one = plots.plot_timelines({"a": (records, timeline)}, tmp_path / "one.png")
    two = plots.plot_timelines({"a": (records, timeline), "b": (records, [])}, tmp_path / "sub" / "two.png")
    assert _is_png(one) and _is_png(two)
    rng = np.random.default_rng(0)
    spread = plots.plot_budget_spread(
        {"100 KiB": 900 - rng.gamma(2, 20, 500), "500 KiB": 800 - rng.gamma(2, 80, 500)}, tmp_path / "b.png", 1000
    )
    assert _is_png(spread)
    with pytest.raises(ValueError):
        plots.plot_timelines({}, tmp_path / "none.png")


def test_report_command(tmp_path, capsys, records: list[RequestRecord], timeline: list[TimelineRecord]) -> None:
    write_run(tmp_path / "r1", records, timeline, {"policy": "sponge"})
    write_run(tmp_path / "r2", records[:6], timeline, {"policy": "static"})
    parser = argparse.ArgumentParser(prog="sponge")
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["report", str(tmp_path / "r1"), str(tmp_path / "r2"), "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(out[-1])
    assert figures["runs"]["sponge"]["attainment"] == pytest.approx(0.6)
    assert figures["runs"]["static"]["attainment"] == pytest.approx(1.0)
    assert figures["runs"]["sponge"]["core_seconds"] == pytest.approx(4.0)
    assert any("SLO attainment" in line for line in out)
    assert (tmp_path / "out" / "summary.md").read_text().count("|") > 10
    assert _is_png(tmp_path / "out" / "timeline.png")

    args = parser.parse_args(["report", str(tmp_path / "r1"), "--names", "x", "y"])
    assert args.func(args) == 2  # one name per run, clearly refused
    args = parser.parse_args(["report", str(tmp_path / "missing")])
    assert args.func(args) == 2


def _saveable_records() -> list[RequestRecord]:
    # already late (budget <= 0), under the floor (30 < 50 ms), at the floor and ok, ok, late
    return [
        _rec(0, "expired", 2.0, budget=-20.0, net=1020.0),
        _rec(1, "late", 40.0, budget=30.0, net=970.0),
        _rec(2, "ok", 45.0, budget=50.0, net=950.0),
        _rec(3, "ok", 300.0, budget=500.0),
        _rec(4, "late", 450.0, budget=400.0),
    ]


def test_saveable_attainment_by_hand() -> None:
    recs = _saveable_records()
    s = summary.summarize(recs, saveable_floor_ms=50.0)
    assert s.attainment == pytest.approx(2 / 5)
    # unsaveable: the already-late one and the one under l(1, max CPU) = 50 ms; a budget equal to the floor
    # is saveable. Saveable: 3, of which 2 ok.
    assert s.unsaveable == 2 and s.attainment_saveable == pytest.approx(2 / 3)
    assert s.saveable_floor_ms == 50.0
    # Without a floor only budget <= 0 is unsaveable: 4 saveable, 2 ok.
    s0 = summary.summarize(recs)
    assert s0.unsaveable == 1 and s0.attainment_saveable == pytest.approx(0.5)
    assert s0.as_dict()["saveable_floor_ms"] is None
    # No saveable request at all: undefined, None in JSON.
    none = summary.summarize(recs, saveable_floor_ms=1_000.0)
    assert none.unsaveable == 5 and math.isnan(none.attainment_saveable)
    assert none.as_dict()["attainment_saveable"] is None
    assert summary.is_saveable(50.0, 50.0) and not summary.is_saveable(0.0) and not summary.is_saveable(49.9, 50.0)
    # Both tables carry the split.
    t = summary.format_table({"a": s, "b": s0}).splitlines()
    assert next(x for x in t if x.startswith("  of saveable requests")).split()[-2:] == ["66.67%", "50.00%"]
    assert next(x for x in t if x.startswith("unsaveable")).split()[-2:] == ["2", "1"]
    md = summary.format_markdown({"a": s, "b": s0})
    assert "| of saveable requests | 66.67% | 50.00% |" in md and "| saveable floor (ms) | 50.0 | - |" in md


def test_saveable_floor_from_run_json_or_the_flag(tmp_path, capsys) -> None:
    recs = _saveable_records()
    write_run(tmp_path / "sim", recs, [], {"policy": "sponge", "saveable_floor_ms": 50.0})
    write_run(tmp_path / "live", recs, [], {"policy": "paper"})  # a live run without a floor
    parser = argparse.ArgumentParser(prog="sponge")
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["report", str(tmp_path / "sim"), str(tmp_path / "live"), "--out", str(tmp_path / "o")])
    assert args.func(args) == 0
    runs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"]
    assert runs["sponge"]["unsaveable"] == 2 and runs["sponge"]["attainment_saveable"] == pytest.approx(2 / 3)
    assert runs["sponge"]["saveable_floor_ms"] == 50.0
    assert runs["paper"]["unsaveable"] == 1 and runs["paper"]["saveable_floor_ms"] is None
    # --saveable-floor-ms overrides run.json for every run
    args = parser.parse_args(["report", str(tmp_path / "sim"), str(tmp_path / "live"), "--out", str(tmp_path / "o"),
                              "--saveable-floor-ms", "35"])
    assert args.func(args) == 0
    runs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"]
    assert runs["sponge"]["unsaveable"] == runs["paper"]["unsaveable"] == 2  # -20 and 30 < 35
    assert runs["paper"]["attainment_saveable"] == pytest.approx(2 / 3)
