"""The simulator's input: every request of a run as columns (send time, SLO, network delay, budget,
images).

The plan comes from `sponge.workload.generate_requests` — the same function the live load generator
replays — and is held as NumPy columns so a simulation touches no per-request Python object until it
must (the event loop) and so several policies can share one plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from sponge.workload.requests import PlannedRequest


@dataclass(frozen=True, eq=False)
class RequestSet:
    """Requests sorted by send time. The server sees request i arrive at send_ms[i] (as in a live run,
    where the load generator reports the network delay instead of incurring it), with deadline
    send_ms[i] + budget_ms[i]. Request i carries images[i] images (first-axis rows; default 1): batches
    are sized in images, as l(b, c) counts them."""

    send_ms: np.ndarray
    slo_ms: np.ndarray
    network_ms: np.ndarray
    budget_ms: np.ndarray
    duration_ms: float  # length of the trace the plan was drawn from (the run lasts at least this long)
    description: str = ""
    images: np.ndarray | None = None  # per-request image count (None: one each)

    def __post_init__(self) -> None:
        cols = {}
        for name in ("send_ms", "slo_ms", "network_ms", "budget_ms"):
            a = np.array(getattr(self, name), dtype=np.float64)
            if a.ndim != 1:
                raise ValueError(f"RequestSet.{name} must be 1-D")
            cols[name] = a
        n = cols["send_ms"].size
        if any(a.size != n for a in cols.values()):
            raise ValueError("RequestSet columns differ in length")
        if n and (not np.all(np.isfinite(cols["send_ms"])) or np.any(np.diff(cols["send_ms"]) < 0)):
            raise ValueError("RequestSet.send_ms must be finite and sorted")
        if n and not np.all(np.isfinite(cols["budget_ms"])):
            raise ValueError("RequestSet.budget_ms must be finite")
        img = np.ones(n, dtype=np.int64) if self.images is None else np.array(self.images, dtype=np.int64)
        if img.shape != (n,) or (n and img.min() < 1):
            raise ValueError("RequestSet.images must hold one integer >= 1 per request")
        cols["images"] = img
        for name, a in cols.items():
            a.setflags(write=False)
            object.__setattr__(self, name, a)
        last = float(cols["send_ms"][-1]) if n else 0.0
        object.__setattr__(self, "duration_ms", max(float(self.duration_ms), last))

    def __len__(self) -> int:
        return int(self.send_ms.size)

    @property
    def deadline_ms(self) -> np.ndarray:
        return self.send_ms + self.budget_ms

    @classmethod
    def from_planned(
        cls, plan: Sequence[PlannedRequest], duration_ms: float | None = None, description: str = ""
    ) -> RequestSet:
        """Columns of a `generate_requests` plan (sorted by send time; ids are positions after sorting)."""
        send = np.fromiter((r.send_ms for r in plan), np.float64, len(plan))
        order = np.argsort(send, kind="stable")
        slo = np.fromiter((r.slo_ms for r in plan), np.float64, len(plan))[order]
        net = np.fromiter((r.network_ms for r in plan), np.float64, len(plan))[order]
        bud = np.fromiter((r.budget_ms for r in plan), np.float64, len(plan))[order]
        send = send[order]
        dur = float(duration_ms) if duration_ms is not None else (float(np.ceil(send[-1] / 1000.0) * 1000.0) if len(plan) else 0.0)
        return cls(send, slo, net, bud, dur, description)

    @classmethod
    def from_arrays(
        cls,
        send_ms: Sequence[float] | np.ndarray,
        budget_ms: Sequence[float] | np.ndarray,
        slo_ms: float | Sequence[float] | np.ndarray | None = None,
        duration_ms: float | None = None,
        description: str = "",
        images: Sequence[int] | np.ndarray | None = None,
    ) -> RequestSet:
        """Hand-made requests (tests, what-if cases): network = slo - budget; slo defaults to the budget;
        images per request default to 1."""
        send = np.asarray(send_ms, dtype=np.float64)
        bud = np.broadcast_to(np.asarray(budget_ms, dtype=np.float64), send.shape)
        slo = bud if slo_ms is None else np.broadcast_to(np.asarray(slo_ms, dtype=np.float64), send.shape)
        dur = float(duration_ms) if duration_ms is not None else (float(send.max()) if send.size else 0.0)
        return cls(send, slo, slo - bud, bud, dur, description, images)
