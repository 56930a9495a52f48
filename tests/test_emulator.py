"""The CUDA emulator (kernels/topk_moe/cuda/emulator) against the definitions it implements.

Each test builds tests/test_emulator_kernels.cu with the emulator, exactly as
the real kernels are built, and checks one feature against an independent
statement of its definition: NumPy for float16 conversions, the PTX ISA's
fragment tables written out lane by lane for ldmatrix and mma, the CUDA
Programming Guide's rules for shuffles, votes and match_any, the PTX ISA's
cp.async group semantics. The fault tests show each fault class surfacing as
an error that names the kernel, never as silent garbage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from topk_moe.backends import emulator_unavailable_reason

REASON = emulator_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"the CUDA emulator can't run here: {REASON}")

SOURCE = Path(__file__).resolve().parent / "test_emulator_kernels.cu"


def kernel(name):
    from topk_moe.cuda.emulator import loader

    return loader.load_kernel(SOURCE, name)


def device(a):
    from topk_moe.cuda.emulator import arrays

    return arrays.asarray(a)


def empty(shape, dtype):
    from topk_moe.cuda.emulator import arrays

    return arrays.empty(shape, dtype)


# ---------------------------------------------------------------------------
# float16: every half, and a large sample of floats, against NumPy (both round
# to nearest even; NaN payloads are not compared, NaN-ness is)


def assert_same_bits_or_both_nan(got_bits, want_bits, as_float):
    got_nan, want_nan = np.isnan(got_bits.view(as_float)), np.isnan(want_bits.view(as_float))
    np.testing.assert_array_equal(got_nan, want_nan)
    np.testing.assert_array_equal(got_bits[~got_nan], want_bits[~want_nan])


def test_every_half_converts_to_float_exactly():
    halves = np.arange(65536, dtype=np.uint16)
    out = empty(65536, np.float32)
    kernel("half_to_float_all")((256,), (256,), (device(halves), out, np.int64(65536)))
    want = halves.view(np.float16).astype(np.float32)
    assert_same_bits_or_both_nan(out.view(np.uint32), want.view(np.uint32), np.float32)


def float_sample():
    rng = np.random.default_rng(0)
    random_bits = rng.integers(0, 2**32, size=1 << 20, dtype=np.uint64).astype(np.uint32)
    # every half's neighbourhood: exact halves, the halfway points between
    # neighbours (ties to even), one float ulp either side of them
    halves = np.arange(65536, dtype=np.uint16).view(np.float16)
    finite = np.sort(halves[np.isfinite(halves)].astype(np.float64))
    midpoints = ((finite[:-1] + finite[1:]) / 2).astype(np.float32)
    near = np.concatenate([midpoints, np.nextafter(midpoints, np.float32(np.inf)),
                           np.nextafter(midpoints, np.float32(-np.inf)), finite.astype(np.float32),
                           np.float32([65504, 65519.996, 65520, 1e-8, 2.9802322e-08, 2.9802326e-08, 6e-8,
                                       np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-40, -1e-40])])
    return np.concatenate([random_bits.view(np.float32), near])


def test_floats_round_to_the_nearest_even_half():
    values = float_sample()
    n = values.size
    out = empty(n, np.uint16)
    kernel("float_to_half_all")((-(-n // 256),), (256,), (device(values), out, np.int64(n)))
    with np.errstate(over="ignore"):
        want = values.astype(np.float16).view(np.uint16)
    assert_same_bits_or_both_nan(np.asarray(out), want, np.float16)


def test_cuda_fp16_header_functions_agree_with_the_ptx_conversions():
    values = float_sample()[:200_000]
    n = values.size
    bits, back = empty(n, np.uint16), empty(n, np.float32)
    kernel("fp16_header_round_trip")((-(-n // 256),), (256,), (device(values), bits, back, np.int64(n)))
    with np.errstate(over="ignore"):
        want = values.astype(np.float16)
    assert_same_bits_or_both_nan(np.asarray(bits), want.view(np.uint16), np.float16)
    assert_same_bits_or_both_nan(np.asarray(back).view(np.uint32), want.astype(np.float32).view(np.uint32),
                                 np.float32)


def test_float32_subnormals_flush_to_zero_as_with_cupys_ftz():
    a = np.float32([1e-20, 1e-30, 3.0, -1e-20])
    b = np.float32([1e-20, 1e10, 2.0, 1e-20])  # 1e-40 and -1e-40 are float32 subnormals
    out = empty(4, np.float32)
    kernel("multiply")((1,), (4,), (device(a), device(b), out))
    np.testing.assert_array_equal(out, np.float32([0.0, 1e-20, 6.0, -0.0]))
    assert np.signbit(out[3])
    assert np.float32(1e-20) * np.float32(1e-20) != 0  # NumPy, after the launch, is not flushed


# ---------------------------------------------------------------------------
# warp collectives (CUDA C++ Programming Guide, "Warp Shuffle Functions",
# "Warp Vote Functions", "Warp Match Functions")


def shuffle_model(values, lane, source, width=32):
    """The value lane `lane` receives from `source`, which is computed within
    the lane's segment of `width` lanes; out of the segment a lane keeps its own."""
    return values[source] if lane // width == source // width and 0 <= source < 32 else values[lane]


def test_shuffles_votes_and_match_any_lane_by_lane():
    values = np.random.default_rng(3).integers(0, 50, size=64).astype(np.int32)
    out = empty(64 * 12, np.int32)
    kernel("collectives")((1,), (64,), (device(values), out))
    out = np.asarray(out).reshape(64, 12)
    for warp in range(2):
        v = values[warp * 32:(warp + 1) * 32]
        for lane in range(32):
            row = out[warp * 32 + lane]
            assert row[0] == v[31 - lane]
            assert row[1] == (v[lane - 3] if lane >= 3 else v[lane])
            assert row[2] == (v[lane + 5] if lane + 5 < 32 else v[lane])
            assert row[3] == v[lane ^ 6]
            assert row[4] == shuffle_model(v, lane, lane ^ 1, 8)
            assert row[5] == v[(lane // 16) * 16 + 2]
            assert row[6] == int((v > 40).any())
            assert row[7] == 1
            assert np.uint32(row[8]) == sum(1 << i for i in range(32) if v[i] & 1)
            assert np.uint32(row[9]) == sum(1 << i for i in range(32) if v[i] % 3 == v[lane] % 3)
            assert row[10] == 7
            assert row[11] == v[lane ^ 16]  # 64-bit values shuffle whole


def test_atomics_and_barriers_count_every_thread_of_every_block():
    values = np.random.default_rng(4).integers(0, 100, size=96).astype(np.int32)
    counts, total = empty(3 * 4, np.int32), device(np.zeros(1, np.int32))
    kernel("count_and_scan")((3,), (96,), (device(values), counts, total))
    np.testing.assert_array_equal(np.asarray(counts).reshape(3, 4), np.tile(np.bincount(values & 3, minlength=4), (3, 1)))
    assert total[0] == 3 * 96


# ---------------------------------------------------------------------------
# ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16
# PTX ISA 9.7.14.5.15 (ldmatrix), figure "ldmatrix fragment layout": for .x4, lanes
# 8i..8i+7 supply the row addresses of matrix i; each 8 x 8 matrix is delivered
# into register i of every lane: lane l holds row l / 4, elements 2 (l % 4) and
# 2 (l % 4) + 1 (lower element in the lower 16 bits). With .trans the matrix is
# transposed on the way: lane l holds column l / 4 of rows 2 (l % 4) and 2 (l % 4) + 1.

def ldmatrix_table(trans):
    """(lane, register) -> ((matrix, row, column) of the low half, ... of the high half)."""
    table = {}
    for lane in range(32):
        for register in range(4):
            if not trans:
                low = (register, lane // 4, 2 * (lane % 4))
                high = (register, lane // 4, 2 * (lane % 4) + 1)
            else:
                low = (register, 2 * (lane % 4), lane // 4)
                high = (register, 2 * (lane % 4) + 1, lane // 4)
            table[lane, register] = (low, high)
    return table


def test_ldmatrix_x4_table_as_in_the_ptx_isa():
    # a few rows of the ISA's figure, written out by hand
    table = ldmatrix_table(False)
    assert table[0, 0] == ((0, 0, 0), (0, 0, 1)) and table[1, 0] == ((0, 0, 2), (0, 0, 3))
    assert table[4, 2] == ((2, 1, 0), (2, 1, 1)) and table[31, 3] == ((3, 7, 6), (3, 7, 7))
    trans = ldmatrix_table(True)
    assert trans[0, 0] == ((0, 0, 0), (0, 1, 0)) and trans[1, 1] == ((1, 2, 0), (1, 3, 0))
    assert trans[31, 3] == ((3, 6, 7), (3, 7, 7))


@pytest.mark.parametrize("trans", [False, True], ids=["x4", "x4.trans"])
def test_ldmatrix_delivers_the_isa_fragments(trans):
    # 32 distinct shared rows, addressed in a scrambled order: matrix i row r is the
    # shared row row_of_lane[8 i + r]; element (row s, column c) holds s * 8 + c.
    tile = np.arange(32 * 8, dtype=np.uint16)
    row_of_lane = np.random.default_rng(5).permutation(32).astype(np.int32)
    out = empty(32 * 4, np.uint32)
    kernel("ldmatrix_table")((1,), (32,), (device(tile), device(row_of_lane), np.int32(trans), out))
    out = np.asarray(out).reshape(32, 4)
    for (lane, register), (low, high) in ldmatrix_table(trans).items():
        def element(position):
            matrix, row, column = position
            return row_of_lane[8 * matrix + row] * 8 + column
        want = element(low) | (element(high) << 16)
        assert out[lane, register] == want, (lane, register)


# ---------------------------------------------------------------------------
# mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32
# PTX ISA 9.7.13.4.8, "Matrix Fragments for mma.m16n8k16 with floating point type";
# groupID g = lane / 4, threadID_in_group t = lane % 4:
#   A: a0,a1 (g, 2t), (g, 2t+1); a2,a3 (g+8, 2t..); a4,a5 (g, 2t+8..); a6,a7 (g+8, 2t+8..)
#      (two f16 per 32-bit register: register i holds elements 2i, 2i+1)
#   B: b0,b1 (k 2t, 2t+1; n g); b2,b3 (k 2t+8, 2t+9; n g)
#   C/D: c0,c1 (g, 2t), (g, 2t+1); c2,c3 (g+8, 2t), (g+8, 2t+1)

def mma_a_position(lane, element):
    g, t = lane // 4, lane % 4
    row = g + 8 * ((element // 2) % 2)
    column = 2 * t + (element % 2) + 8 * (element // 4)
    return row, column


def mma_b_position(lane, element):
    g, t = lane // 4, lane % 4
    return 2 * t + (element % 2) + 8 * (element // 2), g


def mma_c_position(lane, element):
    g, t = lane // 4, lane % 4
    return g + 8 * (element // 2), 2 * t + (element % 2)


def test_mma_tables_cover_each_matrix_once():
    assert sorted(mma_a_position(l, i) for l in range(32) for i in range(8)) == [(r, c) for r in range(16) for c in range(16)]
    assert sorted(mma_b_position(l, i) for l in range(32) for i in range(4)) == [(k, n) for k in range(16) for n in range(8)]
    assert sorted(mma_c_position(l, i) for l in range(32) for i in range(4)) == [(r, c) for r in range(16) for c in range(8)]
    assert mma_a_position(5, 0) == (1, 2) and mma_a_position(5, 3) == (9, 3) and mma_a_position(5, 6) == (9, 10)
    assert mma_b_position(6, 2) == (12, 1) and mma_c_position(31, 3) == (15, 7)


def test_mma_m16n8k16_computes_a_times_b_plus_c():
    rng = np.random.default_rng(6)
    A = rng.standard_normal((16, 16)).astype(np.float16)
    B = rng.standard_normal((16, 8)).astype(np.float16)
    C = rng.standard_normal((16, 8)).astype(np.float32)
    a_halves = np.array([[A[mma_a_position(l, i)] for i in range(8)] for l in range(32)], np.float16)
    b_halves = np.array([[B[mma_b_position(l, i)] for i in range(4)] for l in range(32)], np.float16)
    c_values = np.array([[C[mma_c_position(l, i)] for i in range(4)] for l in range(32)], np.float32)
    d = empty(32 * 4, np.float32)
    kernel("mma_registers")((1,), (32,), (device(a_halves.view(np.uint32)), device(b_halves.view(np.uint32)),
                                          device(c_values), d))
    d = np.asarray(d).reshape(32, 4)
    D = np.zeros((16, 8), np.float32)
    for l in range(32):
        for i in range(4):
            D[mma_c_position(l, i)] = d[l, i]
    exact = A.astype(np.float64) @ B.astype(np.float64) + C
    np.testing.assert_allclose(D, exact, rtol=2**-23, atol=1e-6)


# ---------------------------------------------------------------------------
# cp.async (PTX ISA 9.7.9.25.3: cp.async, cp.async.commit_group, cp.async.wait_group)


@pytest.mark.parametrize("copy_async", ["late", "eager"])
def test_cp_async_groups_zero_fill_and_wait(copy_async):
    from topk_moe.cuda.emulator import loader

    source = np.arange(1, 17, dtype=np.uint16)
    out = empty(24, np.uint16)
    with loader.schedule(copy_async=copy_async):
        kernel("copy_async_groups")((1,), (1,), (device(source), np.int32(6), out))
    out = np.asarray(out)
    np.testing.assert_array_equal(out[:8], source[:8])  # wait_group 1: the older group has landed
    if copy_async == "late":  # the newer one need not have: here it has not (poison)
        np.testing.assert_array_equal(out[8:16], 0xFFFF)
    final = np.concatenate([source[8:11], np.zeros(5, np.uint16)])  # 6 bytes copied, 10 zero-filled
    np.testing.assert_array_equal(out[16:], final)


# ---------------------------------------------------------------------------
# faults: each an error naming the kernel


def fault():
    from topk_moe.cuda.emulator.loader import KernelFault

    return KernelFault


def test_a_barrier_after_an_early_exit_is_an_error():
    with pytest.raises(fault(), match=r"barrier_after_early_exit.*__syncthreads reached by 63 of 64"):
        kernel("barrier_after_early_exit")((1,), (64,), (empty(64, np.int32),))


def test_a_collective_naming_exited_lanes_is_an_error():
    with pytest.raises(fault(), match=r"shuffle_with_exited_lanes.*__shfl_xor_sync.*has exited"):
        kernel("shuffle_with_exited_lanes")((1,), (32,), (empty(32, np.int32),))


def test_an_out_of_bounds_write_hits_the_guard_zone():
    with pytest.raises(fault(), match=r"write_one_past_the_end: wrote outside argument 0 \(\d+ bytes past the end"):
        kernel("write_one_past_the_end")((1,), (32,), (empty(10, np.float32), np.int64(10)))


def test_a_misaligned_vector_load_names_its_line():
    line = next(i for i, text in enumerate(SOURCE.read_text().splitlines(), 1) if "in + 1" in text)
    with pytest.raises(fault(), match=rf"misaligned_vector_load.*test_emulator_kernels.cu:{line}: misaligned"):
        kernel("misaligned_vector_load")((1,), (1,), (device(np.zeros(8, np.float32)), empty(1, np.float32)))


@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_a_missing_barrier_reads_poison(order):
    from topk_moe.cuda.emulator import loader

    out = empty(64, np.float32)
    with loader.schedule(order):
        kernel("read_shared_before_it_is_written")((1,), (64,), (out,))
    assert np.isnan(out).sum() == 32  # the half that ran first read shared memory nobody had written


def test_launch_bounds_and_block_size_are_checked():
    with pytest.raises(fault(), match=r"bounded.*exceeds __launch_bounds__\(64\)"):
        kernel("bounded")((1,), (128,), (empty(128, np.int32),))
    with pytest.raises(fault(), match="1 to 1024"):
        kernel("bounded")((1,), (2048,), (empty(2048, np.int32),))


def test_arguments_must_have_the_kernels_c_types():
    out = empty(1, np.int64)
    with pytest.raises(TypeError, match=r"takes_long_long, argument 0: expected numpy.int64"):
        kernel("takes_long_long")((1,), (1,), (np.int32(5), out))
    with pytest.raises(TypeError, match="emulator device array"):
        kernel("takes_long_long")((1,), (1,), (np.int64(5), np.zeros(1, np.int64)))
    with pytest.raises(TypeError, match="8-byte integers"):
        kernel("takes_long_long")((1,), (1,), (np.int64(5), empty(1, np.int32)))
    kernel("takes_long_long")((1,), (1,), (np.int64(2**40 + 3), out))
    assert out[0] == 2**40 + 3


def test_unknown_ptx_is_refused_at_build_time(tmp_path):
    from topk_moe.cuda.emulator import build, rewrite

    source = tmp_path / "unknown.cu"
    source.write_text('extern "C" __global__ void k(float* a) {\n'
                      '    asm volatile("bar.sync 0;");\n}\n')
    with pytest.raises(rewrite.RewriteError, match=r"unknown.cu:2: .*does not implement the PTX instruction 'bar.sync'"):
        build.build("unknown.cu", (), tmp_path)


def test_rewrites_keep_every_line_where_it_was():
    """Only asm statements, __shared__ declarations and the blanked system include
    change, each within its own lines; everything else stays on its line."""
    from topk_moe.cuda.emulator import rewrite

    folder = Path(__file__).resolve().parent.parent / "kernels" / "topk_moe" / "cuda"
    for path in sorted(folder.glob("*.cu")) + sorted(folder.glob("*.cuh")):
        lines = path.read_text().splitlines()
        new_lines = rewrite.rewrite(path.read_text(), path.name).splitlines()
        assert "launch entries" in "".join(new_lines[len(lines):len(lines) + 2]), path.name  # after the last line
        for number, (old, new) in enumerate(zip(lines, new_lines)):
            if old != new:
                statement = " ".join(lines[max(0, number - 5):number + 1])
                assert any(word in statement for word in ("asm", "__shared__", "#include <")), \
                    f"{path.name}:{number + 1} changed: {old!r} -> {new!r}"
