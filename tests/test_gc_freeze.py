"""The server freezes its startup objects out of the cyclic collector (issue 13, the tiny model's p99 at
concurrency 64): a full collection then walks only what was allocated since, not the ~150k objects of
the imported modules and the app."""

from __future__ import annotations

import gc

from sponge.server.memory import freeze_startup_objects


def test_freeze_moves_what_is_alive_out_of_the_collectors_reach():
    app_state = [{"i": i} for i in range(50_000)]  # long-lived objects, as the app's own
    try:
        frozen = freeze_startup_objects()
        # frozen objects may die afterwards (threads of earlier tests free theirs): the count only falls
        assert frozen >= 50_000 and 50_000 <= gc.get_freeze_count() <= frozen
        tracked = gc.get_objects()  # what a full collection walks
        assert not any(o is app_state for o in tracked)
        assert len(tracked) < 0.02 * frozen  # only what was allocated since (this test's and threads' few)
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual
        del app_state
