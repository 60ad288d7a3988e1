"""The front door's own CPU is billed beside the replicas' (issue 13): measured live (the server process,
children excluded, plus the JSON decoder's child), modelled per request in the simulator, reported apart
and in a "with front door" total — the replicas' core-seconds stay what they were."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import time

import httpx
import numpy as np
import orjson
import pytest
from prometheus_client import generate_latest

from helpers import Scripted, run_subcommand
from sponge.perf.latency_model import LatencyModel
from sponge.policy.types import Decision
from sponge.protocol.v2 import Limits
from sponge.report.cli import run_report
from sponge.report.results import TimelineRecord, read_run, write_run
from sponge.report.summary import format_table, front_door_core_seconds, summarize
from sponge.runtime.base import TensorSpec
from sponge.server.decode import BodyDecoder, process_cpu_s
from sponge.server.metrics import Metrics
from sponge.sim import RequestSet, SimConfig, simulate
from sponge.sim import cli as sim_cli
from sponge.sim.engine import FRONT_DOOR_CPU_MS
from test_live_billing import fetched_timeline, live_setup

MODEL = LatencyModel(g=10.0, d=0.0, e=0.0, h=2.0)


def _requests(n: int, duration_ms: float = 5000.0) -> RequestSet:
    return RequestSet.from_arrays(np.linspace(0.0, duration_ms - 1.0, n), budget_ms=1000.0, duration_ms=duration_ms)


# ---- simulator ---------------------------------------------------------------------------------------------

def test_simulator_bills_the_front_door_per_request_apart_from_the_replicas():
    reqs = _requests(400)
    policy = lambda: Scripted({})  # noqa: E731 - the initial configuration throughout
    free = simulate(reqs, MODEL, policy(), SimConfig(initial_cpu_m=2000, front_door_cpu_ms=0.0))
    paid = simulate(reqs, MODEL, policy(), SimConfig(initial_cpu_m=2000, front_door_cpu_ms=1.5))
    assert paid.core_seconds == free.core_seconds  # the replicas' figure never moves
    assert [t.total_cpu_m for t in paid.timeline] == [t.total_cpu_m for t in free.timeline]
    assert free.front_door_core_seconds == 0.0
    assert paid.front_door_core_seconds == pytest.approx(400 * 1.5 / 1000.0)
    assert paid.core_seconds_with_front_door == pytest.approx(paid.core_seconds + 0.6)
    # the timeline's per-interval figure integrates to the same total (what `sponge report` reads)
    assert front_door_core_seconds(paid.timeline) == pytest.approx(0.6)
    meta = paid.run_meta()
    assert meta["front_door_core_seconds"] == pytest.approx(0.6)
    assert meta["core_seconds_with_front_door"] == pytest.approx(paid.core_seconds + 0.6)
    assert meta["config"]["front_door_cpu_ms"] == 1.5


def test_refused_requests_cost_the_front_door_too():
    # budgets shorter than one inference: every request is refused on arrival, yet each was parsed
    reqs = RequestSet.from_arrays(np.linspace(0.0, 999.0, 50), budget_ms=0.5, duration_ms=1000.0)
    r = simulate(reqs, MODEL, Scripted({}), SimConfig(front_door_cpu_ms=2.0))
    assert r.counts()["expired"] == 50
    assert r.front_door_core_seconds == pytest.approx(50 * 2.0 / 1000.0)


def test_default_front_door_cost_and_validation():
    assert SimConfig().front_door_cpu_ms == FRONT_DOOR_CPU_MS > 0
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="front_door_cpu_ms"):
            SimConfig(front_door_cpu_ms=bad)


def test_simulate_cli_flag(tmp_path, capsys):
    out = tmp_path / "sim"
    rc = run_subcommand(sim_cli.register, ["simulate", "--trace", "constant:10", "--duration-s", "20", "--network",
                                           "none", "--policy", "static", "--static-cpu-m", "4000", "--no-oracle",
                                           "--front-door-cpu-ms", "2.5", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    fig = json.loads(text.strip().splitlines()[-1])
    run = fig["runs"]["static"]
    assert fig["config"]["front_door_cpu_ms"] == 2.5
    assert run["front_door_core_seconds_exact"] == pytest.approx(fig["requests"] * 2.5 / 1000.0)
    assert run["core_seconds_with_front_door_exact"] == pytest.approx(
        run["core_seconds_exact"] + run["front_door_core_seconds_exact"])
    assert run["front_door_core_seconds"] == pytest.approx(run["front_door_core_seconds_exact"], rel=1e-6)
    assert "+front door" in text
    _, tl, meta = read_run(out / "static")
    assert meta["front_door_core_seconds"] == pytest.approx(run["front_door_core_seconds_exact"])
    assert all(math.isfinite(t.front_door_cpu_m) for t in tl)


# ---- report ------------------------------------------------------------------------------------------------

def _timeline(front_door: list[float]) -> list[TimelineRecord]:
    return [TimelineRecord(1000.0 * (i + 1), 5.0, 1000, 1, 1000, 1, 0, front_door_cpu_m=f)
            for i, f in enumerate(front_door)]


def test_summary_reports_core_seconds_with_and_without_the_front_door(tmp_path):
    tl = _timeline([100.0, 300.0, 200.0])  # m over 1 s each: 0.6 core-seconds
    s = summarize([], tl)
    assert s.core_seconds == pytest.approx(3.0)
    assert s.front_door_core_seconds == pytest.approx(0.6)
    assert s.core_seconds_with_front_door == pytest.approx(3.6)
    table = format_table({"run": s})
    assert re.search(r"front door\s+0\.60", table) and re.search(r"with front door\s+3\.6", table)
    # through the results files and `sponge report`
    write_run(tmp_path / "r", [], tl, {"kind": "live"})
    figures = run_report([str(tmp_path / "r")], out=str(tmp_path / "rep"))
    got = figures["runs"]["r"]
    assert got["front_door_core_seconds"] == pytest.approx(0.6)
    assert got["core_seconds_with_front_door"] == pytest.approx(3.6)


def test_a_run_without_the_front_doors_figure_reports_none(tmp_path):
    # an older run: a timeline.csv without the column reads as NaN, reported as "-" / None
    d = tmp_path / "old"
    write_run(d, [], _timeline([1.0, 2.0]), {})
    csv = (d / "timeline.csv").read_text().splitlines()
    (d / "timeline.csv").write_text("\n".join(",".join(line.split(",")[:-1]) for line in csv) + "\n")
    _, tl, _ = read_run(d)
    assert all(math.isnan(t.front_door_cpu_m) for t in tl)
    s = summarize([], tl)
    assert s.core_seconds == pytest.approx(2.0)
    assert math.isnan(s.front_door_core_seconds) and math.isnan(s.core_seconds_with_front_door)
    assert s.as_dict()["front_door_core_seconds"] is None
    # one row without the figure makes the total unknown, not silently smaller
    assert math.isnan(front_door_core_seconds(_timeline([1.0, math.nan])))
    assert math.isnan(front_door_core_seconds([]))


# ---- live: the controller's log and the metric -------------------------------------------------------------

def test_decision_log_carries_the_front_doors_cpu_per_interval(monkeypatch):
    cpu = {"s": 10.0}
    clock, scaler, ctl = live_setup(Scripted({}), Decision(1000, 1))
    # not constructed in live_setup's order: re-read the baseline from the fake source
    scaler.core.metrics.front_door.process_cpu_s = lambda: cpu["s"]
    ctl._front_door_s = ctl._front_door_cpu_s()
    for t, used_s in ((1000.0, 0.25), (2000.0, 0.05), (4000.0, 0.5)):
        clock.t = t
        cpu["s"] += used_s
        ctl.tick()
    assert [e.front_door_cpu_m for e in ctl.decisions] == pytest.approx([250.0, 50.0, 250.0])
    timeline = fetched_timeline(monkeypatch, ctl)
    assert front_door_core_seconds(timeline) == pytest.approx(0.8)
    s = summarize([], timeline)
    assert s.core_seconds == pytest.approx(4.0)
    assert s.core_seconds_with_front_door == pytest.approx(4.8)


def test_front_door_metric_is_exposed():
    m = Metrics()
    m.front_door.process_cpu_s = lambda: 12.5

    class Decoder:
        def child_cpu_s(self) -> float:
            return 1.25

    m.front_door.decoder = Decoder()
    text = generate_latest(m.registry).decode()
    assert "sponge_front_door_cpu_seconds_total 13.75" in text
    assert "sponge_front_door_decoder_cpu_seconds_total 1.25" in text


def test_process_cpu_reads_proc():
    t0 = process_cpu_s(os.getpid())
    if t0 is None:
        pytest.skip("no /proc")
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    assert process_cpu_s(os.getpid()) >= t0 + 0.03  # clock ticks: 10 ms granularity
    assert process_cpu_s(2**22 + 12345) is None


def test_decoder_child_cpu_is_counted_and_kept_after_it_stops():
    if process_cpu_s(os.getpid()) is None:
        pytest.skip("no /proc")
    dec = BodyDecoder(process_json_bytes=1000)  # every JSON body of 1000+ bytes goes to the child
    specs = [TensorSpec("x", "FP32", (-1, 16))]
    n = 20_000
    body = orjson.dumps({"inputs": [{"name": "x", "shape": [n, 16], "datatype": "FP32",
                                     "data": np.random.default_rng(0).random(n * 16).round(6).tolist()}]})

    async def go() -> tuple[float, float]:
        for _ in range(3):
            await dec.decode(body, None, Limits(specs, n, None), specs)
        during = dec.child_cpu_s()
        await dec.aclose()
        return during, dec.child_cpu_s()

    during, after = asyncio.run(go())
    assert dec.counts["process"] == 3
    assert during > 0.0  # spawning and decoding ~15 MB of JSON: well over one clock tick
    assert after >= during  # the child is gone, what it used stays counted


# ---- end to end ----------------------------------------------------------------------------------------------

def _scrape(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return float(re.search(r"^sponge_front_door_cpu_seconds_total (\S+)$", text, re.M).group(1))


def test_front_door_cpu_grows_with_requests_end_to_end():
    from sponge.models.trivial import trivial_model_path
    from sponge.server.process import ServerProcess

    with ServerProcess("--model", str(trivial_model_path()), "--batch", "4", "--actuator", "none",
                       "--interval-ms", "500") as srv:
        path = f"{srv.url}/v2/models/trivial/infer"
        x = np.ones((1, 16), dtype=np.float32).ravel().tolist()
        body = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": x}]})
        before = _scrape(srv.url)
        assert before > 0.0  # the process's start alone used CPU
        with httpx.Client(timeout=30) as c:
            for _ in range(300):
                assert c.post(path, content=body).status_code == 200
        after = _scrape(srv.url)
        # 300 requests cost the front door CPU (each well over 0.1 ms; a loaded host only adds to it)
        assert after - before > 300 * 0.1e-3
        time.sleep(0.7)  # a controller tick after the requests
        log = srv.admin("GET", "/admin/decisions").json()["decisions"]
        fd = [e["front_door_cpu_m"] for e in log]
        assert fd and all(v is not None and v >= 0.0 for v in fd)
        assert max(fd) > 0.0
