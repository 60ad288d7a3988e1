"""One served batch as an observation of the latency model (pure data, shared by live and simulator).

Every batch the server runs is a free measurement of l(b, c): `images` rows (the model's first axis,
what l(b, c) counts — not requests, a request may carry several images), run on `cpu_m` millicores,
took `latency_ms` in the runtime. The controller hands the batches served since its last look to the
policy in its Observation, so a policy can learn its latency model online, live and simulated alike.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchSample:
    """A batch of `images` rows on `cpu_m` millicores took `latency_ms` (runtime time), at `t_ms`."""

    images: int
    cpu_m: int
    latency_ms: float
    t_ms: float = 0.0
