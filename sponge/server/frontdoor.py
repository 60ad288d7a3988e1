"""What every front door (HTTP `app.py`, gRPC `grpc_service.py`) does with a decoded request: submit it
to the serving core, wait for it, and count its outcome — in `sponge_requests` (all front doors, as
before) and in `sponge_requests_by_protocol` (the same outcomes, by front door). The core's exceptions
pass through (counted) for each protocol to answer in its own terms."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

import numpy as np

from sponge.protocol.v2 import RequestedOutput, classify
from sponge.server.core import DeadlineExpired, InferenceFailed, Pending, Served, ServerBusy, ServingCore
from sponge.server.slo import Budget


@dataclass
class Answer:
    served: Served
    server_ms: float
    met: bool
    params: dict[str, Any]  # the response's `parameters`: what the server spent, against which budget


class FrontDoor:
    def __init__(self, core: ServingCore, protocol: str) -> None:
        self.core = core
        self.protocol = protocol
        self.name = core.model_name
        self.metrics = core.metrics

    def count(self, outcome: str) -> None:
        self.metrics.requests.labels(self.name, outcome).inc()
        self.metrics.requests_by_protocol.labels(self.name, self.protocol, outcome).inc()

    async def serve(self, inputs: dict[str, np.ndarray], items: int, budget: Budget, arrival_ms: float,
                    wait: Callable[[Pending], Awaitable[Served | None]]) -> Answer | None:
        """Submit and wait (`wait` returns None if the client went away while the request was queued).
        Raises the core's DeadlineExpired / ServerBusy / InferenceFailed (ShuttingDown) after counting
        them; a cancelled caller (its client gone) takes a still-queued request out of the queue."""
        core, m = self.core, self.metrics
        m.budget.labels(self.name).observe(max(0.0, budget.budget_ms) / 1000.0)
        pending: Pending | None = None
        try:
            pending = core.submit(inputs, items, budget, arrival_ms)
            served = await wait(pending)
        except DeadlineExpired:
            self.count("expired")
            if pending is None:  # refused on arrival (admission), not expired in the queue
                m.refusal_latency.labels(self.name).observe((core.clock() - arrival_ms) / 1000.0)
            raise
        except ServerBusy:
            self.count("rejected")
            m.refusal_latency.labels(self.name).observe((core.clock() - arrival_ms) / 1000.0)
            raise
        except InferenceFailed:  # a replica's failure, or ShuttingDown
            self.count("error")
            raise
        except asyncio.CancelledError:
            if pending is not None and not pending.future.done():
                core.cancel(pending)  # still queued: no replica will run it (in a batch: it runs on)
                self.count("cancelled")
            raise
        if served is None:  # the client went away while queued: nobody to answer
            self.count("cancelled")
            return None
        server_ms = core.clock() - arrival_ms
        met = server_ms <= budget.budget_ms
        self.count("ok" if met else "late")
        m.server_latency.labels(self.name).observe(server_ms / 1000.0)
        m.queue_time.labels(self.name).observe(served.queue_ms / 1000.0)
        params = {
            "slo_ms": budget.slo_ms, "network_ms": round(budget.network_ms, 3),
            "budget_ms": round(budget.budget_ms, 3), "server_ms": round(server_ms, 3),
            "queue_ms": round(served.queue_ms, 3), "infer_ms": round(served.infer_ms, 3),
            "batch_size": served.batch_size, "cpu_m": served.cpu_m, "deadline_met": met,
        }
        return Answer(served, server_ms, met, params)


def requested_outputs(requested: Sequence[RequestedOutput], served: Served, labels: Sequence[str] | None,
                      binary_default: bool) -> list[tuple[str, np.ndarray, bool]]:
    """(name, array, binary?) of the outputs the request asked for (all of them if none), with Triton's
    classification extension applied."""
    if not requested:
        return [(k, v, binary_default) for k, v in served.outputs.items()]
    out = []
    for o in requested:
        arr = served.outputs[o.name]
        if o.classification:
            arr = classify(arr, o.classification, labels)
        out.append((o.name, arr, o.binary))
    return out
