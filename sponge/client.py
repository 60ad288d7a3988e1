"""A minimal V2 client: `sponge classify IMAGE` sends a photo with its own SLO and prints the answer.

It uses the binary tensor extension (one UINT8 224x224x3 tensor, ~150 KB) and the classification
extension, so the request is exactly what a stock Triton/KServe client would send."""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

import httpx
import numpy as np
import orjson


def sample_image(name: str) -> Path:
    return Path(str(resources.files("sponge.samples") / f"{name}.jpg"))


def load_image(path: str | Path) -> np.ndarray:
    from PIL import Image

    from sponge.models.efficientnet_lite0 import preprocess

    with Image.open(path) as im:
        return preprocess(np.asarray(im.convert("RGB")))


def classify_request(img: np.ndarray, slo_ms: float | None, network_ms: float | None, top_k: int
                     ) -> tuple[bytes, dict[str, str]]:
    params = {k: v for k, v in (("slo_ms", slo_ms), ("network_ms", network_ms)) if v is not None}
    header = orjson.dumps({
        "inputs": [{"name": "image", "shape": [1, *img.shape], "datatype": "UINT8",
                    "parameters": {"binary_data_size": img.nbytes}}],
        "outputs": [{"name": "probabilities", "parameters": {"classification": top_k}}],
        "parameters": params,
    })
    return header + img.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                    "Content-Type": "application/octet-stream"}


def _classify(args: argparse.Namespace) -> int:
    path = sample_image(args.image[len("sample:"):]) if args.image.startswith("sample:") else Path(args.image)
    body, headers = classify_request(load_image(path), args.slo_ms, args.network_ms, args.top)
    try:
        r = httpx.post(f"{args.url}/v2/models/{args.model}/infer", content=body, headers=headers, timeout=60)
    except httpx.HTTPError as exc:
        print(f"sponge: error: cannot reach {args.url}: {unreachable_reason(exc)}", file=sys.stderr)
        return 1
    if r.status_code != 200:
        print(f"HTTP {r.status_code}: {r.text}", file=sys.stderr)
        return 1
    doc = r.json()
    for entry in doc["outputs"][0]["data"]:
        score, index, *label = entry.split(":", 2)
        print(f"{float(score):6.3f}  {label[0] if label else index}")
    print(json.dumps(doc["parameters"]))
    return 0


def unreachable_reason(exc: httpx.HTTPError) -> str:
    """A transport error in a few words: "connection refused", "timed out", ..."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if "refused" in text.lower():
        return "connection refused"
    return text.split("] ", 1)[-1].strip().lower() if text.startswith("[Errno") else text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="classify a photo with a running server (V2 binary request)")
    p.add_argument("image", help="image file, or sample:chelsea / sample:coffee (shipped photos)")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="efficientnet-lite0")
    p.add_argument("--slo-ms", type=float, default=None, help="end-to-end objective of this request")
    p.add_argument("--network-ms", type=float, default=None, help="time already spent in the network")
    p.add_argument("--top", type=int, default=3)
    p.set_defaults(func=_classify)
