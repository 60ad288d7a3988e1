"""Batches reach the replica through shared memory (sponge.runtime.ipc): outputs are right whichever path a
batch takes (segment, inline when another batch is in flight, pickled object tensors), segments grow, and
nothing is left behind — no /dev/shm entry, no mapping, no file descriptor — over many batches with the
replica killed in between, nor after it stops."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

from sponge.models.trivial import trivial_model_path, trivial_weights
from sponge.runtime import ipc
from sponge.runtime.replica import BatchParts, Replica

W, B = trivial_weights()


def expected(x: np.ndarray) -> np.ndarray:
    return x @ W + B


def _segments_named() -> list[str]:
    return [f for f in os.listdir(ipc.SHM_DIR) if f.startswith(f"sponge-{os.getpid()}-")]


def _segments_mapped() -> int:
    with open("/proc/self/maps") as fh:
        return sum(1 for line in fh if f"sponge-{os.getpid()}-" in line)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---- the format, pure ----------------------------------------------------------------------------------------

def test_messages_round_trip_every_placement(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.array([b"ab", b"", b"xyz"], dtype=object)  # a BYTES tensor: pickled inline
    c = np.ones((3, 2), dtype=np.uint8)
    descs, need = ipc.plan([("a", a.dtype, a.shape), ("b", b.dtype, b.shape), ("c", c.dtype, c.shape)], 4096)
    assert [d["where"] for d in descs] == ["shm", "pickle", "shm"]
    assert descs[2]["offset"] % ipc.ALIGN == 0 and need == ipc.aligned(48) + ipc.aligned(6)
    seg = ipc.Segment.create(f"t{os.getpid()}-0-in", ipc.segment_size(need))
    try:
        for d, arr in zip(descs, (a, b, c)):
            if d["where"] == "shm":
                np.copyto(seg.view(arr.dtype, arr.shape, d["offset"]), arr)
        header, inline = ipc.decode(ipc.encode({"op": "x", "t": descs}, ipc.pack_inline(descs, [a, b, c])))
        got = [ipc.read_tensor(d, seg, inline, copy=True) for d in header["t"]]
    finally:
        seg.close()
    np.testing.assert_array_equal(got[0], a)
    assert list(got[1]) == list(b)
    np.testing.assert_array_equal(got[2], c)
    # no segment, or one too small: every numeric tensor inline
    descs, _ = ipc.plan([("a", a.dtype, a.shape)], None)
    header, inline = ipc.decode(ipc.encode({"t": descs}, ipc.pack_inline(descs, [a])))
    assert header["t"][0]["where"] == "inline"
    np.testing.assert_array_equal(ipc.read_tensor(header["t"][0], None, inline, copy=True), a)
    assert ipc.plan([("a", a.dtype, a.shape)], 16)[0][0]["where"] == "inline"


def test_segment_sizes_and_the_sweep_of_dead_servers(tmp_path):
    assert ipc.segment_size(1) == ipc.MIN_SEGMENT and ipc.segment_size(ipc.MIN_SEGMENT + 1) == 2 * ipc.MIN_SEGMENT
    dead = 2**22 + 4321  # above pid_max's default: no such process
    for name in (f"sponge-{dead}-r0-3-in", f"sponge-{os.getpid()}-r0-1-out", "sponge-notapid-in", "other"):
        (tmp_path / name).write_bytes(b"")
    assert ipc.sweep_stale(str(tmp_path)) == 1
    assert sorted(os.listdir(tmp_path)) == sorted([f"sponge-{os.getpid()}-r0-1-out", "sponge-notapid-in", "other"])


def test_batch_parts_reads_as_the_joined_batch():
    parts = [{"x": np.full((1, 2), i, np.float32)} for i in range(3)] + [{"x": np.zeros((2, 2), np.float32)}]
    bp = BatchParts(parts)
    assert list(bp) == ["x"] and len(bp) == 1
    dtype, shape = bp.spec("x")
    assert dtype == np.float32 and shape == (5, 2)
    np.testing.assert_array_equal(bp["x"], np.concatenate([p["x"] for p in parts]))
    out = np.empty((5, 2), np.float32)
    bp.write("x", out)
    np.testing.assert_array_equal(out, bp["x"])
    with pytest.raises(ValueError):
        BatchParts([])


# ---- a real replica ------------------------------------------------------------------------------------------

def _replica() -> Replica:
    return Replica("shm", str(trivial_model_path()), 1, 1, follow_own_limit=False)


def test_outputs_are_right_on_every_path():
    async def go() -> None:
        r = _replica()
        await r.start()
        try:
            x = np.random.default_rng(0).random((6, 16), dtype=np.float32)
            np.testing.assert_allclose((await r.infer({"x": x})).outputs["y"], expected(x), atol=1e-5)
            parts = BatchParts([{"x": x[i:i + 1]} for i in range(6)])
            np.testing.assert_allclose((await r.infer(parts)).outputs["y"], expected(x), atol=1e-5)
            # two at once: the second goes inline while the first holds the segments
            one, two = await asyncio.gather(r.infer({"x": x}), r.infer({"x": x[:2]}))
            np.testing.assert_allclose(one.outputs["y"], expected(x), atol=1e-5)
            np.testing.assert_allclose(two.outputs["y"], expected(x[:2]), atol=1e-5)
            # a batch larger than the segments: new, larger ones
            big = np.random.default_rng(1).random((20_000, 16), dtype=np.float32)
            np.testing.assert_allclose((await r.infer({"x": big})).outputs["y"], expected(big), atol=1e-4)
            # the outputs are the caller's: a later batch does not overwrite them
            first = await r.infer({"x": x})
            await r.infer({"x": x * 0})
            np.testing.assert_allclose(first.outputs["y"], expected(x), atol=1e-5)
            assert _segments_named() == []  # names unlinked once the worker mapped them
        finally:
            await r.stop()
        assert _segments_named() == [] and _segments_mapped() == 0

    asyncio.run(go())


def test_nothing_grows_over_many_batches_with_kills_in_between():
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("no /proc")

    async def go() -> None:
        r = _replica()
        await r.start()
        rng = np.random.default_rng(2)

        async def round_() -> None:
            for i in range(40):
                n = int(rng.integers(1, 9))
                x = rng.random((n, 16), dtype=np.float32)
                batch = {"x": x} if i % 2 else BatchParts([{"x": x[j:j + 1]} for j in range(n)])
                np.testing.assert_allclose((await r.infer(batch)).outputs["y"], expected(x), atol=1e-5)
            big = rng.random((int(rng.integers(2000, 9000)), 16), dtype=np.float32)  # and a growth
            await r.infer({"x": big})

        try:
            await round_()
            r.kill()  # as the watchdog does
            await r.restart()
            await round_()
            fds, maps = _fds(), _segments_mapped()
            assert maps <= 2 and _segments_named() == []
            for _ in range(4):
                r.kill()
                await r.restart()
                await round_()
                assert _segments_named() == []
            assert _fds() <= fds and _segments_mapped() <= maps
        finally:
            await r.stop()
        assert _segments_named() == [] and _segments_mapped() == 0

    asyncio.run(go())


def test_a_worker_that_cannot_map_its_segment_answers_an_error_and_the_next_batch_recovers(monkeypatch):
    from sponge.runtime import replica as replica_mod

    async def go() -> None:
        r = _replica()
        await r.start()
        try:
            x = np.ones((2, 16), np.float32)
            real = replica_mod.ipc.Segment.create

            def vanishing(tag: str, size: int) -> ipc.Segment:  # created, then gone before the worker maps it
                seg = real(tag, size)
                seg.unlink()
                return seg

            monkeypatch.setattr(replica_mod.ipc.Segment, "create", staticmethod(vanishing))
            with pytest.raises(replica_mod.ReplicaError, match="shared memory"):
                await r.infer({"x": x})
            monkeypatch.setattr(replica_mod.ipc.Segment, "create", staticmethod(real))
            np.testing.assert_allclose((await r.infer({"x": x})).outputs["y"], expected(x), atol=1e-5)
        finally:
            await r.stop()

    asyncio.run(go())


def test_without_shared_memory_batches_go_through_the_socket(monkeypatch, caplog):
    from sponge.runtime import replica as replica_mod

    def full(tag: str, size: int) -> ipc.Segment:
        raise OSError(28, "No space left on device")

    async def go() -> None:
        r = _replica()
        await r.start()
        try:
            monkeypatch.setattr(replica_mod.ipc.Segment, "create", staticmethod(full))
            x = np.random.default_rng(3).random((4, 16), dtype=np.float32)
            for batch in ({"x": x}, BatchParts([{"x": x[i:i + 1]} for i in range(4)])):
                np.testing.assert_allclose((await r.infer(batch)).outputs["y"], expected(x), atol=1e-5)
        finally:
            await r.stop()
        assert _segments_named() == [] and _segments_mapped() == 0

    with caplog.at_level("WARNING", logger="sponge.replica"):
        asyncio.run(go())
    assert sum("no shared memory" in rec.message for rec in caplog.records) == 1  # said once
