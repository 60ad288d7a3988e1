"""Served batches become BatchSamples for the online latency model — but a batch during which the
replica was resized measured two allocations at once, and is not recorded."""

from __future__ import annotations

import asyncio

import numpy as np

from sponge.server.slo import Budget
from test_front_door_fixes import FakeReplica, make_core


def test_served_batches_are_recorded_unless_the_allocation_changed_mid_batch() -> None:
    async def go() -> None:
        replica = FakeReplica(hang=True)
        core = make_core(replica)
        core.start()
        try:
            async def serve_one() -> None:
                now = core.clock()
                p = core.submit({"x": np.ones((1, 4), np.float32)}, 1, Budget(1000, 0, 1000, now + 1000), now)
                while not replica.calls or len(replica.calls) < served + 1:
                    await asyncio.sleep(0.001)
                if resize_mid_batch:
                    core.cpu_m[replica.name] = 500
                replica.release.set()
                await p.future
                replica.release.clear()

            served, resize_mid_batch = 0, False
            await serve_one()
            assert [(s.images, s.cpu_m) for s in core.recent_batches] == [(1, 1000)]
            served, resize_mid_batch = 1, True
            await serve_one()
            assert len(core.recent_batches) == 1, "the straddling batch was not recorded"
        finally:
            await core.close()

    asyncio.run(go())
