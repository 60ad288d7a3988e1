"""Serve first, learn the latency model while serving (pure: no I/O, no clocks).

A server must not refuse to serve because its latency measurements were noisy: it is always measured
under noise. `LearningPolicy` wraps a model-driven policy (sponge, paper, joint) and decides in two modes:

- **safe**: until anything is measured, answer a fixed safe allocation (the full allocation, or the
  operator's `--cpu-m`), saying why in the decision's explanation;
- **explore**: measured, but the model is not good enough yet: the inner policy plans on the learner's
  conservative provisional model (measured latencies scaled like 1/CPU below the level measured — an
  upper bound) with a deadline margin of EXPLORE_SAFETY. Without it a server under
  steady load never learns: it is never idle for the prober and serves every batch at one allocation
  (measured live: `sponge` started without a profile stayed at 2000 m for a whole 240 s run, 2.65x the
  core-seconds of `sponge` seeded with a profile). The batches it serves at the allocations it picks
  are the new cells the model needs;
- **model**: once the learner reports `ready` (its stated criterion: enough cells over enough CPU levels
  and batch sizes, held-out error below a bound — see `sponge.perf.online`), build the inner policy from
  the learned model with the learner's `safety()` as the deadline margin, so the margin grows with the
  model's measured error. Every `refresh_ms` the inner policy is rebuilt from the current model, so the
  plan follows drift (a neighbour arrives, the frequency changes). If the model stops being good enough
  (drift made it inaccurate), fall back to the safe allocation until it is again. To stop flapping when
  the error sits at the learner's bound, leaving takes `keep_factor` (1.5) times that bound (measured on
  a 2-core host with both cores busy: the held-out error of the same cells moved 49 % -> 69 % within 2 s).

Every served batch is an observation (`Observation.batches`), live and in the simulator alike.

Per-batch CPU between two decisions (`per_batch=True`, for an inner policy that has `batch_cpu_m`, i.e.
sponge): `batch_cpu_m` and `max_cpu_m` are forwarded to the inner policy in model mode only; in safe and
explore modes `batch_cpu_m` answers None (the interval decision stands: exploring must serve batches at
the allocations it picks, to measure them). They exist only on a policy built with `per_batch=True`, so a
caller that looks for them (the simulator, once, at its start) finds them exactly when they can answer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol, Sequence

from sponge.perf.samples import BatchSample
from sponge.policy.types import BatchCpu, Decision, Observation, Policy, QueueView

DEFAULT_REFRESH_MS = 10_000.0
# Deadline scale factor while exploring: the provisional model is already an upper bound of what was
# measured (1/c scaling, lifted above every cell), so the margin only covers p95 noise. With the learner's
# "unknown error" 0.5 on top, a 240 s live run at 91 req/s found every plan infeasible and never left
# 2000 m.
EXPLORE_SAFETY = 0.8


class LearnerQuality(Protocol):
    ready: bool
    reason: str


class LatencyLearner(Protocol):
    """What this policy needs of an online latency learner (sponge.perf.online.OnlineLatencyLearner)."""

    def observe(self, sample: BatchSample) -> None: ...

    def quality(self, max_heldout_p95: float | None = None) -> Any: ...

    def provisional_model(self) -> Any: ...

    def model(self) -> Any: ...

    def safety(self) -> float: ...


# (latency model, safety factor in (0, 1]) -> a fresh model-driven policy
PolicyFactory = Callable[[Any, float], Policy]


@dataclass(frozen=True)
class LearningStatus:
    """For logs and /metrics: which mode decides, and how good the model is."""

    mode: str  # "safe", "explore" or "model"
    ready: bool
    reason: str
    safety: float | None
    switches: int  # safe -> model transitions so far
    rebuilds: int  # inner policy rebuilt from a fresher model
    switch_reason: str = ""  # the learner's verdict when the model last took over


class LearningPolicy:
    """Safe allocation until the learned model is good enough, then the inner policy on that model."""

    def __init__(self, name: str, learner: LatencyLearner, make_inner: PolicyFactory, safe: Decision,
                 refresh_ms: float = DEFAULT_REFRESH_MS, keep_factor: float = 1.5, explore: bool = True,
                 per_batch: bool = False, reach_cpu_m: int | None = None,
                 make_explorer: PolicyFactory | None = None) -> None:
        """per_batch: forward the inner policy's per-batch CPU sizing (module docstring); reach_cpu_m: the
        most it reaches (`max_cpu_m` before the inner policy exists; the inner policy's afterwards);
        make_explorer: the policy explore mode plans with (default `make_inner`; without per-batch sizing
        it may want a different burst margin)."""
        if refresh_ms <= 0 or keep_factor < 1:
            raise ValueError(f"need refresh_ms > 0 and keep_factor >= 1, got {refresh_ms}, {keep_factor}")
        self.keep_factor = keep_factor
        self.name = name
        self.learner = learner
        self.make_inner = make_inner
        self.make_explorer = make_explorer or make_inner
        self.safe = safe
        self.refresh_ms = refresh_ms
        self.inner: Policy | None = None
        self._built_ms = float("-inf")
        self._safety: float | None = None
        self._switches = 0
        self._rebuilds = 0
        self._switch_reason = ""
        self.explore = explore
        self._explorer: Policy | None = None
        self._explorer_ms = float("-inf")
        self.per_batch = per_batch
        self._reach_cpu_m = reach_cpu_m
        if per_batch:  # an instance attribute: absent (getattr -> None) on a policy that never sizes per batch
            self.batch_cpu_m = self._batch_cpu_m

    def _batch_cpu_m(self, view: QueueView) -> BatchCpu | None:
        """The inner policy's per-batch CPU in model mode; None otherwise (the interval decision stands)."""
        sizer = getattr(self.inner, "batch_cpu_m", None) if self.inner is not None else None
        return sizer(view) if sizer is not None else None

    @property
    def max_cpu_m(self) -> int | None:
        """The most per-batch sizing reaches (the inner policy's in model mode), None without per-batch."""
        if not self.per_batch:
            return None
        inner = getattr(self.inner, "max_cpu_m", None) if self.inner is not None else None
        return inner if inner is not None else self._reach_cpu_m

    @property
    def mode(self) -> str:
        if self.inner is not None:
            return "model"
        return "explore" if self._explorer is not None else "safe"

    def _quality(self) -> Any:
        """The learner's judgement; while the model decides, against the looser bound that keeps it."""
        bound = getattr(self.learner, "max_heldout_p95", None)
        if self.inner is not None and bound is not None:
            return self.learner.quality(max_heldout_p95=bound * self.keep_factor)
        return self.learner.quality()

    def status(self) -> LearningStatus:
        q = self._quality()
        return LearningStatus(self.mode, bool(q.ready), str(q.reason), self._safety, self._switches, self._rebuilds,
                              self._switch_reason)

    def observe(self, batches: Sequence[BatchSample]) -> None:
        for s in batches:
            self.learner.observe(s)

    def _build(self, now_ms: float) -> None:
        model = self.learner.model()
        self._safety = float(self.learner.safety())
        self.inner = self.make_inner(model, self._safety)
        self._built_ms = now_ms

    def decide(self, obs: Observation) -> Decision:
        self.observe(obs.batches)
        q = self._quality()
        if not q.ready or self.learner.model() is None:
            was_model = self.inner is not None
            self.inner = None
            why = "model no longer good enough" if was_model else "learning the latency model"
            return self._explore_or_safe(obs, f"{why}: {q.reason}")
        self._explorer = None
        if self.inner is None:
            self._build(obs.now_ms)
            self._switches += 1
            self._switch_reason = str(q.reason)
            switched = f"switched to {self.name} on the learned model ({q.reason}; safety {self._safety:.2f}); "
        elif obs.now_ms - self._built_ms >= self.refresh_ms:
            self._build(obs.now_ms)
            self._rebuilds += 1
            switched = ""
        else:
            switched = ""
        assert self.inner is not None
        d = self.inner.decide(obs)
        return replace(d, explanation=f"{switched}{d.explanation}") if switched else d

    def _explore_or_safe(self, obs: Observation, why: str) -> Decision:
        """Plan on the provisional model if there is one (rebuilt every refresh_ms), else the safe allocation."""
        provisional = getattr(self.learner, "provisional_model", None)
        model = provisional() if (self.explore and provisional is not None) else None
        if model is None:
            self._explorer = None
            return replace(self.safe, explanation=f"safe allocation ({why})")
        if self._explorer is None or obs.now_ms - self._explorer_ms >= self.refresh_ms:
            self._explorer = self.make_explorer(model, EXPLORE_SAFETY)
            self._explorer_ms = obs.now_ms
        d = self._explorer.decide(obs)
        return replace(d, explanation=f"exploring on the conservative provisional model ({why}): {d.explanation}")
