"""Build-once, on-disk cache for generated ONNX models.

Why: models are generated from packaged sources (weights, code) rather than downloaded, and
generation costs noticeable time. Each cached file carries a *stamp* (builder version, source
hash, ...) in its ``metadata_props``; a file whose stamp differs is rebuilt. Files are written
to a temporary name and renamed into place, so concurrent processes never see a partial model.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import onnx

__all__ = ["default_cache_dir", "cached_model", "read_metadata", "save_atomic"]

CACHE_ENV = "SPONGE_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$SPONGE_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/sponge/models`` (``~/.cache/...``)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "sponge" / "models"


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file as a dict (raises if the file is not ONNX)."""
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def save_atomic(model: onnx.ModelProto, path: Path) -> None:
    """Serialise ``model`` to ``path`` via a temp file in the same directory + ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = model.SerializeToString()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _stamp_matches(path: Path, stamp: Mapping[str, str]) -> bool:
    try:
        meta = read_metadata(path)
    except Exception:  # missing, truncated by a crash in an older version, not ONNX: rebuild
        return False
    return all(meta.get(k) == v for k, v in stamp.items())


def cached_model(
    filename: str,
    stamp: Mapping[str, str],
    build: Callable[[], onnx.ModelProto],
    cache_dir: str | Path | None = None,
) -> Path:
    """Return ``cache_dir/filename``, (re)building it with ``build()`` unless its stamp matches.

    ``stamp`` is merged into the built model's ``metadata_props`` before it is written.
    """
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = directory / filename
    if path.is_file() and _stamp_matches(path, stamp):
        return path
    model = build()
    props = {p.key: p.value for p in model.metadata_props}
    props.update(stamp)
    onnx.helper.set_model_props(model, props)
    save_atomic(model, path)
    return path
