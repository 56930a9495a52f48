"""The emulator's memory-traffic counters (kernels/topk_moe/cuda/emulator/traffic.h, traffic.py)
on kernels whose traffic is known by hand (tests/test_traffic_kernels.cu).

Each pattern's expected count is worked out in the comment beside it from the
rules in traffic.h: a warp-wide request is the n-th execution of a site by the
lanes of one warp in one block; a global request touches distinct 32-byte
sectors against a minimum of ceil(distinct bytes / 32); a shared request costs
wavefronts (32 banks of 4 bytes, phases of 32, 16 or 8 lanes for 4-, 8- and
16-byte accesses, one per 8x8 matrix for ldmatrix) against ceil(distinct words / 32).
The last tests show the counts do not depend on the schedule, and that a real
kernel file builds and counts in the traffic flavour while the ordinary build
stays uninstrumented.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import site_line as conftest_site_line

from topk_moe.backends import emulator_unavailable_reason

REASON = emulator_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"the CUDA emulator can't run here: {REASON}")

SOURCE = Path(__file__).resolve().parent / "test_traffic_kernels.cu"


@pytest.fixture(scope="module", autouse=True)
def traffic_builds():
    """Build the traffic flavour of every file these tests launch at once, one
    compiler per core (a cold cache costs ~10-40 s a file)."""
    from topk_moe.cuda import expert_mlp, launch_config
    from topk_moe.cuda.emulator import loader

    loader.prebuild([("router.cu", launch_config.router_defines(4)), ("dispatch.cu", launch_config.dispatch_defines()),
                     ("combine.cu", {}), ("activation.cu", {}), ("expert_mlp.cu", expert_mlp.launch_defines("swiglu", True))],
                    traffic=True)
    loader.prebuild([(SOURCE.name, {})], folder=SOURCE.parent, traffic=True)


def site_line(name: str) -> str:
    """The emulator's label of the line of SOURCE marked `// site: name`."""
    return conftest_site_line(SOURCE, name)


def run(name, grid, block, *args):
    """The LaunchTraffic of one launch of kernel ``name``."""
    from topk_moe.cuda.emulator import loader, traffic

    with traffic.counting() as launches:
        loader.load_kernel(SOURCE, name)(grid, block, args)
    assert len(launches) == 1
    return launches[0]


def site(launch, name, space, kind=None):
    found = [s for s in launch.sites
             if s.line == site_line(name) and s.space == space and (kind is None or s.kind == kind)]
    assert len(found) == 1, (name, space, launch.sites)
    return found[0]


def device(a):
    from topk_moe.cuda.emulator import arrays

    return arrays.asarray(a)


def empty(n, dtype):
    from topk_moe.cuda.emulator import arrays

    return arrays.empty(n, dtype)


# stride and offset in floats -> (sectors, minimum) of one warp's 4-byte read:
@pytest.mark.parametrize("stride, offset, sectors, minimum", [
    (1, 0, 4, 4),    # coalesced: 128 bytes, 4 sectors
    (2, 0, 8, 4),    # every other float: 256 bytes spanned, 128 used
    (8, 0, 32, 4),   # one float per sector
    (0, 0, 1, 1),    # broadcast: every lane the same float
    (1, 1, 5, 4),    # misaligned by 4 bytes: 128 bytes over 5 sectors
])
def test_global_sectors_of_strided_broadcast_and_misaligned_reads(stride, offset, sectors, minimum):
    launch = run("read_strided", (2,), (64,), device(np.arange(8192, dtype=np.float32)), empty(128, np.float32),
                 np.int32(stride), np.int32(offset))
    read = site(launch, "read_strided", "global")
    assert (read.kind, read.access_bytes, read.requests, read.lane_accesses) == ("read", 4, 4, 128)
    assert (read.sectors, read.min_sectors) == (4 * sectors, 4 * minimum)
    write = site(launch, "write_coalesced", "global")
    assert (write.kind, write.requests, write.sectors, write.min_sectors) == ("write", 4, 16, 16)


def test_unique_bytes_per_launch_and_per_block():
    # 2 blocks of 64 threads read in[0:64] each (stride 0 would be one float; here stride 1,
    # and each block reads the same 64 floats): 256 distinct bytes, 8 sectors per block.
    launch = run("read_same_rows", (2,), (64,), device(np.arange(64, dtype=np.float32)), empty(128, np.float32))
    source, out = launch.arrays
    assert (source.name, source.read_bytes, source.written_bytes) == ("in", 256, 0)
    assert (source.read_sectors, source.block_read_sectors) == (8, 16)
    assert (out.name, out.written_bytes, out.written_sectors, out.block_written_sectors) == ("out", 512, 16, 16)


def test_half_reads_and_vector_reads_count_their_width():
    launch = run("read_half", (1,), (32,), device(np.arange(64, dtype=np.uint16)), empty(32, np.uint16))
    read = site(launch, "read_half", "global", "read")
    assert (read.access_bytes, read.sectors, read.min_sectors) == (2, 2, 2)   # 64 bytes
    for stride, sectors in ((1, 16), (2, 32)):  # float4: 512 bytes; at stride 2 spread over 1024
        launch = run("read_vector", (1,), (32,), device(np.arange(512, dtype=np.float32)), empty(128, np.float32),
                     np.int32(stride))
        read = site(launch, "read_vector", "global")
        assert (read.access_bytes, read.requests, read.sectors, read.min_sectors) == (16, 1, sectors, 16)


def test_divergent_trip_counts_group_the_nth_execution_of_each_lane():
    # Lane l reads in[32 j + l] for j <= l % 4: request j has the lanes with l % 4 >= j,
    # 32, 24, 16 and 8 lanes, all within one 128-byte row: 4 sectors each; the minimum
    # is ceil(4 * lanes / 32) = 4, 3, 2, 1.
    launch = run("read_divergent", (1,), (32,), device(np.arange(128, dtype=np.float32)), empty(32, np.float32))
    read = site(launch, "read_divergent", "global")
    assert (read.requests, read.lane_accesses) == (4, 80)
    assert (read.sectors, read.min_sectors) == (16, 10)


# stride in floats -> wavefronts of one warp's 4-byte shared read (minimum 1):
@pytest.mark.parametrize("stride, wavefronts", [
    (1, 1),    # 32 banks, one word each
    (2, 2),    # two words per bank in use
    (32, 32),  # every lane in bank 0: 32-way conflict
    (33, 1),   # a column of a [32][33] padded tile: every bank once
    (0, 1),    # broadcast of one word
])
def test_shared_wavefronts_of_strides_and_padded_columns(stride, wavefronts):
    launch = run("shared_strided", (1,), (32,), empty(32, np.float32), np.int32(stride))
    read = site(launch, "shared_strided", "shared")
    assert (read.kind, read.requests, read.wavefronts, read.min_wavefronts) == ("read", 1, wavefronts, 1)
    fill = site(launch, "shared_fill", "shared")  # 33 coalesced writes of 32 floats
    assert (fill.kind, fill.requests, fill.wavefronts, fill.min_wavefronts) == ("write", 33, 33, 33)


# element stride -> (float4 wavefronts, minimum), (float2 wavefronts, minimum):
@pytest.mark.parametrize("stride, wide, pairs", [
    (1, (4, 4), (2, 2)),  # 16-byte: 4 phases of 8 lanes x 16 bytes; 8-byte: 2 phases of 16 x 8
    (2, (8, 4), (4, 2)),  # every other element: each phase spans 256 bytes, 2 words per bank
    (0, (1, 1), (1, 1)),  # every lane the same element: one broadcast wavefront
])
def test_shared_phases_of_8_and_16_byte_accesses(stride, wide, pairs):
    launch = run("shared_wide", (1,), (32,), empty(32, np.float32), np.int32(stride))
    by_width = {s.access_bytes: s for s in launch.sites if s.space == "shared" and s.kind == "write"}
    assert (by_width[16].wavefronts, by_width[16].min_wavefronts) == wide
    assert (by_width[8].wavefronts, by_width[8].min_wavefronts) == pairs


# pitch of the rows in halves -> wavefronts of ldmatrix.x4 (4 matrices; minimum 4):
@pytest.mark.parametrize("pitch, wavefronts", [
    (8, 4),    # rows packed: each matrix is 128 contiguous bytes
    (64, 32),  # 128-byte pitch: the 8 rows of a matrix share banks 0-3: 8-way
    (72, 4),   # 144-byte pitch (+16 bytes of padding): conflict-free
])
def test_ldmatrix_costs_one_phase_per_matrix(pitch, wavefronts):
    launch = run("ldmatrix_pitch", (1,), (32,), empty(128, np.uint32), np.int32(pitch))
    load = site(launch, "ldmatrix", "shared")
    assert (load.kind, load.requests, load.wavefronts, load.min_wavefronts) == ("ldmatrix", 1, wavefronts, 4)


@pytest.mark.parametrize("pitch, wavefronts", [(8, 4), (16, 8)])  # 16 halves = 32 bytes: 2-way
def test_cp_async_counts_its_global_read_and_shared_write(pitch, wavefronts):
    launch = run("copy_async_pitch", (1,), (32,), device(np.arange(512, dtype=np.uint16)), empty(32, np.uint16),
                 np.int32(pitch))
    read = site(launch, "cp_async", "global")
    assert (read.kind, read.access_bytes, read.sectors, read.min_sectors) == ("read", 16, 16, 16)
    write = site(launch, "cp_async", "shared")
    assert (write.kind, write.access_bytes, write.wavefronts, write.min_wavefronts) == ("write", 16, wavefronts, 4)


@pytest.mark.parametrize("spread, wavefronts", [(1, 32), (4, 8), (32, 1)])
def test_shared_atomics_on_one_word_serialise(spread, wavefronts):
    launch = run("shared_atomics", (1,), (32,), empty(32, np.int32), np.int32(spread))
    atomic = site(launch, "shared_atomic", "shared")
    assert (atomic.kind, atomic.requests, atomic.wavefronts, atomic.min_wavefronts) == ("atomic", 1, wavefronts, 1)


def test_counts_are_the_same_under_every_schedule():
    from topk_moe.cuda.emulator import loader

    def counts():
        return [run("read_divergent", (2,), (64,), device(np.arange(256, dtype=np.float32)), empty(128, np.float32)),
                run("copy_async_pitch", (1,), (32,), device(np.arange(512, dtype=np.uint16)), empty(32, np.uint16),
                    np.int32(16)),
                run("shared_atomics", (1,), (32,), empty(32, np.int32), np.int32(4))]

    expected = counts()
    for order in loader.SCHEDULES:
        for copy_async in ("late", "eager"):
            with loader.schedule(order, seed=7, copy_async=copy_async):
                assert counts() == expected, (order, copy_async)


def test_a_real_kernel_counts_in_the_traffic_flavour_only():
    """combine.cu's permute: every row gathered once (its ideal), and the ordinary
    build of the same file stays uninstrumented (no traffic entry point)."""
    import topk_moe
    from topk_moe.cuda.emulator import build, loader, traffic

    T, D, K = 64, 32, 2
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, D)).astype(np.float32)
    experts = np.stack([rng.permutation(4)[:K] for _ in range(T)]).astype(np.int32)
    plan = topk_moe.dispatch(experts, 4, backend="cuda-emulated")
    with traffic.counting() as launches:
        topk_moe.permute(x, plan, backend="cuda-emulated")
    (launch,) = [entry for entry in launches if entry.file == "combine.cu"]
    by_name = {a.name: a for a in launch.arrays}
    rows = by_name[max(by_name, key=lambda n: by_name[n].written_bytes)]
    assert rows.written_bytes == T * K * D * 4
    assert all(s.line.startswith("kernels/topk_moe/cuda/combine.cu:") for s in launch.sites)
    ordinary = loader._library("combine.cu", (), str(build.KERNEL_DIR))
    assert not hasattr(ordinary, "emu_traffic_begin")


def test_the_traffic_command_counts_every_stage_of_the_layer_labelled_as_emulation(tmp_path):
    """analysis.measure.traffic at a tiny shape: one record per launch of every stage,
    every site on a kernels/topk_moe/cuda line, labelled as CPU emulation, written by
    analysis.records; permute and combine move each byte of their rows once."""
    from analysis import records
    from analysis.measure import traffic as command

    assert command.main(["--T", "16", "--D", "64", "--F", "64", "--E", "4", "--k", "2",
                         "--results-dir", str(tmp_path)]) == 0
    written = records.read_records(command.RECORD_KIND, results_dir=tmp_path)
    assert {r["stage"] for r in written} == {"route", "dispatch", "permute", "expert_mlp", "combine",
                                             "dense_activation"}
    assert all(r["measured_by"] == "cpu-emulation" and "not DRAM traffic" in r["label"] for r in written)
    assert all(site["line"].startswith("kernels/topk_moe/cuda/") for r in written for site in r["sites"])
    moe = [r for r in written if r["params"]["layer"] == "moe"]
    assert all(r["params"]["k"] == 2 and r["routing_max_over_mean"] >= 1 for r in moe)
    (permute,) = [r for r in moe if r["stage"] == "permute"]
    assert permute["ideal_bytes"] == 16 * 64 * 2 + 16 * 2 * 64 * 2 + 16 * 2 * 8  # x, rows, token indices
    dense = [r for r in written if r["params"]["layer"] == "dense"]
    assert dense and all(r["params"]["F_dense"] == 128 and "cuBLAS" in r["dense_gemms"] for r in dense)


@pytest.mark.parametrize("interleaved, wavefronts", [
    (0, 8),  # rows 2q, 2q + 1 at an 80-byte pitch share 4 banks: 2-way in every phase
    (1, 4),  # rows q, q + 4 start 16 banks apart: conflict-free (v3's A-tile mapping)
])
def test_16_byte_conflicts_count_within_a_quarter_warp(interleaved, wavefronts):
    # Over the whole warp both mappings spread 4 words on every bank; only the
    # quarter-warp phases tell them apart.
    launch = run("copy_async_tile", (1,), (32,), device(np.arange(512, dtype=np.uint16)), empty(32, np.uint16),
                 np.int32(40), np.int32(interleaved))
    write = site(launch, "cp_async_tile", "shared")
    assert (write.wavefronts, write.min_wavefronts) == (wavefronts, 4)


def test_a_real_kernel_counts_the_same_under_every_schedule():
    """dispatch.cu (shared atomics, match_any, block scans) at a small size: the
    same counts per launch under each fiber order and cp.async landing."""
    import topk_moe
    from topk_moe.cuda.emulator import loader, traffic

    rng = np.random.default_rng(1)
    experts = np.stack([rng.permutation(8)[:2] for _ in range(300)]).astype(np.int32)

    def counts():
        with traffic.counting() as launches:
            topk_moe.dispatch(experts, 8, backend="cuda-emulated")
        return [(launch.kernel, launch.sites, launch.arrays) for launch in launches]

    expected = counts()
    assert {kernel for kernel, _, _ in expected} >= {"dispatch_count_segments", "dispatch_scatter"}
    for order in ("descending", "shuffled", "warp-by-warp"):
        with loader.schedule(order, seed=3):
            assert counts() == expected, order


def test_the_traffic_command_counts_only_the_chosen_stages(tmp_path):
    """--stages dispatch: records of dispatch's four kernels only, no dense layer,
    with the same counts as the whole layer's run of the same shape."""
    from analysis import records
    from analysis.measure import traffic as command

    shape = ["--T", "40", "--D", "64", "--F", "64", "--E", "4", "--k", "2"]
    assert command.main(shape + ["--stages", "dispatch", "--results-dir", str(tmp_path / "dispatch")]) == 0
    assert command.main(shape + ["--results-dir", str(tmp_path / "all")]) == 0
    chosen = records.read_records(command.RECORD_KIND, results_dir=tmp_path / "dispatch")
    whole = [r for r in records.read_records(command.RECORD_KIND, results_dir=tmp_path / "all")
             if r["stage"] == "dispatch"]
    assert [r["kernel"] for r in chosen] == ["dispatch_count_segments", "dispatch_scan_segments",
                                             "dispatch_offsets", "dispatch_scatter"]
    assert all(r["params"]["layer"] == "moe" for r in chosen)

    def counts(r):
        return r["kernel"], r["sites"], r["arrays"], r["routing_max_over_mean"]

    assert [counts(r) for r in chosen] == [counts(r) for r in whole]


def test_the_traffic_command_refuses_an_unknown_stage():
    from analysis.measure import traffic as command

    with pytest.raises(SystemExit):
        command.parse(["--stages", "dispatcher"])
    with pytest.raises(ValueError, match="stages: expected one or more of"):
        command.count_layer(16, 64, 64, 4, 2, stages=("router",))


def test_a_run_of_some_stages_replaces_only_their_records_in_the_kernels_chapter(tmp_path):
    """The Kernels chapter keeps the newest run per stage: after a whole-layer run,
    a --stages dispatch run replaces dispatch's records and leaves the others."""
    from analysis.chapters import kernels as chapter
    from analysis.measure import traffic as command

    shape = ["--T", "40", "--D", "64", "--F", "64", "--E", "4", "--k", "2", "--results-dir", str(tmp_path)]
    assert command.main(shape) == 0
    whole = chapter.traffic_records(tmp_path)
    assert command.main(shape + ["--stages", "dispatch"]) == 0
    shown = chapter.traffic_records(tmp_path)
    assert {r["stage"] for r in shown} == {r["stage"] for r in whole} >= {"route", "dispatch", "expert_mlp"}
    assert len(shown) == len(whole)
    newest = max(r["utc"] for r in shown)
    assert {r["stage"] for r in shown if r["utc"] == newest} == {"dispatch"}
