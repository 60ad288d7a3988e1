"""One scenario description for live and simulated runs: the same flags given to `sponge load` and to
`sponge simulate` (or, window by window, to `sponge experiment`) draw the very same requests."""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import pytest

from sponge import experiment
from markers import needs_data
from sponge.report.results import read_run
from sponge.sim import cli as sim_cli
from sponge.sim.scenario import request_set
from sponge.workload import loadgen
from sponge.workload.scenario import Scenario, scenario_from_args


# Cases reading a Twitter window or the Ghent log (the default network) need the traces; the last runs anywhere.
FLAG_SETS = [
    pytest.param([], marks=needs_data),  # the defaults of both commands
    pytest.param(["--trace", "twitter:steady_high", "--duration-s", "40", "--scale", "0.44", "--seed", "3"],
                 marks=needs_data),
    pytest.param(["--trace", "twitter:1301160-1301220", "--damping", "4", "--peak-rps", "20", "--rtt",
                  "5gophers:verizon-west", "--clients", "3", "--tx-rule", "exact", "--uplink-scale", "0.5",
                  "--image-kib", "350", "--slo-ms", "800"], marks=needs_data),
    pytest.param(["--trace", "constant:12", "--duration-s", "30", "--arrivals", "uniform", "--client-offsets", "zero",
                  "--clients", "1", "--rtt", "25"], marks=needs_data),
    ["--trace", "constant:9.5", "--duration-s", "20", "--network", "none", "--seed", "11"],
]


def _args(register, argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command", required=True))
    return p.parse_args(argv)


def _load(flags: list[str]) -> Scenario:
    return scenario_from_args(_args(loadgen.register, ["load", *flags]))


def _simulate(flags: list[str]) -> Scenario:
    return scenario_from_args(_args(sim_cli.register, ["simulate", *flags]))


def _columns(plan) -> dict[str, np.ndarray]:
    return {k: np.array([getattr(r, k) for r in plan]) for k in ("send_ms", "slo_ms", "network_ms", "budget_ms")}


@pytest.mark.parametrize("flags", FLAG_SETS, ids=lambda f: " ".join(f) or "defaults")
def test_load_and_simulate_parse_to_the_same_plan(flags: list[str]) -> None:
    live, sim = _load(flags), _simulate(flags)
    assert live == sim
    live_plan = _columns(live.plan())
    sim_plan, trace = request_set(sim)
    assert len(sim_plan) == live_plan["send_ms"].size > 0
    for k, col in live_plan.items():
        assert np.array_equal(getattr(sim_plan, k), col), k
    assert sim_plan.duration_ms == trace.duration_s * 1000.0


def test_plan_is_deterministic_under_a_seed() -> None:
    sc = Scenario(trace="constant:20", duration_s=30, network="none")
    a, b = sc.plan(), sc.plan()
    assert a == b and len(a) > 400
    other = replace(sc, seed=1).plan()
    assert [r.send_ms for r in other] != [r.send_ms for r in a]


@needs_data
def test_plan_with_network_is_deterministic_and_sizes_leave_arrivals_alone() -> None:
    sc = Scenario(trace="twitter:bursty", duration_s=30, rtt="5gophers", seed=5)
    a = sc.plan()
    assert a == sc.plan()
    bigger = replace(sc, image_kib=500).plan()
    assert [r.send_ms for r in bigger] == [r.send_ms for r in a]
    assert sum(r.network_ms for r in bigger) > sum(r.network_ms for r in a)


@pytest.mark.parametrize("flags", [
    pytest.param(["--trace", "twitter:steady_low", "--duration-s", "30", "--seed", "2", "--slo-ms", "900"],
                 marks=needs_data, id="twitter"),
    pytest.param(["--trace", "constant:8", "--duration-s", "30", "--seed", "2", "--slo-ms", "900", "--network", "none"],
                 id="constant"),
])
def test_simulate_replays_the_load_plan_end_to_end(tmp_path, capsys, flags: list[str]) -> None:
    out = tmp_path / "sim"
    args = _args(sim_cli.register, ["simulate", *flags, "--policy", "static", "--static-cpu-m", "4000",
                                    "--no-oracle", "--out", str(out)])
    assert args.func(args) == 0
    reqs, _, meta = read_run(out / "static")
    reqs.sort(key=lambda r: r.id)
    live = _load(flags)
    plan = live.plan()
    assert meta["scenario"] == live.describe()
    assert [r.sent_ms for r in reqs] == pytest.approx([p.send_ms for p in plan])
    assert [r.budget_ms for r in reqs] == pytest.approx([p.budget_ms for p in plan])


@needs_data
def test_experiment_windows_are_the_load_scenarios() -> None:
    """Each experiment window is what `sponge load --trace twitter:<w> --scale <s>` replays."""
    flags = ["--duration-s", "30", "--seed", "4", "--image-kib", "300", "--arrivals", "uniform"]
    args = _args(experiment.register, ["experiment", *flags, "--windows", "bursty", "steady_high"])
    scenarios = experiment.window_scenarios(scenario_from_args(args), args.windows, args.busiest_peak_rps)
    # the common scale is fitted on the whole windows, not the truncated ones
    assert max(replace(sc, duration_s=None).rate_trace().peak_rps for sc in scenarios.values()) == pytest.approx(24.0)
    for w, sc in scenarios.items():
        assert sc == _load([*flags, "--trace", f"twitter:{w}", "--scale", repr(sc.scale)])


def test_aliases_kept_from_simulate() -> None:
    assert _simulate(["--window", "steady_low"]).trace == "twitter:steady_low"
    assert _load(["--constant-rps", "5"]).trace == "constant:5"
    assert _simulate(["--rtt-ms", "20"]) == _simulate(["--rtt", "20"])


def test_invalid_scenarios_are_refused() -> None:
    with pytest.raises(ValueError, match="clients"):
        Scenario(clients=0)
    with pytest.raises(ValueError, match="tx_rule"):
        Scenario(tx_rule="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--trace"):
        Scenario(trace="poisson:3").rate_trace()


@needs_data
def test_5gophers_rtt_accepts_hyphenated_carriers_and_optional_site():
    from sponge.workload.network import read_5gophers_rtt

    def samples(spec: str) -> tuple[float, ...]:
        return Scenario(rtt=spec, duration_s=5).network_model().rtt.samples_ms

    assert sorted(samples("5gophers:T-Mobile-East")) == sorted(read_5gophers_rtt(carrier="T-Mobile", server="East"))
    assert len(samples("5gophers:Verizon")) == 240  # both sites of one carrier (120 samples each)
    assert len(samples("5gophers")) == 720
