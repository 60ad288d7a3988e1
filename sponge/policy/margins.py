"""The latency model's safety margin, measured from the batches actually served. Pure: state in, out.

Every served batch (Observation.batches: images, CPU, latency) is a free check of the model: the ratio
r = measured / l(images, cpu). The margin covers the model's under-prediction at a high quantile:
safety = 1 / (1 + q(max(0, r - 1))), q the `quantile` (0.95) over the last `window` batches, clipped to
[`min_safety`, 1]; deadlines are planned at `safety` times their length. Until `min_samples` batches have
been seen it is the prior (0.9, the paper's constant). A model that is exact gets no margin; a model that
under-predicts by 20 % at p95 gets 1/1.2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from sponge.perf.latency_model import LatencyModel
from sponge.perf.samples import BatchSample


@dataclass(frozen=True)
class MarginState:
    """Recent measured/predicted latency ratios (bounded by the estimator's window)."""

    ratios: tuple[float, ...] = ()


class ModelErrorMargin:
    """`update(state, batches) -> state`; `safety(state) -> float`. See the module docstring."""

    def __init__(self, model: LatencyModel, *, prior: float = 0.9, quantile: float = 0.95, window: int = 256,
                 min_samples: int = 20, min_safety: float = 0.5) -> None:
        if not 0 < min_safety <= prior <= 1 or not 0 < quantile < 1 or window < 1 or min_samples < 1:
            raise ValueError("need 0 < min_safety <= prior <= 1, 0 < quantile < 1, window and min_samples >= 1")
        self.model = model
        self.prior, self.quantile, self.window = prior, quantile, window
        self.min_samples, self.min_safety = min_samples, min_safety

    def update(self, state: MarginState, batches: Sequence[BatchSample]) -> MarginState:
        if not batches:
            return state
        new = []
        for s in batches:
            if s.images >= 1 and s.cpu_m > 0 and s.latency_ms > 0:
                pred = float(self.model.latency_ms(s.images, float(s.cpu_m)))
                if pred > 0:
                    new.append(s.latency_ms / pred)
        return MarginState((state.ratios + tuple(new))[-self.window:])

    def safety(self, state: MarginState) -> float:
        if len(state.ratios) < self.min_samples:
            return self.prior
        under = float(np.quantile(np.maximum(np.asarray(state.ratios) - 1.0, 0.0), self.quantile))
        return float(min(1.0, max(self.min_safety, 1.0 / (1.0 + under))))
