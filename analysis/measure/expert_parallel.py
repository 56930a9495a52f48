"""What expert parallelism costs: bytes and time per phase, counted and timed
across processes, and the same cost at Mixtral's size as a model.

    python -m analysis.measure.expert_parallel [--ranks 2 4] [--tokens 128 1024 4096] [--top-k 1 2]
                                              [--shape D F E] [--repeats 15] [--results-dir DIR]

(the defaults shown; about two minutes on two cores)

``RankPool`` starts P worker processes once (torch.multiprocessing, spawn),
joins them in one gloo group over loopback, and runs functions on the first
P' of them (a sub-group per size, so one pool serves P' = 2 and 4). The tests
(tests/test_expert_parallel.py) and the measurement share it.

``measure`` runs ``topk_moe.expert_parallel`` on every rank with its own
random tokens (T_r per rank) and writes one ``expert-parallel`` record per
(P, T_r, k, rank, phase): the phase's median time (``time_function``, a
barrier before every call, untimed, so the ranks start each call together)
and the bytes the rank sent in it. These are processes on one machine (here:
2 cores; the record gives the load average at the start) exchanging over loopback, not a cluster: the
times say how the phases compare and how they grow with k and P, not what a
network costs.

``mixtral_model`` is the model of the same layer at Mixtral's size on 8 GPUs
(D = 4096, F = 14336, E = 8, one expert per GPU, bfloat16): the bytes each GPU
sends per all-to-all, ``T_r · K · D · 2 · (P-1)/P`` (uniform routing, nothing
dropped), over the per-GPU bandwidth of NVLink or InfiniBand NDR, beside the
floor of the expert GEMMs on an H100 from the roofline formulas
(``roofline.stage_costs``) and the H100 SXM's datasheet peaks in
``gpu_model.DEVICES`` (the GPU prediction's numbers). Its numbers are "predicted (model)", never measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import queue
import socket
import sys
import time
import traceback
from typing import Any, Callable, Optional, Sequence

import numpy as np

from analysis import records
from analysis.measure import gpu_model, roofline
from analysis.measure.bench_cpu import thread_environment
from analysis.measure.timing import time_function

RECORD_KIND = "expert-parallel"
#: Every rank of a measurement runs on one thread: the ranks share the cores.
THREADS_PER_RANK = 1
#: How long a collective may wait for a missing rank before gloo gives up:
#: a test that would hang fails instead.
COLLECTIVE_TIMEOUT_S = 60
TRANSPORT = "gloo over loopback, one process per rank on one machine"


# ---------------------------------------------------------------- the pool of ranks


@dataclasses.dataclass(frozen=True)
class RankOutcome:
    """What one rank returned, or the error it raised (``error``: "Type: message")."""

    rank: int
    value: Any = None
    error: Optional[str] = None


class RankPool:
    """``ranks`` worker processes joined in one gloo group, started once and reused.

    ``run(function, arguments, ranks)`` calls ``function(rank, group, argument)``
    on ranks 0..ranks-1 (``group``: the sub-group of exactly those ranks) and
    returns their ``RankOutcome`` in rank order. ``function`` must be a
    module-level function (it is pickled by name). The pool waits at most
    ``timeout_s`` for every outcome; a rank that raises reports its error
    instead of stopping the pool.
    """

    def __init__(self, ranks: int, *, threads_per_rank: int = THREADS_PER_RANK, timeout_s: float = 120.0):
        if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
            raise ValueError(f"ranks: expected a positive integer, got {ranks!r}")
        import torch.multiprocessing as multiprocessing

        context = multiprocessing.get_context("spawn")
        self.ranks = ranks
        self.timeout_s = timeout_s
        self.tasks = [context.Queue() for _ in range(ranks)]
        self.outcomes = context.Queue()
        address = f"tcp://127.0.0.1:{_free_port()}"
        with thread_environment(threads_per_rank):  # read by each child at start-up
            self.processes = [
                context.Process(target=_rank_main, args=(rank, ranks, address, self.tasks[rank], self.outcomes),
                                daemon=True, name=f"expert-parallel-rank-{rank}")
                for rank in range(ranks)
            ]
            for process in self.processes:
                process.start()
        ready = self._collect("start-up", ranks)
        failed = [outcome.error for outcome in ready if outcome.error]
        if failed:
            self.close()
            raise RuntimeError(f"a rank failed to start: {failed[0]}")

    def run(self, function: Callable, arguments: Sequence, ranks: Optional[int] = None) -> list:
        """``function(rank, group, arguments[rank])`` on the first ``ranks`` ranks."""
        ranks = self.ranks if ranks is None else ranks
        if not 1 <= ranks <= self.ranks:
            raise ValueError(f"ranks: expected 1 to {self.ranks}, got {ranks}")
        if len(arguments) != ranks:
            raise ValueError(f"arguments: expected one per rank ({ranks}), got {len(arguments)}")
        for rank in range(ranks):
            self.tasks[rank].put((function, arguments[rank], ranks))
        return self._collect(getattr(function, "__name__", str(function)), ranks)

    def values(self, function: Callable, arguments: Sequence, ranks: Optional[int] = None) -> list:
        """``run``'s values; the first rank's error as a RuntimeError."""
        outcomes = self.run(function, arguments, ranks)
        for outcome in outcomes:
            if outcome.error:
                raise RuntimeError(f"rank {outcome.rank}: {outcome.error}")
        return [outcome.value for outcome in outcomes]

    def _collect(self, what: str, count: int) -> list:
        deadline = time.monotonic() + self.timeout_s
        outcomes = {}
        while len(outcomes) < count:
            missing = sorted(set(range(count)) - set(outcomes))
            dead = [rank for rank in missing if not self.processes[rank].is_alive()]
            if dead:
                raise RuntimeError(f"{what}: rank {dead[0]}'s process ended "
                                   f"(exit code {self.processes[dead[0]].exitcode}) without an answer")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: ranks {missing} gave no answer within {self.timeout_s:g} s")
            try:
                outcome = self.outcomes.get(timeout=1.0)
            except queue.Empty:
                continue
            outcomes[outcome.rank] = outcome
        return [outcomes[rank] for rank in range(count)]

    def close(self) -> None:
        for task_queue in self.tasks:
            task_queue.put(None)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exception) -> bool:
        self.close()
        return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(rank: int, ranks: int, address: str, tasks, outcomes) -> None:
    """A worker: join the group, make a sub-group of the first n ranks for every
    n (every rank must take part in making each), then run tasks until None."""
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(THREADS_PER_RANK)
        dist.init_process_group("gloo", init_method=address, rank=rank, world_size=ranks,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        groups = {n: dist.new_group(list(range(n))) for n in range(1, ranks)}
        groups[ranks] = dist.group.WORLD
    except Exception as error:  # the parent reports it
        outcomes.put(RankOutcome(rank, error=f"{type(error).__name__}: {error}"))
        return
    outcomes.put(RankOutcome(rank, value="ready"))
    while True:
        task = tasks.get()
        if task is None:
            break
        function, argument, size = task
        try:
            outcomes.put(RankOutcome(rank, value=function(rank, groups[size], argument)))
        except Exception as error:
            outcomes.put(RankOutcome(rank, error=f"{type(error).__name__}: {error}",
                                     value=traceback.format_exc()))
    dist.destroy_process_group()


# ---------------------------------------------------------------- what a rank runs


def forward_on_rank(rank: int, group, case: dict) -> dict:
    """One ``expert_parallel.moe_forward`` on this rank: ``case`` holds its
    ``x`` and ``weights`` (NumPy), ``cfg``, and ``tensors`` (pass torch
    tensors, else NumPy). Returns y, the routing and plan as NumPy arrays, and
    the bytes this rank sent (``Traffic`` as a dict)."""
    import torch

    from topk_moe import MoEWeights, expert_parallel

    weights = case["weights"]
    x = case["x"]
    if case.get("tensors", True):
        x = torch.from_numpy(x)
        weights = MoEWeights(*(None if a is None else torch.from_numpy(a) for a in dataclasses.astuple(weights)))
    forward = expert_parallel.ExpertParallelForward(x, weights, case["cfg"], group=group,
                                                    backend=case.get("backend"))
    output = forward.run()
    host = lambda a: a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)  # noqa: E731
    return {"y": host(output.y), "experts": host(output.routing.experts), "row": host(output.plan.row),
            "counts": host(output.plan.counts), "traffic": dataclasses.asdict(forward.traffic())}


def shard(weights, rank: int, ranks: int):
    """Rank ``rank``'s share of a layer's weights: the whole router and the
    experts [rank·E/P, (rank+1)·E/P) of w1, w2 and w3."""
    from topk_moe import MoEWeights

    experts = weights.w1.shape[0]
    local = experts // ranks
    part = slice(rank * local, (rank + 1) * local)
    return MoEWeights(router=weights.router, w1=weights.w1[part], w2=weights.w2[part],
                      w3=None if weights.w3 is None else weights.w3[part])


def time_phases_on_rank(rank: int, group, case: dict) -> dict:
    """Time every phase of the expert-parallel forward on this rank (see the
    module docstring): ``case`` holds cfg, tokens (T_r), seed, dtype, warmup,
    repeats. Every rank makes the same calls in the same order (fixed repeats,
    no time budget), as collectives need."""
    import torch
    import torch.distributed as dist

    import topk_moe
    from topk_moe import expert_parallel

    cfg = case["cfg"]
    ranks = dist.get_world_size(group)
    full = topk_moe.init_weights(cfg, seed=case["seed"], dtype=case["dtype"])
    weights = shard(full, rank, ranks)
    weights = topk_moe.MoEWeights(*(None if a is None else torch.from_numpy(np.ascontiguousarray(a))
                                    for a in dataclasses.astuple(weights)))
    rng = np.random.default_rng([case["seed"], rank])
    x = torch.from_numpy(rng.standard_normal((case["tokens"], cfg.d_model)).astype(case["dtype"]))

    forward = expert_parallel.ExpertParallelForward(x, weights, cfg, group=group)
    for _ in range(case["warmup"]):
        forward.run()
    steps = {
        "check": lambda: expert_parallel.ExpertParallelForward(x, weights, cfg, group=group),
        "route": forward.route,
        "count_exchange": forward.exchange_counts,
        "row_exchange": forward.exchange_rows,
        "experts": forward.run_experts,
        "return": forward.return_rows,
        "combine": forward.combine,
        "forward": lambda: expert_parallel.moe_forward(x, weights, cfg, group=group),
    }
    barrier = lambda: dist.barrier(group=group)  # noqa: E731
    timings = {name: time_function(step, warmup=1, repeats=case["repeats"], setup=barrier).as_dict()
               for name, step in steps.items()}
    traffic = forward.traffic()
    return {"timings": timings, "traffic": dataclasses.asdict(traffic),
            "kept_rows": int(sum(traffic.rows_to)), "threads": torch.get_num_threads()}


# ---------------------------------------------------------------- the measurement


@dataclasses.dataclass(frozen=True)
class MeasureConfig:
    """What ``measure`` runs: every (P, T_r, k) on one layer shape."""

    ranks: tuple = (2, 4)
    tokens: tuple = (128, 1024, 4096)
    top_k: tuple = (1, 2)
    d_model: int = 256
    d_ff: int = 512
    n_experts: int = 8
    activation: str = "swiglu"
    dtype: str = "float32"
    capacity_factor: Optional[float] = None
    warmup: int = 2
    repeats: int = 15
    seed: int = 0


#: The bytes each phase puts on the wire, by Traffic field.
PHASE_BYTES = {"count_exchange": "count_bytes", "row_exchange": "row_bytes", "return": "return_bytes"}


def measure(config: MeasureConfig = MeasureConfig(), pool: Optional[RankPool] = None) -> list:
    """Run every (P, T_r, k) of ``config`` and return ``expert-parallel``
    record dicts (not yet written), one per (P, T_r, k, rank, phase)."""
    import topk_moe

    for P in config.ranks:
        if config.n_experts % P:
            raise ValueError(f"ranks: expected divisors of n_experts = {config.n_experts}, got {P}")
    load = os.getloadavg()[0]  # how busy the machine was, for the records' note
    own_pool = pool is None
    pool = pool or RankPool(max(config.ranks))
    rows = []
    try:
        for P in config.ranks:
            for T in config.tokens:
                for k in config.top_k:
                    cfg = topk_moe.MoEConfig(config.d_model, config.d_ff, config.n_experts, k,
                                             activation=config.activation, capacity_factor=config.capacity_factor)
                    case = {"cfg": cfg, "tokens": T, "seed": config.seed, "dtype": config.dtype,
                            "warmup": config.warmup, "repeats": config.repeats}
                    started = time.perf_counter()
                    results = pool.values(time_phases_on_rank, [case] * P, P)
                    print(f"P = {P}, T_r = {T}, k = {k}: {time.perf_counter() - started:.1f} s", flush=True)
                    rows.extend(_records(config, P, T, k, results, load))
    finally:
        if own_pool:
            pool.close()
    return rows


def _records(config: MeasureConfig, P: int, T: int, k: int, results: list, load: float) -> list:
    from topk_moe.expert_parallel import expected_row_bytes

    itemsize = np.dtype(config.dtype).itemsize
    params = {"ranks": P, "tokens_per_rank": T, "top_k": k, "d_model": config.d_model, "d_ff": config.d_ff,
              "n_experts": config.n_experts, "activation": config.activation, "dtype": config.dtype,
              "capacity_factor": config.capacity_factor, "warmup": config.warmup, "repeats": config.repeats,
              "seed": config.seed, "transport": TRANSPORT, "threads_per_rank": THREADS_PER_RANK,
              "load_average_at_start": load,
              "note": (f"{P} processes on one machine with {os.cpu_count()} cores (load average "
                       f"{load:.1f} when the run started); loopback, not a network; a short run of "
                       f"{config.repeats} timed calls per phase")}
    out = []
    for rank, result in enumerate(results):
        traffic = result["traffic"]
        for phase, timing in result["timings"].items():
            field = PHASE_BYTES.get(phase)
            out.append({
                "params": params, "measurement": "phase-time", "rank": rank, "phase": phase,
                **{key: timing[key] for key in ("median_s", "p20_s", "p80_s", "repeats")},
                "bytes_sent": traffic[field] if field else 0,
                "rows_to": traffic["rows_to"], "rows_from": traffic["rows_from"],
                "kept_rows": result["kept_rows"],
                "expected_row_bytes": expected_row_bytes(T, k, config.d_model, itemsize, P),
            })
    return out



# ---------------------------------------------------------------- the model at scale

#: Mixtral 8x7B's MoE layer (Jiang et al. 2024, "Mixtral of Experts", Table 1:
#: dim 4096, hidden_dim 14336, n_experts 8, top_k_experts 2).
MIXTRAL = {"d_model": 4096, "d_ff": 14336, "n_experts": 8, "activation": "swiglu"}
MODEL_GPUS = 8
MODEL_ITEMSIZE = 2  # bfloat16

#: Bandwidth per GPU, in bytes per second, in ONE direction, and where it comes from.
LINKS = {
    "NVLink (H100 SXM)": {
        "bytes_per_s": 900e9 / 2,
        "source": ("NVIDIA H100 Tensor Core GPU datasheet: NVLink 900 GB/s per GPU (H100 SXM), "
                   "the sum of both directions, so 450 GB/s each way"),
    },
    "InfiniBand NDR": {
        "bytes_per_s": 400e9 / 8,
        "source": ("NVIDIA ConnectX-7 / Quantum-2 InfiniBand NDR: 400 Gb/s per port, one port per GPU "
                   "as in a DGX H100 (8 ConnectX-7 for 8 GPUs), so 50 GB/s each way"),
    },
}
#: The GPU whose expert GEMM floor the exchange is set against: issue 21's
#: datasheet numbers (dense BF16/FP16 tensor peak, HBM bandwidth), one source for both models.
H100 = gpu_model.DEVICES["H100 SXM"]
MODEL_LABEL = "predicted (model)"


def mixtral_model(tokens_per_gpu: Sequence[int] = (1, 16, 128, 1024, 4096, 16384),
                  top_k: Sequence[int] = (1, 2)) -> list:
    """The all-to-all time per layer against the expert GEMM floor, per GPU, for
    the Mixtral-sized layer on 8 GPUs with one expert each (module docstring).

    Each GPU holds T_r tokens and, with uniform routing and nothing dropped,
    sends ``T_r·K·D·2·(P-1)/P`` bytes out and as many back (two all-to-alls),
    and its expert gets ``T_r·K`` rows (E = P). The all-to-all time is bytes
    over the one-way link bandwidth, a bandwidth-only floor: no latency, no
    congestion, no overlap with compute. The expert floor is the roofline of
    ``expert_gemm1`` + ``expert_gemm2`` for those rows and one expert's weights
    (compulsory bytes, no launch overhead) at the H100 SXM's datasheet peaks
    as ``gpu_model.DEVICES`` holds them. Every number is labelled ``MODEL_LABEL``."""
    from topk_moe.expert_parallel import expected_row_bytes

    D, F, E = MIXTRAL["d_model"], MIXTRAL["d_ff"], MIXTRAL["n_experts"]
    P = MODEL_GPUS
    rows = []
    for k in top_k:
        for T in tokens_per_gpu:
            one_way = expected_row_bytes(T, k, D, MODEL_ITEMSIZE, P)
            costs = roofline.stage_costs(T, D, F, E, k, MIXTRAL["activation"], MODEL_ITEMSIZE,
                                         kept_assignments=T * k, experts_used=1)
            expert_s = roofline.pipeline_roofline_seconds(
                [costs["expert_gemm1"], costs["expert_gemm2"]], H100.tensor_flop_per_s, H100.hbm_bytes_per_s)
            row = {"label": MODEL_LABEL, "top_k": k, "tokens_per_gpu": T, "bytes_per_all_to_all": one_way,
                   "bytes_per_layer": 2 * one_way, "expert_floor_s": expert_s,
                   "expert_bound": roofline.bound(costs["expert_gemm1"] + costs["expert_gemm2"],
                                                  H100.tensor_flop_per_s, H100.hbm_bytes_per_s)}
            for link, spec in LINKS.items():
                seconds = 2 * one_way / spec["bytes_per_s"]
                row[f"{link} s"] = seconds
                row[f"{link} / experts"] = seconds / expert_s
            rows.append(row)
    return rows


# ---------------------------------------------------------------- command line


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.measure.expert_parallel",
                                     description=__doc__.split("\n\n")[0])
    defaults = MeasureConfig()
    parser.add_argument("--ranks", type=int, nargs="+", default=list(defaults.ranks))
    parser.add_argument("--tokens", type=int, nargs="+", default=list(defaults.tokens), help="T_r, per rank")
    parser.add_argument("--top-k", type=int, nargs="+", default=list(defaults.top_k), choices=(1, 2))
    parser.add_argument("--shape", type=int, nargs=3, metavar=("D", "F", "E"),
                        default=[defaults.d_model, defaults.d_ff, defaults.n_experts])
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--results-dir", default=None, help="default: results/ ($MOE_RESULTS_DIR)")
    args = parser.parse_args(argv)
    D, F, E = args.shape
    config = MeasureConfig(ranks=tuple(args.ranks), tokens=tuple(args.tokens), top_k=tuple(args.top_k),
                           d_model=D, d_ff=F, n_experts=E, repeats=args.repeats)
    started = time.perf_counter()
    rows = measure(config)
    path = records.write_records(RECORD_KIND, rows, results_dir=args.results_dir)
    print(f"wrote {len(rows)} records to {path} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
