"""The profiler for real: one replica process resized in place through the cgroup actuator; a saved
profile that load_profile accepts; and a live demonstration that a resize of the same replica changes
its latency as the fitted model predicts."""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

import numpy as np
import pytest

from sponge.config import ServerConfig
from sponge.perf.fit import PoorFitError
from sponge.perf.profile_store import load_profile
from sponge.perf.profiler import (
    HostLoad,
    _actuator_cpu_grid,
    default_cpu_grid,
    format_grid,
    png_path_for,
    random_inputs,
    run_profile,
)
from sponge.runtime.base import TensorSpec

V1_MOUNT = Path("/sys/fs/cgroup/cpu")


def _cgroup_writable() -> str | None:
    """None if a CFS quota can be written here, else why not."""
    from sponge.scaling.base import ActuatorError
    from sponge.scaling.select import select_actuator

    try:
        sel = select_actuator(f"probe{os.getpid()}", prefer="auto")
    except (ActuatorError, OSError) as exc:
        return f"no writable cgroup: {exc}"
    try:
        if sel.actuator.kind == "affinity":
            return f"no writable cgroup cpu controller (only {sel.reason})"
        return None
    finally:
        sel.actuator.close()


NO_CGROUP = _cgroup_writable()
needs_cgroup = pytest.mark.skipif(NO_CGROUP is not None, reason=f"fractional CPU needs a CFS quota: {NO_CGROUP}")

# The small grid of the real runs: b=4 and b=16 at 500, 1000 and 2000 m (6 cells, ~0.4-1.7 s each).
# Why not b=1 or 2: under the 100 ms CFS period a small batch at 500 m usually runs at full speed and
# sometimes waits ~50 ms for the next period, a tail the four-term model cannot express (bench/profile.py
# shows it); batches of 4+ span the throttling and follow 1/c. The demonstration uses b=8, between the
# profiled sizes, so it also checks the model's interpolation in b.
BATCHES = (4, 16)
CPUS = (500, 1000, 2000)
DEMO_BATCH = 8
# Acceptance limits of the small profile. A cell here has 4-15 samples, so its "p99" is its maximum, and
# one disturbance by another process on this shared 2-core host moves it by up to ~50 %: the fit quality of
# 6 such cells is noise (R² 0.73-0.99 from run to run with two busy processes beside it; 0.75 in a CI
# run without them). So the test does not demand a good fit; it checks that the profiler measures, saves and
# accepts or refuses by these limits, and that the measured cells point the right way. Fit quality on a
# full grid is bench/profile.py's figure.
SMALL_MAX_P95 = 0.35
SMALL_MIN_R2 = 0.85
# Directions of the measured cells (means), with margins. Ideal: twice the CPU ~2x faster, 4x the batch
# ~4-5x slower; seen with two busy processes beside the profile: >= 1.39x and >= 3.96x. A comparison is
# asserted only when the cell expected to be faster measurably had the CPU for it (`_available_cores`):
# other processes (the host's other test runs, with replicas as high-weight as this one) can leave a
# 2000 m cell less than one core, and then it is slower than the 1000 m one — contention, not a bug.
MIN_SPEEDUP_PER_DOUBLING = 1.15  # asserted when the larger allocation had >= 1.5x the smaller one
MIN_SLOWDOWN_4X_BATCH = 2.0  # asserted when the small batch had >= half its allocation
N_CPUS = HostLoad(None).n_cpus


def _available_cores(cpu_m: int, ext_cores: float) -> float:
    """The CPU a replica allocated `cpu_m` could have used while other processes used `ext_cores`
    (measured by HostLoad over the same time)."""
    return min(cpu_m / 1000.0, N_CPUS - ext_cores)


# -- pure pieces --------------------------------------------------------------------------------------


def test_default_cpu_grid() -> None:
    assert default_cpu_grid(2000) == (250, 500, 750, 1000, 1500, 2000)
    assert default_cpu_grid(1000) == (250, 500, 750, 1000)
    assert default_cpu_grid(4000) == (250, 500, 750, 1000, 1500, 2000, 3000, 4000)
    assert default_cpu_grid(2500) == (250, 500, 750, 1000, 1500, 2000, 2500)
    with pytest.raises(ValueError):
        default_cpu_grid(100)


def test_whole_core_actuator_rounds_the_grid_up() -> None:
    assert _actuator_cpu_grid([250, 500, 1000, 1500, 2000], 1000) == [1000, 2000]
    assert _actuator_cpu_grid([250, 500], 1) == [250, 500]


def test_random_inputs_follow_specs() -> None:
    specs = [TensorSpec("image", "UINT8", (-1, 224, 224, 3)), TensorSpec("mask", "FP32", (-1, -1)),
             TensorSpec("ids", "INT64", (-1, 7))]
    x = random_inputs(specs, 5, np.random.default_rng(1))
    assert x["image"].shape == (5, 224, 224, 3) and x["image"].dtype == np.uint8
    assert x["mask"].shape == (5, 1) and x["mask"].dtype == np.float32
    assert x["ids"].shape == (5, 7) and x["ids"].dtype == np.int64
    with pytest.raises(ValueError):
        random_inputs([TensorSpec("s", "BYTES", (-1,))], 1)


def test_png_path_and_grid_table() -> None:
    assert png_path_for("/m/x.onnx.profile.json") == Path("/m/x.onnx.profile.png")
    from sponge.perf.profile_store import GridCell

    table = format_grid([GridCell(1, 500, 10.0, 20.0, 5, holdout=True), GridCell(2, 500, 30.0, 40.0, 5)])
    assert "10.0/20.0*" in table and "30.0/40.0" in table


def test_host_load_contention_rule() -> None:
    class NoMeter:
        pass

    h = HostLoad(NoMeter(), n_cpus=2)
    assert not h.contended(0.1, 2000, 2)
    assert h.contended(0.3, 2000, 2)  # 2000 m on 2 cores: nothing may be left to others
    assert not h.contended(0.6, 1500, 2)  # 1500 m leaves 0.5 cores (+0.15 tolerance)
    assert h.contended(0.7, 1500, 2)
    assert not h.contended(1.6, 500, 1)
    assert h.contended(1.7, 500, 1)
    assert h.sample() >= 0.0


def test_cli_registers_profile_subcommand() -> None:
    from sponge.perf.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["profile", "--batches", "1,4", "--cpu-m", "500,1000", "--reps", "7",
                              "--actuator", "cgroup-v1", "--out", "/tmp/x.json"])
    assert args.batches == [1, 4] and args.cpu_m == [500, 1000] and args.reps == 7
    assert args.actuator == "cgroup-v1" and args.out == "/tmp/x.json" and callable(args.func)
    with pytest.raises(SystemExit):
        parser.parse_args(["profile", "--batches", "1,x"])


def _synthetic_cells(noise: float, seed: int = 3) -> list:
    from sponge.perf.latency_model import LatencyModel
    from sponge.perf.profiler import CellStats

    truth = LatencyModel(g=9.0, d=1.0, e=2.0, h=1.0)
    rng = np.random.default_rng(seed)
    cells = []
    for b in (1, 2, 4, 8):
        for c in (250, 500, 1000, 2000):
            base = truth.latency_ms(b, c)
            samples = list(base * (1 + noise * rng.standard_normal(20)).clip(0.2))
            cells.append(CellStats(b, c, samples, threads=-(-c // 1000), wall_s=1.0))
    return cells


def test_fit_and_store_accepts_a_good_grid_and_refuses_a_bad_one(tmp_path: Path) -> None:
    from sponge.perf.profiler import _fit_and_store

    model = tmp_path / "m.onnx"
    model.write_bytes(b"not really onnx, only hashed")
    kw = dict(conditions={"actuator": "test", "cfs_period_us": 100_000}, statistic="median_ms",
              weighting="relative", holdout_every=4, out=None, png=True, save=True, min_r2=0.95,
              max_p95_rel_err=0.15, actuator_reason="test", pid=1)
    good = _fit_and_store(model, _synthetic_cells(0.01), **kw)
    assert good.accepted and good.holdout is not None and good.holdout.n == 4
    assert good.profile_path == tmp_path / "m.onnx.profile.json" and good.png_path.is_file()
    assert sum(c.holdout for c in good.profile.grid) == 4
    prof = load_profile(good.profile_path, model)
    assert prof.machine["profiled_with"]["cfs_period_us"] == 100_000
    assert abs(prof.model.g - 9.0) < 0.5

    bad = _fit_and_store(model, _synthetic_cells(0.6), **kw)
    assert not bad.accepted and bad.problems
    assert bad.profile_path == tmp_path / "m.onnx.profile.rejected.json"
    assert (tmp_path / "m.onnx.profile.json").is_file()  # the earlier good profile is not replaced


@needs_cgroup
def test_open_actuator_uses_the_high_weight_root() -> None:
    from sponge.perf.profiler import GUARANTEED_ROOT, open_actuator

    sel = open_actuator("weight-probe")
    try:
        assert sel.actuator.path.parent.name == GUARANTEED_ROOT, sel.reason
        parent = sel.actuator.path.parent
        weight = parent / ("cpu.shares" if (parent / "cpu.shares").exists() else "cpu.weight")
        assert int(weight.read_text()) > 1024
        sel.actuator.apply(750)
        assert sel.actuator.current() == 750
    finally:
        sel.actuator.close()
    assert not sel.actuator.path.exists()


# -- real runs ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the default model, so the test's profile never replaces the real one."""
    from sponge.models.efficientnet_lite0 import default_model_path

    dst = tmp_path_factory.mktemp("model") / "efficientnet-lite0.onnx"
    dst.write_bytes(default_model_path().read_bytes())
    return dst


@pytest.fixture(scope="module")
def small_run(model_file: Path):
    # Measured as `sponge serve` measures (its CFS period), judged by this small grid's limits (see above).
    return run_profile(model_file, BATCHES, CPUS, warmup=1, reps=15, min_reps=4, cell_seconds=0.4, progress=False,
                       retries=1, retry_budget_s=5.0, max_p95_rel_err=SMALL_MAX_P95, min_r2=SMALL_MIN_R2,
                       period_us=ServerConfig().cfs_period_us)


def _within_limits(q, min_r2: float = SMALL_MIN_R2, max_p95: float = SMALL_MAX_P95) -> bool:
    return q.r2 >= min_r2 and q.p95_rel_err <= max_p95


@pytest.mark.slow
@needs_cgroup
def test_small_real_profile_is_saved_and_judged_by_its_limits(small_run, model_file: Path) -> None:
    """A real 6-cell profile: every cell measured with the allocation's thread count, cells that point the
    right way, and the profile saved and accepted or refused exactly as its limits say — whichever way
    this run's (noisy) fit came out. The store re-judges the saved file by whatever limits it is given."""
    run = small_run
    cells = sorted(run.cells, key=lambda c: (c.batch, c.cpu_m))
    assert [(c.batch, c.cpu_m) for c in cells] == [(b, c) for b in BATCHES for c in CPUS]
    assert all(c.n >= 4 for c in run.cells)
    assert all(c.threads == -(-c.cpu_m // 1000) for c in run.cells)  # threads followed each allocation
    assert run.pid > 0

    # Directions (cells, not the fit). The mean, not the median: at 500 m a batch of 4 (36 ms of CPU) fits
    # in one period's quota or waits for the next one, so its median flips, while the mean is the work
    # divided by the allocation.
    by = {(c.batch, c.cpu_m): c for c in run.cells}
    avail = {k: _available_cores(c.cpu_m, c.ext_cores) for k, c in by.items()}
    seen = (f"means {[(k, round(c.mean_ms, 1)) for k, c in sorted(by.items())]}, "
            f"available cores {[(k, round(v, 2)) for k, v in sorted(avail.items())]}")
    checked = []
    for b in BATCHES:  # more CPU is faster
        for lo, hi in ((500, 1000), (1000, 2000)):
            if avail[(b, hi)] >= 1.5 * lo / 1000:
                assert by[(b, lo)].mean_ms > MIN_SPEEDUP_PER_DOUBLING * by[(b, hi)].mean_ms, seen
                checked.append(f"b={b}: {lo} m slower than {hi} m")
    for c in CPUS:  # a bigger batch is slower
        if avail[(4, c)] >= 0.5 * c / 1000:
            assert by[(16, c)].mean_ms > MIN_SLOWDOWN_4X_BATCH * by[(4, c)].mean_ms, seen
            checked.append(f"{c} m: b=16 slower than b=4")
    print(f"directions checked: {checked or 'none (every cell was short of CPU)'}; {seen}")

    # Accepted or refused by the stated limits, and saved where that says.
    qualities = [q for q in (run.fit.quality, run.holdout, run.overall) if q is not None]
    assert run.accepted == all(_within_limits(q) for q in qualities), (run.problems, qualities)
    good = model_file.with_name(model_file.name + ".profile.json")
    rejected = model_file.with_name(model_file.name + ".profile.rejected.json")
    assert run.png_path is not None and run.png_path.stat().st_size > 10_000
    if run.accepted:
        assert run.profile_path == good and not run.problems
        prof = load_profile(good, model_file, max_p95_rel_err=SMALL_MAX_P95, min_r2=SMALL_MIN_R2)
        assert prof.model == run.profile.model
    else:
        assert run.profile_path == rejected and not good.exists(), run.problems
        assert all("fits badly" in p for p in run.problems) and any(
            f"< {SMALL_MIN_R2}" in p or f"> {SMALL_MAX_P95:.1%}" in p for p in run.problems), run.problems
        with pytest.raises(PoorFitError):
            load_profile(rejected, model_file, max_p95_rel_err=SMALL_MAX_P95, min_r2=SMALL_MIN_R2)

    # Whatever this run's quality, the saved file is judged afresh from its grid: refused by limits just
    # above its quality, accepted by limits just below, and it holds what was measured and how.
    q = run.overall
    with pytest.raises(PoorFitError):
        load_profile(run.profile_path, model_file, min_r2=q.r2 + 1e-3, max_p95_rel_err=1.0)
    with pytest.raises(PoorFitError):
        load_profile(run.profile_path, model_file, min_r2=-1e9, max_p95_rel_err=q.p95_rel_err - 1e-3)
    prof = load_profile(run.profile_path, model_file, min_r2=q.r2 - 1e-3, max_p95_rel_err=q.p95_rel_err + 1e-3)
    assert prof.model == run.profile.model and len(prof.grid) == 6 and prof.statistic == "p99_ms"
    measured = {(c.batch, c.cpu_m): c.p99_ms for c in cells}
    assert {(g.batch, g.cpu_m): g.p99_ms for g in prof.grid} == pytest.approx(measured)
    assert prof.machine["profiled_with"]["cfs_period_us"] == ServerConfig().cfs_period_us  # what `sponge serve` uses


@pytest.mark.slow
@needs_cgroup
def test_live_resize_changes_latency_as_the_model_predicts(small_run, model_file: Path) -> None:
    """The same load (batches of 8 back to back) on ONE replica process at 2000 m, then 500 m, then
    2000 m again, each applied in place through the actuator: the latency changes as the fitted
    model predicts.

    What is compared: the p99 and median of each phase against l(8, 500) and l(8, 2000) (the model is
    fitted to p99s: it must lie between a phase's median and its p99, within the tolerance), and the
    ratio of medians median(500 m) / median(2000 m) against l(8, 500) / l(8, 2000). Of the two 2000 m phases the lower p99
    counts (one disturbance by another process must not decide the test; both phases show that the
    step back up works).

    What must hold however busy the host: the replica follows each quota by itself and is never
    restarted; a quarter of the CPU is more than twice as slow (p99) when the 2000 m phase measurably
    had >= 1.5 cores, at least 15 % slower (median) when it had >= 0.75 (other processes' use is
    measured; a disturbed phase is measured again, up to three times).
    When neither the profile's cells nor these phases saw other processes take the replica's CPU
    (measured, `HostLoad`), the model must also match closely: its own error on the profiled cells
    (max |rel err|, `fit_err`) plus 25 % for re-measuring a p99 from ~5-15 samples (its maximum;
    repeated cells here varied by up to ~20 % when no other process competed), twice that for the ratio.
    """
    from sponge.perf.profiler import open_actuator, wait_threads_follow
    from sponge.runtime.replica import Replica
    from sponge.scaling.self_limit import threads_for

    model = small_run.profile.model
    fit_err = small_run.overall.max_rel_err
    predicted = {c: model.latency_ms(DEMO_BATCH, c) for c in (2000, 500)}

    async def scenario() -> tuple[dict[str, list[float]], list[int], dict[str, float], list[str]]:
        sel = open_actuator("demo")
        act = sel.actuator
        rep = Replica("demo", str(model_file), threads=2, max_threads=2)
        load = HostLoad(act)
        phases: dict[str, list[float]] = {}
        others: dict[str, float] = {}
        disturbed: list[str] = []  # phases whose kept measurement was contended
        pids: list[int] = []
        try:
            await rep.start()
            act.attach(rep.pid)
            x = random_inputs(rep.inputs, DEMO_BATCH)
            act.apply(2000)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.0:  # the worker builds its other session right after start
                await rep.infer(x)
            for name, cpu in (("2000a", 2000), ("500", 500), ("2000b", 2000)):
                act.apply(cpu)
                _, followed = await wait_threads_follow(rep, threads_for(cpu), x)
                assert followed, "the replica did not follow its new quota by itself"
                for _attempt in range(3):  # as the profiler: measure again if other processes took its CPU
                    await rep.infer(x)  # warm-up at this allocation
                    load.sample()
                    ms: list[float] = []
                    t0 = time.monotonic()
                    while len(ms) < 5 or (time.monotonic() - t0 < 0.8 and len(ms) < 15):
                        ms.append((await rep.infer(x)).infer_ms)
                    other = load.sample()
                    if name not in others or other < others[name]:
                        phases[name], others[name] = ms, other
                    if not load.contended(other, cpu, threads_for(cpu)):
                        break
                if load.contended(others[name], cpu, threads_for(cpu)):
                    disturbed.append(f"phase {name}")
                pids.append(rep.pid)
        finally:
            await rep.stop()
            act.close()
        return phases, pids, others, disturbed

    phases, pids, others, disturbed = asyncio.run(scenario())
    assert len(set(pids)) == 1, f"the replica was restarted: pids {pids}"
    p99 = {k: float(np.percentile(v, 99)) for k, v in phases.items()}
    fast = min(p99["2000a"], p99["2000b"])
    measured_ratio = p99["500"] / fast
    predicted_ratio = predicted[500] / predicted[2000]
    tol = fit_err + 0.25
    med = {k: round(float(np.median(v)), 1) for k, v in phases.items()}
    disturbed += [f"profile cell b={c.batch} c={c.cpu_m} m" for c in small_run.contended_cells]
    msg = (f"p99 {p99}, median {med}, model {predicted}, ratio measured {measured_ratio:.2f} vs predicted "
           f"{predicted_ratio:.2f}, fit max err {fit_err:.0%}, other processes used {others} cores, "
           f"disturbed: {disturbed or 'nothing'}")
    # A quarter of the CPU is slower: more than twice where the 2000 m phase measurably had >= 1.5 cores
    # (3x the 500 m allocation), at least 15 % (medians) where it had >= 0.75 cores.
    avail = {k: _available_cores(2000, others[k]) for k in ("2000a", "2000b")}
    roomy = [k for k, v in avail.items() if v >= 1.5]
    if roomy:
        assert p99["500"] / min(p99[k] for k in roomy) > 2.0, msg
    some = [k for k, v in avail.items() if v >= 0.75]
    if some:
        assert float(np.median(phases["500"])) > 1.15 * min(float(np.median(phases[k])) for k in some), msg
    print(f"2000 m phases with >= 1.5 cores: {roomy}, >= 0.75 cores: {some}; {msg}")
    if disturbed:
        return  # the close comparison needs an undisturbed profile and demonstration (see the docstring)
    assert measured_ratio > 2.0, msg
    # Medians for the close comparison: from 5-15 batches a p99 is about the maximum, and one CFS stall
    # moved it by 40 % with no other process measured (500 m p99 150 ms, median 107, model 102).
    fast_key = min(("2000a", "2000b"), key=lambda k: p99[k])
    med_ratio = med["500"] / med[fast_key]
    assert abs(med_ratio / predicted_ratio - 1) <= 2 * tol, msg
    for c, key in ((500, "500"), (2000, fast_key)):  # the p99-fitted model sits between body and tail
        assert (1 - tol) * med[key] <= predicted[c] <= (1 + tol) * p99[key], msg
