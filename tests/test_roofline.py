"""The FLOP and byte formulas against numbers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from analysis import roofline


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
