"""One factory for every policy, so the controller, the simulator and benchmarks name them alike."""

from __future__ import annotations

from typing import Any, Callable

from sponge.perf.latency_model import LatencyModel
from sponge.policy.baselines import FA2LikePolicy, HPALikePolicy, StaticPolicy, VPALikePolicy
from sponge.policy.joint import JointOptimizer
from sponge.policy.paper import PaperOptimizer
from sponge.policy.sponge_opt import SpongeOptimizer
from sponge.policy.themis import ThemisPolicy
from sponge.policy.types import Policy

_FACTORIES: dict[str, Callable[[LatencyModel, dict[str, Any]], Policy]] = {
    "static": lambda model, p: StaticPolicy(**p),
    "paper": lambda model, p: PaperOptimizer(model, **p),
    "sponge": lambda model, p: SpongeOptimizer(model, **p),
    "joint": lambda model, p: JointOptimizer(model, **p),
    "vpa": lambda model, p: VPALikePolicy(**p),
    "hpa": lambda model, p: HPALikePolicy(**p),
    "fa2": lambda model, p: FA2LikePolicy(model, **p),
    "themis": lambda model, p: ThemisPolicy(model, **p),
}

POLICY_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def make_policy(name: str, model: LatencyModel, **params: Any) -> Policy:
    """A fresh policy object by name (static, paper, sponge, joint, vpa, hpa, fa2, themis) with its parameters.

    Policies with state (hysteresis, histograms, sync timers) must not be shared between runs: call this
    once per run. Unknown parameters raise TypeError, unknown names ValueError.
    """
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES)}") from None
    return factory(model, params)
