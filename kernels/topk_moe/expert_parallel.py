"""Expert parallelism over torch.distributed: ``topk_moe.expert_parallel``.

An MoE layer that outgrows one device places its experts on several: rank r of
P holds experts [r·E/P, (r+1)·E/P) and the whole router. Each rank routes its
own tokens, sends every kept row to the rank that holds its expert and gets the
expert's output back, with two all-to-alls per layer (as in DeepSpeed-MoE,
Tutel, MegaBlocks and Megatron-Core; here with uneven splits, no padding):

    route      local: route, dispatch (with this rank's capacity), permute
    counts     all_to_all_single of the per-expert row counts (E/P int64 to each rank)
    rows       all_to_all_single of the rows, uneven splits
    experts    local: the rows sorted by local expert, the expert MLPs
    return     all_to_all_single of the expert outputs, the splits reversed
    combine    local: the weighted sum, as in moe_forward

Capacity is per rank: each rank applies ``capacity(cfg, T_r)`` to its own
T_r tokens (GShard's groups, one group per rank), so the result on a rank is
exactly ``topk_moe.moe_forward(x, full_weights, cfg)`` on that rank's tokens:
the same routing, the same drops, the same sums up to the rounding of the
expert GEMMs (whose row blocks now hold other ranks' rows too).

Before any row moves, the ranks exchange a small fingerprint (the config, the
dtype, the device kind, the shard's shape, a CRC of the router, and any local
problem with the arguments): a config, router or shard that differs across
ranks, or a bad argument on one rank, raises the same ValueError on every rank
instead of leaving the others waiting in a collective. ``E % P != 0`` raises
before any communication (it depends only on cfg and the group). Ranks with
no tokens (T_r = 0) and ranks whose experts receive no rows take part normally.

Devices. CPU tensors go over gloo, computed by the "cpu" backend (or
``$MOE_BACKEND``). CUDA tensors go over NCCL, computed by the "cuda" backend:
tensors become CuPy arrays through DLPack (``topk_moe.torch.as_array``) and
back, on torch's current stream, so the rows are never copied to the host;
only the E/P counts per rank and the router's fingerprint are. **The CUDA and
NCCL path has not been run**: it was written without a GPU and only the gloo
path is tested. Forward only: nothing here computes a gradient.

Run it with one process per device, e.g. ``torchrun --nproc-per-node 2 script.py``
where the script calls ``torch.distributed.init_process_group("gloo")`` (CPU)
or ``"nccl"`` (GPUs, after ``torch.cuda.set_device(local_rank)``).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from . import api, checks
from .torch import as_array, as_tensor, cuda_stream
from .types import DispatchPlan, MoEConfig, MoEOutput, MoEWeights, Routing

#: The phases of one forward, in order (``ExpertParallelForward`` has one method each).
PHASES = ("check", "route", "count_exchange", "row_exchange", "experts", "return", "combine")
#: The phases that communicate.
EXCHANGE_PHASES = ("check", "count_exchange", "row_exchange", "return")
COUNT_BYTES = 8  # the row counts are int64


@dataclasses.dataclass(frozen=True)
class Traffic:
    """What one rank sent to the other ranks in one forward, counted from the
    split sizes and dtypes handed to ``all_to_all_single``. The part of each
    all-to-all a rank addresses to itself is a local copy and is not counted.

    ``rows_to[q]``: rows this rank sent to rank q's experts (its own included);
    ``rows_from[q]``: rows it received from rank q. ``count_bytes``: the
    per-expert counts, E/P int64 to each other rank. ``row_bytes``: rows out,
    ``sum_{q != r} rows_to[q] · D · itemsize``. ``return_bytes``: expert outputs
    back, ``sum_{q != r} rows_from[q] · D · itemsize``. The fingerprint
    exchange (a few hundred bytes of pickled metadata) is not counted.
    """

    rank: int
    ranks: int
    rows_to: tuple
    rows_from: tuple
    count_bytes: int
    row_bytes: int
    return_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.count_bytes + self.row_bytes + self.return_bytes


def expected_row_bytes(tokens_per_rank: int, top_k: int, d_model: int, itemsize: int, ranks: int) -> float:
    """Bytes of rows one rank sends out per layer when routing is uniform and
    nothing is dropped: each of its T_r·K assignments lands on another rank with
    probability (P-1)/P, so ``T_r · K · D · s · (P-1)/P``. The return all-to-all
    sends as many again. This is the formula the model of the book uses; the
    counted bytes (``Traffic``) are its exact version for one batch."""
    return tokens_per_rank * top_k * d_model * itemsize * (ranks - 1) / ranks


def moe_forward(x, weights: MoEWeights, cfg: MoEConfig, *, group=None, backend: Optional[str] = None) -> MoEOutput:
    """The MoE layer with its experts spread over the ranks of ``group``.

    ``x`` (T_r, D): this rank's tokens, a torch tensor (CPU or CUDA).
    ``weights``: the whole router (D, E) and only this rank's experts, w1 and
    w3 (E/P, D, F) and w2 (E/P, F, D), experts [r·E/P, (r+1)·E/P); torch
    tensors on x's device (or NumPy arrays with a CPU x). ``cfg``: the whole
    layer (E counts every expert). ``group``: a torch.distributed process group
    (None: the default group), gloo for CPU tensors, NCCL for CUDA tensors.
    ``backend``: the topk_moe backend for the local work (None: "cuda" for CUDA
    tensors, else ``$MOE_BACKEND`` or "cpu").

    Returns ``MoEOutput`` of tensors on x's device: ``y`` (T_r, D) equals
    ``topk_moe.moe_forward(x, full_weights, cfg)`` on this rank's tokens
    (capacity per rank: ``capacity(cfg, T_r)``); ``routing`` and ``plan`` are
    this rank's, over all E experts, as that call returns them.

    Every rank of the group must call it (a collective). ``E % P != 0`` is a
    ValueError before any communication; any other bad argument, or a config,
    dtype, router or shard shape that differs between ranks, is a ValueError on
    every rank after the fingerprint exchange. The CUDA/NCCL path is unverified
    (written without a GPU; see the module docstring).
    """
    return ExpertParallelForward(x, weights, cfg, group=group, backend=backend).run()


class ExpertParallelForward:
    """One expert-parallel forward, one phase per method (``PHASES``), so that
    each can be timed on its own; ``moe_forward`` is this class's ``run``.

    The constructor is the "check" phase (argument checks and the fingerprint
    exchange: a collective). Each later method reads what the one before it
    left and may be called again (on every rank alike) to time it.
    """

    def __init__(self, x, weights: MoEWeights, cfg: MoEConfig, *, group=None, backend: Optional[str] = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("expert_parallel.moe_forward: torch.distributed is not initialised "
                               "(call torch.distributed.init_process_group first, e.g. under torchrun)")
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg: expected a topk_moe.MoEConfig, got {type(cfg).__name__}")
        self.group = group
        self.ranks = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if cfg.n_experts % self.ranks != 0:
            # Same cfg and group on every rank: every rank raises here, none waits.
            raise ValueError(
                f"cfg.n_experts: expected a multiple of the number of ranks P = {self.ranks} "
                f"(each rank holds E/P experts), got E = {cfg.n_experts}"
            )
        self.cfg = cfg
        self.local_experts = cfg.n_experts // self.ranks
        self.communication_backend = dist.get_backend(group)
        self.x_is_tensor = isinstance(x, torch.Tensor)
        self.device = x.device if self.x_is_tensor else torch.device("cpu")

        problem = None
        try:
            self._take_arguments(x, weights, backend)
        except (ValueError, TypeError) as error:
            problem = f"{type(error).__name__}: {error}"
        _agree_across_ranks(self._fingerprint(problem), self.group, self.ranks)

    # ------------------------------------------------------------ check

    def _take_arguments(self, x, weights: MoEWeights, backend: Optional[str]) -> None:
        """Local checks: everything that can be wrong on one rank alone."""
        cfg = self.cfg
        if not isinstance(weights, MoEWeights):
            raise TypeError(f"weights: expected a topk_moe.MoEWeights, got {type(weights).__name__}")
        if self.device.type == "cuda":
            if self.communication_backend != "nccl":
                raise ValueError(f"group: expected an NCCL group for CUDA tensors, "
                                 f"got a {self.communication_backend!r} group")
            if backend not in (None, "cuda"):
                raise ValueError(f"backend: expected None or 'cuda' for CUDA tensors, got {backend!r}")
            backend = "cuda"
        else:
            if self.communication_backend == "nccl":
                raise ValueError("group: expected a gloo (or mpi) group for CPU tensors, got an 'nccl' group")
            if backend == "cuda":
                raise ValueError("backend: expected a CPU backend for CPU tensors, got 'cuda'")
        self.backend = backend
        self.x = self._array("x", x)
        self.router = self._array("weights.router", weights.router)
        self.w1 = self._array("weights.w1", weights.w1)
        self.w2 = self._array("weights.w2", weights.w2)
        self.w3 = None if weights.w3 is None else self._array("weights.w3", weights.w3)
        D, F, E, local = cfg.d_model, cfg.d_ff, cfg.n_experts, self.local_experts
        checks.check_rank("x", self.x, 2, "(T_r, D)")
        checks.check_dim("x", "D columns", self.x.shape[1], D, "cfg.d_model")
        checks.check_shape("weights.router", self.router, (D, E), "(D, E), the whole router")
        shard = f"this rank's experts, E/P = {E}/{self.ranks} = {local}"
        checks.check_shape("weights.w1", self.w1, (local, D, F), f"(E/P, D, F), {shard}")
        checks.check_shape("weights.w2", self.w2, (local, F, D), f"(E/P, F, D), {shard}")
        checks.check_gate(cfg.activation, self.w3)
        if self.w3 is not None:
            checks.check_shape("weights.w3", self.w3, (local, D, F), f"(E/P, D, F), {shard}")
        dtypes = {name: str(a.dtype) for name, a in (("x", self.x), ("weights.router", self.router),
                                                    ("weights.w1", self.w1), ("weights.w2", self.w2),
                                                    ("weights.w3", self.w3)) if a is not None}
        if len(set(dtypes.values())) != 1:
            raise TypeError(f"weights: expected the dtype of x ({dtypes['x']}) in every weight, got {dtypes}")
        self.itemsize = int(np.dtype(self.x.dtype).itemsize)

    def _array(self, name: str, value: Any):
        """The backend's array over ``value``'s memory: tensors through
        topk_moe.torch.as_array (no copy); NumPy arrays only beside a CPU x."""
        if isinstance(value, torch.Tensor):
            if value.device != self.device:
                raise ValueError(f"{name}: expected a tensor on x's device {self.device}, got one on {value.device}")
            return as_array(value.contiguous(), name)
        if isinstance(value, np.ndarray) and self.device.type == "cpu":
            return np.ascontiguousarray(value)
        raise TypeError(f"{name}: expected a torch.Tensor on {self.device}"
                        f"{' or a NumPy array' if self.device.type == 'cpu' else ''}, got {type(value).__name__}")

    def _fingerprint(self, problem: Optional[str]) -> dict:
        """What must agree across ranks, and this rank's local problem (or None)."""
        cfg = self.cfg
        fingerprint = {
            "problem": problem,
            "config": dataclasses.astuple(cfg),
            "ranks": self.ranks,
            "device kind": self.device.type,
        }
        if problem is None:
            router = self.router.get() if hasattr(self.router, "get") else self.router  # D·E values, not rows
            fingerprint.update({
                "dtype": str(self.x.dtype),
                "backend": self.backend,
                "shard shape": tuple(tuple(a.shape) for a in (self.w1, self.w2, self.w3) if a is not None),
                "router CRC-32": zlib.crc32(np.ascontiguousarray(router).tobytes()),
            })
        return fingerprint

    # ------------------------------------------------------------ phases

    def route(self) -> None:
        """Route this rank's tokens over all E experts, with this rank's
        capacity, and gather the kept rows in expert order (hence rank order)."""
        cfg = self.cfg
        with cuda_stream(self.device):
            self.routing = api.route(self.x, self.router, cfg.top_k, renormalize=cfg.renormalize,
                                     backend=self.backend)
            self.plan = api.dispatch(self.routing.experts, cfg.n_experts,
                                     capacity=api.capacity(cfg, self.x.shape[0]), backend=self.backend)
            self.rows = api.permute(self.x, self.plan, backend=self.backend)
        counts = _host(self.plan.counts).reshape(self.ranks, self.local_experts)
        self.rows_to = [int(n) for n in counts.sum(axis=1)]

    def exchange_counts(self) -> None:
        """Tell each rank how many rows its experts get from this one:
        received[q, e] = rows from rank q for local expert e."""
        sent = as_tensor(self.plan.counts, self.device)
        received = torch.empty_like(sent)
        dist.all_to_all_single(received, sent, group=self.group)
        self.received_counts = received.cpu().numpy().reshape(self.ranks, self.local_experts)  # P·E/P ints
        self.rows_from = [int(n) for n in self.received_counts.sum(axis=1)]

    def exchange_rows(self) -> None:
        """Send each kept row to the rank of its expert (uneven splits)."""
        sent = as_tensor(self.rows, self.device)
        received = torch.empty((sum(self.rows_from), self.cfg.d_model), dtype=sent.dtype, device=self.device)
        dist.all_to_all_single(received, sent, output_split_sizes=self.rows_from,
                               input_split_sizes=self.rows_to, group=self.group)
        self.received_rows = as_array(received, "received rows")

    def run_experts(self) -> None:
        """Apply this rank's experts to the rows received. They arrive grouped
        by source rank, then by local expert; a dispatch over the local experts
        (one choice per row, so its order is stable) sorts them by expert."""
        local_expert_of_row = np.repeat(np.tile(np.arange(self.local_experts, dtype=np.int32), self.ranks),
                                        self.received_counts.ravel()).reshape(-1, 1)
        with cuda_stream(self.device):
            if self.device.type == "cuda":
                local_expert_of_row = as_array(torch.from_numpy(local_expert_of_row).to(self.device))
            local_plan = api.dispatch(local_expert_of_row, self.local_experts, backend=self.backend)
            by_expert = api.permute(self.received_rows, local_plan, backend=self.backend)
            out = api.expert_mlp(by_expert, local_plan, self.w1, self.w2, self.w3,
                                 activation=self.cfg.activation, backend=self.backend)
            # plan.row[i, 0] is where received row i sits in expert order.
            self.expert_rows = out[local_plan.row[:, 0]]

    def return_rows(self) -> None:
        """Send each expert output back to the rank its token lives on; it lands
        at the row the local plan gave it."""
        sent = as_tensor(self.expert_rows, self.device)
        received = torch.empty((sum(self.rows_to), self.cfg.d_model), dtype=sent.dtype, device=self.device)
        dist.all_to_all_single(received, sent, output_split_sizes=self.rows_to,
                               input_split_sizes=self.rows_from, group=self.group)
        self.expert_out = as_array(received, "returned rows")

    def combine(self) -> MoEOutput:
        """The weighted sum of each token's kept expert outputs, as moe_forward."""
        with cuda_stream(self.device):
            y = api.combine(self.expert_out, self.routing, self.plan, backend=self.backend)
        return self._result(y)

    def run(self) -> MoEOutput:
        """Every phase after the check, in order."""
        self.route()
        self.exchange_counts()
        self.exchange_rows()
        self.run_experts()
        self.return_rows()
        return self.combine()

    def traffic(self) -> Traffic:
        """Bytes this rank sent in the last forward (after ``exchange_counts``)."""
        others = [q for q in range(self.ranks) if q != self.rank]
        row_bytes = self.cfg.d_model * self.itemsize
        return Traffic(
            rank=self.rank, ranks=self.ranks,
            rows_to=tuple(self.rows_to), rows_from=tuple(self.rows_from),
            count_bytes=COUNT_BYTES * self.local_experts * len(others),
            row_bytes=row_bytes * sum(self.rows_to[q] for q in others),
            return_bytes=row_bytes * sum(self.rows_from[q] for q in others),
        )

    def _result(self, y) -> MoEOutput:
        if not self.x_is_tensor:
            return MoEOutput(y=y, routing=self.routing, plan=self.plan)
        tensor = lambda a: as_tensor(a, self.device)  # noqa: E731
        routing = Routing(*(tensor(a) for a in dataclasses.astuple(self.routing)))
        plan = DispatchPlan(*(tensor(a) for a in (self.plan.counts, self.plan.offsets, self.plan.token,
                                                  self.plan.row)))
        return MoEOutput(y=tensor(y), routing=routing, plan=plan)


def _host(a) -> np.ndarray:
    return np.asarray(a.get() if hasattr(a, "get") else a)


def _agree_across_ranks(fingerprint: dict, group, ranks: int) -> None:
    """Gather every rank's fingerprint; raise the same ValueError on every rank
    when one reported a problem or when they differ."""
    everyone = [None] * ranks
    dist.all_gather_object(everyone, fingerprint, group=group)
    problems = [f"rank {q}: {f['problem']}" for q, f in enumerate(everyone) if f["problem"] is not None]
    if problems:
        raise ValueError("expert-parallel arguments rejected; " + "; ".join(problems))
    for field in fingerprint:
        values = [f.get(field) for f in everyone]
        if any(value != values[0] for value in values):
            shown = ", ".join(f"rank {q} has {value!r}" for q, value in enumerate(values))
            raise ValueError(f"expert-parallel ranks disagree on the {field}: expected the same on every rank, "
                             f"got {shown}")
