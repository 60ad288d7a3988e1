"""Trace-driven discrete-event simulator that calls the same policy objects as the live controller.

`simulate(requests, model, policy, config)` runs one policy on one request plan; `oracle` gives a proven
lower bound on the core-seconds any policy in the same action space must spend.
"""

from sponge.sim.engine import OUTCOME_NAMES, ConservationError, SimConfig, SimResult, Simulator, simulate
from sponge.sim.inputs import RequestSet

__all__ = ["OUTCOME_NAMES", "ConservationError", "RequestSet", "SimConfig", "SimResult", "Simulator", "simulate"]
