"""Performance model l(b, c) (DESIGN §4).

latency_model: the model itself (pure); fit: bounded least-squares fit and acceptance checks
(pure); profile_store: measured profiles next to the model file (I/O); plot: fit pictures (I/O);
builtin_profiles: paper-scale models shipped as package data. Only LatencyModel is re-exported
here so that importing the model does not pull in scipy or matplotlib.
"""

from sponge.perf.latency_model import LatencyModel

__all__ = ["LatencyModel"]
