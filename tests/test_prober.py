"""IdleProber: measures wanted cells only while the server is idle, restores the allocation, and gives
the replica back at once (sample discarded) when a request arrives or the controller resizes."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from sponge.perf.samples import BatchSample
from sponge.server.prober import IdleProber


@dataclass
class Result:
    infer_ms: float


class FakeReplica:
    name = "r0"
    ready = True
    inputs: list = []

    def __init__(self, infer_s: float = 0.05) -> None:
        self.infer_s = infer_s
        self.calls: list[int] = []
        self.busy = False

    async def infer(self, inputs: dict) -> Result:
        self.calls.append(len(next(iter(inputs.values()))))
        await asyncio.sleep(self.infer_s)
        return Result(self.infer_s * 1000.0)


@dataclass
class FakeCore:
    replicas: list
    arrivals: int = 0
    queue: list = field(default_factory=list)
    cpu_m: dict = field(default_factory=lambda: {"r0": 2000})

    def serving(self) -> list:
        return [r for r in self.replicas if r.ready]


class FakeScaler:
    min_cpu_m, max_cpu_m = 100, 2000

    def __init__(self, core: FakeCore) -> None:
        self.core = core
        self.calls: list[int] = []

    def resize(self, name: str, cpu_m: int) -> None:
        self.calls.append(cpu_m)
        self.core.cpu_m[name] = cpu_m


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(infer_s: float = 0.05, wanted=((1, 500),)):
    replica = FakeReplica(infer_s)
    core = FakeCore([replica])
    scaler = FakeScaler(core)
    got: list[BatchSample] = []
    clock = Clock()
    prober = IdleProber(core, scaler, lambda levels, batches, limit: list(wanted), got.append,
                        cpu_levels=[500, 1000, 2000], batch_sizes=[1, 2, 4], quiet_ms=300, clock=clock)
    prober._batch = lambda r, b: {"x": [0] * b}  # no model specs needed for the fake replica
    return prober, core, scaler, replica, got, clock


def test_probes_only_after_a_quiet_period_and_restores_the_allocation() -> None:
    async def go() -> None:
        prober, core, scaler, replica, got, clock = make()
        assert await prober.step() is None  # first look: just started watching arrivals
        clock.t = 100.0
        assert await prober.step() is None  # not quiet long enough
        clock.t = 400.0
        s = await prober.step()
        assert s is not None and (s.images, s.cpu_m) == (1, 500) and got == [s]
        assert scaler.calls == [500, 2000] and core.cpu_m["r0"] == 2000
        core.arrivals += 1  # an arrival restarts the quiet period
        clock.t = 500.0
        assert await prober.step() is None and replica.calls == [1]

    asyncio.run(go())


def test_an_arrival_mid_probe_restores_at_once_and_discards_the_sample() -> None:
    async def go() -> None:
        prober, core, scaler, replica, got, clock = make(infer_s=0.2)
        await prober.step()
        clock.t = 1000.0
        task = asyncio.create_task(prober.step())
        await asyncio.sleep(0.03)
        assert core.cpu_m["r0"] == 500
        core.arrivals += 1
        core.queue.append("request")
        await asyncio.sleep(0.03)
        assert core.cpu_m["r0"] == 2000, "allocation restored while the probe batch still runs"
        assert not task.done()
        assert await task is None and got == [] and prober.stats.disturbed == 1

    asyncio.run(go())


def test_a_controller_resize_mid_probe_is_not_undone() -> None:
    async def go() -> None:
        prober, core, scaler, replica, got, clock = make(infer_s=0.1)
        await prober.step()
        clock.t = 1000.0
        task = asyncio.create_task(prober.step())
        await asyncio.sleep(0.02)
        core.cpu_m["r0"] = 750  # the controller decided 750 m meanwhile
        assert await task is None
        assert core.cpu_m["r0"] == 750 and scaler.calls == [500]

    asyncio.run(go())


def test_expensive_or_unknown_cells_are_skipped() -> None:
    async def go() -> None:
        prober, core, scaler, replica, got, clock = make(wanted=((4, 500), (2, 500), (1, 1000)))
        prober.expected = lambda b, c: None  # nothing known: only single images
        await prober.step()
        clock.t = 1000.0
        s = await prober.step()
        assert s is not None and (s.images, s.cpu_m) == (1, 1000)
        prober.expected = lambda b, c: 100.0 * b  # 4 images ~400 ms > max_probe_ms 250: skip to 2
        clock.t = 2000.0
        s = await prober.step()
        assert s is not None and (s.images, s.cpu_m) == (2, 500)

    asyncio.run(go())
