"""Actuators that resize a running replica's CPU in place (cgroup v2/v1 quota, affinity fallback)."""

from sponge.scaling.base import ActuatorError, CpuActuator, CpuUsageMeter

__all__ = ["ActuatorError", "CpuActuator", "CpuUsageMeter"]
