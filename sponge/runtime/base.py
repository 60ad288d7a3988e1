"""The small interface every model runtime implements (DESIGN §2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """Name, V2 datatype (e.g. "FP32", "UINT8") and shape of one model input/output; -1 = any size."""

    name: str
    datatype: str
    shape: tuple[int, ...]


class Runtime(Protocol):
    """Runs a whole batch; its threads follow the CPU allocation of the replica it lives in."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def infer(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on a batch (first axis = batch) and return every output by name."""
        ...

    def set_threads(self, n: int) -> None:
        """Use `n` intra-op threads from now on (switching must not pause serving)."""
        ...

    @property
    def threads(self) -> int: ...
