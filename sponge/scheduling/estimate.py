"""Online estimate of batch service time, used by the batcher before a fitted profile exists. Pure."""

from __future__ import annotations


class OnlineServiceEstimate:
    """EWMA of observed batch latency per batch size in images; unknown sizes are scaled from the nearest known.

    Returns 0 until anything was observed, so nothing is expired on a guess. After a resize (`resized`)
    the samples taken at the old allocation `c0` still bound the latency at the new one `c` from below —
    a batch runs at most c/c0 times faster with more CPU, and no faster with less — so until a batch at
    the new allocation is observed the estimate is that bound (never an overestimate, never nothing).
    """

    def __init__(self, alpha: float = 0.2, cpu_m: int | None = None) -> None:
        self.alpha = alpha
        self._ewma: dict[int, float] = {}
        self._cpu = cpu_m  # allocation in force (None: unknown, samples are used as they are)
        self._measured_cpu = cpu_m  # allocation the samples were taken at

    def observe(self, batch: int, latency_ms: float) -> None:
        if self._measured_cpu != self._cpu:  # the first sample at a new allocation replaces the old ones
            self._ewma.clear()
            self._measured_cpu = self._cpu
        old = self._ewma.get(batch)
        self._ewma[batch] = latency_ms if old is None else old + self.alpha * (latency_ms - old)

    def resized(self, cpu_m: int) -> None:
        """The allocation is now `cpu_m` millicores."""
        self._cpu = cpu_m

    def reset(self) -> None:
        """Forget everything observed."""
        self._ewma.clear()

    def __call__(self, batch: int) -> float:
        if batch in self._ewma:
            est = self._ewma[batch]
        elif not self._ewma:
            return 0.0
        else:
            nearest = min(self._ewma, key=lambda k: abs(k - batch))
            est = self._ewma[nearest] * batch / nearest
        c0, c = self._measured_cpu, self._cpu
        if c0 is not None and c is not None and c > c0:
            est *= c0 / c
        return est
