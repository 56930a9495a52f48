"""The GPU model (issue 21): occupancy by the documented rules against cases
worked by hand, grids as the launchers make them, and floors that stay below a
published measurement. Everything it computes is predicted (model), not measured."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.measure import gpu_model, gpu_occupancy
from analysis.measure.sweep_plan import Shape


# ---------------------------------------------------------------- occupancy, by hand


def test_v3_gemm_on_h100_is_limited_by_registers():
    # 126 registers x 32 lanes = 4032 -> 4096 per warp; 16384 per sub-partition
    # hold 4 warps, 16 per SM: two 8-warp blocks. Shared: 38912 + 1024 = 39936
    # bytes (a multiple of 128) would allow 233472 // 39936 = 5.
    result = gpu_occupancy.occupancy(90, 256, 126, 38912)
    assert result.registers_per_warp == 4096 and result.shared_bytes_per_block == 39936
    assert result.limits == {"warps": 8, "blocks": 32, "registers": 2, "shared memory": 5}
    assert (result.blocks_per_sm, result.occupancy, result.limiter) == (2, 0.25, "registers")
    # sm_80 has 164 KiB: 167936 // 39936 = 4 blocks by shared memory, still 2 by registers.
    assert gpu_occupancy.occupancy(80, 256, 128, 38912).limits["shared memory"] == 4


def test_shared_memory_limit_counts_the_reserved_kib_and_rounds_to_128_bytes():
    # 40000 + 1024 = 41024 -> 41088 (321 x 128); 167936 // 41088 = 4 blocks of 2 warps.
    result = gpu_occupancy.occupancy(80, 64, 32, 40000)
    assert result.shared_bytes_per_block == 41088
    assert (result.blocks_per_sm, result.limiter, result.occupancy) == (4, "shared memory", 8 / 64)


def test_one_warp_blocks_stop_at_32_blocks_per_sm():
    result = gpu_occupancy.occupancy(90, 32, 16)
    assert (result.blocks_per_sm, result.limiter, result.occupancy) == (32, "blocks", 0.5)


def test_ties_name_every_limiter():
    # 32 registers: 1024 per warp, 16 warps per sub-partition, 64 per SM = 8 blocks of 8 warps = warps' limit.
    result = gpu_occupancy.occupancy(80, 256, 32)
    assert (result.blocks_per_sm, result.limiter, result.occupancy) == (8, "registers and warps", 1.0)


def test_registers_round_up_to_256_per_warp():
    # 33 and 40 registers both take 1280 per warp: 12 warps per sub-partition, 48 per SM, 16 blocks of 3 warps.
    for registers in (33, 40):
        result = gpu_occupancy.occupancy(80, 96, registers)
        assert result.registers_per_warp == 1280
        assert (result.blocks_per_sm, result.limiter, result.occupancy) == (16, "registers", 0.75)


def test_a_block_that_does_not_fit_gets_no_blocks():
    # 64 registers x 1024 threads is exactly the 65536 of a block; 65 rounds to 2304 per warp, 73728 in all.
    assert gpu_occupancy.occupancy(90, 1024, 64).blocks_per_sm == 1
    too_many = gpu_occupancy.occupancy(90, 1024, 65)
    assert (too_many.blocks_per_sm, too_many.limiter) == (0, "registers")
    # 50000 bytes + 1 KiB exceed the default 48 KiB + 1 KiB per block; opting in allows 3 blocks.
    assert gpu_occupancy.occupancy(80, 128, 32, 40000, 10000).limiter == "shared memory"
    assert gpu_occupancy.occupancy(80, 128, 32, 40000, 10000).blocks_per_sm == 0
    assert gpu_occupancy.occupancy(80, 128, 32, 40000, 10000, optin=True).blocks_per_sm == 167936 // 51072


def test_carveouts():
    assert gpu_occupancy.carveout_bytes(80, None) == 164 * 1024
    assert gpu_occupancy.carveout_bytes(80, 50_000) == 64 * 1024
    assert gpu_occupancy.carveout_bytes(90, 200 * 1024) == 228 * 1024
    with pytest.raises(ValueError, match="requested_bytes"):
        gpu_occupancy.carveout_bytes(80, 200 * 1024)
    # A 32 KiB carve-out holds two blocks of 10240 + 1024 bytes.
    result = gpu_occupancy.occupancy(90, 128, 32, 10240, carveout=32 * 1024)
    assert (result.blocks_per_sm, result.limiter, result.shared_per_sm) == (2, "shared memory", 32 * 1024)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="arch"):
        gpu_occupancy.occupancy(75, 256, 32)
    with pytest.raises(ValueError, match="threads_per_block"):
        gpu_occupancy.occupancy(80, 2048, 32)
    with pytest.raises(ValueError, match="registers"):
        gpu_occupancy.occupancy(80, 256, -1)


def test_waves():
    wave = gpu_occupancy.waves(300, 2, 132)
    assert (wave.capacity, wave.waves) == (264, 2) and wave.last_wave_fill == pytest.approx(36 / 264)
    assert gpu_occupancy.waves(264, 2, 132).last_wave_fill == 1.0
    assert gpu_occupancy.waves(0, 2, 132).waves == 0


# ---------------------------------------------------------------- routing and grids


def test_touched_experts_under_uniform_routing():
    for k in (1, 2):
        shares = gpu_model.uniform_shares(8, k)
        assert gpu_model.touched_experts(1, shares) == pytest.approx(k)
        for T in (3, 17, 100):
            assert gpu_model.touched_experts(T, shares) == pytest.approx(8 * (1 - (1 - k / 8) ** T))
    assert gpu_model.touched_experts(10_000, gpu_model.uniform_shares(8, 2)) == pytest.approx(8)
    # One expert that takes every token is one expert touched, whatever T.
    assert gpu_model.touched_experts(50, [1.0, 0, 0, 0]) == 1.0


def test_shares_from_routing():
    experts = np.array([[0, 1], [0, 2], [3, 0]])
    assert gpu_model.shares_from_routing(experts, 4).tolist() == [1.0, 1 / 3, 1 / 3, 1 / 3]
    with pytest.raises(ValueError, match="experts"):
        gpu_model.shares_from_routing(np.zeros((0, 2)), 4)


def test_grids_follow_the_launchers():
    from topk_moe.cuda import expert_mlp

    shape, h100 = Shape(4096, 14336, 8), gpu_model.DEVICES["H100 SXM"]
    (router,) = gpu_model.stage_launches("router", shape, 2, 17, h100)
    assert (router.kernel, router.blocks) == ("router_top2_f16", 3)  # 8 tokens per block
    count, scan, offsets, scatter = gpu_model.stage_launches("dispatch", shape, 2, 1000, h100)
    assert count.blocks == scatter.blocks == 1 and scan.blocks == 8 and offsets.blocks == 1  # 2000 / 256 -> 8 warps
    (permute,) = gpu_model.stage_launches("permute", shape, 2, 32768, h100)
    assert permute.blocks == 32 * 132  # grid-stride: at most 32 blocks per SM
    starts, hidden = gpu_model.stage_launches("expert_gemm1", shape, 2, 4096, h100)
    assert hidden.kernel == "expert_mlp_v3_hidden_f16"
    assert hidden.blocks == expert_mlp.row_tile_bound(8192, 8, 128) * (14336 // 64)
    assert hidden.working_blocks == 8 * (1024 // 128) * (14336 // 64)  # 1024 rows per expert
    (decode,) = gpu_model.stage_launches("expert_gemm2", shape, 1, 1, h100)
    assert decode.kernel == "expert_mlp_decode_out_f16"
    assert (decode.blocks, decode.working_blocks) == (4096 // 32 * 8, 4096 // 32)  # one expert works
    assert gpu_model.stage_launches("dense_gemm1", shape, 0, 64, h100)[0].blocks is None


# ---------------------------------------------------------------- floors


def test_decode_is_memory_bound_on_the_touched_weights():
    shape, a100 = Shape(4096, 14336, 8), gpu_model.DEVICES["A100 SXM"]
    floor, version = gpu_model.stage_floor("expert_gemm1", shape, 1, 1, a100)
    weights = 2 * 4096 * 14336 * 2  # one expert's w1 and w3, float16
    assert version == "decode" and floor.bound == "memory"
    assert floor.memory_s == pytest.approx((weights + 2 * 4096 + 2 * 14336) / 2.039e12)
    assert floor.seconds == pytest.approx(floor.memory_s + gpu_model.LAUNCH_OVERHEAD_S)  # decode: one launch


def test_prefill_gemms_are_compute_bound_and_tiny_stages_launch_bound():
    shape, h100 = Shape(4096, 14336, 8), gpu_model.DEVICES["H100 SXM"]
    floor, version = gpu_model.stage_floor("expert_gemm2", shape, 2, 8192, h100)
    assert version == "v3" and floor.bound == "compute"
    assert floor.compute_s == pytest.approx(2 * 16384 * 14336 * 4096 / (1979e12 / 2))
    assert floor.utilisation()["compute"] == pytest.approx(floor.compute_s / floor.seconds)
    assert gpu_model.stage_floor("dispatch", shape, 1, 1, h100)[0].bound == "launch"


def test_the_floor_is_below_every_published_h100_time():
    found = gpu_model.sanity_records()
    assert [r["tokens"] for r in found] == [1, 8, 256, 1024]
    for record in found:
        assert record["floor_below_published"] and record["published_over_floor"] > 1
        assert record["published_over_floor"] == pytest.approx(record["published_s"] / record["floor_s"])
    # At one token two experts are read: 2 x 3 x 4096 x 7168 x 2 bytes at 3.35 TB/s, about 105 us.
    assert found[0]["floor_s"] == pytest.approx(2 * 3 * 4096 * 7168 * 2 / 3.35e12, rel=0.02)


def test_sector_excess_from_traffic_records():
    def record(stage, k, sectors, minimum, utc="2026-01-01"):
        return {"params": {"sources": "working tree", "k": k, "layer": "moe"}, "stage": stage, "utc": utc,
                "global_sectors": sectors, "global_min_sectors": minimum, "sector_bytes": 32 * sectors,
                "compulsory_bytes": 32 * minimum}

    found = [record("dispatch", 2, 136, 68), record("dispatch", 2, 24, 24), record("expert_mlp", 1, 10, 10),
             record("route", 1, 99, 9, utc="2025-01-01"), record("route", 1, 10, 10)]
    excess = gpu_model.sector_excess(found)
    assert excess[("dispatch", 2)] == pytest.approx(160 / 92)
    assert excess[("expert_gemm1", 1)] == excess[("expert_gemm2", 1)] == 1.0
    assert excess[("router", 1)] == 1.0  # the newest run only
    assert gpu_model.reread_factor([record("route", 2, 40, 10)]) == {2: 4.0}


def test_v2_bank_conflict_effect_by_hand():
    # 2.5x the 64 minimal wavefronts of a 16 x 128 float32 A-tile store: 96 extra, against
    # 128 x 128 x 16 FMAs per K step at 64 (A100) or 128 (H100) per clock per SM.
    rows = [r for r in gpu_model.effects({}, {}, 2.5, tokens=(1,)) if r["inefficiency"].startswith("v2")]
    assert [r["stage_change"] for r in rows] == [96 / 4096, 96 / 2048]


def test_records_have_exactly_the_issues_fields():
    row = {"file": "expert_mlp.cu", "kernel": "expert_mlp_v3_hidden_f16", "defines": {}, "registers": 126,
           "shared_bytes": 38912, "spill_stores": 0, "spill_loads": 0}
    occupancy = gpu_model.occupancy_record(row, 90)
    assert set(occupancy) - {"params"} == {"kernel", "arch", "threads_per_block", "registers", "shared_bytes",
                                           "blocks_per_sm", "occupancy", "limiter"}
    assert (occupancy["blocks_per_sm"], occupancy["limiter"]) == (2, "registers")
    predicted = gpu_model.predictions({}, tokens=(1, 4096), shapes={"mixtral": gpu_model.SHAPES["mixtral"]})
    fields = {"device_model", "stage", "k", "tokens", "d_model", "d_ff", "n_experts", "dtype", "bytes", "flops",
              "floor_s", "bound", "predicted_utilisation"}
    assert all(set(r) - {"params"} == fields for r in predicted)
    assert all(r["params"]["label"] == "predicted (model), not measured" for r in predicted)
    assert {r["bound"] for r in predicted} <= {"memory", "compute", "launch"}
    assert {r["k"] for r in predicted} == {0, 1, 2}
    layers = [r for r in predicted if r["stage"] == "layer" and r["k"] == 2 and r["device_model"] == "H100 SXM"]
    for layer in layers:
        stages = [r for r in predicted if r["stage"] in gpu_model.MOE_STAGES and r["k"] == 2
                  and r["tokens"] == layer["tokens"] and r["device_model"] == "H100 SXM"]
        assert layer["floor_s"] == pytest.approx(sum(r["floor_s"] for r in stages))


def test_study_routing_averages_each_seed_and_layer():
    study = {2: [{"shares": [0.5, 0.5, 0.5, 0.5]}, {"shares": [1.0, 1.0, 0.0, 0.0]}]}
    assert gpu_model.study_touched(3, study[2]) == pytest.approx((4 * (1 - 0.5**3) + 2) / 2)
    shape = {"tiny": Shape(64, 128, 4)}
    found = gpu_model.predictions({}, study, tokens=(3,), shapes=shape)
    routed = [r for r in found if r["k"] == 2 and r["params"]["routing"] == "study"]
    assert routed and all(math.isclose(r["params"]["touched_experts"], 2.75) for r in routed)


@pytest.mark.slow
def test_study_shares_come_from_the_trained_checkpoints():
    pytest.importorskip("torch", reason="the checkpoints need the torch extra")
    found = gpu_model.study_shares(max_bytes=1024)
    assert sorted(found) == [1, 2]
    for k, vectors in found.items():
        assert len(vectors) >= 3  # every seed's every MoE layer
        for vector in vectors:
            assert len(vector["shares"]) == 8 and sum(vector["shares"]) == pytest.approx(k)


def test_a_rerun_of_the_model_is_read_alone(tmp_path):
    """The model's files are appended to; readers take the newest run only, so
    a rerun does not double every floor and occupancy the chapter shows."""
    from conftest import write_model_records

    write_model_records(tmp_path, [1, 16])
    first = gpu_model.read_kind(gpu_model.PREDICTION_KIND, tmp_path)
    write_model_records(tmp_path, [1, 16, 256])
    newest = gpu_model.read_kind(gpu_model.PREDICTION_KIND, tmp_path)
    assert len({r["utc"] for r in newest}) == 1 and newest[0]["utc"] > first[0]["utc"]
    assert {r["tokens"] for r in newest} == {1, 16, 256} and {r["tokens"] for r in first} == {1, 16}
    assert len(gpu_model.read_kind(gpu_model.OCCUPANCY_KIND, tmp_path)) == 4  # two kernels x two archs, once
    assert gpu_model.read_kind(gpu_model.SANITY_KIND, tmp_path / "none") == []
