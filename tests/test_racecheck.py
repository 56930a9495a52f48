"""The emulated racecheck (kernels/topk_moe/cuda/emulator/racecheck.h, racecheck.py):
data races found on the CPU, as compute-sanitizer's racecheck finds them on a GPU.

First on kernels of its own (tests/test_racecheck_kernels.cu), each known to race
or not: the report must name both source lines, the threads and the address that
the comment beside each kernel works out, not just a count. Then every kernel of
kernels/topk_moe/cuda at small shapes (racecheck_cases), which must be race-free.
CPU emulation only: what a GPU's schedule or memory model adds is not seen here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import site_line as conftest_site_line

from topk_moe.backends import emulator_unavailable_reason

REASON = emulator_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"the CUDA emulator can't run here: {REASON}")

SOURCE = Path(__file__).resolve().parent / "test_racecheck_kernels.cu"
SHARED_BASE = 64 << 10  # static __shared__ variables start here in the emulator's arena


def static_shared(offset: int) -> bool:
    """A 4-byte aligned address among the static __shared__ variables (each takes its
    place at first use in the process, so the base of one variable is not known here)."""
    return offset >= SHARED_BASE and offset % 4 == 0


@pytest.fixture(scope="module", autouse=True)
def instrumented_build():
    """The instrumented (traffic) flavour of the test kernels, built once."""
    from topk_moe.cuda.emulator import loader

    loader.prebuild([(SOURCE.name, {})], folder=SOURCE.parent, traffic=True)


def site_line(name: str) -> str:
    """The emulator's label of the line of SOURCE marked `// site: name`."""
    return conftest_site_line(SOURCE, name)


def run(name, grid, block, *args):
    """The hazards of one launch of kernel ``name`` under racecheck."""
    from topk_moe.cuda.emulator import loader, racecheck

    with racecheck.checking() as launches:
        loader.load_kernel(SOURCE, name)(grid, block, args)
    assert len(launches) == 1 and launches[0].kernel == name
    return launches[0].hazards


def pair(hazard) -> set:
    """{(site line, kind), (site line, kind)} of a hazard's two sides."""
    return {(hazard.first.line, hazard.first.kind), (hazard.second.line, hazard.second.kind)}


def device(a):
    from topk_moe.cuda.emulator import arrays

    return arrays.asarray(a)


def empty(n, dtype):
    from topk_moe.cuda.emulator import arrays

    return arrays.empty(n, dtype)


def test_a_non_atomic_shared_counter_races_and_atomic_add_does_not():
    out = empty(1, np.int32)
    hazards = run("shared_counter", (1,), (64,), np.int32(0), out)
    line = site_line("counter_plain")
    # Every thread reads and writes the one counter: read-write and write-write pairs
    # of the same line, between different threads, at the counter's address.
    assert {frozenset(pair(h)) for h in hazards} == {frozenset({(line, "read"), (line, "write")}),
                                                     frozenset({(line, "write")})}
    for h in hazards:
        assert h.space == "shared" and static_shared(h.offset) and h.first.thread != h.second.thread
        assert h.first.block == h.second.block == (0, 0, 0)
    read_write = next(h for h in hazards if h.first.kind != h.second.kind)
    assert read_write.pairs == 64 * 63  # each thread's read against every other thread's write
    assert run("shared_counter", (1,), (64,), np.int32(1), out) == ()
    assert out.view(np.ndarray)[0] == 64


def test_a_missing_barrier_between_a_write_and_another_warps_read_races():
    out = empty(64, np.float32)
    (hazard,) = run("exchange_across_warps", (1,), (64,), np.int32(0), out)
    assert pair(hazard) == {(site_line("exchange_write"), "write"), (site_line("exchange_read"), "read")}
    writer, reader = (hazard.first, hazard.second) if hazard.first.kind == "write" else (hazard.second, hazard.first)
    # thread t reads s[63 - t], a float written by thread 63 - t of the other warp
    assert reader.thread[0] == 63 - writer.thread[0] and reader.thread[0] // 32 != writer.thread[0] // 32
    assert static_shared(hazard.offset) and hazard.pairs == 64
    assert run("exchange_across_warps", (1,), (64,), np.int32(1), out) == ()


def test_a_correct_double_buffer_does_not_race_and_a_single_buffer_does():
    data = device(np.arange(64 * 4, dtype=np.float32))
    out = empty(64, np.float32)
    assert run("double_buffer", (1,), (64,), data, np.int32(4), np.int32(0), out) == ()
    hazards = run("double_buffer", (1,), (64,), data, np.int32(4), np.int32(1), out)
    assert {frozenset(pair(h)) for h in hazards} == {
        frozenset({(site_line("buffer_read"), "read"), (site_line("buffer_store"), "write")})}


def test_a_read_only_shared_table_does_not_race():
    assert run("read_only_table", (1,), (64,), empty(64, np.float32)) == ()


def test_a_syncwarp_over_half_the_communicating_lanes_races():
    out = empty(32, np.int32)
    assert run("syncwarp_exchange", (1,), (32,), np.uint32(0xFFFFFFFF), out) == ()
    (hazard,) = run("syncwarp_exchange", (1,), (32,), np.uint32(0x0000FFFF), out)
    assert pair(hazard) == {(site_line("warp_write"), "write"), (site_line("warp_read"), "read")}
    writer, reader = (hazard.first, hazard.second) if hazard.first.kind == "write" else (hazard.second, hazard.first)
    assert reader.thread[0] == writer.thread[0] ^ 16  # lane l reads s[l ^ 16]
    assert static_shared(hazard.offset)
    assert hazard.pairs == 32  # every read crosses the halves; none is ordered


def test_shuffles_and_votes_are_not_hazards_but_do_not_order_shared_memory():
    out = empty(32, np.int32)
    assert run("warp_synchronous", (1,), (32,), np.int32(0), out) == ()
    (hazard,) = run("warp_synchronous", (1,), (32,), np.int32(1), out)
    assert pair(hazard) == {(site_line("shuffled_write"), "write"), (site_line("shuffled_read"), "read")}
    assert hazard.first.thread[0] == hazard.second.thread[0] ^ 1


def test_global_memory_races_between_blocks_whatever_the_barriers():
    out, per_thread = empty(1, np.int32), empty(4 * 32, np.int32)
    (hazard,) = run("global_across_blocks", (4,), (32,), np.int32(0), out, per_thread)
    assert pair(hazard) == {(site_line("global_store"), "write")}
    assert (hazard.space, hazard.array, hazard.offset) == ("global", "out", 0)
    assert hazard.first.thread == hazard.second.thread == (0, 0, 0) and hazard.first.block != hazard.second.block
    assert hazard.pairs == 3  # blocks 1, 2 and 3 each find an earlier block's store
    assert run("global_across_blocks", (4,), (32,), np.int32(1), out, per_thread) == ()


def test_global_memory_within_a_block_is_ordered_by_its_barriers():
    data, out = empty(64, np.int32), empty(64, np.int32)
    (hazard,) = run("global_neighbour", (1,), (64,), np.int32(0), data, out)
    assert pair(hazard) == {(site_line("neighbour_write"), "write"), (site_line("neighbour_read"), "read")}
    writer, reader = (hazard.first, hazard.second) if hazard.first.kind == "write" else (hazard.second, hazard.first)
    assert (hazard.array, hazard.offset, reader.thread[0]) == ("data", 4 * writer.thread[0], writer.thread[0] - 1)
    assert run("global_neighbour", (1,), (64,), np.int32(1), data, out) == ()


def test_a_cp_async_copy_races_until_the_wait_that_completes_it():
    source, out = device(np.arange(64 * 8, dtype=np.uint16)), empty(64, np.uint16)
    assert run("copy_async_tiles", (1,), (64,), source, np.int32(1), np.int32(0), out) == ()
    # No wait: the copies are still in flight after the barrier, when thread t reads tile[t ^ 1].
    (hazard,) = run("copy_async_tiles", (1,), (64,), source, np.int32(0), np.int32(0), out)
    assert pair(hazard) == {(site_line("copy_issue"), "write"), (site_line("copy_read"), "read")}
    copy, reader = (hazard.first, hazard.second) if hazard.first.asynchronous else (hazard.second, hazard.first)
    assert copy.asynchronous and not reader.asynchronous and reader.thread[0] == copy.thread[0] ^ 1
    # Reading one's own destination before the wait: the same thread, still a hazard.
    (hazard,) = run("copy_async_tiles", (1,), (64,), source, np.int32(1), np.int32(1), out)
    assert pair(hazard) == {(site_line("copy_issue"), "write"), (site_line("copy_early_read"), "read")}
    assert hazard.first.thread == hazard.second.thread


def test_checking_fail_raises_and_the_environment_variable_checks_every_launch(monkeypatch):
    from topk_moe.cuda.emulator import loader, racecheck

    out = empty(64, np.float32)
    with pytest.raises(racecheck.RaceHazard, match=r"exchange_across_warps.*test_racecheck_kernels\.cu"):
        with racecheck.checking(fail=True):  # the kernel is looked up inside: the instrumented build
            loader.load_kernel(SOURCE, "exchange_across_warps")((1,), (64,), (np.int32(0), out))
    monkeypatch.setenv(racecheck.ENVIRONMENT_VARIABLE, "1")
    with pytest.raises(racecheck.RaceHazard):
        loader.load_kernel(SOURCE, "exchange_across_warps")((1,), (64,), (np.int32(0), out))
    monkeypatch.setenv(racecheck.ENVIRONMENT_VARIABLE, "maybe")
    with pytest.raises(ValueError, match=racecheck.ENVIRONMENT_VARIABLE):
        racecheck.active()
    with pytest.raises(TypeError, match="fail must be a bool"):
        with racecheck.checking(fail="yes"):
            pass


def test_every_kernel_of_the_sources_is_race_free_at_small_shapes():
    """All kernels of kernels/topk_moe/cuda under racecheck (racecheck_cases), and the
    summary the device check compares with compute-sanitizer's racecheck."""
    from topk_moe.cuda import build_report
    from topk_moe.cuda.emulator import loader, racecheck_cases

    loader.prebuild(racecheck_cases.builds(), traffic=True)  # a cold cache: one compiler per core
    summary = racecheck_cases.run_all_kernels()
    assert summary["failed"] == {}, summary["failed"]
    assert set(summary["kernels_run"]) == {name for _, name in build_report.source_kernels()}
    assert summary["hazards"] == [], "\n".join(summary["hazards"])
    assert summary["backend"] == "CPU emulation" and summary["launches"] >= len(summary["kernels_run"])
