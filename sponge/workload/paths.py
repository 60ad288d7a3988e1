"""Where the shared traces live and where parsed copies are cached.

The traces are third-party files kept outside the repository (never copied in); code reads them in
place. Locating them one way everywhere keeps tests, the simulator and the load generator consistent.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_DATA = "SPONGE_SHARED_DATA"
ENV_CACHE = "SPONGE_CACHE_DIR"


def repo_root() -> Path:
    """The directory holding pyproject.toml, searched upward from this file."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").is_file():
            return parent
    raise FileNotFoundError(f"no pyproject.toml above {here}; set {ENV_DATA} to the shared data directory")


def shared_data_dir() -> Path:
    """$SPONGE_SHARED_DATA if set, else <repo root>/../shared/data."""
    env = os.environ.get(ENV_DATA)
    d = Path(env) if env else repo_root().parent / "shared" / "data"
    if not d.is_dir():
        raise FileNotFoundError(f"shared data directory {d} does not exist (set {ENV_DATA} to override)")
    return d


def data_file(relative: str | Path) -> Path:
    """A file under the shared data directory, with an error naming it if it is missing."""
    p = shared_data_dir() / relative
    if not p.is_file():
        raise FileNotFoundError(f"trace file {p} not found (shared data dir: {shared_data_dir()})")
    return p


def cache_dir() -> Path:
    """$SPONGE_CACHE_DIR if set, else ~/.cache/sponge (created on demand)."""
    env = os.environ.get(ENV_CACHE)
    return Path(env) if env else Path.home() / ".cache" / "sponge"
