"""The measured profile of one model on one machine, stored as `<model file>.profile.json`.

Why a store with refusals: a latency model is only as good as the model file and machine it was
measured on. Loading refuses a profile whose schema is unknown, whose model file changed since
profiling (size or sha256), or whose coefficients do not fit the stored measurements. This is
the only module of `sponge/perf/` that touches the file system for measured profiles.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Sequence

from sponge.perf.fit import (
    DEFAULT_MAX_P95_REL_ERR,
    DEFAULT_MIN_R2,
    METHOD,
    FitQuality,
    FitResult,
    PoorFitError,
    ProfilePoint,
    Weighting,
    check_fit,
    evaluate,
)
from sponge.perf.latency_model import LatencyModel
from sponge.perf.step_model import StepLatencyModel

SCHEMA_VERSION = 1
KIND = "sponge.perf.profile"
PROFILE_SUFFIX = ".profile.json"
Statistic = Literal["p99_ms", "median_ms"]

__all__ = [
    "SCHEMA_VERSION",
    "GridCell",
    "ModelFileInfo",
    "Profile",
    "ProfileError",
    "UnknownSchemaError",
    "ModelChangedError",
    "PoorFitError",
    "profile_path_for",
    "model_file_info",
    "machine_info",
    "build_profile",
    "save_profile",
    "load_profile",
]


class ProfileError(Exception):
    """A stored profile cannot be used."""


class UnknownSchemaError(ProfileError):
    """The file was written by a schema version this code does not know."""


class ModelChangedError(ProfileError):
    """The model file is not the one that was profiled."""


@dataclass(frozen=True)
class GridCell:
    """One profiled (batch, cpu_m) cell: summary of n timed batches; `holdout` = not used to fit."""

    batch: int
    cpu_m: int
    median_ms: float
    p99_ms: float
    n: int
    holdout: bool = False

    def point(self, statistic: Statistic = "p99_ms") -> ProfilePoint:
        return ProfilePoint(self.batch, self.cpu_m, float(getattr(self, statistic)))


@dataclass(frozen=True)
class ModelFileInfo:
    name: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Profile:
    """Everything needed to trust (or refuse) a fitted latency model."""

    model_file: ModelFileInfo
    machine: dict[str, Any]
    grid: tuple[GridCell, ...]
    model: LatencyModel
    fit: FitQuality  # on the cells used to fit (holdout=False)
    holdout: FitQuality | None  # on the held-back cells, if any
    weighting: Weighting
    statistic: Statistic = "p99_ms"  # which cell summary was fitted
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    schema_version: int = SCHEMA_VERSION
    # Sponge's own thread-step model, fitted to the same cells (optional: older profiles have none).
    step_model: StepLatencyModel | None = None
    step_fit: FitQuality | None = None
    step_holdout: FitQuality | None = None

    def points(self, include_holdout: bool = True) -> list[ProfilePoint]:
        """The fitted statistic of each cell, as fit/plot input."""
        return [c.point(self.statistic) for c in self.grid if include_holdout or not c.holdout]

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "schema_version": self.schema_version,
            "created": self.created,
            "model_file": {"name": self.model_file.name, "sha256": self.model_file.sha256, "size": self.model_file.size},
            "machine": self.machine,
            "statistic": self.statistic,
            "grid": [
                {"batch": c.batch, "cpu_m": c.cpu_m, "median_ms": c.median_ms, "p99_ms": c.p99_ms, "n": c.n,
                 "holdout": c.holdout}
                for c in self.grid
            ],
            "model": self.model.to_dict(),
            "fit": {"method": METHOD, "weighting": self.weighting, **self.fit.to_dict()},
            "holdout": None if self.holdout is None else self.holdout.to_dict(),
            "step_model": None if self.step_model is None else {
                **self.step_model.to_dict(),
                "fit": None if self.step_fit is None else self.step_fit.to_dict(),
                "holdout": None if self.step_holdout is None else self.step_holdout.to_dict(),
            },
        }


def profile_path_for(model_path: str | os.PathLike[str]) -> Path:
    """`model.onnx` -> `model.onnx.profile.json`, next to the model file."""
    p = Path(model_path)
    return p.with_name(p.name + PROFILE_SUFFIX)


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def model_file_info(model_path: str | os.PathLike[str]) -> ModelFileInfo:
    p = Path(model_path)
    return ModelFileInfo(name=p.name, sha256=_sha256(p), size=p.stat().st_size)


def machine_info() -> dict[str, Any]:
    """What the latency numbers depend on: how many CPUs, which kind, which OS."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def build_profile(
    model_path: str | os.PathLike[str],
    grid: Sequence[GridCell],
    fit: FitResult,
    holdout: FitQuality | None = None,
    statistic: Statistic = "p99_ms",
) -> Profile:
    """Assemble a profile for `model_path` measured on this machine (hashes the model file)."""
    return Profile(
        model_file=model_file_info(model_path),
        machine=machine_info(),
        grid=tuple(grid),
        model=fit.model,
        fit=fit.quality,
        holdout=holdout,
        weighting=fit.weighting,
        statistic=statistic,
    )


def save_profile(profile: Profile, path: str | os.PathLike[str]) -> Path:
    """Write the profile as JSON (atomically: a reader never sees half a file)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(profile.to_json_dict(), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, p)
    return p


def _quality_from(d: dict[str, Any]) -> FitQuality:
    return FitQuality(
        n=int(d["n"]),
        r2=float(d["r2"]),
        rel_errors=tuple(float(v) for v in d["rel_errors"]),
        max_rel_err=float(d["max_rel_err"]),
        p95_rel_err=float(d["p95_rel_err"]),
    )


def _parse(raw: dict[str, Any]) -> Profile:
    mf = raw["model_file"]
    grid = tuple(
        GridCell(int(c["batch"]), int(c["cpu_m"]), float(c["median_ms"]), float(c["p99_ms"]), int(c["n"]),
                 bool(c.get("holdout", False)))
        for c in raw["grid"]
    )
    statistic = raw["statistic"]
    if statistic not in ("p99_ms", "median_ms"):
        raise ValueError(f"unknown statistic {statistic!r}")
    if raw["fit"]["weighting"] not in ("relative", "absolute"):
        raise ValueError(f"unknown fit weighting {raw['fit']['weighting']!r}")
    step = raw.get("step_model")  # absent in profiles written before the step model existed
    return Profile(
        model_file=ModelFileInfo(str(mf["name"]), str(mf["sha256"]), int(mf["size"])),
        machine=dict(raw["machine"]),
        grid=grid,
        model=LatencyModel.from_dict(raw["model"]),
        fit=_quality_from(raw["fit"]),
        holdout=None if raw.get("holdout") is None else _quality_from(raw["holdout"]),
        weighting=raw["fit"]["weighting"],
        statistic=statistic,
        created=str(raw["created"]),
        schema_version=int(raw["schema_version"]),
        step_model=None if step is None else StepLatencyModel.from_dict(step),
        step_fit=None if step is None or step.get("fit") is None else _quality_from(step["fit"]),
        step_holdout=None if step is None or step.get("holdout") is None else _quality_from(step["holdout"]),
    )


def load_profile(
    path: str | os.PathLike[str],
    model_path: str | os.PathLike[str],
    min_r2: float = DEFAULT_MIN_R2,
    max_p95_rel_err: float = DEFAULT_MAX_P95_REL_ERR,
) -> Profile:
    """Read a profile and refuse it unless it is usable for `model_path` on this code.

    Raises UnknownSchemaError, ModelChangedError, PoorFitError (judged afresh from the stored
    grid and coefficients, not from the stored numbers), or ProfileError for an unreadable file.
    """
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise ProfileError(f"no performance profile at {p}; profile the model first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileError(f"cannot read performance profile {p}: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("kind") != KIND:
        raise ProfileError(f"{p} is not a Sponge performance profile (kind={raw.get('kind') if isinstance(raw, dict) else None!r})")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UnknownSchemaError(
            f"{p} has profile schema version {version!r}; this Sponge reads version {SCHEMA_VERSION}; re-profile"
        )
    try:
        profile = _parse(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise ProfileError(f"{p} is malformed ({type(exc).__name__}: {exc}); re-profile") from exc

    mp = Path(model_path)
    try:
        size = mp.stat().st_size
    except OSError as exc:
        raise ModelChangedError(f"cannot check model file {mp} against profile {p}: {exc}") from exc
    want = profile.model_file
    if size != want.size or (digest := _sha256(mp)) != want.sha256:
        got = f"size {size}" if size != want.size else f"sha256 {digest[:12]}…"
        raise ModelChangedError(
            f"model file {mp} changed since it was profiled ({got}; profile {p} is for "
            f"{want.name}, size {want.size}, sha256 {want.sha256[:12]}…); re-profile"
        )

    points = profile.points()
    if not points:
        raise ProfileError(f"{p} holds no measured cells; re-profile")
    if not all(math.isfinite(v) and v >= 0 for v in profile.model.to_dict().values()):
        raise PoorFitError(f"profile {p} has negative coefficients {profile.model.to_dict()}; re-profile")
    check_fit(evaluate(profile.model, points), min_r2, max_p95_rel_err, what=f"profile {p}")
    return profile
