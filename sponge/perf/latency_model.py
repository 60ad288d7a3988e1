"""The performance model l(b, c) = g*b/c + d*b + e/c + h (ms), c in cores; pure (DESIGN §4)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LatencyModel:
    """Latency of one batch of `batch` requests on `cpu_m` millicores, in milliseconds."""

    g: float
    d: float
    e: float
    h: float

    def latency_ms(self, batch: int, cpu_m: float) -> float:
        c = cpu_m / 1000.0
        return self.g * batch / c + self.d * batch + self.e / c + self.h

    def throughput_rps(self, batch: int, cpu_m: float) -> float:
        """h(b, c) = 1000 * b / l(b, c): requests per second when batches run back to back."""
        return 1000.0 * batch / self.latency_ms(batch, cpu_m)
