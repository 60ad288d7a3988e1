"""Pure decision code (DESIGN §2, §4): no I/O, no clocks, no threads; nothing from server/scaling/sim.

The live controller and the simulator call the same policy objects once per adaptation interval.
"""

from sponge.policy.baselines import FA2LikePolicy, HPALikePolicy, StaticPolicy, VPALikePolicy
from sponge.policy.feasibility import (
    BudgetProfile,
    Check,
    Workload,
    build_workload,
    check,
    latency_bounds_ms,
    worst_slack_ms,
)
from sponge.policy.joint import JointOptimizer
from sponge.policy.paper import PaperOptimizer
from sponge.policy.predictors import EWMA, MaxWindow, Predictor, Reactive, WindowMean, make_predictor
from sponge.policy.registry import POLICY_NAMES, make_policy
from sponge.policy.sponge_opt import SpongeOptimizer
from sponge.policy.themis import ThemisPolicy
from sponge.policy.types import Decision, Observation, Policy

__all__ = [
    "BudgetProfile",
    "Check",
    "Decision",
    "EWMA",
    "FA2LikePolicy",
    "HPALikePolicy",
    "JointOptimizer",
    "MaxWindow",
    "Observation",
    "POLICY_NAMES",
    "PaperOptimizer",
    "Policy",
    "Predictor",
    "Reactive",
    "SpongeOptimizer",
    "StaticPolicy",
    "ThemisPolicy",
    "VPALikePolicy",
    "WindowMean",
    "Workload",
    "build_workload",
    "check",
    "latency_bounds_ms",
    "make_policy",
    "make_predictor",
    "worst_slack_ms",
]
