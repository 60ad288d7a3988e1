"""Scale-down stabilisation: the one piece of state an optimizer may keep (no clocks: counts intervals).

Same idea as the Kubernetes HPA's scale-down stabilisation window: scale up at once, but scale down
only to the highest value recommended over the last `window` intervals. A dip shorter than the window
therefore never lowers the allocation, and a lower allocation is adopted only after it has been
sufficient for `window` consecutive intervals, so the allocation cannot flap.
"""

from __future__ import annotations

from collections import deque


def stabilise(recommended: int, current: int, recent: tuple[int, ...], window: int,
              max_step: int | None = None) -> tuple[int, tuple[int, ...]]:
    """The value to apply and the new recent recommendations (the last `window`): up at once, down only
    to the highest of the last `window` recommendations, by at most `max_step`. Pure."""
    recent = (recent + (recommended,))[-window:]
    if recommended >= current or len(recent) < window:
        return (recommended if recommended >= current else current), recent
    target = max(recent)
    if target >= current:
        return current, recent
    if max_step is not None:
        target = max(target, current - max_step)
    return target, recent


class DownscaleStabilizer:
    """Filters a stream of recommended values (e.g. millicores, replicas) against the value in force."""

    def __init__(self, window: int, max_step: int | None = None) -> None:
        if window < 1:
            raise ValueError("window must be >= 1 interval")
        if max_step is not None and max_step <= 0:
            raise ValueError("max_step must be positive")
        self.window = window
        self.max_step = max_step
        self._recent: deque[int] = deque(maxlen=window)

    def update(self, recommended: int, current: int) -> int:
        """Record this interval's recommendation and return the value to apply."""
        value, recent = stabilise(recommended, current, tuple(self._recent), self.window, self.max_step)
        self._recent = deque(recent, maxlen=self.window)
        return value

    def below_for(self, current: int) -> int:
        """How many of the latest consecutive recommendations were below `current` (for explanations)."""
        n = 0
        for v in reversed(self._recent):
            if v >= current:
                break
            n += 1
        return n

    def reset(self) -> None:
        self._recent.clear()
