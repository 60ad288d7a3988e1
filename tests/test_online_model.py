"""The thread-step latency model (perf/step_model.py) and the online learner (perf/online.py).

Pure and fast: synthetic surfaces with known thread steps, plus one real measured grid embedded below.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace

import numpy as np
import pytest

from sponge.perf.fit import ProfilePoint, evaluate, fit_latency_model
from sponge.perf.latency_model import LatencyModel
from sponge.perf.online import OnlineLatencyLearner, safety_for
from sponge.perf.samples import BatchSample
from sponge.perf.step_model import StepLatencyModel, loco_predictions, threads_of

BATCHES = (1, 2, 4, 8, 16)
CPUS = (250, 500, 750, 1000, 1250, 1500, 1750, 2000)
# Per thread count: (g, d, e, h). Two threads do more work per image than one (synchronisation), so the
# surface steps at 1000 m; the four-term model, one smooth surface, cannot follow.
TRUTH = {1: (5.5, 0.3, 0.5, 0.3), 2: (7.5, 0.6, 1.5, 0.8)}


def truth(b: np.ndarray | float, c: np.ndarray | float) -> np.ndarray:
    t = threads_of(c, 2)
    k = np.array([TRUTH[1], TRUTH[2]])[t - 1]
    u = 1000.0 / np.asarray(c, dtype=float)
    return k[..., 0] * b * u + k[..., 1] * b + k[..., 2] * u + k[..., 3]


def grid_points(noise: float = 0.0, seed: int = 0, cpus=CPUS, batches=BATCHES) -> list[ProfilePoint]:
    rng = np.random.default_rng(seed)
    return [ProfilePoint(b, c, float(truth(b, c)) * math.exp(rng.normal(0.0, noise))) for b in batches for c in cpus]


# A real grid: EfficientNet-Lite0 on this 2-core host, 10 ms CFS period, p95 ms of 5-40 batches per cell,
# measured while other processes used ~0.5 core on average (the host is shared).
REAL_P95 = [(1, 250, 38.9), (1, 500, 18.7), (1, 750, 10.4), (1, 1000, 6.7), (1, 1250, 7.0), (1, 1500, 7.4),
            (1, 1750, 4.4), (1, 2000, 7.1), (2, 250, 65.2), (2, 500, 30.4), (2, 750, 19.4), (2, 1000, 12.5),
            (2, 1250, 17.5), (2, 1500, 10.2), (2, 1750, 7.7), (2, 2000, 10.7), (4, 250, 186.8), (4, 500, 50.4),
            (4, 750, 35.2), (4, 1000, 27.5), (4, 1250, 27.7), (4, 1500, 20.0), (4, 1750, 15.3), (4, 2000, 33.3),
            (8, 250, 297.9), (8, 500, 120.2), (8, 750, 83.1), (8, 1000, 58.8), (8, 1250, 57.0), (8, 1500, 60.6),
            (8, 1750, 36.2), (8, 2000, 48.4), (16, 250, 580.9), (16, 500, 263.8), (16, 750, 154.3),
            (16, 1000, 126.0), (16, 1250, 110.3), (16, 1500, 110.1), (16, 1750, 76.3), (16, 2000, 78.3)]


def assert_monotone(m: StepLatencyModel, max_cpu_m: int = 3000, max_batch: int = 32) -> None:
    """Finite, positive; non-increasing in cpu within a thread count; non-decreasing in batch."""
    c = np.arange(1, max_cpu_m + 1, dtype=float)
    b = np.arange(1, max_batch + 1, dtype=float)
    lat = np.asarray(m.latency_ms(b[:, None], c[None, :]))
    assert lat.shape == (b.size, c.size)
    assert np.isfinite(lat).all() and (lat > 0).all()
    assert (np.diff(lat, axis=0) >= -1e-9).all(), "latency falls with a larger batch"
    same_threads = threads_of(c[1:], m.max_threads) == threads_of(c[:-1], m.max_threads)
    dc = np.diff(lat, axis=1)[:, same_threads]
    assert (dc <= 1e-9 * lat[:, 1:][:, same_threads]).all(), "latency rises with more CPU within a thread count"


# -- StepLatencyModel -----------------------------------------------------------------------------------


def test_step_model_recovers_a_step_surface_the_four_term_model_cannot() -> None:
    pts = grid_points()
    step, four = StepLatencyModel.fit(pts), fit_latency_model(pts).model
    # Judged between and beyond the measured cells, where a policy's candidates lie.
    b = np.array([1, 3, 6, 12, 16], dtype=float)[:, None]
    c = np.array([300, 600, 900, 1000, 1001, 1100, 1400, 1900, 2000], dtype=float)[None, :]
    want = truth(b, c)
    step_err = np.abs(step.latency_ms(b, c) / want - 1)
    four_err = np.abs(np.vectorize(four.latency_ms)(b, c) / want - 1)
    assert step_err.max() < 0.01
    assert np.percentile(four_err, 95) > 0.10  # the smooth model misses the step by >10 %
    # With measurement noise, held out (each cell predicted by a fit to the others), still far better.
    noisy = grid_points(noise=0.05, seed=3)
    bb, cc, yy = (np.array([getattr(p, k) for p in noisy], dtype=float) for k in ("batch", "cpu_m", "latency_ms"))
    exact = truth(bb, cc)
    step_loco = np.abs(loco_predictions(bb, cc, yy, 2) / exact - 1)
    four_loco = np.array([abs(fit_latency_model(noisy[:i] + noisy[i + 1:]).model.latency_ms(int(bb[i]), cc[i])
                              / exact[i] - 1) for i in range(len(noisy))])
    assert np.percentile(step_loco, 95) < 0.5 * np.percentile(four_loco, 95)


def test_loco_predictions_equal_refitting_without_the_cell() -> None:
    pts = grid_points(noise=0.1, seed=1, cpus=(250, 500, 1000, 1500, 2000), batches=(1, 4, 16))
    pts = [p for p in pts if not (p.batch == 16 and p.cpu_m != 500)]  # one batch size measured once
    b, c, y = (np.array([getattr(p, k) for p in pts], dtype=float) for k in ("batch", "cpu_m", "latency_ms"))
    loco = loco_predictions(b, c, y, 2)
    for i, p in enumerate(pts):
        m = StepLatencyModel.fit(pts[:i] + pts[i + 1:], max_threads=2)
        assert loco[i] == pytest.approx(m.latency_ms(p.batch, p.cpu_m), rel=1e-9)


def test_broadcasting_matches_scalar_calls() -> None:
    m = StepLatencyModel.fit(grid_points(noise=0.05))
    batches = np.arange(1, 17)
    grid = np.arange(100, 2501, 50).astype(float)
    table = m.latency_ms(batches[:, None], grid[None, :])  # as SpongeOptimizer precomputes it
    assert table.shape == (16, grid.size)
    for i in (0, 5, 15):
        for j in (0, 17, grid.size - 1):
            one = m.latency_ms(int(batches[i]), float(grid[j]))
            assert isinstance(one, float) and one == pytest.approx(table[i, j])
    rps = m.throughput_rps(batches[:, None], grid[None, :])
    assert rps.shape == table.shape and np.allclose(rps, 1000 * batches[:, None] / table)
    assert isinstance(m.throughput_rps(4, 1500), float)
    assert isinstance(m, LatencyModel)  # the policies take it where they take the four-term model


@pytest.mark.parametrize("seed", range(6))
def test_fits_are_monotone_positive_and_flat_above_the_threads(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Heavy, unstructured noise (up to 2x either way): the data itself is not monotone.
    pts = [replace(p, latency_ms=p.latency_ms * math.exp(rng.uniform(-0.7, 0.7))) for p in grid_points()]
    m = StepLatencyModel.fit(pts)
    assert_monotone(m)
    assert m.latency_ms(4, 2000) == m.latency_ms(4, 5000)  # 2 threads cannot use more than 2 cores
    assert math.isfinite(m.latency_ms(1, 1)) and m.latency_ms(1, 1) > 0


def test_thread_counts_with_few_or_no_cells_fall_back_to_the_four_term_fit() -> None:
    one_thread = [p for p in grid_points() if p.cpu_m <= 1000]
    m = StepLatencyModel.fit(one_thread, max_threads=2)
    assert m.group(2) is None and m.group(1) is not None and m.group(1).cells == len(one_thread)
    four = LatencyModel(m.g, m.d, m.e, m.h)
    assert m.latency_ms(8, 1700) == pytest.approx(four.latency_ms(8, 1700))
    assert_monotone(m)
    # Two threads measured at ONE allocation only: the level comes from those cells, the c-shape from the prior.
    sparse = one_thread + [p for p in grid_points() if p.cpu_m == 2000]
    m2 = StepLatencyModel.fit(sparse)
    assert m2.group(2).cells == len(BATCHES)
    for b in BATCHES:
        assert m2.latency_ms(b, 2000) == pytest.approx(float(truth(b, 2000)), rel=0.05)
    assert_monotone(m2)
    assert evaluate(m2, sparse).p95_rel_err < evaluate(fit_latency_model(sparse).model, sparse).p95_rel_err


def test_fit_refuses_what_it_cannot_separate() -> None:
    with pytest.raises(ValueError, match="no profile points"):
        StepLatencyModel.fit([])
    with pytest.raises(ValueError, match="two distinct"):
        StepLatencyModel.fit([ProfilePoint(4, c, 10.0) for c in (500, 1000)])
    with pytest.raises(ValueError, match="latency_ms"):
        StepLatencyModel.fit([ProfilePoint(1, 500, float("nan")), ProfilePoint(2, 1000, 3.0)])


def test_to_dict_round_trips_through_json() -> None:
    m = StepLatencyModel.fit(grid_points(noise=0.05))
    back = StepLatencyModel.from_dict(json.loads(json.dumps(m.to_dict(), allow_nan=False)))
    assert back == m
    b, c = np.arange(1, 17)[:, None], np.arange(100, 2100, 100)[None, :]
    assert np.array_equal(back.latency_ms(b, c), m.latency_ms(b, c))


@pytest.mark.parametrize("corrupt, message", [
    (lambda d: d.pop("g"), "missing coefficient 'g'"),
    (lambda d: d.update(e=-1.0), "e=-1.0"),
    (lambda d: d.update(h="1"), "h='1'"),
    (lambda d: d.update(kind="four-term"), "not a step latency model"),
    (lambda d: d.update(max_threads=0), "max_threads"),
    (lambda d: d.update(groups={"1": {}}), "groups must be a list"),
    (lambda d: d["groups"][0].update(d=float("nan")), "d=nan"),
    (lambda d: d["groups"][0].update(g=True), "g=True"),
    (lambda d: d["groups"].append(dict(d["groups"][0])), "duplicated"),
    (lambda d: d["groups"][0].update(threads=9), "above max_threads"),
    (lambda d: d["groups"][0].update(g=0.0, d=0.0, e=0.0, h=0.0), "all coefficients zero"),
])
def test_from_dict_refuses_corrupt_data(corrupt, message: str) -> None:
    d = StepLatencyModel.fit(grid_points()).to_dict()
    corrupt(d)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        StepLatencyModel.from_dict(d)
    with pytest.raises(ValueError):
        StepLatencyModel.from_dict([1, 2])  # type: ignore[arg-type]


def test_policies_precompute_and_search_a_step_model() -> None:
    from sponge.policy.sponge_opt import SpongeOptimizer

    m = StepLatencyModel.fit(grid_points())
    opt = SpongeOptimizer(m, min_cpu_m=100, max_cpu_m=2000, step_m=50, max_batch=16)
    bounds = np.array([m.latency_ms(b, 1200.0) + 1e-6 for b in range(1, 17)])
    idx = opt.allocation.first_feasible(bounds)
    for b in range(1, 17):  # the least CPU on the grid meeting each bound
        lat = m.latency_ms(b, opt.grid.astype(float))
        assert opt.grid[idx[b - 1]] == opt.grid[np.argmax(lat <= bounds[b - 1])]


def test_real_grid_fits_monotone_and_at_least_as_well_in_sample() -> None:
    pts = [ProfilePoint(b, c, y) for b, c, y in REAL_P95]
    step, four = StepLatencyModel.fit(pts), fit_latency_model(pts).model
    assert_monotone(step, max_cpu_m=2000, max_batch=16)
    q_step, q_four = evaluate(step, pts), evaluate(four, pts)
    # Nested models (each thread count may take the global coefficients), so in sample it is no worse.
    assert sum(r * r for r in q_step.rel_errors) <= sum(r * r for r in q_four.rel_errors) * 1.01
    assert {g.threads: g.cells for g in step.groups} == {1: 20, 2: 20}


# -- OnlineLatencyLearner -------------------------------------------------------------------------------


def feed(learner: OnlineLatencyLearner, cells, n: int, t0: float = 0.0, scale: float = 1.0, noise: float = 0.02,
         cell_noise: dict | None = None, seed: int = 0) -> float:
    """n samples per cell, interleaved over the cells, 10 ms apart; returns the last time."""
    rng = np.random.default_rng(seed)
    t = t0
    for _ in range(n):
        for b, c in cells:
            t += 10.0
            f = (cell_noise or {}).get((b, c), 1.0)
            lat = float(truth(b, c)) * scale * f * math.exp(abs(rng.normal(0.0, noise)))
            learner.observe(BatchSample(b, c, lat, t))
    return t


GRID = [(b, c) for b in (1, 4, 16) for c in (500, 1000, 1500, 2000)]


def test_learner_readiness_criterion() -> None:
    lr = OnlineLatencyLearner()
    assert lr.model() is None and not lr.quality().ready
    feed(lr, GRID[:4], n=10)  # one batch size only
    q = lr.quality()
    assert not q.ready and "4/6 cells" in q.reason and "1/2 batch sizes" in q.reason and lr.model() is None
    feed(lr, [(4, 500), (4, 1000)], n=4)  # below min_samples: not counted yet
    q = lr.quality()
    assert q.cells == 4 and q.cells_seen == 6 and not q.ready
    feed(lr, GRID, n=8)
    q = lr.quality()
    assert q.ready, q.reason
    assert (q.cells, q.cpu_levels, q.batch_sizes) == (12, 4, 3)
    assert q.heldout_p95 is not None and q.heldout_p95 < 0.1 and q.reason.startswith("ready: 12 cells")
    m = lr.model()
    assert m is not None and m.latency_ms(4, 1200) == pytest.approx(float(truth(4, 1200)), rel=0.1)
    # Too few CPU levels, though enough cells.
    narrow = OnlineLatencyLearner()
    feed(narrow, [(b, c) for b in (1, 2, 4, 8) for c in (1000, 2000)], n=6)
    q = narrow.quality()
    assert not q.ready and "2/3 CPU levels" in q.reason


def test_learner_is_not_ready_when_noise_makes_held_out_error_large() -> None:
    rng = np.random.default_rng(7)
    # Each cell is off by its own factor (a neighbour on some cells, not others): no surface explains it.
    off = {cell: math.exp(rng.normal(0.0, 0.5)) for cell in GRID}
    lr = OnlineLatencyLearner()
    feed(lr, GRID, n=8, cell_noise=off)
    q = lr.quality()
    assert not q.ready and q.heldout_p95 > lr.max_heldout_p95 and "held-out p95 error" in q.reason
    assert q.cells == 12 and q.under_fraction is not None and q.under_max >= q.under_p95 > 0


def test_safety_grows_the_margin_with_the_error() -> None:
    assert safety_for(0.0) == 0.95 and safety_for(0.25) == pytest.approx(0.8) and safety_for(3.0) == 0.5
    assert safety_for(None) == 0.5 and safety_for(float("nan")) == 0.5
    assert OnlineLatencyLearner().safety() == 0.5  # nothing measured: the widest margin
    z = dict(zip(GRID, np.random.default_rng(11).normal(size=len(GRID))))
    values = []
    for sigma in (0.0, 0.1, 0.2, 0.4):  # the same per-cell disturbances, growing
        lr = OnlineLatencyLearner()
        off = {cell: math.exp(sigma * z[cell]) for cell in GRID}
        feed(lr, GRID, n=6, cell_noise=off)
        values.append(lr.safety())
    assert all(0.5 <= v <= 0.95 for v in values)
    assert values == sorted(values, reverse=True) and values[0] > values[-1] + 0.1


def test_memory_is_bounded() -> None:
    lr = OnlineLatencyLearner(window=16, max_cells=50)
    rng = np.random.default_rng(0)
    for i in range(20_000):
        lr.observe(BatchSample(int(rng.integers(1, 33)), int(rng.integers(1, 2001)), 5.0 + rng.random(), float(i)))
    stats = lr.cell_stats()
    assert len(stats) <= 50 and all(n <= 16 for n, _ in stats.values()) and lr.samples <= 50 * 16
    lr.quality()  # still answers


def test_the_model_follows_drift() -> None:
    lr = OnlineLatencyLearner()
    t = feed(lr, GRID, n=64)
    before = lr.model().latency_ms(4, 1000)
    # A neighbour arrives: every batch takes twice as long. A p95 follows within a few samples per cell.
    t = feed(lr, GRID, n=6, t0=t, scale=2.0, seed=1)
    assert lr.model().latency_ms(4, 1000) >= 1.8 * before
    # It leaves again: the window turns over (64 samples per cell at most) and the model comes back.
    t = feed(lr, GRID, n=64, t0=t, seed=2)
    assert lr.model().latency_ms(4, 1000) == pytest.approx(before, rel=0.1)
    # With a time horizon, samples older than it go even before the window turns over.
    short = OnlineLatencyLearner(horizon_ms=1_000.0)
    t = feed(short, GRID, n=64)
    t = feed(short, GRID, n=2, t0=t + 5_000.0, scale=0.5, seed=3)  # only the newest min_samples survive
    assert all(n == short.min_samples for n, _ in short.cell_stats().values())
    t = feed(short, GRID, n=10, t0=t, scale=0.5, seed=4)
    assert short.model().latency_ms(4, 1000) == pytest.approx(0.5 * before, rel=0.1)


def test_seeded_profile_is_used_then_corrected_by_live_samples() -> None:
    lr = OnlineLatencyLearner()
    lr.seed([ProfilePoint(b, c, float(truth(b, c))) for b, c in GRID])
    q = lr.quality()
    assert q.ready and q.cells == 12, q.reason
    assert lr.model().latency_ms(1, 500) == pytest.approx(float(truth(1, 500)), rel=0.02)
    # The live server runs this cell 30 % slower than profiled: min_samples live samples replace the seed.
    for i in range(lr.min_samples):
        lr.observe(BatchSample(1, 500, 1.3 * float(truth(1, 500)), 1000.0 + i))
    n, p95 = lr.cell_stats()[(1, 500)]
    assert n == lr.min_samples and p95 == pytest.approx(1.3 * float(truth(1, 500)))
    with pytest.raises(ValueError):
        lr.observe(BatchSample(0, 500, 1.0, 0.0))
    with pytest.raises(ValueError):
        lr.observe(BatchSample(1, 500, float("inf"), 0.0))


def test_wanted_cells_puts_unmeasured_and_cheap_cells_first() -> None:
    lr = OnlineLatencyLearner()
    assert lr.wanted_cells([500, 1000], [1, 16], limit=2) == [(1, 1000), (1, 500)]  # nothing yet: cheapest
    feed(lr, [(1, 1000), (16, 500)], n=8)
    feed(lr, [(1, 500)], n=2)
    # unmeasured first, then the thin one (2 samples), then full cells, the longest-unmeasured first
    assert lr.wanted_cells([500, 1000], [1, 16], limit=4) == [(16, 1000), (1, 500), (1, 1000), (16, 500)]
    assert lr.wanted_cells([500, 1000], [1, 16], limit=1) == [(16, 1000)]
    assert lr.wanted_cells([500], [1], limit=0) == []
    seeded = OnlineLatencyLearner()
    seeded.seed([ProfilePoint(1, 500, 10.0)])
    assert seeded.wanted_cells([500, 1000], [1], limit=2) == [(1, 1000), (1, 500)]  # seeds are not live samples


def test_quality_is_cheap_to_ask_every_second() -> None:
    lr = OnlineLatencyLearner()
    cells = [(b, c) for b in (1, 2, 4, 8, 16) for c in CPUS]  # 40 cells
    t = feed(lr, cells, n=64)  # 2560 samples
    lr.quality()
    rng = np.random.default_rng(5)
    spent = 0.0
    for _ in range(20):  # a second of serving between looks: 30 batches, noisy, spread over the grid
        for _ in range(30):
            b, c = cells[int(rng.integers(len(cells)))]
            t += 33.0
            lr.observe(BatchSample(b, c, float(truth(b, c)) * math.exp(abs(rng.normal(0, 0.3))), t))
        t0 = time.process_time()  # CPU time: holds on a host shared with other work
        lr.quality()
        spent += time.process_time() - t0
    assert spent / 20 < 0.010


# -- stored next to the four-term model in a profile ------------------------------------------------------


def test_profile_stores_the_step_model_and_old_profiles_still_load(tmp_path) -> None:
    from sponge.perf.profile_store import GridCell, ProfileError, build_profile, load_profile, save_profile

    model_file = tmp_path / "m.onnx"
    model_file.write_bytes(b"onnx" * 64)
    smooth = LatencyModel(g=6.0, d=0.4, e=1.0, h=0.5)  # a surface the four-term check accepts
    cells = [GridCell(b, c, 0.9 * smooth.latency_ms(b, c), smooth.latency_ms(b, c), 20)
             for b in BATCHES for c in (500, 1000, 1500, 2000)]
    points = [c.point() for c in cells]
    old = build_profile(model_file, cells, fit_latency_model(points))
    path = save_profile(old, tmp_path / "old.profile.json")
    raw = json.loads(path.read_text())
    raw.pop("step_model")  # exactly what a profile written before the step model holds
    path.write_text(json.dumps(raw))
    assert load_profile(path, model_file).step_model is None

    step = StepLatencyModel.fit(points)
    new = replace(old, step_model=step, step_fit=evaluate(step, points))
    path = save_profile(new, tmp_path / "new.profile.json")
    back = load_profile(path, model_file)
    assert back.step_model == step and back.step_fit == new.step_fit and back.step_holdout is None
    assert back.model == old.model

    raw = json.loads(path.read_text())
    raw["step_model"]["groups"][0]["g"] = -3.0
    path.write_text(json.dumps(raw))
    with pytest.raises(ProfileError, match="malformed"):
        load_profile(path, model_file)


def test_provisional_model_bounds_every_measured_cell_and_scales_like_one_over_c() -> None:
    lr = OnlineLatencyLearner()
    assert lr.provisional_model() is None
    truth = {1: 8.0, 4: 22.0, 8: 40.0}  # ms at 2000 m: intercept + per-image cost
    for b, y in truth.items():
        for i in range(6):
            lr.observe(BatchSample(b, 2000, y * (1.0 + 0.01 * i), float(i)))
    m = lr.provisional_model()
    assert m is not None
    for (b, c), (_, p95) in lr.cell_stats().items():
        assert m.latency_ms(b, c) >= p95 - 1e-9  # on or above every measured cell's p95
    assert m.latency_ms(8, 2000) <= 1.1 * lr.cell_stats()[(8, 2000)][1]  # ... but not far above (slope fit)
    assert m.latency_ms(8, 1000) == pytest.approx(2 * m.latency_ms(8, 2000))
    assert m.latency_ms(1, 500) == pytest.approx(4 * m.latency_ms(1, 2000))
    # More cells at another level: that level becomes c0.
    for b in (1, 2, 4, 8):
        for i in range(6):
            lr.observe(BatchSample(b, 1000, 10.0 * b, 10.0 + i))
    m2 = lr.provisional_model()
    assert m2 is not None and m2.latency_ms(8, 1000) >= 80.0 and m2.latency_ms(8, 500) == pytest.approx(
        2 * m2.latency_ms(8, 1000))
