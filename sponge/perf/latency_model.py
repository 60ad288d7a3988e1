"""The performance model l(b, c) = g*b/c + d*b + e/c + h (ms), c in cores; pure (DESIGN §4)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

COEFFICIENTS = ("g", "d", "e", "h")


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

    def to_dict(self) -> dict[str, float]:
        """Coefficients by name, for JSON stores."""
        return {k: float(getattr(self, k)) for k in COEFFICIENTS}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> LatencyModel:
        """Inverse of `to_dict`; refuses missing or non-finite coefficients (a corrupt store)."""
        missing = [k for k in COEFFICIENTS if k not in data]
        if missing:
            raise ValueError(f"latency model is missing coefficient(s) {missing}; got keys {sorted(data)}")
        values = {}
        for k in COEFFICIENTS:
            v = data[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"latency model coefficient {k}={v!r} is not a finite number")
            values[k] = float(v)
        return cls(**values)
