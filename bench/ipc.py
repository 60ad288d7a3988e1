"""Per-batch cost of handing a batch to a replica process and getting its outputs back (issue 13, item 3):
the wall time of `Replica.infer` minus the worker's own runtime call (`infer_ms`), for batches formed from
one-image requests as the serving core forms them (the requests' inputs joined into the batch, then sent).

Usage: python bench/ipc.py [--quick]
Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time

import numpy as np

from sponge.runtime.replica import Replica

try:  # the shared-memory path: requests' inputs written once, straight into the replica's input buffer
    from sponge.runtime.replica import BatchParts
except ImportError:  # before it: concatenated, then pickled through the socket
    BatchParts = None


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


async def measure(model_path: str, name: str, make, batches: tuple[int, ...], n: int) -> list[dict]:
    cores = len(os.sched_getaffinity(0))
    rep = Replica("bench", model_path, cores, cores, follow_own_limit=False)
    await rep.start()
    rows = []
    try:
        for b in batches:
            parts = [{name: make(1)} for _ in range(b)]
            for _ in range(5):  # warm-up (segments created, sessions built)
                await rep.infer(batch(parts))
            walls, overheads = [], []
            for _ in range(n):
                t0 = time.perf_counter()
                res = await rep.infer(batch(parts))
                wall = (time.perf_counter() - t0) * 1000
                walls.append(wall)
                overheads.append(wall - res.infer_ms)
            nbytes = sum(p[name].nbytes for p in parts)
            rows.append({"batch": b, "input_kib": nbytes / 1024, "wall_p50_ms": pct(walls, 50),
                         "overhead_p50_ms": pct(overheads, 50), "overhead_p99_ms": pct(overheads, 99)})
    finally:
        await rep.stop()
    return rows


def batch(parts: list[dict[str, np.ndarray]]):
    """What the serving core hands the replica for these requests."""
    if len(parts) == 1:
        return parts[0]
    if BatchParts is not None:
        return BatchParts(parts)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 60 if args.quick else 300
    gc.collect()
    gc.freeze()
    from sponge.models.efficientnet_lite0 import default_model_path
    from sponge.models.trivial import trivial_model_path

    rng = np.random.default_rng(0)
    cases = {
        "trivial": asyncio.run(measure(str(trivial_model_path()), "x",
                                       lambda b: rng.random((b, 16), dtype=np.float32), (1, 8, 32), n)),
        "efficientnet-lite0": asyncio.run(measure(str(default_model_path()), "image",
                                                  lambda b: rng.integers(0, 255, (b, 224, 224, 3), dtype=np.uint8),
                                                  (1, 8, 32), max(20, n // 4))),
    }
    path = "shared memory" if BatchParts is not None else "pickle over the socket"
    print(f"\nIPC per batch ({path}): wall of Replica.infer minus the runtime's own time")
    print(f"{'model':<20}{'batch':>6}{'input KiB':>11}{'overhead p50':>14}{'p99':>9}{'wall p50':>10}")
    for model, rows in cases.items():
        for r in rows:
            print(f"{model:<20}{r['batch']:>6}{r['input_kib']:>11.0f}{r['overhead_p50_ms']:>12.3f}ms"
                  f"{r['overhead_p99_ms']:>7.3f}ms{r['wall_p50_ms']:>8.2f}ms")
    print(json.dumps({"bench": "ipc", "path": path, "cases": cases}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
