"""Class labels: the vendored ImageNet-1k names, and labels carried inside ONNX models.

Why: responses are far more useful with ``"tabby"`` than with ``281``. Any model may carry its
labels as a JSON list under the ``labels`` key of its ONNX ``metadata_props``; the server reads
them with :func:`labels_of` without knowing which model it serves.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .onnx_cache import read_metadata

__all__ = ["LABELS_KEY", "imagenet_synonyms", "imagenet_labels", "labels_of"]

LABELS_KEY = "labels"

# ImageNet's own first synonyms collide for two pairs of classes; name them apart.
_DISAMBIGUATED = {134: "crane (bird)", 517: "crane (machine)", 639: "tank suit"}


@lru_cache(maxsize=1)
def imagenet_synonyms() -> tuple[str, ...]:
    """The 1000 original ImageNet-1k synonym lists (``"tabby, tabby cat"``), index = class id."""
    text = resources.files(__package__).joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    names = tuple(line for line in text.splitlines() if line and not line.startswith("#"))
    if len(names) != 1000:
        raise RuntimeError(f"imagenet_classes.txt holds {len(names)} names, expected 1000")
    return names


@lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """Short, unique display names: each class's first synonym (``"tabby"``, ``"espresso"``)."""
    labels = tuple(
        _DISAMBIGUATED.get(i, s.split(",")[0].strip()) for i, s in enumerate(imagenet_synonyms())
    )
    assert len(set(labels)) == len(labels), "ImageNet display labels must be unique"
    return labels


def labels_of(model_path: str | Path) -> list[str] | None:
    """The labels stored in an ONNX model's metadata (JSON list under ``labels``), else None."""
    raw = read_metadata(model_path).get(LABELS_KEY)
    if raw is None:
        return None
    try:
        labels = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{model_path}: metadata '{LABELS_KEY}' is not valid JSON: {exc}") from exc
    if not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise ValueError(f"{model_path}: metadata '{LABELS_KEY}' must be a JSON list of strings")
    return labels
