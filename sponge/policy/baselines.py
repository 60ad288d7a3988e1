"""Baselines to compare Sponge against (DESIGN §7): static, VPA-like, HPA-like and FA2-like policies.

Each is pure: no I/O, no clock (time is Observation.now_ms); the VPA- and HPA-like ones keep state (a
usage histogram, sync timers, recent recommendations) as the originals do. Where a baseline imitates a
Kubernetes component, its defaults
are that component's defaults (sources named per class) and every duration is a parameter, so a short
experiment can scale them down (e.g. `time_scale=1/1440` turns the VPA's day into a minute).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np

from sponge.perf.latency_model import LatencyModel
from sponge.policy.predictors import Predictor, history_of, make_predictor
from sponge.policy.types import Decision, Observation

DAY_MS = 86_400_000.0


def finite(values: "tuple[float, ...]") -> list[float]:
    """The measured values only: a replica whose usage could not be read reports NaN."""
    return [float(v) for v in values if math.isfinite(v)]


class StaticPolicy:
    """A fixed allocation: the 'provision for the peak' (or for the average) strawman."""

    name = "static"

    def __init__(self, cpu_m: int = 1000, batch: int = 1, replicas: int = 1) -> None:
        if cpu_m <= 0 or batch < 1 or replicas < 1:
            raise ValueError("invalid StaticPolicy parameters")
        self.decision = Decision(cpu_m, batch, replicas, True, f"static: {replicas} x {cpu_m}m b={batch}")

    def decide(self, obs: Observation) -> Decision:
        return self.decision


# ---------------------------------------------------------------------------------------------------
class DecayingHistogram:
    """The VPA recommender's CPU histogram: exponential buckets, exponentially decaying sample weights.

    Buckets: the first is `first_bucket_m` wide (VPA: 0.01 core), each next one `ratio` times wider
    (VPA: 1.05), up to `max_m` (VPA: 1000 cores). A sample at time t weighs w * 2^(t / half_life), so
    older samples count for less; percentile() answers the END of the bucket holding the percentile,
    as VPA's histogram.Percentile does.
    """

    def __init__(
        self, half_life_ms: float, first_bucket_m: float = 10.0, ratio: float = 1.05, max_m: float = 1_000_000.0
    ) -> None:
        if half_life_ms <= 0 or first_bucket_m <= 0 or ratio <= 1:
            raise ValueError("invalid histogram options")
        n = int(math.ceil(math.log(max_m * (ratio - 1) / first_bucket_m + 1, ratio))) + 1
        self.starts = first_bucket_m * (ratio ** np.arange(n) - 1) / (ratio - 1)
        self.weights = np.zeros(n)
        self.half_life_ms = half_life_ms
        self._ref_ms: float | None = None

    def add(self, value_m: float, weight: float, t_ms: float) -> None:
        if self._ref_ms is None:
            self._ref_ms = t_ms
        exponent = (t_ms - self._ref_ms) / self.half_life_ms
        if exponent > 100:  # move the reference forward so weights stay finite (VPA: maxDecayExponent)
            self.weights *= 2.0 ** (-exponent)
            self._ref_ms, exponent = t_ms, 0.0
        i = int(np.clip(np.searchsorted(self.starts, value_m, side="right") - 1, 0, self.starts.size - 1))
        self.weights[i] += weight * 2.0**exponent

    def percentile(self, p: float) -> float:
        total = float(self.weights.sum())
        if total <= 0:
            return 0.0
        i = int(np.searchsorted(np.cumsum(self.weights), p * total, side="left"))
        i = min(i, self.starts.size - 1)
        return float(self.starts[i + 1]) if i < self.starts.size - 1 else float(self.starts[i])


class VPALikePolicy:
    """Usage-based vertical scaling after the Kubernetes VPA recommender (+ an in-place updater).

    Defaults are the recommender's flags in kubernetes/autoscaler vertical-pod-autoscaler
    pkg/recommender/logic/recommender.go and model/aggregations_config.go:
      target_percentile 0.9 (--target-cpu-percentile), lower/upper bound percentiles 0.5/0.95,
      safety_margin 0.15 (--recommendation-margin-fraction), min_cpu_m 25
      (--pod-recommendation-min-cpu-millicores), CPU histogram half-life 24 h, bucket 0.01 core * 1.05^i,
      sample weight max(request, 0.1 core), confidence interval 24 h with samples counted at one per minute.
    Bounds carry VPA's confidence multipliers: upper * (1 + 1/conf), lower * (1 + 0.001/conf)^-2, where
    conf = min(history length, samples / samples-per-day) in days; no history -> [0, inf), no action.
    Updater: the allocation is changed (in place, to the target, batch and replicas untouched) only when
    the allocation in force lies outside [lower bound, upper bound], as the VPA updater decides.
    `time_scale` multiplies the half-life, the day and the sampling period (1/1440: a day is a minute).
    Known weakness, kept on purpose: usage cannot exceed the allocation, so under saturation the target
    grows by at most the safety margin per step; and it never looks at latency.
    """

    name = "vpa"

    def __init__(
        self,
        *,
        batch: int | None = None,
        target_percentile: float = 0.9,
        lower_bound_percentile: float = 0.5,
        upper_bound_percentile: float = 0.95,
        safety_margin: float = 0.15,
        min_cpu_m: int = 25,
        max_cpu_m: int = 4000,
        time_scale: float = 1.0,
        half_life_ms: float | None = None,
        day_ms: float | None = None,
        sample_period_ms: float | None = None,
        min_sample_weight_m: float = 100.0,
    ) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self.batch = batch
        self.p_target, self.p_lower, self.p_upper = target_percentile, lower_bound_percentile, upper_bound_percentile
        self.safety_margin = safety_margin
        self.min_cpu_m, self.max_cpu_m = min_cpu_m, max_cpu_m
        self.day_ms = day_ms if day_ms is not None else DAY_MS * time_scale
        self.sample_period_ms = sample_period_ms if sample_period_ms is not None else 60_000.0 * time_scale
        self.histogram = DecayingHistogram(half_life_ms if half_life_ms is not None else DAY_MS * time_scale)
        self.min_sample_weight_m = min_sample_weight_m
        self._first_ms: float | None = None
        self._last_ms: float | None = None
        self._samples = 0

    def confidence(self) -> float:
        """History in 'days': min(lifespan, samples normalised at one per sample period) (VPA getConfidence)."""
        if self._first_ms is None or self._last_ms is None:
            return 0.0
        lifespan = (self._last_ms - self._first_ms) / self.day_ms
        amount = self._samples / (self.day_ms / self.sample_period_ms)
        return min(lifespan, amount)

    def recommendation(self) -> tuple[float, float, float]:
        """(lower bound, target, upper bound) in millicores."""
        conf = self.confidence()
        m = 1.0 + self.safety_margin
        target = self.histogram.percentile(self.p_target) * m
        if conf <= 0:  # no history: VPA's multipliers are 0 and +inf, i.e. never act
            return float(self.min_cpu_m), max(target, self.min_cpu_m), math.inf
        lower = self.histogram.percentile(self.p_lower) * m * (1.0 + 0.001 / conf) ** -2
        upper = self.histogram.percentile(self.p_upper) * m * (1.0 + 1.0 / conf)
        floor = float(self.min_cpu_m)
        return max(lower, floor), max(target, floor), max(upper, floor)

    def decide(self, obs: Observation) -> Decision:
        cur = obs.current
        usage_m = finite(obs.cpu_usage_m)
        for usage in usage_m:
            self.histogram.add(usage, max(float(cur.cpu_m), self.min_sample_weight_m), obs.now_ms)
            self._samples += 1
        if usage_m:
            self._first_ms = obs.now_ms if self._first_ms is None else self._first_ms
            self._last_ms = obs.now_ms
        lower, target, upper = self.recommendation()
        batch = self.batch if self.batch is not None else cur.batch
        cpu = cur.cpu_m
        action = "inside bounds: keep"
        if cur.cpu_m < lower or cur.cpu_m > upper:
            cpu = int(min(max(math.ceil(target), self.min_cpu_m), self.max_cpu_m))
            action = "outside bounds: apply target"
        explanation = (
            f"vpa: usage {','.join(f'{u:.0f}' for u in usage_m) or 'none'} m, "
            f"bounds [{lower:.0f}, {upper:.0f}] target {target:.0f}m, confidence {self.confidence():.3f} d; "
            f"{cur.cpu_m}m {action} -> {cpu}m b={batch}"
        )
        return Decision(cpu, batch, cur.replicas, True, explanation)


# ---------------------------------------------------------------------------------------------------
class HPALikePolicy:
    """Utilisation-based horizontal scaling after the Kubernetes HPA (autoscaling/v2 defaults).

    desired = ceil(ready * utilisation / target), utilisation = mean usage / CPU per replica, evaluated
    every `sync_period_ms` (kube-controller-manager --horizontal-pod-autoscaler-sync-period 15 s);
    no change while |utilisation/target - 1| <= tolerance (--horizontal-pod-autoscaler-tolerance 0.1);
    scale-down to the highest recommendation of the last `scale_down_window_ms` (behavior.scaleDown
    stabilizationWindowSeconds 300); scale-up at most max(2x, +4) replicas per sync (the default
    behavior.scaleUp policies: 100 % or 4 pods per 15 s, whichever is larger). Replicas still starting are
    counted at 0 % usage when scaling up, as the HPA does for unready pods, so it does not over-react to
    its own cold start. `target_utilization` has no Kubernetes default (it is per HPA object; examples use
    50-80 %): 0.8 here. CPU per replica and batch are fixed.
    """

    name = "hpa"

    def __init__(
        self,
        *,
        cpu_m: int = 1000,
        batch: int = 1,
        target_utilization: float = 0.8,
        tolerance: float = 0.1,
        sync_period_ms: float = 15_000.0,
        scale_down_window_ms: float = 300_000.0,
        min_replicas: int = 1,
        max_replicas: int = 16,
        scale_up_factor: float = 2.0,
        scale_up_pods: int = 4,
    ) -> None:
        if not 0 < target_utilization or tolerance < 0 or not 1 <= min_replicas <= max_replicas:
            raise ValueError("invalid HPALikePolicy parameters")
        self.cpu_m, self.batch = cpu_m, batch
        self.target, self.tolerance = target_utilization, tolerance
        self.sync_period_ms, self.scale_down_window_ms = sync_period_ms, scale_down_window_ms
        self.min_replicas, self.max_replicas = min_replicas, max_replicas
        self.scale_up_factor, self.scale_up_pods = scale_up_factor, scale_up_pods
        self._last_sync_ms: float | None = None
        self._recs: deque[tuple[float, int]] = deque()

    def recommend(self, obs: Observation) -> tuple[int, str]:
        """This sync's raw recommendation (before stabilisation and rate limits)."""
        cur = obs.current.replicas
        usage = finite(obs.cpu_usage_m)
        if not usage:
            return cur, "no usage samples"
        ready = len(usage)
        request = float(obs.current.cpu_m)
        total = float(sum(usage))
        ratio = total / (ready * request) / self.target
        if abs(ratio - 1.0) <= self.tolerance:
            return cur, f"utilisation/target {ratio:.2f} within tolerance"
        if ratio > 1.0 and obs.replicas_starting > 0:
            with_unready = ready + obs.replicas_starting
            ratio = total / (with_unready * request) / self.target  # unready pods at 0 % usage
            if ratio <= 1.0 + self.tolerance:
                return cur, f"utilisation/target {ratio:.2f} counting {obs.replicas_starting} starting at 0 %"
            return math.ceil(ratio * with_unready), f"utilisation/target {ratio:.2f} (starting at 0 %)"
        return math.ceil(ratio * ready), f"utilisation/target {ratio:.2f} over {ready} ready"

    def decide(self, obs: Observation) -> Decision:
        cur = obs.current.replicas
        if self._last_sync_ms is not None and obs.now_ms - self._last_sync_ms < self.sync_period_ms:
            return Decision(self.cpu_m, self.batch, cur, True, f"hpa: between syncs, keep {cur} replicas")
        self._last_sync_ms = obs.now_ms
        rec, why = self.recommend(obs)
        rec = min(max(rec, self.min_replicas), self.max_replicas)
        self._recs.append((obs.now_ms, rec))
        while self._recs and self._recs[0][0] < obs.now_ms - self.scale_down_window_ms:
            self._recs.popleft()
        if rec >= cur:
            limit = max(math.ceil(cur * self.scale_up_factor), cur + self.scale_up_pods)
            desired = min(rec, limit)
        else:
            desired = min(cur, max(r for _, r in self._recs))
        desired = min(max(desired, self.min_replicas), self.max_replicas)
        usage = ",".join(f"{u:.0f}" for u in finite(obs.cpu_usage_m)) or "none"
        explanation = (
            f"hpa: {why}; usage {usage} m of {obs.current.cpu_m}m, "
            f"recommend {rec}, stabilised {cur} -> {desired} replicas x {self.cpu_m}m b={self.batch}"
        )
        return Decision(self.cpu_m, self.batch, desired, True, explanation)


# ---------------------------------------------------------------------------------------------------
class FA2LikePolicy:
    """Horizontal scaling with 1-core replicas after FA2 (Razavi et al., 2022), the Sponge authors' baseline.

    The batch is the largest b <= max_batch whose batch latency on one core fits the tightest budget:
    l(b, 1000 m) <= slack_factor * budget_min (0.9, as in the paper's rule); the largest because it has
    the highest throughput per core. replicas = ceil(predicted load / h(b, 1000 m)). No stabilisation:
    FA2 re-plans every interval and pays the cold start of each new replica.
    """

    name = "fa2"

    def __init__(
        self,
        model: LatencyModel,
        *,
        cpu_m: int = 1000,
        max_batch: int = 16,
        slack_factor: float = 0.9,
        min_replicas: int = 1,
        max_replicas: int = 64,
        predictor: str | Predictor = "reactive",
        predictor_params: dict[str, Any] | None = None,
    ) -> None:
        self.model, self.cpu_m, self.max_batch, self.slack_factor = model, cpu_m, max_batch, slack_factor
        self.min_replicas, self.max_replicas = min_replicas, max_replicas
        self.predictor = make_predictor(predictor, **(predictor_params or {}))
        self._lat = np.asarray(model.latency_ms(np.arange(1, max_batch + 1), float(cpu_m)))

    def decide(self, obs: Observation) -> Decision:
        cur = obs.current
        load = max(self.predictor.predict(history_of(obs.rate_history_rps, obs.arrival_rate_rps)), 0.0)
        if not len(obs.budgets_ms):
            return Decision(cur.cpu_m, cur.batch, cur.replicas, True, "fa2: no budgets observed: keep")
        budget_min = float(min(obs.budgets_ms))
        fits = np.flatnonzero(self._lat <= self.slack_factor * budget_min)
        feasible = bool(fits.size)
        batch = int(fits[-1]) + 1 if feasible else 1
        h = self.model.throughput_rps(batch, self.cpu_m)
        need = max(self.min_replicas, math.ceil(load / h) if load > 0 else 1)
        replicas = min(need, self.max_replicas)
        feasible = feasible and need <= self.max_replicas
        explanation = (
            f"fa2: predicted {load:.1f} rps, budget_min {budget_min:.0f} ms -> b={batch} "
            f"(l={self._lat[batch - 1]:.1f} ms on {self.cpu_m}m{'' if fits.size else ', too slow even at b=1'}), "
            f"h={h:.1f} rps per replica, {replicas} replicas (need {need})"
        )
        return Decision(self.cpu_m, batch, replicas, feasible, explanation)
