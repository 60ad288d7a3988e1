"""`sponge simulate` and `sponge experiment` end to end on short windows (the real traces, read in place,
where present; a constant-rate scenario without network runs anywhere)."""

from __future__ import annotations

import json

import pytest

from sponge import experiment
from helpers import run_subcommand
from markers import needs_data
from sponge.report.results import read_run
from sponge.sim import cli as sim_cli
from sponge.sim.scenario import Deployment, load_model


_run = run_subcommand


@pytest.mark.parametrize("scenario", [
    pytest.param(["--trace", "twitter:steady_high", "--duration-s", "60", "--scale", "0.44"], marks=needs_data,
                 id="twitter"),
    pytest.param(["--trace", "constant:20", "--duration-s", "60", "--network", "none"], id="constant"),
])
def test_simulate_writes_runs_and_a_json_line(tmp_path, capsys, scenario):
    out = tmp_path / "sim"
    rc = _run(sim_cli.register, ["simulate", *scenario,
                                 "--policy", "sponge,static,hpa", "--static-cpu-m", "8000", "--static-batch", "6",
                                 "--set", "sponge.arrival_eps=0.2", "--out", str(out)])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    fig = json.loads(last)
    assert set(fig["runs"]) == {"sponge", "static", "hpa"}
    assert fig["runs"]["sponge"]["ratio_to_oracle"] >= 1.0 or fig["runs"]["sponge"]["attainment"] < 1.0
    assert fig["runs"]["static"]["core_seconds_exact"] == pytest.approx(8.0 * 60, rel=0.05)
    reqs, tl, meta = read_run(out / "sponge")
    assert len(reqs) == fig["requests"] and meta["params"]["arrival_eps"] == 0.2
    # Saveable requests counted apart (DESIGN §5), against l(1, max CPU) of the deployment's model,
    # which every run directory records.
    model, _ = load_model("yolov5s")
    floor = model.latency_ms(1, Deployment().max_cpu_m)
    assert meta["saveable_floor_ms"] == pytest.approx(floor)
    budgets = [r.budget_ms for r in reqs]
    for name, run in fig["runs"].items():
        assert run["saveable_floor_ms"] == pytest.approx(floor), name
        assert run["unsaveable"] == sum(b <= 0 or b < floor for b in budgets), name
        assert run["attainment_saveable"] is not None and run["attainment_saveable"] >= run["attainment"] - 1e-12
    assert (out / "simulate.json").is_file()


def test_simulate_rejects_unknown_policies(capsys):
    assert _run(sim_cli.register, ["simulate", "--trace", "constant:5", "--policy", "nope"]) == 2


@needs_data
def test_experiment_quick(tmp_path, capsys):
    out = tmp_path / "exp"
    rc = _run(experiment.register, ["experiment", "--out", str(out), "--windows", "bursty", "--policies", "sponge",
                                    "paper", "static", "hpa", "--duration-s", "60", "--quiet"])
    assert rc == 0
    for f in ("budget_spread.png", "fit_yolov5s.png", "fit_yolov5n.png", "summary.md", "summary.html",
              "summary.json", "bursty/timelines.png", "bursty/sponge/requests.csv"):
        assert (out / f).is_file(), f
    res = json.loads((out / "summary.json").read_text())
    w = res["windows"][0]
    assert set(w["runs"]) == {"sponge", "paper", "static", "hpa"}
    md = (out / "summary.md").read_text()
    assert "| bursty | sponge |" in md and "Targets for `sponge`" in md
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["windows"]["bursty"]["sponge"]
