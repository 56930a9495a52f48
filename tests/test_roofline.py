"""The FLOP and byte formulas against numbers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.measure import roofline


def test_moe_flops_by_hand():
    # T=4, D=8, F=16, E=4, K=2, swiglu: 8 assignments x 3 GEMMs x 2*8*16 = 6144;
    # router 2*4*8*4 = 256.
    assert roofline.moe_flops(4, 8, 16, 4, 2, "swiglu") == 6144 + 256
    # relu has two GEMMs: 8 x 2 x 256 = 4096.
    assert roofline.moe_flops(4, 8, 16, 4, 2, "relu") == 4096 + 256
    assert roofline.moe_flops(4, 8, 16, 4, 2, "gelu") == 4096 + 256
    # Five kept assignments (three dropped): 5 x 3 x 256 = 3840.
    assert roofline.moe_flops(4, 8, 16, 4, 2, "swiglu", kept_assignments=5) == 3840 + 256


def test_dense_flops_by_hand():
    assert roofline.dense_flops(4, 8, 16, "swiglu") == 3 * 2 * 4 * 8 * 16
    assert roofline.dense_flops(4, 8, 16, "relu") == 2 * 2 * 4 * 8 * 16
    # Equal active FLOPs: dense width K*F matches MoE's expert FLOPs.
    assert roofline.dense_flops(4, 8, 2 * 16, "swiglu") == roofline.moe_flops(4, 8, 16, 4, 2, "swiglu") - 256


def test_byte_formulas_by_hand():
    # float32, T=2, D=8, F=16, swiglu: x and y 2*2*8, weights 3*8*16.
    assert roofline.dense_min_bytes(2, 8, 16, "swiglu", 4) == 4 * (32 + 384)
    # MoE, E=4, K=1, T=2: at most two experts used; router 8*4.
    assert roofline.moe_min_bytes(2, 8, 16, 4, 1, "swiglu", 4) == 4 * (32 + 32 + 2 * 384)
    assert roofline.moe_min_bytes(2, 8, 16, 4, 1, "swiglu", 4, experts_used=1) == 4 * (32 + 32 + 384)
    assert roofline.moe_min_bytes(64, 8, 16, 4, 2, "relu", 2) == 2 * (2 * 64 * 8 + 32 + 4 * 256)


def test_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        roofline.moe_flops(1, 1, 1, 1, 1, "tanh")


def test_sgemm_rate_is_plausible():
    rate = roofline.sgemm_rate(n=128, dtype=np.float32, warmup=1, repeats=3)
    assert 1e7 < rate < 1e14  # between a slow phone and a rack of GPUs


def test_stage_costs_by_hand():
    # T=4, D=8, F=16, E=4, K=2, swiglu, float16 (s=2); dropless: N=8; all 4 experts used.
    costs = roofline.stage_costs(4, 8, 16, 4, 2, "swiglu", 2)
    # router: x 4*8, router 8*4, probs 4*4, weights 4*2 (all *2 bytes); experts 4*2 int32.
    assert costs["router"] == roofline.Cost(2 * 4 * 8 * 4, 2 * (32 + 32 + 16 + 8) + 4 * 8, "router")
    # dispatch: experts 8 int32 read; token 8, row 8, counts+offsets 9, all int64.
    assert costs["dispatch"].flops == 0 and costs["dispatch"].bytes == 4 * 8 + 8 * (8 + 8 + 9)
    # permute: x 4*8 read, rows 8*8 written (s=2); token 8 int64.
    assert costs["permute"].bytes == 2 * (32 + 64) + 8 * 8
    # GEMM 1: rows 8*8, w1+w3 of 4 experts 2*4*8*16, hidden 8*16; FLOPs 2*8*8*16*2.
    assert costs["expert_gemm1"] == roofline.Cost(4096, 2 * (64 + 1024 + 128), "expert_gemm1")
    # GEMM 2: hidden 8*16, w2 4*16*8, out 8*8; FLOPs 2*8*16*8.
    assert costs["expert_gemm2"] == roofline.Cost(2048, 2 * (128 + 512 + 64), "expert_gemm2")
    # combine: out 8*8, weights 4*2, y 4*8 (s=2); row 8 int64.
    assert costs["combine"].bytes == 2 * (64 + 8 + 32) + 8 * 8
    assert costs["expert_mlp"].flops == 4096 + 2048
    assert costs["end_to_end"].flops == roofline.moe_flops(4, 8, 16, 4, 2, "swiglu")
    assert costs["end_to_end"].bytes == sum(costs[s].bytes for s in roofline.STAGES)
    # One expert used, three rows kept (drops): weights of one expert only.
    few = roofline.stage_costs(4, 8, 16, 4, 2, "relu", 4, kept_assignments=3, experts_used=1)
    assert few["expert_gemm1"] == roofline.Cost(2 * 3 * 8 * 16, 4 * (3 * 8 + 8 * 16 + 3 * 16), "expert_gemm1")


def test_dense_costs_and_roofline_by_hand():
    costs = roofline.dense_costs(2, 8, 16, "swiglu", 4)
    assert costs["gemm1"] == roofline.Cost(2 * 2 * 8 * 16 * 2, 4 * (16 + 2 * 128 + 32), "dense_gemm1")
    assert costs["gemm2"] == roofline.Cost(2 * 2 * 16 * 8, 4 * (32 + 128 + 16), "dense_gemm2")
    assert costs["end_to_end"].flops == roofline.dense_flops(2, 8, 16, "swiglu")
    # 1000 FLOPs at 100 FLOP/s = 10 s; 50 bytes at 10 B/s = 5 s: compute bound, 10 s.
    work = roofline.Cost(1000, 50, "x")
    assert roofline.roofline_seconds(work, 100.0, 10.0) == 10.0
    assert roofline.bound(work, 100.0, 10.0) == "compute"
    assert roofline.bound(work, 1000.0, 10.0) == "memory"
    assert roofline.pipeline_roofline_seconds([work, work], 100.0, 10.0) == 20.0
    assert (work + work).flops == 2000


def test_cpu_ceilings_are_plausible():
    assert 1e8 < roofline.copy_bandwidth("cpu", 4 * 2**20, warmup=1, repeats=3) < 1e13
    assert 1e7 < roofline.gemm_rate("cpu", np.float32, 128, warmup=1, repeats=3) < 1e14
    with pytest.raises(ValueError, match="device"):
        roofline.copy_bandwidth("tpu")
    with pytest.raises(ValueError, match="device"):
        roofline.gemm_rate("tpu")
