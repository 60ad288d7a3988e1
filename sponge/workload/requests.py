"""The request plan: when each request is sent, how big it is, and what budget the network leaves it.

The live load generator and the simulator both replay this plan, so it is a pure function of its
inputs and the seed. Independent random streams (arrivals, sizes, clients, network) are spawned from
one seed, so changing e.g. the image size leaves the arrival times unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np

from sponge.workload.arrivals import ArrivalMode, arrival_times_ms
from sponge.workload.network import NetworkModel
from sponge.workload.traces import RateTrace

SizeSpec = Union[int, Sequence[int], Mapping[int, float]]


@dataclass(frozen=True)
class PlannedRequest:
    id: int
    send_ms: float  # experiment time the client sends it (ms from run start)
    slo_ms: float  # end-to-end objective
    network_ms: float  # upload (+ RTT) outside the server
    budget_ms: float  # slo_ms - network_ms: what the server gets (may be <= 0: arrives already late)
    size_bytes: int


def _sizes(spec: SizeSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    """Request sizes: one fixed size, a uniform pick from a list, or a weighted pick from {size: weight}."""
    if isinstance(spec, (int, np.integer)):
        if spec <= 0:
            raise ValueError(f"image_bytes must be > 0, got {spec}")
        return np.full(n, int(spec), dtype=np.int64)
    if isinstance(spec, Mapping):
        values = np.array(list(spec.keys()), dtype=np.int64)
        w = np.array(list(spec.values()), dtype=np.float64)
        if values.size == 0 or np.any(values <= 0) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError("image_bytes mapping needs positive sizes and non-negative weights with a positive sum")
        return rng.choice(values, size=n, p=w / w.sum())
    values = np.asarray(list(spec), dtype=np.int64)
    if values.size == 0 or np.any(values <= 0):
        raise ValueError("image_bytes sequence must be non-empty and positive")
    return rng.choice(values, size=n)


def generate_requests(
    rate_trace: RateTrace | np.ndarray,
    network_model: NetworkModel | None,
    slo_ms: float,
    image_bytes: SizeSpec,
    seed: int = 0,
    *,
    arrivals: ArrivalMode = "poisson",
    clients: int = 1,
    random_offsets: bool = True,
) -> list[PlannedRequest]:
    """Plan every request of a run.

    Arrivals follow the per-second rate trace; each request goes to one of `clients` simulated clients
    (uniformly at random); each client sees the network trace at its own offset — drawn uniformly
    over the trace when `random_offsets`, else the model's own `offset_ms` (offset 0 = Sponge's setup).
    `network_model=None` means no network delay (budget = SLO).
    """
    if slo_ms <= 0:
        raise ValueError(f"slo_ms must be > 0, got {slo_ms}")
    if clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients}")
    s_arr, s_size, s_client, s_net = np.random.SeedSequence(seed).spawn(4)
    send = arrival_times_ms(rate_trace, arrivals, np.random.default_rng(s_arr))
    n = send.size
    sizes = _sizes(image_bytes, n, np.random.default_rng(s_size))
    net = np.zeros(n)
    if network_model is not None and n:
        rng_c = np.random.default_rng(s_client)
        offsets = (
            np.array([network_model.random_offset(rng_c) for _ in range(clients)])
            if random_offsets
            else np.full(clients, network_model.offset_ms)
        )
        who = rng_c.integers(0, clients, size=n) if clients > 1 else np.zeros(n, dtype=np.int64)
        rng_n = np.random.default_rng(s_net)
        # one vectorised call: shift each request's send time by its client's offset
        base = network_model.with_offset(0.0)
        net = base.network_ms_many(send + offsets[who], sizes, rng_n)
    budgets = slo_ms - net
    return [
        PlannedRequest(i, float(send[i]), float(slo_ms), float(net[i]), float(budgets[i]), int(sizes[i]))
        for i in range(n)
    ]


def budgets_of(requests: Sequence[PlannedRequest]) -> np.ndarray:
    """The per-request server budgets of a plan (for histograms and the controller's priors)."""
    return np.array([r.budget_ms for r in requests], dtype=np.float64)
