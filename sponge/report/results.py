"""One results format for live runs (`sponge load`) and simulations (`sponge simulate`).

A run is a directory with:
  requests.csv  — one row per request (columns of RequestRecord), every request exactly once;
  timeline.csv  — one row per adaptation interval (columns of TimelineRecord);
  run.json      — free-form metadata (policy, trace window, model, machine, ...).
`sponge report` reads both kinds alike.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Literal

Outcome = Literal["ok", "late", "expired", "rejected", "error"]
# ok: answered within its budget; late: answered after it; expired: answered with a deadline error;
# rejected: refused at admission (queue full, 503); error: failed (5xx, connection error, timeout).


@dataclass(frozen=True)
class RequestRecord:
    id: int
    sent_ms: float  # experiment time the client sent it (ms from run start)
    slo_ms: float  # end-to-end objective
    network_ms: float  # communication time outside the server (upload + return)
    budget_ms: float  # slo_ms - network_ms: what the server had
    server_ms: float  # time spent in the server (arrival -> response); NaN if no answer
    e2e_ms: float  # network_ms + server_ms (what the user saw); NaN if no answer
    outcome: Outcome
    batch: int = 0  # batch size it was served in (0 if not served)
    cpu_m: int = 0  # CPU allocation of the replica that served it

    @property
    def met(self) -> bool:
        return self.outcome == "ok"


@dataclass(frozen=True)
class TimelineRecord:
    t_ms: float  # experiment time at the end of the interval
    arrival_rps: float
    cpu_m: int  # CPU per replica
    replicas: int
    total_cpu_m: int  # allocated CPU summed over replicas, starting ones included
    batch: int
    queue_len: int
    feasible: bool = True
    refused_replicas: int = 0  # replicas the scale-out of this interval asked for that fit on no node (simulator)
    # CPU the front door (HTTP, decoding, queue, controller: the server process, not its replicas) used over
    # the interval, in millicores; live: measured (sponge_front_door_cpu_seconds), simulated: arrivals x
    # SimConfig.front_door_cpu_ms. NaN: not measured (older runs). Not part of total_cpu_m.
    front_door_cpu_m: float = math.nan


def _write_csv(path: Path, rows: Iterable[Any], cls: type) -> None:
    names = [f.name for f in fields(cls)]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=names)
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))


def _read_csv(path: Path, cls: type) -> list[Any]:
    types = {f.name: f.type for f in fields(cls)}
    out = []
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            kw: dict[str, Any] = {}
            for k, v in row.items():
                t = types[k]
                if t in ("int", int):
                    kw[k] = int(v)
                elif t in ("float", float):
                    kw[k] = float(v)
                elif t in ("bool", bool):
                    kw[k] = v in ("True", "true", "1")
                else:
                    kw[k] = v
            out.append(cls(**kw))
    return out


def write_run(
    directory: str | Path,
    requests: Iterable[RequestRecord],
    timeline: Iterable[TimelineRecord],
    meta: dict[str, Any],
) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _write_csv(d / "requests.csv", requests, RequestRecord)
    _write_csv(d / "timeline.csv", timeline, TimelineRecord)
    (d / "run.json").write_text(json.dumps(meta, indent=2, default=str))
    return d


def read_run(directory: str | Path) -> tuple[list[RequestRecord], list[TimelineRecord], dict[str, Any]]:
    d = Path(directory)
    reqs = _read_csv(d / "requests.csv", RequestRecord)
    tl_path = d / "timeline.csv"
    tl = _read_csv(tl_path, TimelineRecord) if tl_path.exists() else []
    meta_path = d / "run.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return reqs, tl, meta
