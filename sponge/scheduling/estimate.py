"""Online estimate of batch service time, used by the batcher before a fitted profile exists. Pure."""

from __future__ import annotations


class OnlineServiceEstimate:
    """EWMA of observed batch latency per batch size; unknown sizes are scaled from the nearest known.

    Returns 0 until anything was observed, so nothing is expired on a guess.
    """

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self._ewma: dict[int, float] = {}

    def observe(self, batch: int, latency_ms: float) -> None:
        old = self._ewma.get(batch)
        self._ewma[batch] = latency_ms if old is None else old + self.alpha * (latency_ms - old)

    def reset(self) -> None:
        """Forget (after the CPU allocation changed, old latencies no longer hold)."""
        self._ewma.clear()

    def __call__(self, batch: int) -> float:
        if batch in self._ewma:
            return self._ewma[batch]
        if not self._ewma:
            return 0.0
        nearest = min(self._ewma, key=lambda k: abs(k - batch))
        return self._ewma[nearest] * batch / nearest
