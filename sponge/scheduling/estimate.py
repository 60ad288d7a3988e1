"""Online estimate of batch service time, used by the batcher before a fitted profile exists. Pure."""

from __future__ import annotations


class OnlineServiceEstimate:
    """EWMA of observed batch latency per batch size in images; unknown sizes are scaled from the nearest known.

    Returns 0 until anything was observed, so nothing is expired on a guess. After a resize (`resized`)
    the samples taken at the old allocation `c0` still bound the latency at the new one `c` from below —
    a batch runs at most c/c0 times faster with more CPU, and no faster with less — so until a batch at
    the new allocation is observed the estimate is that bound (never an overestimate, never nothing).

    A stall is not a latency: a sample more than `outlier_factor` times what the estimate allows for it
    (at a smaller allocation, scaled by how much slower it may be) is set aside — e.g. a replica that was
    SIGSTOPped for a while but not past its watchdog. Only `outlier_run` such samples in a row for one
    batch size are believed (the service really got slower): the estimate then restarts from their median.
    A sample `outlier_factor` times below the estimate replaces it (the estimate was too high, e.g. its
    first sample was a stall): a too-high estimate refuses requests that could be served.
    """

    def __init__(self, alpha: float = 0.2, cpu_m: int | None = None, outlier_factor: float = 8.0,
                 outlier_run: int = 3) -> None:
        self.alpha = alpha
        self.outlier_factor = outlier_factor
        self.outlier_run = outlier_run
        self._ewma: dict[int, float] = {}
        self._outliers: dict[int, list[float]] = {}  # the current run of set-aside samples per batch size
        self._cpu = cpu_m  # allocation in force (None: unknown, samples are used as they are)
        self._measured_cpu = cpu_m  # allocation the samples were taken at
        self.set_aside = 0  # samples not believed (stalls), in all

    def observe(self, batch: int, latency_ms: float) -> bool:
        """Feed one served batch; False when it was set aside as a stall (not averaged in)."""
        ref = self._raw(batch)
        c0, c = self._measured_cpu, self._cpu
        if c0 is not None and c is not None and c < c0:
            ref *= c0 / c  # less CPU now: up to c0/c slower, legitimately
        if ref > 0 and latency_ms > self.outlier_factor * ref:
            run = self._outliers.setdefault(batch, [])
            run.append(latency_ms)
            if len(run) < self.outlier_run:
                self.set_aside += 1
                return False
            latency_ms = sorted(run)[len(run) // 2]  # persistent: believe it, from the run's median
            self._ewma.pop(batch, None)
        self._outliers.pop(batch, None)
        if self._measured_cpu != self._cpu:  # the first sample at a new allocation replaces the old ones
            self._ewma.clear()
            self._measured_cpu = self._cpu
        old = self._ewma.get(batch)
        if old is None or latency_ms * self.outlier_factor < old:
            self._ewma[batch] = latency_ms
        else:
            self._ewma[batch] = old + self.alpha * (latency_ms - old)
        return True

    def _raw(self, batch: int) -> float:
        """The samples' estimate for `batch` images at the allocation they were taken at (0: none)."""
        if batch in self._ewma:
            return self._ewma[batch]
        if not self._ewma:
            return 0.0
        nearest = min(self._ewma, key=lambda k: abs(k - batch))
        return self._ewma[nearest] * batch / nearest

    def resized(self, cpu_m: int) -> None:
        """The allocation is now `cpu_m` millicores."""
        self._cpu = cpu_m

    def reset(self) -> None:
        """Forget everything observed."""
        self._ewma.clear()
        self._outliers.clear()

    def __call__(self, batch: int) -> float:
        est = self._raw(batch)
        if est == 0.0:
            return 0.0
        c0, c = self._measured_cpu, self._cpu
        if c0 is not None and c is not None and c > c0:
            est *= c0 / c
        return est
