"""Nodes in the simulator, the oracle's "infeasible" answer, and the reports that show both (issue 11).

Hand-computed with l(b, c) = 100*b/c + 20 ms (c in cores): l(1, 1000 m) = 120 ms, l(1, 1500 m) = 86.67 ms.
"""

from __future__ import annotations

import argparse
import json
import math
import numpy as np
import pytest
from helpers import Scripted, run_subcommand

from sponge import experiment
from sponge.perf.latency_model import LatencyModel
from sponge.policy import make_policy
from sponge.policy.types import Decision
from sponge.report import plots
from sponge.sim import RequestSet, SimConfig, simulate
from sponge.sim import cli as sim_cli
from sponge.sim.engine import Simulator
from sponge.sim.oracle import ActionSpace, lp_bound, oracle_bound
from sponge.sim.scenario import Deployment
from sponge.workload.scenario import Scenario

MODEL = LatencyModel(g=100.0, d=0.0, e=0.0, h=20.0)




def _idle(duration_ms: float) -> RequestSet:
    return RequestSet.from_arrays([], budget_ms=[], duration_ms=duration_ms)


# ---- the simulator ---------------------------------------------------------------------------------------
def test_a_replica_never_exceeds_its_node():
    # static at 2000 m on 1500 m nodes: every request is served at 1500 m in l(1, 1500) = 86.67 ms, and the
    # run pays 1.5 cores x 2 s = 3 core-s (not 4)
    req = RequestSet.from_arrays(np.arange(10) * 200.0, budget_ms=500.0, duration_ms=2000.0)
    r = simulate(req, MODEL, make_policy("static", MODEL, cpu_m=2000, batch=1),
                 SimConfig(initial_cpu_m=2000, node_cpu_m=1500))
    assert r.counts()["ok"] == 10
    assert np.all(r.cpu_m == 1500)
    assert r.server_ms == pytest.approx(np.full(10, 100.0 / 1.5 + 20.0))
    assert r.core_seconds == pytest.approx(3.0)
    assert all(t.cpu_m == 1500 for t in r.timeline)
    assert r.meta["nodes"]["clamped_cpu"] >= 1 and r.meta["nodes"]["refused_replicas"] == 0
    assert "cut to 1500 m" in r.decisions[0][1].explanation


def test_without_nodes_nothing_changes():
    req = RequestSet.from_arrays(np.arange(10) * 200.0, budget_ms=500.0, duration_ms=2000.0)
    r = simulate(req, MODEL, make_policy("static", MODEL, cpu_m=2000, batch=1), SimConfig(initial_cpu_m=2000))
    assert np.all(r.cpu_m == 2000) and r.core_seconds == pytest.approx(4.0)
    assert "nodes" not in r.meta and all(t.refused_replicas == 0 for t in r.timeline)


def test_replicas_are_packed_and_a_scale_out_beyond_the_nodes_is_refused():
    # 2 nodes of 2000 m, 1 replica of 1000 m; at 1 s the policy asks for 5 x 1000 m: the new ones go to the
    # least loaded node (node 1, then 0, then 1): 2 + 2 replicas, the fifth fits nowhere and is refused.
    # At 2 s it asks 4 x 1500 m: two replicas share each node, so 1000 m each is all they get.
    pol = Scripted({1000.0: Decision(1000, 1, 5), 2000.0: Decision(1500, 1, 4)})
    sim = Simulator(_idle(3000.0), MODEL, pol, SimConfig(initial_cpu_m=1000, nodes=2, node_cpu_m=2000,
                                                         cold_start_ms=500.0))
    r = sim.run()
    assert sim._node_count == [2, 2]
    assert [t.replicas for t in r.timeline] == [1, 4, 4]
    assert [t.refused_replicas for t in r.timeline] == [0, 1, 0]  # the interval after the refused decision
    assert [t.cpu_m for t in r.timeline] == [1000, 1000, 1000]
    assert r.meta["nodes"] == {"nodes": 2, "node_cpu_m": 2000, "used": 2, "refused_replicas": 1,
                               "refused_decisions": 1, "clamped_cpu": 1}
    t1, applied = r.decisions[0]
    assert t1 == 1000.0 and applied.replicas == 4 and "refused" in applied.explanation
    assert pol.seen[1].current.replicas == 4  # the policy sees what was applied
    assert "cut to 1000 m" in r.decisions[1][1].explanation
    # billing unchanged: 1 core for 1 s, then 4 replicas of 1 core (the 3 starting ones included) for 2 s
    assert r.core_seconds == pytest.approx(1.0 + 4.0 * 2.0)


def test_a_starting_replica_is_billed_and_a_refused_one_is_not():
    # cold start 500 ms: the second replica starts at 1 s, serves from 1.5 s, and costs from 1 s: 3 + 2 core-s
    pol = Scripted({1000.0: Decision(1000, 1, 2)})
    r = simulate(_idle(3000.0), MODEL, pol, SimConfig(initial_cpu_m=1000, cold_start_ms=500.0))
    assert r.core_seconds == pytest.approx(5.0)
    # one node of 1000 m: the second replica has no room, costs nothing, and is counted
    pol = Scripted({1000.0: Decision(1000, 1, 2)})
    r = simulate(_idle(3000.0), MODEL, pol, SimConfig(initial_cpu_m=1000, cold_start_ms=500.0, nodes=1,
                                                      node_cpu_m=1000))
    assert r.core_seconds == pytest.approx(3.0)
    assert r.meta["nodes"]["refused_replicas"] == 1 and [t.replicas for t in r.timeline] == [1, 1, 1]


def test_spread_replicas_keep_their_room_to_grow():
    # 3 nodes of 4000 m, 3 replicas: one per node, so each may grow to 4000 m
    pol = Scripted({1000.0: Decision(4000, 1, 3)})
    sim = Simulator(_idle(2000.0), MODEL, pol, SimConfig(initial_cpu_m=1000, initial_replicas=3, nodes=3,
                                                         node_cpu_m=4000))
    r = sim.run()
    assert sim._node_count == [1, 1, 1] and r.timeline[-1].cpu_m == 4000 and r.meta["nodes"]["clamped_cpu"] == 0


def test_deployment_cuts_replica_sizes_to_the_node():
    dep = Deployment(nodes=4)  # 16-core nodes by default
    assert dep.node_cpu_m == 16_000 and dep.max_cpu_m == 16_000
    small = Deployment(node_cpu_m=8000, replica_cpu_m=1000)
    assert small.max_cpu_m == 8000 and small.nodes is None and small.sim_nodes() == {"nodes": None, "node_cpu_m": 8000}
    assert Deployment().node_cpu_m is None and Deployment().vertical == ActionSpace(500, 16_000, 16)
    with pytest.raises(ValueError):
        Deployment(nodes=0)
    with pytest.raises(ValueError):
        SimConfig(nodes=0)


# ---- the oracle --------------------------------------------------------------------------------------------
def test_oracle_says_infeasible_where_the_load_exceeds_the_top_rate():
    # 30 requests at t = 0, budget 1 s; one 1000 m replica, batch 1: at most 1/120 ms = 8.33 req/s. The slots
    # (100 ms) 0..10 lie in their window: 11 x 100/120 = 9.17 requests can be served, 20.83 miss at 1 s.
    req = RequestSet.from_arrays(np.zeros(30), budget_ms=1000.0, duration_ms=5000.0)
    one = ActionSpace(1000, 1000, 1)
    ob = oracle_bound(req, MODEL, one)
    assert not ob.feasible and math.isnan(ob.core_seconds) and ob.ratio(100.0) is None
    assert ob.notes["missed_requests"] == pytest.approx(30 - 11 * 100.0 / 120.0)
    assert ob.notes["infeasible_seconds"] == [(1, 1)]
    assert ob.max_rate_per_s == pytest.approx(1000.0 / 120.0)
    assert "infeasible" in ob.infeasible and "8.3 req/s" in ob.infeasible and "(1 s)" in ob.infeasible
    d = ob.as_dict()
    assert d["feasible"] is False and d["core_seconds"] is None and d["infeasible"] == ob.infeasible
    assert ob.label() == "infeasible"
    assert not lp_bound(req, MODEL, one).feasible
    # 4 replicas serve 36.7 in that window: a bound, above the floor (1 core x 5 s)
    four = ActionSpace(1000, 1000, 1, 1, 4)
    ob4 = oracle_bound(req, MODEL, four)
    assert ob4.feasible and ob4.core_seconds >= 5.0 * 0.999 and ob4.ratio(2 * ob4.core_seconds) == pytest.approx(2.0)
    # ... but not when they must share one 2000 m node (2 replicas at most: 18.3)
    packed = ActionSpace(1000, 1000, 1, 1, 4, nodes=1, node_cpu_m=2000)
    assert packed.max_cpu_for(2) == 1000 and packed.max_cpu_for(3) == 666
    obp = oracle_bound(req, MODEL, packed)
    assert not obp.feasible and obp.max_rate_per_s == pytest.approx(2000.0 / 120.0)


def test_oracle_is_feasible_under_the_top_rate():
    req = RequestSet.from_arrays(np.zeros(5), budget_ms=1000.0, duration_ms=5000.0)
    ob = oracle_bound(req, MODEL, ActionSpace(1000, 1000, 1))
    assert ob.feasible and ob.infeasible == "" and math.isfinite(ob.core_seconds)
    assert ob.core_seconds >= ob.floor_core_seconds * 0.999


# ---- the reports -------------------------------------------------------------------------------------------
_run = run_subcommand


def test_simulate_json_line_says_infeasible(tmp_path, capsys):
    # 40 req/s of yolov5s: one 16-core replica serves ~30 req/s at most
    rc = _run(sim_cli.register, ["simulate", "--trace", "constant:40", "--duration-s", "20", "--network", "none",
                                 "--policy", "static", "--static-cpu-m", "16000", "--static-batch", "16",
                                 "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    fig = json.loads(out.strip().splitlines()[-1])
    run = fig["runs"]["static"]
    assert run["oracle"] == "infeasible" and run["oracle_core_seconds"] is None and run["ratio_to_oracle"] is None
    assert run["oracle_infeasible"].startswith("infeasible:")
    (ob,) = fig["oracles"].values()
    assert ob["feasible"] is False and ob["core_seconds"] is None
    table = out.split("\n{")[0]
    assert "infeasible" in table and "e+3" not in table and "0.00x" not in table
    assert json.loads((tmp_path / "static" / "run.json").read_text())["oracle"] == "infeasible"


def test_simulate_takes_nodes(tmp_path, capsys):
    rc = _run(sim_cli.register, ["simulate", "--trace", "constant:5", "--duration-s", "10", "--network", "none",
                                 "--policy", "joint", "--nodes", "2", "--node-cpu-m", "4000", "--no-oracle",
                                 "--out", str(tmp_path)])
    assert rc == 0
    fig = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fig["deployment"]["max_cpu_m"] == 4000 and fig["config"]["nodes"] == 2
    run = fig["runs"]["joint"]
    assert run["nodes"]["nodes"] == 2 and run["nodes"]["node_cpu_m"] == 4000
    assert "2 nodes of 4000 m" in run["oracle_space"]
    assert _run(sim_cli.register, ["simulate", "--trace", "constant:5", "--nodes", "0", "--no-oracle"]) == 2


def test_experiment_adds_the_unscaled_windows():
    assert {"bursty_d8_unscaled", "bursty_d5_unscaled"} <= set(experiment.ALL_WINDOWS)
    assert set(experiment.WINDOWS) <= set(experiment.ALL_WINDOWS)
    sc = experiment.window_scenarios(Scenario(), ["bursty_d8_unscaled", "bursty_d5_unscaled"], 24.0)
    assert {w: (s.trace, s.damping, s.scale, s.peak_rps) for w, s in sc.items()} == {
        "bursty_d8_unscaled": ("twitter:bursty", 8.0, None, None),
        "bursty_d5_unscaled": ("twitter:bursty", 5.0, None, None)}
    dep = experiment.unscaled_deployment()
    assert (dep.nodes, dep.node_cpu_m, dep.max_cpu_m) == (4, 16_000, 16_000)
    from sponge.policy import POLICY_NAMES

    multi = experiment.unscaled_policies(experiment.default_policies())
    assert multi[:1] == ["joint"] and {"hpa", "fa2", "static", "sponge"} <= set(multi)
    assert ("themis" in multi) == ("themis" in POLICY_NAMES)
    assert "paper" not in multi and "clairvoyant" not in multi
    p = argparse.ArgumentParser()
    experiment.register(p.add_subparsers())
    args = p.parse_args(["experiment", "--windows", "bursty_d5_unscaled"])
    assert args.windows == ["bursty_d5_unscaled"] and args.policies is None


def test_timeline_png_shows_replicas_and_cpu_per_replica(tmp_path, monkeypatch):
    pol = Scripted({1000.0: Decision(1000, 1, 5), 2000.0: Decision(1500, 1, 4)})
    r = simulate(_idle(3000.0), MODEL, pol, SimConfig(initial_cpu_m=1000, nodes=2, node_cpu_m=2000,
                                                      cold_start_ms=500.0))
    s = plots.replica_series(r.timeline)
    assert s["t_s"].tolist() == [1.0, 2.0, 3.0]
    assert s["replicas"].tolist() == [1, 4, 4]
    assert s["cpu_per_replica_m"].tolist() == [1000, 1000, 1000]
    assert s["total_cpu_m"].tolist() == [1000, 4000, 4000]
    assert s["refused_replicas"].tolist() == [0, 1, 0]
    figs = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figs.append(fig), save(fig, path))[1])
    png = plots.plot_timelines({"joint": (r.records(), r.timeline)}, tmp_path / "t.png")
    assert png.is_file() and png.stat().st_size > 10_000
    axes = figs[0].axes
    per_replica = axes[plots._ROW["per_replica"]]
    assert per_replica.get_ylabel() == "CPU per replica (millicores)"
    assert per_replica.lines[0].get_ydata().tolist() == [1000, 1000, 1000, 1000]  # post-steps from t = 0
    reps = axes[plots._ROW["replicas"]]
    assert reps.get_ylabel() == "replicas" and reps.lines[0].get_ydata().tolist() == [1, 4, 4, 4]
    assert reps.collections[0].get_offsets().tolist() == [[2.0, 5.0]]  # 4 replicas + 1 asked, no node
