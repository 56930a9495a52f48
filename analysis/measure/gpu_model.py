"""What the MoE layer should cost on an A100 and an H100, predicted without a
GPU (issue 21): grids and waves per stage, a time floor per stage, and a
sanity check of that floor against a published measurement.

    python -m analysis.measure.gpu_model            # nvcc, the checkpoints; writes records
    python -m analysis.measure.gpu_model --no-write # prints the summary and the sanity ratios

Every number this module makes is **predicted (model), not measured**. Its
records go to ``results/predicted-model/`` (``PREDICTED_FOLDER``), apart from
the folders of the machines that measured something, in three kinds:

- ``gpu-occupancy``: one per kernel x architecture (sm_80, sm_90), from
  ptxas's registers and static shared memory, the launchers' block shapes and
  dynamic shared memory, and the allocation rules of ``gpu_occupancy``;
- ``gpu-prediction``: one per device x layer shape x k (0 for dense) x T x
  routing x stage: the floor of the stage's time and what bounds it;
- ``gpu-sanity``: the floor at the shapes of a published H100 measurement,
  and the measurement over the floor (it must be above 1).

The floor of a stage is

    max(bytes / HBM bandwidth, FLOPs / peak) + launches x LAUNCH_OVERHEAD_S

with the datasheet peaks of ``DEVICES``. ``bytes`` are the compulsory bytes of
``analysis.measure.roofline.stage_costs`` times the sectors the emulator
counted over the minimal sectors for the same requests (``sector_excess``,
from the committed ``traffic`` records): what the kernels' access patterns
fetch beyond the minimum. Re-reads that a cache serves (the router reading
its weights in every warp) are not DRAM bytes and are left out; ``effects``
says what they would cost if they were not cached. ``bound`` names the
largest of the three terms; ``predicted_utilisation`` is, per resource, the
achieved rate at the floor over the peak (``memory`` for HBM bandwidth,
``compute`` for the FLOP rate).

Assumptions (each also in the records' params):

- float16 data (the study's GPU dtype; bf16 has the same peaks), swiglu;
- expert weights read once per touched expert: with routing shares q_e (the
  fraction of tokens that choose expert e; they sum to k), T independent tokens
  touch sum_e 1 - (1 - q_e)^T experts on average, E (1 - (1 - k/E)^T) under
  uniform routing. Decode batches are independent sequences, which is what
  makes the tokens independent; the study's shares come from its trained
  checkpoints (``study_shares``);
- rows per expert are their expected share (T q_e) for the grids and the
  version rule; a real batch's busiest expert has more;
- the sm_90 expert GEMMs (v3) issue mma.sync, not wgmma. No NVIDIA document
  gives mma.sync's peak on H100; the dense FP16 tensor peak is used as an upper
  bound, so v3's compute floor on H100 is lower than any time it can reach;
- intermediates between stages go through HBM (every stage is its own kernel);
- the dense baseline's GEMMs are cuBLAS: their FLOPs and bytes are in the
  floor, their grids are not known here (no waves for them).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Iterable, Optional

import numpy as np

from analysis import records
from analysis.measure import gpu_occupancy, roofline
from analysis.measure.sweep_plan import PRESETS, Shape

LABEL = "predicted (model), not measured"
#: The results sub-folder of every model record: not a device that measured anything.
PREDICTED_FOLDER = "predicted-model"
OCCUPANCY_KIND = "gpu-occupancy"
PREDICTION_KIND = "gpu-prediction"
SANITY_KIND = "gpu-sanity"

#: Token counts of the predictions: 1 to 32768, powers of two.
TOKENS = tuple(2**i for i in range(16))
#: The layer shapes: the study's (the CPU preset, whose requests the emulator
#: counted) and Mixtral 8x7B's.
SHAPES = {"cpu": PRESETS["cpu"], "mixtral": PRESETS["mixtral"]}
DTYPE = "float16"
ITEMSIZE = 2
MOE_STAGES = roofline.STAGES
DENSE_STAGES = ("dense_gemm1", "dense_activation", "dense_gemm2")


# ---------------------------------------------------------------- the devices


@dataclasses.dataclass(frozen=True)
class Device:
    """A GPU's datasheet numbers."""

    model: str
    arch: int
    multiprocessors: int
    hbm_bytes_per_s: float
    tensor_flop_per_s: float  # dense FP16/BF16 tensor core, FP32 accumulate
    fp32_flop_per_s: float
    source: str


DEVICES = {
    "A100 SXM": Device(
        "A100 SXM", 80, 108, 2.039e12, 312e12, 19.5e12,
        "NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM: GPU memory bandwidth 2,039 GB/s; FP16 and "
        "BF16 Tensor Core 312 TFLOPS dense, 624 with sparsity; FP32 19.5 TFLOPS); 108 SMs: NVIDIA A100 "
        "Tensor Core GPU Architecture whitepaper"),
    "H100 SXM": Device(
        "H100 SXM", 90, 132, 3.35e12, 1979e12 / 2, 67e12,
        "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM: GPU memory bandwidth 3.35 TB/s; FP16 and BF16 "
        "Tensor Core 1,979 TFLOPS with sparsity, half of it, 989.5, dense; FP32 67 TFLOPS); 132 SMs: "
        "NVIDIA H100 Tensor Core GPU Architecture whitepaper"),
}

MMA_SYNC_NOTE = ("On sm_90 the expert GEMMs (v3) issue mma.sync, not wgmma; no NVIDIA document gives "
                 "mma.sync's peak on H100, so the dense FP16 tensor peak stands in as an upper bound: "
                 "v3's compute floor on H100 is below any time it can reach.")

#: Time between two kernels launched back to back, added once per launch.
LAUNCH_OVERHEAD_S = 0.5e-6
LAUNCH_SOURCE = ("NVIDIA Technical Blog, 'Getting Started with CUDA Graphs' (A. Gray, 2019): short kernels "
                 "launched back to back took about 0.9 us more than their run time each in a stream and "
                 "0.5 us more in a CUDA graph (V100); the smaller is taken, so the floor stays a floor")


# ---------------------------------------------------------------- kernels and their launch shapes


def launch_shape(kernel: str, n_experts: int = 8) -> tuple:
    """(threads per block, dynamic shared bytes) the launchers give ``kernel``
    (topk_moe.cuda.stages and expert_mlp)."""
    from topk_moe.cuda import expert_mlp as launcher
    from topk_moe.cuda import launch_config as config

    if kernel.startswith("router_"):
        return config.ROUTER_WARPS * config.WARP, 0
    if kernel in ("dispatch_count_segments", "dispatch_scatter"):
        warps = config.dispatch_warps_per_block(n_experts)
        return warps * config.WARP, config.dispatch_shared_bytes(kernel, n_experts)
    if kernel in ("dispatch_scan_segments", "dispatch_offsets"):
        return config.SCAN_THREADS, 0
    if kernel.startswith(("permute_rows_", "combine_")):
        return config.ROW_WARPS * config.WARP, 0
    if kernel.startswith("activate_"):
        return config.ELEMENTWISE_THREADS, 0
    if kernel.startswith("expert_mlp_v1_"):
        return launcher.COMPILE_DEFINES["V1_BLOCK_COLS"], 0
    if kernel.startswith("expert_mlp_"):
        return launcher.THREADS, 0
    raise ValueError(f"kernel: no launcher is known for {kernel!r}")


def kernel_resources(arch: int, n_experts: int = 8) -> list:
    """ptxas's report for sm_<arch> (nvcc needed), one row per kernel: the router
    compiled for ``n_experts``, every other kernel with its launcher's defines."""
    from topk_moe.cuda import build_report, launch_config

    router = launch_config.router_defines(n_experts)
    rows = build_report.resource_report(f"sm_{arch}")
    return [row for row in rows if row["file"] != "router.cu" or row["defines"] == router]


def occupancy_record(row: dict, arch: int, n_experts: int = 8) -> dict:
    """One ``gpu-occupancy`` record from one row of ptxas's report."""
    threads, dynamic = launch_shape(row["kernel"], n_experts)
    result = gpu_occupancy.occupancy(arch, threads, row["registers"], row["shared_bytes"], dynamic)
    return {
        "params": {"label": LABEL, "file": row["file"], "defines": row["defines"], "n_experts": n_experts,
                   "static_shared_bytes": row["shared_bytes"], "dynamic_shared_bytes": dynamic,
                   "allocated_shared_bytes": result.shared_bytes_per_block,
                   "allocated_registers_per_warp": result.registers_per_warp,
                   "spill_stores": row["spill_stores"], "spill_loads": row["spill_loads"],
                   "limits": result.limits, "carveout_bytes": result.shared_per_sm,
                   "rules": gpu_occupancy.RULES_SOURCE},
        "kernel": row["kernel"],
        "arch": arch,
        "threads_per_block": threads,
        "registers": row["registers"],
        "shared_bytes": row["shared_bytes"] + dynamic,
        "blocks_per_sm": result.blocks_per_sm,
        "occupancy": result.occupancy,
        "limiter": result.limiter,
    }


# ---------------------------------------------------------------- routing


def uniform_shares(n_experts: int, k: int) -> np.ndarray:
    """Each expert's share of the tokens under uniform routing: k / E each."""
    return np.full(n_experts, k / n_experts)


def touched_experts(tokens: int, shares) -> float:
    """Expected experts that T independent tokens touch: sum_e 1 - (1 - q_e)^T."""
    shares = np.asarray(shares, dtype=np.float64)
    if tokens < 0 or np.any(shares < 0) or np.any(shares > 1):
        raise ValueError(f"tokens, shares: expected T >= 0 and shares in [0, 1], got {tokens}, {shares}")
    return float(np.sum(1.0 - (1.0 - shares) ** tokens))


def shares_from_routing(experts, n_experts: int) -> np.ndarray:
    """q_e from routing decisions (N, K): the fraction of tokens with e among their K."""
    experts = np.asarray(experts)
    if experts.ndim != 2 or experts.shape[0] == 0:
        raise ValueError(f"experts: expected a non-empty (N, K) array, got shape {experts.shape}")
    return np.bincount(experts.reshape(-1), minlength=n_experts)[:n_experts] / experts.shape[0]


def study_shares(max_bytes: int = 1 << 14, results_dir=None) -> dict:
    """{k: [{"arm", "seed", "layer", "shares"} of every (seed, layer)]} of the
    accuracy study's trained moe-k1 and moe-k2 checkpoints (preset cpu), routed
    over ``max_bytes`` test bytes spread over every test file (needs torch)."""
    from analysis.study import corpus, evaluation
    from analysis.study.moe_model import load_checkpoint

    data = corpus.load_corpus()["test"]
    root = records.results_root(results_dir)
    found: dict = {}
    for record in evaluation.eval_records(results_dir, preset="cpu"):
        params = record["params"]
        if params["arm"] not in ("moe-k1", "moe-k2"):
            continue
        model, meta = load_checkpoint(root / params["checkpoint"])
        routing = evaluation.collect_routing(model, data, batch_size=meta["batch_size"], max_bytes=max_bytes)
        for layer, experts in enumerate(routing["experts"]):
            found.setdefault(model.cfg.top_k, []).append(
                {"arm": params["arm"], "seed": int(params["seed"]), "layer": layer,
                 "shares": shares_from_routing(experts, model.cfg.n_experts).tolist()})
    return found


# ---------------------------------------------------------------- grids


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch of a stage: the blocks it launches and those that work
    (the grouped GEMMs launch an upper bound of row tiles; the extra blocks exit)."""

    kernel: str
    blocks: Optional[int]  # None: a library kernel whose grid is not known here
    working_blocks: Optional[int]


def _ceil_div(a, b) -> int:
    return -(-int(a) // int(b))


def expert_rows(tokens: int, shares) -> np.ndarray:
    """Expected rows per expert: T q_e, whole rows summing to T k (largest remainders)."""
    shares = np.asarray(shares, dtype=np.float64)
    wanted = tokens * shares
    rows = np.floor(wanted).astype(np.int64)
    missing = int(round(tokens * shares.sum())) - int(rows.sum())
    if missing > 0:
        rows[np.argsort(-(wanted - rows), kind="stable")[:missing]] += 1
    return rows


def expert_version(tokens: int, shape: Shape, shares, arch: int) -> str:
    """The version the launcher's rule picks for the expected busiest expert."""
    from topk_moe.cuda.expert_mlp import choose_version

    return choose_version(int(expert_rows(tokens, shares).max()), shape.n_experts, np.float16, arch)


def stage_launches(stage: str, shape: Shape, k: int, tokens: int, device: Device, shares=None) -> list:
    """The kernels ``stage`` launches for T tokens (k = 0: the dense MLP at
    width ``shape.d_ff``), with their grids, as the launchers compute them."""
    from topk_moe.cuda import expert_mlp as launcher
    from topk_moe.cuda import launch_config as config

    D, F, E = shape.d_model, shape.d_ff, shape.n_experts
    grid_limit = config.BLOCKS_PER_SM * device.multiprocessors  # grid-stride kernels
    if k == 0:
        if stage == "dense_gemm1":  # x @ w1 and x @ w3 (swiglu)
            return [Launch("cuBLAS GEMM", None, None)] * (roofline.gemms_per_mlp(shape.activation) - 1)
        if stage == "dense_activation":
            blocks = max(1, min(_ceil_div(tokens * F, config.ELEMENTWISE_THREADS), grid_limit))
            return [Launch(f"activate_{shape.activation}_f16", blocks, blocks)]
        if stage == "dense_gemm2":
            return [Launch("cuBLAS GEMM", None, None)]
        raise ValueError(f"stage: expected one of {DENSE_STAGES} for the dense MLP, got {stage!r}")

    shares = uniform_shares(E, k) if shares is None else np.asarray(shares)
    assignments = tokens * k
    if stage == "router":
        blocks = _ceil_div(tokens, config.router_defines(E)["ROUTER_TOKENS"])
        return [Launch(f"router_top{k}_f16", blocks, blocks)]
    if stage == "dispatch":
        segments = _ceil_div(assignments, config.DISPATCH_SEGMENT)
        segment_blocks = _ceil_div(segments, config.dispatch_warps_per_block(E))
        return [Launch("dispatch_count_segments", segment_blocks, segment_blocks),
                Launch("dispatch_scan_segments", E, E), Launch("dispatch_offsets", 1, 1),
                Launch("dispatch_scatter", segment_blocks, segment_blocks)]
    if stage in ("permute", "combine"):
        items = assignments if stage == "permute" else tokens
        blocks = max(1, min(_ceil_div(items, config.ROW_WARPS), grid_limit))
        return [Launch("permute_rows_16" if stage == "permute" else "combine_f16_vector", blocks, blocks)]
    if stage in ("expert_gemm1", "expert_gemm2"):
        version = expert_version(tokens, shape, shares, device.arch)
        rows = expert_rows(tokens, shares)
        gated = shape.activation == "swiglu"
        if version == "decode":
            # A block streams one slice of columns of one expert: lanes x 16 bytes wide.
            lanes = launcher.COMPILE_DEFINES["DECODE_HIDDEN_LANES" if stage == "expert_gemm1" else "DECODE_OUT_LANES"]
            columns = _ceil_div(F if stage == "expert_gemm1" else D, lanes * (16 // ITEMSIZE))
            touched = math.ceil(touched_experts(tokens, shares) - 1e-9)
            part = "hidden" if stage == "expert_gemm1" else "out"
            return [Launch(f"expert_mlp_decode_{part}_f16", columns * E, columns * touched)]
        prefix = "V3" if version == "v3" else "V1"
        block_rows = launcher.COMPILE_DEFINES[f"{prefix}_BLOCK_ROWS"] if prefix == "V3" else 1
        row_tiles = launcher.row_tile_bound(assignments, E, block_rows)
        working_tiles = int(sum(_ceil_div(r, block_rows) for r in rows if r > 0))
        if stage == "expert_gemm1":
            cols = launcher.COMPILE_DEFINES[f"{prefix}_BLOCK_COLS_GATED" if gated and prefix == "V3"
                                            else f"{prefix}_BLOCK_COLS"]
            columns = _ceil_div(F, cols)
            return [Launch("expert_mlp_tile_starts", 1, 1),
                    Launch(f"expert_mlp_{version}_hidden_f16", row_tiles * columns, working_tiles * columns)]
        columns = _ceil_div(D, launcher.COMPILE_DEFINES[f"{prefix}_BLOCK_COLS"])
        return [Launch(f"expert_mlp_{version}_out_f16", row_tiles * columns, working_tiles * columns)]
    raise ValueError(f"stage: expected one of {MOE_STAGES}, got {stage!r}")


def wave_rows(occupancy_records: list, shape_name: str, tokens: Iterable, device_models: Iterable = tuple(DEVICES),
              shares_by_k: Optional[dict] = None) -> list:
    """One row per device x k (0: dense, at widths F and 2 F) x T x stage x
    kernel: blocks launched, blocks that work, blocks per SM (from the occupancy
    records), waves and the last wave's fill, under uniform routing unless
    ``shares_by_k`` gives shares. Library kernels (cuBLAS) have no row."""
    per_kernel = {(r["kernel"], r["arch"]): r["blocks_per_sm"] for r in occupancy_records}
    shape = SHAPES[shape_name]
    cases = [(1, shape), (2, shape), (0, shape), (0, dataclasses.replace(shape, d_ff=2 * shape.d_ff))]
    out = []
    for model in device_models:
        device = DEVICES[model]
        for k, layer in cases:
            for T in tokens:
                for stage in (MOE_STAGES if k else DENSE_STAGES):
                    shares = (shares_by_k or {}).get(k)
                    for launch in stage_launches(stage, layer, k, T, device, shares):
                        per_sm = per_kernel.get((launch.kernel, device.arch))
                        if launch.blocks is None or not per_sm:
                            continue
                        wave = gpu_occupancy.waves(launch.working_blocks, per_sm, device.multiprocessors)
                        out.append({"device_model": model, "k": k, "d_ff": layer.d_ff, "tokens": T,
                                    "stage": stage, "kernel": launch.kernel, "blocks": launch.blocks,
                                    "working_blocks": launch.working_blocks, "blocks_per_sm": per_sm,
                                    "waves": wave.waves, "last_wave_fill": wave.last_wave_fill})
    return out


# ---------------------------------------------------------------- the emulator's extra sectors


def sector_excess(traffic_records: list) -> dict:
    """{(stage, k): sectors counted / minimal sectors} of the kernels of each
    stage, from the emulator's ``traffic`` records of the current sources
    (``sources == "working tree"``; the newest run of each (stage, k)). The
    dense activation is keyed ("dense_activation", k) for width k F."""
    newest: dict = {}
    for record in traffic_records:
        params = record["params"]
        if params.get("sources") != "working tree":
            continue
        key = (record["stage"], params["k"], params["layer"])
        if key not in newest or record["utc"] > newest[key][0]:
            newest[key] = (record["utc"], [])
    for record in traffic_records:
        params = record["params"]
        key = (record["stage"], params["k"], params["layer"])
        if params.get("sources") == "working tree" and key in newest and record["utc"] == newest[key][0]:
            newest[key][1].append(record)
    excess = {}
    names = {"route": ("router",), "expert_mlp": ("expert_gemm1", "expert_gemm2")}
    for (stage, k, _layer), (_, found) in newest.items():
        sectors = sum(r["global_sectors"] for r in found)
        minimum = sum(r["global_min_sectors"] for r in found)
        for name in names.get(stage, (stage,)):
            excess[(name, k)] = sectors / minimum if minimum else 1.0
    return excess


def reread_factor(traffic_records: list, stage: str = "route") -> dict:
    """{k: sector bytes / compulsory bytes} of a stage: the traffic the kernels
    request when nothing is cached, over the bytes each sector holds once."""
    found: dict = {}
    for record in traffic_records:
        if record["params"].get("sources") == "working tree" and record["stage"] == stage:
            k = record["params"]["k"]
            sector_bytes, compulsory = found.get(k, (0, 0))
            found[k] = (sector_bytes + record["sector_bytes"], compulsory + record["compulsory_bytes"])
    return {k: a / b for k, (a, b) in found.items() if b}


# ---------------------------------------------------------------- floors


@dataclasses.dataclass(frozen=True)
class Floor:
    """A stage's predicted floor and its three terms."""

    bytes: float
    flops: float
    memory_s: float
    compute_s: float
    launch_s: float
    launches: int

    @property
    def seconds(self) -> float:
        return max(self.memory_s, self.compute_s) + self.launch_s

    @property
    def bound(self) -> str:
        terms = {"memory": self.memory_s, "compute": self.compute_s, "launch": self.launch_s}
        return max(terms, key=terms.get)

    def utilisation(self) -> dict:
        """Achieved rate at the floor over the peak, per resource."""
        seconds = self.seconds
        return {"memory": self.memory_s / seconds if seconds else 0.0,
                "compute": self.compute_s / seconds if seconds else 0.0}


def stage_cost(stage: str, shape: Shape, k: int, tokens: int, shares=None) -> roofline.Cost:
    """FLOPs and compulsory bytes of one stage (roofline's formulas; k = 0: the
    dense MLP of width shape.d_ff, whose activation kernel reads the GEMMs'
    outputs and writes the hidden array in place)."""
    D, F, E = shape.d_model, shape.d_ff, shape.n_experts
    if k == 0:
        dense = roofline.dense_costs(tokens, D, F, shape.activation, ITEMSIZE)
        if stage == "dense_activation":
            arrays = 3 if shape.activation == "swiglu" else 2
            return roofline.Cost(0, ITEMSIZE * arrays * tokens * F, "dense_activation")
        return dense[{"dense_gemm1": "gemm1", "dense_gemm2": "gemm2"}[stage]]
    shares = uniform_shares(E, k) if shares is None else shares
    used = touched_experts(tokens, shares)
    return roofline.stage_costs(tokens, D, F, E, k, shape.activation, ITEMSIZE, experts_used=used)[stage]


def peak_for(stage: str, version: Optional[str], device: Device) -> float:
    """The FLOP rate a stage's arithmetic runs at: the router and the decode
    kernels on FP32 FFMA, the tensor-core GEMMs (v3, cuBLAS) at the dense tensor peak."""
    if stage == "router" or version in ("decode", "v1", "v2"):
        return device.fp32_flop_per_s
    return device.tensor_flop_per_s


def stage_floor(stage: str, shape: Shape, k: int, tokens: int, device: Device, shares=None,
                excess: Optional[dict] = None, byte_factor: float = 1.0) -> tuple:
    """(Floor, version) of one stage; ``excess`` from ``sector_excess`` (missing: 1),
    ``byte_factor`` scales the bytes further (the effects of item 5)."""
    E = shape.n_experts
    shares_used = None if k == 0 else (uniform_shares(E, k) if shares is None else shares)
    cost = stage_cost(stage, shape, k, tokens, shares_used)
    launches = stage_launches(stage, shape, k, tokens, device, shares_used)
    version = expert_version(tokens, shape, shares_used, device.arch) if stage.startswith("expert_gemm") else None
    key = ("dense_activation", 1) if stage == "dense_activation" else (stage, k)
    factor = (excess or {}).get(key, 1.0) * byte_factor
    moved = cost.bytes * factor
    floor = Floor(bytes=moved, flops=cost.flops, memory_s=moved / device.hbm_bytes_per_s,
                  compute_s=cost.flops / peak_for(stage, version, device),
                  launch_s=len(launches) * LAUNCH_OVERHEAD_S, launches=len(launches))
    return floor, version


def layer_floor(floors: list) -> Floor:
    """The layer's terms: each stage's summed. The layer's floor is the sum of
    the stages' floors (``Floor.seconds`` of each), at least this one's."""
    return Floor(bytes=sum(f.bytes for f in floors), flops=sum(f.flops for f in floors),
                 memory_s=sum(f.memory_s for f in floors), compute_s=sum(f.compute_s for f in floors),
                 launch_s=sum(f.launch_s for f in floors), launches=sum(f.launches for f in floors))


def prediction_record(device: Device, shape_name: str, shape: Shape, stage: str, k: int, tokens: int,
                      floor: Floor, seconds: float, bound: str, routing: str, extra: dict) -> dict:
    return {
        "params": {"label": LABEL, "preset": shape_name, "activation": shape.activation, "routing": routing,
                   "launches": floor.launches, "memory_s": floor.memory_s, "compute_s": floor.compute_s,
                   "launch_s": floor.launch_s, "hbm_bytes_per_s": device.hbm_bytes_per_s,
                   "tensor_flop_per_s": device.tensor_flop_per_s, "fp32_flop_per_s": device.fp32_flop_per_s,
                   "launch_overhead_s": LAUNCH_OVERHEAD_S, **extra},
        "device_model": device.model,
        "stage": stage,
        "k": k,
        "tokens": tokens,
        "d_model": shape.d_model,
        "d_ff": shape.d_ff,
        "n_experts": shape.n_experts if k else 1,
        "dtype": DTYPE,
        "bytes": floor.bytes,
        "flops": floor.flops,
        "floor_s": seconds,
        "bound": bound,
        "predicted_utilisation": {"memory": floor.memory_s / seconds, "compute": floor.compute_s / seconds},
    }


def predictions(excess: dict, study: Optional[dict] = None, tokens: Iterable = TOKENS,
                shapes: Optional[dict] = None) -> list:
    """Every ``gpu-prediction`` record: device x shape x (k = 1, 2 under uniform
    routing and, where ``study`` gives shares, the study's; dense at widths F and
    2 F) x T x stage, plus a ``layer`` row (its stages summed) per case."""
    study = study or {}
    out = []
    for device in DEVICES.values():
        for shape_name, shape in (shapes or SHAPES).items():
            for T in tokens:
                for k in (1, 2):
                    routings = {"uniform": uniform_shares(shape.n_experts, k)}
                    if study.get(k):
                        routings["study"] = None  # one share vector per (seed, layer): see _case_records
                    for routing, shares in routings.items():
                        out += _case_records(device, shape_name, shape, k, T, excess, routing, shares, study.get(k))
                for width in (shape.d_ff, 2 * shape.d_ff):
                    dense = dataclasses.replace(shape, d_ff=width)
                    out += _case_records(device, shape_name, dense, 0, T, excess, None, None, None)
    return out


def study_touched(tokens: int, study_k: list) -> float:
    """Touched experts under the study's routing: the mean over its (seed, layer)
    shares of sum_e 1 - (1 - q_e)^T."""
    return float(np.mean([touched_experts(tokens, s["shares"]) for s in study_k]))


def _case_records(device, shape_name, shape, k, T, excess, routing, shares, study_k) -> list:
    stages = MOE_STAGES if k else DENSE_STAGES
    extra: dict = {}
    if k:
        if routing == "study":
            # One share vector per (seed, layer): the floor of each, averaged, is
            # the expected floor; its touched experts the expected touched experts.
            extra = {"touched_experts": study_touched(T, study_k),
                     "routing_source": f"the accuracy study's moe-k{k} checkpoints: the mean over "
                                       f"{len(study_k)} (seed, layer) share vectors (in the layer record)"}
        else:
            extra = {"touched_experts": touched_experts(T, shares), "routing_source": "uniform: k / E per expert"}
    rows, floors = [], []
    for stage in stages:
        if routing == "study":
            each = [stage_floor(stage, shape, k, T, device, np.asarray(s["shares"]), excess) for s in study_k]
            floor = Floor(*(float(np.mean([getattr(f, name) for f, _ in each]))
                            for name in ("bytes", "flops", "memory_s", "compute_s", "launch_s")),
                          launches=each[0][0].launches)
            version = each[0][1]
        else:
            floor, version = stage_floor(stage, shape, k, T, device, shares, excess)
        floors.append(floor)
        key = ("dense_activation", 1) if stage == "dense_activation" else (stage, k)
        stage_extra = dict(extra, version=version, sector_excess=excess.get(key, 1.0),
                           compulsory_bytes=floor.bytes / excess.get(key, 1.0))
        if stage.startswith("expert_gemm") and device.arch == 90 and version == "v3":
            stage_extra["peak_note"] = MMA_SYNC_NOTE
        rows.append(prediction_record(device, shape_name, shape, stage, k, T, floor, floor.seconds, floor.bound,
                                      routing or "none (dense)", stage_extra))
    seconds = sum(f.seconds for f in floors)
    layer = layer_floor(floors)
    terms = {"memory": layer.memory_s, "compute": layer.compute_s, "launch": layer.launch_s}
    layer_extra = dict(extra, note="the stages' floors summed")
    if routing == "study":
        layer_extra["shares"] = [s["shares"] for s in study_k]
    rows.append(prediction_record(device, shape_name, shape, "layer", k, T, layer, seconds,
                                  max(terms, key=terms.get), routing or "none (dense)", layer_extra))
    return rows


# ---------------------------------------------------------------- the published check


#: vLLM's fused MoE kernel on one H100 at Mixtral 8x7B's shapes under tensor
#: parallelism 2 (each GPU holds F = 14336 / 2 of every expert), bf16, top-2.
PUBLISHED = {
    "source": ("vllm-project/vllm pull request #24700: the fused MoE kernel on an H100, Mixtral shapes under "
               "TP = 2 (E = 8, N = 7168, H = 4096, bf16, top-2)"),
    "device_model": "H100 SXM",
    "shape": Shape(4096, 7168, 8),
    "k": 2,
    "seconds": {1: 144e-6, 8: 435e-6, 256: 537e-6, 1024: 834e-6},
}


def sanity_records() -> list:
    """The floor of the expert MLP (GEMM 1 with the activation, GEMM 2: the part
    every fused MoE kernel does, with compulsory bytes only) at each published
    point, and the published time over it. A ratio below 1 means the model is wrong."""
    device = DEVICES[PUBLISHED["device_model"]]
    shape, k = PUBLISHED["shape"], PUBLISHED["k"]
    out = []
    for tokens, published in PUBLISHED["seconds"].items():
        floors = [stage_floor(stage, shape, k, tokens, device)[0] for stage in ("expert_gemm1", "expert_gemm2")]
        seconds = sum(f.seconds for f in floors)
        layer = layer_floor(floors)
        out.append({
            "params": {"label": LABEL, "source": PUBLISHED["source"], "stage": "expert_gemm1 + expert_gemm2",
                       "routing": "uniform", "touched_experts": touched_experts(tokens, uniform_shares(8, k)),
                       "d_model": shape.d_model, "d_ff": shape.d_ff, "n_experts": shape.n_experts, "k": k,
                       "memory_s": layer.memory_s, "compute_s": layer.compute_s, "launch_s": layer.launch_s,
                       "peak_note": MMA_SYNC_NOTE},
            "device_model": device.model,
            "tokens": tokens,
            "published_s": published,
            "floor_s": seconds,
            "published_over_floor": published / seconds,
            "floor_below_published": seconds < published,
        })
    return out


# ---------------------------------------------------------------- the inefficiencies of item 5


#: FP32 FMA units per SM (A100 and H100 architecture whitepapers: 64 and 128).
FP32_FMA_PER_CLOCK = {80: 64, 90: 128}
#: v2's block tile and K step (expert_mlp.cu): the FMAs between two A-tile stores.
V2_TILE = {"rows": 128, "cols": 128, "k_step": 16}


#: The dispatch row of ``effects``: what its sectors above the minimum are now.
DISPATCH_EFFECT = "dispatch's partial sectors (token rows at expert boundaries)"


def effects(excess: dict, reread: dict, v2_wavefront_excess: float, tokens: Iterable = TOKENS) -> list:
    """How much each inefficiency the emulator found moves its predicted stage
    time and the layer's, at the largest effect over T (uniform routing):

    - the router re-reading its weights in every warp: its bytes times the
      sector bytes over the compulsory bytes (``reread``) if no cache served the
      re-reads (on a GPU they hit L1/L2: the router's weights are D x E x 2 bytes,
      64 KiB at Mixtral, against a 40-50 MB L2; the DRAM floor does not move);
    - dispatch's partial sectors (what is left after the two issue-21 fixes:
      each (segment, choice)'s run of token rows per expert starts and ends
      inside a sector): its floor with and without ``excess``;
    - v2's bank conflict (float32 path, not in the float16 predictions): the
      extra shared-store wavefronts per K step over the FFMA cycles of the same
      step, one block per SM (v2's occupancy), with no overlap: an upper bound.
    """
    out = []
    for device in DEVICES.values():
        for shape_name, shape in SHAPES.items():
            for k in (1, 2):
                for name, stage, change in (
                        ("router re-reads its weights in every warp (if uncached)", "router",
                         {"byte_factor": reread.get(k, 1.0)}),
                        (DISPATCH_EFFECT, "dispatch", {"excess": {}})):
                    best = None
                    for T in tokens:
                        before = {s: stage_floor(s, shape, k, T, device, None, excess)[0].seconds for s in MOE_STAGES}
                        kwargs = {"excess": change.get("excess", excess), "byte_factor": change.get("byte_factor", 1.0)}
                        after_stage = stage_floor(stage, shape, k, T, device, None, **kwargs)[0].seconds
                        if "excess" in change:  # the fix removes the excess: "before" is the current code
                            moved = before[stage] - after_stage
                        else:
                            moved = after_stage - before[stage]
                        row = {"inefficiency": name, "device_model": device.model, "preset": shape_name, "k": k,
                               "stage": stage, "tokens": T, "stage_change": moved / min(before[stage], after_stage),
                               "layer_change": moved / sum(before.values())}
                        if best is None or abs(row["stage_change"]) > abs(best["stage_change"]):
                            best = row
                    out.append(best)
        arch = device.arch
        fma_cycles = V2_TILE["rows"] * V2_TILE["cols"] * V2_TILE["k_step"] / FP32_FMA_PER_CLOCK[arch]
        minimal = V2_TILE["rows"] * V2_TILE["k_step"] * 4 / 128  # one 128-byte wavefront per 32 floats
        extra = (v2_wavefront_excess - 1) * minimal
        out.append({"inefficiency": "v2's bank conflict on its transposed A-tile store (float32)",
                    "device_model": device.model, "preset": "any", "k": None, "stage": "expert_gemm1, expert_gemm2",
                    "tokens": None, "stage_change": extra / fma_cycles, "layer_change": None})
    return out


# ---------------------------------------------------------------- the command line


def predicted_root(results_dir=None):
    """Where the model's records live: ``<results>/predicted-model``."""
    return records.results_root(results_dir) / PREDICTED_FOLDER


def read_kind(kind: str, results_dir=None) -> list:
    """The model's newest run of ``kind`` (the records that share the newest
    ``utc``: a rerun appends a whole new run); [] when there are none."""
    try:
        found = records.read_records(kind, results_dir=predicted_root(results_dir))
    except FileNotFoundError:
        return []
    newest = max(record.get("utc", "") for record in found)
    return [record for record in found if record.get("utc", "") == newest]


def traffic_records(results_dir=None) -> list:
    """The emulator's newest ``traffic`` records (any CPU folder); [] when none."""
    try:
        return records.read_records("traffic", results_dir=results_dir)
    except FileNotFoundError:
        return []


def parse(argv):
    parser = argparse.ArgumentParser(prog="python -m analysis.measure.gpu_model", description=(
        "Predict (model, not measure) occupancy, waves and per-stage time floors of the CUDA kernels "
        "on A100 SXM and H100 SXM, and check the floor against vLLM's published H100 times."))
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--no-study-routing", action="store_true",
                        help="skip the accuracy study's checkpoints (uniform routing only)")
    parser.add_argument("--routing-bytes", type=int, default=1 << 14,
                        help="test bytes the checkpoints route for their shares (default 16384)")
    parser.add_argument("--results-dir", default=None, help="results folder (default: the repository's results/)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    arguments = parse(argv)
    occupancy = [occupancy_record(row, arch) for arch in gpu_occupancy.ARCHITECTURES
                 for row in kernel_resources(arch)]
    traffic = traffic_records(arguments.results_dir)
    excess = sector_excess(traffic)
    study = {} if arguments.no_study_routing else study_shares(arguments.routing_bytes, arguments.results_dir)
    predicted = predictions(excess, study)
    sanity = sanity_records()

    print(f"All numbers below are {LABEL}.")
    for record in occupancy:
        if record["arch"] == 90:
            print(f"sm_{record['arch']} {record['kernel']:32s} {record['registers']:4d} registers "
                  f"{record['shared_bytes']:6d} B shared: {record['blocks_per_sm']:2d} blocks/SM, "
                  f"occupancy {record['occupancy']:.0%} ({record['limiter']})")
    print(f"Sector excess from the emulator's traffic records: {excess or 'none found (1 assumed)'}")
    for k, found in sorted(study.items()):
        print(f"Touched experts, k = {k}, T = 1, 4, 16, 64: uniform "
              + ", ".join(f"{touched_experts(T, uniform_shares(8, k)):.2f}" for T in (1, 4, 16, 64))
              + "; the study's routing " + ", ".join(f"{study_touched(T, found):.2f}" for T in (1, 4, 16, 64)))
    for record in sanity:
        print(f"vLLM PR #24700 on H100, T = {record['tokens']:5d}: published {record['published_s'] * 1e6:6.0f} us, "
              f"floor {record['floor_s'] * 1e6:6.1f} us, published / floor = {record['published_over_floor']:.2f}")
    for row in effects(excess, reread_factor(traffic), v2_bank_conflict_excess()):
        layer = "" if row["layer_change"] is None else f", layer {row['layer_change']:+.1%}"
        print(f"{row['inefficiency']}: {row['device_model']} {row['preset']} k={row['k']} at T={row['tokens']}: "
              f"stage {row['stage_change']:+.1%}{layer}")
    if not arguments.no_write:
        root = predicted_root(arguments.results_dir)
        for kind, found in ((OCCUPANCY_KIND, occupancy), (PREDICTION_KIND, predicted), (SANITY_KIND, sanity)):
            print(f"{len(found)} records appended to {records.write_records(kind, found, results_dir=root)}")
    return 0


#: v2's transposed A-tile store: shared wavefronts over the minimum (a 4-way
#: conflict on part of the store), as issue 21 quotes the emulator's count on the
#: float32 path; no float32 ``traffic`` record is committed to read it from.
V2_BANK_CONFLICT_EXCESS = 2.5


def v2_bank_conflict_excess() -> float:
    """Shared wavefronts over the minimum at v2's A-tile store (``V2_BANK_CONFLICT_EXCESS``)."""
    return V2_BANK_CONFLICT_EXCESS


if __name__ == "__main__":
    sys.exit(main())
