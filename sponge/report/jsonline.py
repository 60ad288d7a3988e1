"""The final line of every benchmark: one strict JSON object (NaN/inf, which JSON has no words for,
become null), so that runs can be compared over time by any JSON reader."""

from __future__ import annotations

import json
import math
from typing import Any


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def json_line(figures: Any) -> str:
    """`figures` as one line of strict JSON (non-finite numbers as null; other objects via str)."""
    return json.dumps(_finite(figures), allow_nan=False, default=str)
