"""Memory traffic of the CUDA kernels, counted on the CPU emulator (issue 14).

    python -m analysis.measure.traffic --T 256 --D 512 --F 1024 --E 8 --k 1 2

runs the whole MoE layer through the cuda backend's launchers on the emulator
(``cuda-emulated``), with the traffic counters of kernels/topk_moe/cuda/emulator/traffic.h,
and appends one record per kernel launch to ``results/cpu-<cpu>/traffic.jsonl``
(``analysis.records``). Each record holds the stage and kernel, the layer's shape,
k, dtype, the routing skew (largest expert load over the mean), per access site
(the .cu line) the warp-wide requests, sectors against the minimum and shared
wavefronts against the minimum, and per array argument the distinct bytes
(the ideal: each byte read once, written once) and distinct sectors.

``--stages dispatch`` (or any of STAGES) counts only those stages: the layer
runs through the contract's stage functions (topk_moe.route, dispatch, permute,
expert_mlp, combine) on the emulator, the others uncounted and only as far as
the last chosen stage needs; the dense layer runs only for dense_activation.
A stage's records are the same as in a whole-layer run, except that
expert_mlp's kernel version then follows the plan's busiest expert (an eager
call) where moe_forward passes T as that bound (the same above DECODE_ROWS).

``--sources DIR --sources-label NAME`` counts the .cu files of another folder
(e.g. a commit's kernels/topk_moe/cuda, exported with ``git archive``) instead of
kernels/topk_moe/cuda: how a fix's counts before and after are recorded side by side.

For the dense baseline at equal active FLOPs (hidden width k F) only the
activation kernel is ours: its two GEMMs are cuBLAS on a GPU and NumPy in the
emulator, with no counts; its records say so.

Every record is labelled ``measured_by: cpu-emulation``: these are the requests
the kernels' source makes, compiled by the host compiler and grouped into warps
as traffic.h documents; not DRAM traffic (no caches are modelled) and never a
GPU measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time

import numpy as np
from tqdm import tqdm

from analysis import records

RECORD_KIND = "traffic"
MEASURED_BY = "cpu-emulation"
LABEL = ("counted in CPU emulation: the requests the kernel makes, not DRAM traffic "
         "(no caches are modelled)")
SECTOR_BYTES = 32
#: The stages a run can count, in the layer's order (``--stages``).
MOE_STAGES = ("route", "dispatch", "permute", "expert_mlp", "combine")
STAGES = MOE_STAGES + ("dense_activation",)


def stage_of(file: str, kernel: str) -> str:
    """The contract's stage a kernel belongs to."""
    if file == "router.cu":
        return "route"
    if file == "dispatch.cu":
        return "dispatch"
    if file == "combine.cu":
        return "permute" if kernel.startswith("permute") else "combine"
    if file == "expert_mlp.cu":
        return "expert_mlp"
    if file == "activation.cu":
        return "dense_activation"
    raise ValueError(f"stage_of: unknown kernel file {file!r}")


def launch_record(launch, index: int, params: dict, extra: dict) -> dict:
    """One tidy record of one counted launch (topk_moe.cuda.emulator.traffic.LaunchTraffic)."""
    global_sites = [s for s in launch.sites if s.space == "global"]
    shared_sites = [s for s in launch.sites if s.space == "shared"]
    ideal = sum(a.read_bytes + a.written_bytes for a in launch.arrays)
    compulsory = SECTOR_BYTES * sum(a.read_sectors + a.written_sectors for a in launch.arrays)
    per_block = SECTOR_BYTES * sum(a.block_read_sectors + a.block_written_sectors for a in launch.arrays)
    return {
        "params": params,
        "measured_by": MEASURED_BY,
        "label": LABEL,
        "stage": stage_of(launch.file, launch.kernel),
        "file": launch.file,
        "kernel": launch.kernel,
        "launch": index,
        "grid": list(launch.grid),
        "block": list(launch.block),
        "global_requests": sum(s.requests for s in global_sites),
        "global_sectors": sum(s.sectors for s in global_sites),
        "global_min_sectors": sum(s.min_sectors for s in global_sites),
        "sector_bytes": SECTOR_BYTES * sum(s.sectors for s in global_sites),
        "block_unique_bytes": per_block,
        "compulsory_bytes": compulsory,
        "ideal_bytes": ideal,
        "shared_requests": sum(s.requests for s in shared_sites),
        "shared_wavefronts": sum(s.wavefronts for s in shared_sites),
        "shared_min_wavefronts": sum(s.min_wavefronts for s in shared_sites),
        "sites": [dataclasses.asdict(s) for s in launch.sites],
        "arrays": [dataclasses.asdict(a) for a in launch.arrays],
        **extra,
    }


def routing_skew(plan, n_experts: int, assignments: int) -> float:
    """Largest expert load over the mean load (1 = perfectly balanced)."""
    counts = np.asarray(plan.counts)[:n_experts]
    mean = assignments / n_experts
    return float(counts.max() / mean) if mean else float("nan")


def count_layer(T: int, D: int, F: int, E: int, k: int, dtype: str = "float16", activation: str = "swiglu",
                seed: int = 0, sources=None, sources_label: str = "working tree", stages=STAGES) -> list:
    """Records of every launch of one MoE layer and of the dense activation at
    equal active FLOPs (hidden k F), counted on the emulator; the kernels of
    folder ``sources`` (named ``sources_label``) instead of kernels/topk_moe/cuda if given.
    ``stages``: count only these (names from STAGES), the others run uncounted
    where a counted stage needs their result."""
    from topk_moe.cuda.emulator import loader

    unknown = [stage for stage in stages if stage not in STAGES]
    if unknown or not stages:
        raise ValueError(f"stages: expected one or more of {STAGES}, got {list(stages)}")
    with loader.kernel_sources(sources) if sources else contextlib.nullcontext():
        return _count_layer(T, D, F, E, k, dtype, activation, seed, sources_label, tuple(stages))


def _count_layer(T, D, F, E, k, dtype, activation, seed, sources_label, stages) -> list:
    import topk_moe
    from topk_moe.cuda.emulator import traffic

    cfg = topk_moe.MoEConfig(d_model=D, d_ff=F, n_experts=E, top_k=k, activation=activation)
    weights = topk_moe.init_weights(cfg, seed=seed, dtype=np.dtype(dtype))
    x = np.random.default_rng(seed).standard_normal((T, D)).astype(dtype)
    params = {"T": T, "D": D, "F": F, "E": E, "k": k, "dtype": dtype, "activation": activation, "seed": seed,
              "layer": "moe", "sources": sources_label}
    out = []
    chosen = [stage for stage in MOE_STAGES if stage in stages]
    if chosen == list(MOE_STAGES):
        with traffic.counting() as launches:
            plan = topk_moe.moe_forward(x, weights, cfg, backend="cuda-emulated").plan
    elif chosen:
        launches, plan = _count_moe_stages(x, weights, cfg, chosen)
    if chosen:
        skew = routing_skew(plan, E, T * k)
        out += [launch_record(launch, i, params, {"routing_max_over_mean": skew, "dense_gemms": None})
                for i, launch in enumerate(launches)]
    if "dense_activation" not in stages:
        return out

    dense = topk_moe.MoEConfig(d_model=D, d_ff=k * F, n_experts=1, top_k=1, activation=activation)
    dense_weights = topk_moe.init_weights(dense, seed=seed, dtype=np.dtype(dtype))
    with traffic.counting() as launches:
        topk_moe.dense_mlp(x, dense_weights.w1[0], dense_weights.w2[0],
                          None if dense_weights.w3 is None else dense_weights.w3[0],
                          activation=activation, backend="cuda-emulated")
    params = dict(params, layer="dense", F_dense=k * F)
    out += [launch_record(launch, i, params, {
        "routing_max_over_mean": None,
        "dense_gemms": "cuBLAS on a GPU (NumPy in the emulator): not counted"}) for i, launch in enumerate(launches)]
    return out


def _count_moe_stages(x, weights, cfg, chosen) -> tuple:
    """(launches of the chosen stages, plan): the layer stage by stage through the
    contract's functions on the emulator, up to the last chosen stage."""
    import topk_moe
    from topk_moe.cuda.emulator import traffic

    backend = "cuda-emulated"
    launches: list = []

    def run(stage, function, *arguments, **keywords):
        if stage not in chosen:
            return function(*arguments, backend=backend, **keywords)
        with traffic.counting() as counted:
            result = function(*arguments, backend=backend, **keywords)
        launches.extend(counted)
        return result

    last = MOE_STAGES.index(chosen[-1])
    routing = run("route", topk_moe.route, x, weights.router, cfg.top_k, renormalize=cfg.renormalize)
    plan = run("dispatch", topk_moe.dispatch, routing.experts, cfg.n_experts,
               capacity=topk_moe.capacity(cfg, x.shape[0]))
    if last >= MOE_STAGES.index("permute"):
        rows = run("permute", topk_moe.permute, x, plan)
    if last >= MOE_STAGES.index("expert_mlp"):
        expert_out = run("expert_mlp", topk_moe.expert_mlp, rows, plan, weights.w1, weights.w2, weights.w3,
                         activation=cfg.activation)
    if last >= MOE_STAGES.index("combine"):
        run("combine", topk_moe.combine, expert_out, routing, plan)
    return launches, plan


def summary_line(record: dict) -> str:
    def ratio(a, b):
        return f"{a / b:.2f}" if b else "-"

    return (f"{record['params']['layer']:5s} k={record['params']['k']} {record['stage']:16s} "
            f"{record['kernel']:28s} sectors/min {ratio(record['global_sectors'], record['global_min_sectors'])}  "
            f"wavefronts/min {ratio(record['shared_wavefronts'], record['shared_min_wavefronts'])}  "
            f"sector bytes/ideal {ratio(record['sector_bytes'], record['ideal_bytes'])}  "
            f"compulsory/ideal {ratio(record['compulsory_bytes'], record['ideal_bytes'])}")


def parse(argv):
    parser = argparse.ArgumentParser(
        prog="python -m analysis.measure.traffic",
        description="Count the memory traffic of the CUDA kernels on the CPU emulator (" + LABEL + ").")
    parser.add_argument("--T", type=int, nargs="+", default=[256], help="tokens (default 256)")
    parser.add_argument("--D", type=int, default=512, help="d_model (default 512)")
    parser.add_argument("--F", type=int, default=1024, help="d_ff per expert (default 1024)")
    parser.add_argument("--E", type=int, default=8, help="experts (default 8)")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2], help="top-k values (default 1 2)")
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument("--activation", default="swiglu", choices=("relu", "gelu", "swiglu"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, metavar="STAGE",
                        help=f"count only these stages, of {' '.join(STAGES)} (default all)")
    parser.add_argument("--sources", default=None, help="count the .cu files of this folder (default kernels/topk_moe/cuda)")
    parser.add_argument("--sources-label", default="working tree", help="the name records give --sources")
    parser.add_argument("--results-dir", default=None, help="results folder (default: the repository's results/)")
    parser.add_argument("--no-write", action="store_true", help="print the summary only")
    arguments = parser.parse_args(argv)
    for name in ("T", "k"):
        for value in getattr(arguments, name):
            if value < 1 or (name == "k" and value not in (1, 2)):
                parser.error(f"--{name}: expected {'1 or 2' if name == 'k' else 'a positive integer'}, got {value}")
    for name in ("D", "F", "E"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name}: expected a positive integer, got {getattr(arguments, name)}")
    return arguments


def main(argv=None) -> int:
    arguments = parse(argv)
    started = time.perf_counter()
    runs = [(T, k) for T in arguments.T for k in arguments.k]
    out = []
    for T, k in tqdm(runs, desc="traffic", unit="layer"):
        out += count_layer(T, arguments.D, arguments.F, arguments.E, k, arguments.dtype, arguments.activation,
                           arguments.seed, arguments.sources, arguments.sources_label, arguments.stages)
    print(f"{LABEL}. Wall time {time.perf_counter() - started:.0f} s.")
    for record in out:
        print(summary_line(record))
    if not arguments.no_write:
        path = records.write_records(RECORD_KIND, out, device_kind="cpu", results_dir=arguments.results_dir)
        print(f"Records appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
