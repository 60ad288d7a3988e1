"""A tiny ONNX model (``y = x @ W + b``, 16 -> 16) for overhead benchmarks and fast tests.

Why: measuring the serving stack's own overhead (HTTP, queueing, batching) needs a model whose
compute is negligible, and tests need one that builds in milliseconds. W and b are fixed
(seeded), so outputs are reproducible across processes and machines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_cache import cached_model

__all__ = ["BUILDER_VERSION", "FEATURES", "build_trivial_model", "trivial_model_path", "trivial_weights"]

BUILDER_VERSION = "1"
FEATURES = 16
INPUT_NAME = "x"
OUTPUT_NAME = "y"
_SEED = 20240611


def trivial_weights() -> tuple[np.ndarray, np.ndarray]:
    """The fixed ``(W [16, 16], b [16])`` float32 parameters, for checking outputs in tests."""
    rng = np.random.default_rng(_SEED)
    w = rng.standard_normal((FEATURES, FEATURES)).astype(np.float32) / np.float32(np.sqrt(FEATURES))
    b = rng.standard_normal(FEATURES).astype(np.float32)
    return w, b


def build_trivial_model() -> onnx.ModelProto:
    """``x`` float32 [N, 16] -> ``y`` float32 [N, 16] with N dynamic."""
    w, b = trivial_weights()
    graph = helper.make_graph(
        [helper.make_node("Gemm", [INPUT_NAME, "W", "b"], [OUTPUT_NAME], name="linear")],
        "trivial",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", FEATURES])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="sponge", doc_string="y = x @ W + b"
    )
    model.ir_version = 8
    helper.set_model_props(model, {"model": "trivial"})
    onnx.checker.check_model(model)
    return model


def trivial_model_path(cache_dir: Path | None = None) -> Path:
    """Path of the trivial model's ONNX file, built once and cached (see ``onnx_cache``)."""
    return cached_model("trivial.onnx", {"builder_version": BUILDER_VERSION}, build_trivial_model, cache_dir)
