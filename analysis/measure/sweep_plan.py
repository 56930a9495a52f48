"""What the sweep measures: the layer shapes (``PRESETS``), the token counts and the plans.

Kept apart from the runner (``analysis.measure.sweep``) so that anything that
only needs a preset's shape (the utilisation profiler, the chapters) imports
this small module and nothing of the run. The plans are described in the
runner's docstring.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from analysis.measure import skew, timing

@dataclasses.dataclass(frozen=True)
class Shape:
    """One MoE layer shape (a named preset)."""

    d_model: int
    d_ff: int
    n_experts: int
    activation: str = "swiglu"

    def config(self, k: int):
        import topk_moe  # noqa: PLC0415

        return topk_moe.MoEConfig(self.d_model, self.d_ff, self.n_experts, k, activation=self.activation)


PRESETS = {
    "small": Shape(1024, 4096, 8),
    "mixtral": Shape(4096, 14336, 8),
    "fine": Shape(2048, 1408, 64),
    "cpu": Shape(512, 1024, 8),
    "tiny": Shape(64, 128, 4),
}

#: The issue's token counts, plus 8192, where the expert-GEMM goal is judged.
GPU_TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 8192, 16384, 32768)
CPU_TOKENS = (1, 4, 16, 64, 256, 1024, 4096)
#: What a block measures: the five stages, the whole layer, the whole layer as
#: CUDA-graph replays (GPU, small T), the peers, the dense baselines, the GEMMs alone.
EVERYTHING = frozenset({"stages", "end_to_end", "graph", "peers", "dense", "gemm"})
LAYER_ONLY = frozenset({"stages", "end_to_end"})


@dataclasses.dataclass(frozen=True)
class Block:
    """Cells: every preset x dtype x k x skew x T, each measuring ``what``."""

    presets: tuple
    tokens: tuple
    top_ks: tuple = (1, 2)
    dtypes: tuple = ("float16",)
    skews: tuple = ("uniform",)
    what: frozenset = EVERYTHING


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    device: str
    blocks: tuple
    budget: timing.Budget = timing.Budget()
    #: Nsight Compute and NVML on (preset, T, dtype), both k; None: not measured.
    utilisation: Optional[tuple] = None
    budget_s: Optional[float] = None
    #: The ceilings' sizes; None: ``sweep_cells.CEILING_COPY_BYTES`` / ``CEILING_GEMM_N``
    #: (the ceiling records say which sizes were used either way).
    ceiling_copy_bytes: Optional[int] = None
    ceiling_gemm_n: Optional[int] = None
    #: The cells the goal table judges (preset, dtype).
    judged: tuple = ("mixtral", "float16")


PLANS = {
    "gpu-default": Plan(
        "gpu-default", "cuda",
        blocks=(
            Block(("mixtral",), GPU_TOKENS),
            Block(("mixtral",), (4096,), skews=skew.SKEWS[1:], what=LAYER_ONLY),
            Block(("small", "fine"), (1, 16, 256, 4096), dtypes=("float16", "float32")),
        ),
        budget=timing.Budget(seconds_per_measurement=0.25, min_repeats=5, max_repeats=30),
        utilisation=("mixtral", 8192, "float16"), budget_s=330.0,
    ),
    "gpu-full": Plan(
        "gpu-full", "cuda",
        blocks=(Block(("small", "mixtral", "fine"), GPU_TOKENS, dtypes=("float16", "float32"),
                      skews=skew.SKEWS),),
        utilisation=("mixtral", 8192, "float16"),
    ),
    "cpu-default": Plan(
        "cpu-default", "cpu",
        blocks=(
            Block(("cpu",), CPU_TOKENS, dtypes=("float32",)),
            Block(("cpu",), (1024,), dtypes=("float32",), skews=skew.SKEWS[1:], what=LAYER_ONLY),
        ),
        budget=timing.Budget(seconds_per_measurement=0.4, min_repeats=3, max_repeats=20),
        budget_s=900.0, judged=("cpu", "float32"),
    ),
    "cpu-tiny": Plan(
        "cpu-tiny", "cpu",
        blocks=(
            Block(("tiny",), (1, 16, 128), dtypes=("float32",)),
            Block(("tiny",), (16,), dtypes=("float32",), skews=skew.SKEWS[1:], what=LAYER_ONLY),
        ),
        budget=timing.Budget(seconds_per_measurement=0.005, min_repeats=2, max_repeats=3),
        ceiling_copy_bytes=8 * 2**20, ceiling_gemm_n=256, judged=("tiny", "float32"),
    ),
}


def default_plan_name() -> str:
    from topk_moe.backends import cuda_unavailable_reason  # noqa: PLC0415 - imports CuPy where present

    return "gpu-default" if cuda_unavailable_reason() is None else "cpu-default"


def with_overrides(plan: Plan, **overrides) -> Plan:
    """``plan`` with each given block field (presets, tokens, top_ks, dtypes,
    skews) replaced in every block; duplicate blocks are dropped."""
    given = {field: tuple(value) for field, value in overrides.items() if value is not None}
    if not given:
        return plan
    blocks = []
    for block in plan.blocks:
        changed = dataclasses.replace(block, **given)
        if changed not in blocks:
            blocks.append(changed)
    return dataclasses.replace(plan, blocks=tuple(blocks))


def check_plan(plan: Plan) -> None:
    """Refuse what cannot run, before anything is measured."""
    for block in plan.blocks:
        unknown = [name for name in block.presets if name not in PRESETS]
        if unknown:
            raise ValueError(f"presets: expected names from {sorted(PRESETS)}, got {unknown}")
        if plan.device == "cpu" and "float16" in block.dtypes:
            raise ValueError("dtypes: the cpu backend computes in float32 or float64, got float16")
        for name in block.skews:
            skew.skew_probabilities(name, 4)
        if any(T < 1 for T in block.tokens):
            raise ValueError(f"tokens: expected positive counts, got {list(block.tokens)}")
        if any(k not in (1, 2) for k in block.top_ks):
            raise ValueError(f"k: expected 1 or 2, got {list(block.top_ks)}")


def cells(plan: Plan) -> list:
    """(block, preset, dtype, T, k, skew) in run order: one layer shape and
    dtype at a time, so its weights are made once."""
    order = []
    for block in plan.blocks:
        for preset in block.presets:
            for dtype in block.dtypes:
                for T in block.tokens:
                    for k in block.top_ks:
                        for skew_name in block.skews:
                            order.append((block, preset, dtype, T, k, skew_name))
    return order
