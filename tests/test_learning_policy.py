"""LearningPolicy: safe allocation until the learned model is good enough, then the model's policy,
rebuilt as the model changes, with the learner's safety as the margin; back to safe if it degrades."""

from __future__ import annotations

from dataclasses import dataclass, field

from sponge.perf.latency_model import LatencyModel
from sponge.perf.samples import BatchSample
from sponge.policy.learning import LearningPolicy
from sponge.policy.registry import make_policy
from sponge.policy.types import Decision, Observation

SAFE = Decision(2000, 8, 1, True, "safe")
MODEL = LatencyModel(g=20.0, d=0.5, e=2.0, h=1.0)


@dataclass
class Quality:
    ready: bool
    reason: str


@dataclass
class FakeLearner:
    """Ready once it has seen `needed` samples; `error` drives its safety like the real learner."""

    needed: int = 3
    error: float = 0.1
    seen: list[BatchSample] = field(default_factory=list)
    broken: bool = False

    def observe(self, sample: BatchSample) -> None:
        self.seen.append(sample)

    max_heldout_p95: float = 0.5
    heldout: float = 0.1

    def quality(self, max_heldout_p95: float | None = None) -> Quality:
        bound = self.max_heldout_p95 if max_heldout_p95 is None else max_heldout_p95
        ok = len(self.seen) >= self.needed and not self.broken and self.heldout <= bound
        return Quality(ok, f"{len(self.seen)}/{self.needed} samples, error {self.heldout:.0%} vs {bound:.0%}")

    def model(self) -> LatencyModel | None:
        return MODEL if len(self.seen) >= self.needed else None

    def safety(self) -> float:
        return 1.0 / (1.0 + self.error)


def obs(t_ms: float, batches: tuple[BatchSample, ...] = (), rate: float = 20.0,
        current: Decision = SAFE) -> Observation:
    return Observation(now_ms=t_ms, interval_ms=1000.0, arrival_rate_rps=rate, rate_history_rps=(rate,) * 10,
                       budgets_ms=(300.0,) * 50, queue_remaining_ms=(), current=current, batches=batches)


def sample(t: float) -> BatchSample:
    return BatchSample(images=1, cpu_m=1000, latency_ms=20.0, t_ms=t)


def make(learner: FakeLearner, built: list[float]) -> LearningPolicy:
    def factory(model: LatencyModel, safety: float):
        built.append(safety)
        return make_policy("sponge", model, min_cpu_m=100, max_cpu_m=2000, max_batch=8, safety=safety)

    return LearningPolicy("sponge", learner, factory, SAFE, refresh_ms=10_000)


def test_serves_the_safe_allocation_until_the_model_is_ready_and_says_why() -> None:
    learner, built = FakeLearner(), []
    pol = make(learner, built)
    d = pol.decide(obs(1000, (sample(1), sample(2))))
    assert (d.cpu_m, d.batch) == (SAFE.cpu_m, SAFE.batch)
    assert "learning the latency model" in d.explanation and "2/3 samples" in d.explanation
    assert pol.mode == "safe" and built == []
    d = pol.decide(obs(2000, (sample(3),)))
    assert pol.mode == "model" and len(built) == 1
    assert "switched to sponge" in d.explanation
    assert d.cpu_m < SAFE.cpu_m  # 20 req/s of a ~20 ms/core model needs far less than two cores
    assert len(learner.seen) == 3  # every served batch reached the learner


def test_margin_follows_the_learner_error_and_the_model_is_rebuilt_on_refresh() -> None:
    learner, built = FakeLearner(error=0.1), []
    pol = make(learner, built)
    pol.decide(obs(0, tuple(sample(i) for i in range(3))))
    learner.error = 0.6  # drift: the model's measured error grew
    pol.decide(obs(5_000))
    assert len(built) == 1  # not yet: refresh every 10 s
    pol.decide(obs(10_000))
    assert len(built) == 2 and built[1] < built[0]  # a larger error, a smaller safety factor
    assert pol.status().rebuilds == 1 and pol.status().safety == built[1]


def test_a_larger_error_never_plans_less_cpu() -> None:
    cpus = []
    for err in (0.0, 0.3, 0.8):
        learner = FakeLearner(error=err)
        pol = make(learner, [])
        cpus.append(pol.decide(obs(0, tuple(sample(i) for i in range(3)), rate=60.0)).cpu_m)
    assert cpus == sorted(cpus) and cpus[-1] > cpus[0]


def test_falls_back_to_safe_when_the_model_degrades() -> None:
    learner, built = FakeLearner(), []
    pol = make(learner, built)
    pol.decide(obs(0, tuple(sample(i) for i in range(3))))
    assert pol.mode == "model"
    learner.broken = True
    d = pol.decide(obs(1000))
    assert pol.mode == "safe" and d.cpu_m == SAFE.cpu_m and "no longer good enough" in d.explanation
    learner.broken = False
    pol.decide(obs(2000))
    assert pol.mode == "model" and pol.status().switches == 2


def test_leaving_the_model_takes_a_larger_error_than_entering_it() -> None:
    learner = FakeLearner(heldout=0.55)  # above the 50 % bound: not ready
    pol = make(learner, [])
    pol.decide(obs(0, tuple(sample(i) for i in range(3))))
    assert pol.mode == "safe"
    learner.heldout = 0.45
    pol.decide(obs(1000))
    assert pol.mode == "model"
    learner.heldout = 0.7  # worse than the entry bound, within 1.5 x: keep deciding on the model
    pol.decide(obs(2000))
    assert pol.mode == "model"
    learner.heldout = 0.8  # beyond 1.5 x 50 %: back to safe
    d = pol.decide(obs(3000))
    assert pol.mode == "safe" and "80%" in d.explanation


def test_explores_on_the_provisional_model_when_measured_but_not_ready() -> None:
    """Steady load, never idle: every batch at the safe 2000 m. The real learner is not ready (one CPU
    level), yet the policy leaves 2000 m on its conservative provisional model — and never plans below
    what that upper-bound model says meets the budgets."""
    from sponge.perf.online import OnlineLatencyLearner

    learner = OnlineLatencyLearner()
    pol = LearningPolicy("sponge", learner, lambda m, s: make_policy(
        "sponge", m, min_cpu_m=100, max_cpu_m=2000, max_batch=8, safety=s), SAFE)
    d = pol.decide(obs(0))
    assert pol.mode == "safe" and d.cpu_m == 2000  # nothing measured yet
    served = tuple(BatchSample(b, 2000, 4.0 * b + 2.0, float(i)) for i in range(6) for b in (1, 4, 8))
    d = pol.decide(obs(1000, served, rate=40.0))
    assert pol.mode == "explore" and "exploring on the conservative provisional model" in d.explanation
    assert not learner.quality().ready and 100 <= d.cpu_m < 2000
    prov = learner.provisional_model()
    assert prov is not None and prov.latency_ms(d.batch, d.cpu_m) <= 300.0  # budgets are 300 ms
    assert prov.throughput_rps(d.batch, d.cpu_m) >= 40.0


def test_without_exploration_it_stays_safe() -> None:
    from sponge.perf.online import OnlineLatencyLearner

    pol = LearningPolicy("sponge", OnlineLatencyLearner(), lambda m, s: make_policy(
        "sponge", m, min_cpu_m=100, max_cpu_m=2000, max_batch=8, safety=s), SAFE, explore=False)
    served = tuple(BatchSample(b, 2000, 4.0 * b + 2.0, float(i)) for i in range(6) for b in (1, 4, 8))
    d = pol.decide(obs(1000, served, rate=40.0))
    assert pol.mode == "safe" and d.cpu_m == 2000
