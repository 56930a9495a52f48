"""The launchers of the CUDA backend, written once for both devices.

``Stages(device)`` holds the contract's stages (route, dispatch, permute,
expert_mlp, combine, dense_mlp) as launches of the raw CUDA kernels of this
folder; ``device`` (topk_moe.cuda.device) supplies the array module and the
kernel loader: CuPy and NVRTC on a GPU (backend.py), guarded NumPy buffers and
the host C++ compiler under the emulator (emulator/backend.py). Each launcher
checks nothing more than the API has, allocates, launches, returns.

Dtypes: float32 and float16. All arithmetic is float32 (float16 is widened on
load and rounded once on store); results come back in the input's dtype.
``experts`` is int32 and every plan array int64.

Non-finite input: the router kernel raises a device flag when a logit is not
finite, which happens exactly when x or the router holds NaN or infinity (or
when a float32 logit overflows); ``route`` reads the flag back (one
synchronisation) and raises ValueError, unless ``check_finite=False``.

CUDA graphs: arrays a captured launch writes to but the result does not hold
(the non-finite flag, dispatch scratch, hidden activations, tile starts) are
gathered by ``device.keep_for_graph`` while a capture is in progress; the
capturer takes them with ``device.take_graph_keepalive()`` after ending the
capture and holds them with the graph, so their memory stays valid for every
replay and is freed with the graph (CuPy gives no hook for a graph's release).
Under capture the busiest expert's rows cannot be read back, so ``moe_forward``
passes T as their bound (``expert_mlp(..., max_expert_rows=T)``): the graph
then runs the kernel version an eager call would.

Limits of this version: the router takes E <= 1024 (E logits per token live
in registers), dispatch E <= launch_config.MAX_DISPATCH_EXPERTS (per warp a row base and a
counter per expert in shared memory); beyond them a ValueError says so.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..types import DispatchPlan, Routing
from . import launch_config as config
from . import device as device_module
from .device import Device

_FLOAT16 = np.dtype(np.float16)
NONFINITE_MESSAGE = (
    "x, router: expected finite values, got non-finite entries (NaN or infinity) in x or router, "
    "or float32 logits that overflow (found by the cuda router kernel)"
)

class Stages:
    def __init__(self, device: Device):
        self.device = device
        self.xp = device.xp
        self.get_kernel = device.get_kernel

    def keep_for_graph(self, *arrays) -> None:
        """Keep arrays a captured graph writes alive for as long as it may replay."""
        if self.device.capturing():
            device_module.keep_for_graph(arrays)

    # -- the backend interface ----------------------------------------------

    def to_compute(self, a):
        """A C-contiguous device array (copied to the device when given NumPy)."""
        return self.xp.ascontiguousarray(self.xp.asarray(a))

    def to_index(self, a):
        """int64 on the device, so the caller's range check sees the true values."""
        return self.xp.asarray(a).astype(np.int64, copy=False)

    def all_finite(self, a) -> bool:
        return bool(self.xp.isfinite(a).all())

    def _grid(self, n_items: int, items_per_block: int) -> int:
        """Blocks for a grid-stride kernel: enough for every item, at most
        BLOCKS_PER_SM per multiprocessor."""
        limit = config.BLOCKS_PER_SM * self.device.multiprocessors()
        return max(1, min(-(-n_items // items_per_block), limit))

    # -- route ---------------------------------------------------------------

    def _router_kernel(self, k: int, dtype: np.dtype, defines: dict):
        if dtype == _FLOAT16:
            if k == 1:
                return self.get_kernel("router.cu", "router_top1_f16", **defines)
            return self.get_kernel("router.cu", "router_top2_f16", **defines)
        if k == 1:
            return self.get_kernel("router.cu", "router_top1_f32", **defines)
        return self.get_kernel("router.cu", "router_top2_f32", **defines)

    def route(self, x, router, k: int, renormalize: bool, *, check_finite: bool = True) -> Routing:
        """Logits, softmax and top-k in one kernel (router.cu). x (T, D), router (D, E).

        probs (T, E) and weights (T, k) come back in x's dtype, computed in float32;
        without ``renormalize`` a weight is bitwise its entry of probs.
        """
        xp = self.xp
        n_tokens, d_model = x.shape
        n_experts = router.shape[1]
        defines = config.router_defines(n_experts)
        experts = xp.empty((n_tokens, k), dtype=np.int32)
        weights = xp.empty((n_tokens, k), dtype=x.dtype)
        probs = xp.empty((n_tokens, n_experts), dtype=x.dtype)
        if n_tokens == 0:  # no kernel reads the router, so check it here
            if check_finite and not self.all_finite(router):
                raise ValueError(NONFINITE_MESSAGE)
            return Routing(experts=experts, weights=weights, probs=probs)

        nonfinite = xp.zeros(1, dtype=np.int32)
        blocks = -(-n_tokens // defines["ROUTER_TOKENS"])
        self._router_kernel(k, x.dtype, defines)(
            (blocks,), (config.ROUTER_WARPS * config.WARP,),
            (x, router, np.int64(n_tokens), np.int64(d_model), np.int32(bool(renormalize)),
             experts, weights, probs, nonfinite),
        )
        self.keep_for_graph(nonfinite)
        if check_finite and int(self.device.to_host(nonfinite)[0]) != 0:
            raise ValueError(NONFINITE_MESSAGE)
        return Routing(experts=experts, weights=weights, probs=probs)

    # -- dispatch ------------------------------------------------------------

    def dispatch(self, experts, n_experts: int, capacity: Optional[int]) -> DispatchPlan:
        """The plan by a stable counting sort on the device (dispatch.cu).

        Dropless (and capacity >= T * K): no host synchronisation, N = T * K.
        Otherwise N = offsets[E] is read back once to size ``token``.
        """
        xp = self.xp
        experts = xp.ascontiguousarray(experts, dtype=np.int32)
        n_tokens, k = experts.shape
        warps = config.dispatch_warps_per_block(n_experts)
        defines = config.dispatch_defines()
        n_assignments = n_tokens * k
        n_segments = -(-n_assignments // config.DISPATCH_SEGMENT)
        segment_blocks = -(-n_segments // warps)
        capacity_arg = np.int64(-1 if capacity is None else capacity)

        counts = xp.empty(n_experts, dtype=np.int64)
        offsets = xp.empty(n_experts + 1, dtype=np.int64)
        row = xp.empty((n_tokens, k), dtype=np.int64)
        segment_counts = xp.empty(n_experts * k * n_segments, dtype=np.int64)  # (E, k, segments)

        if n_segments > 0:
            self.get_kernel("dispatch.cu", "dispatch_count_segments", **defines)(
                (segment_blocks,), (warps * config.WARP,),
                (experts, np.int64(n_tokens), np.int32(k), np.int32(n_experts), np.int64(n_segments),
                 segment_counts),
                shared_mem=config.dispatch_shared_bytes("dispatch_count_segments", n_experts),
            )
        self.get_kernel("dispatch.cu", "dispatch_scan_segments", **defines)(
            (n_experts,), (config.SCAN_THREADS,),
            (segment_counts, np.int64(k * n_segments), capacity_arg, counts),  # row length per expert
        )
        self.get_kernel("dispatch.cu", "dispatch_offsets", **defines)(
            (1,), (config.SCAN_THREADS,), (counts, np.int32(n_experts), offsets),
        )

        if capacity is None or capacity >= n_assignments:
            n_kept = n_assignments  # nothing can be dropped: no need to ask the device
        else:
            n_kept = int(self.device.to_host(offsets[n_experts:])[0])
        token = xp.empty(n_kept, dtype=np.int64)
        if n_segments > 0:
            self.get_kernel("dispatch.cu", "dispatch_scatter", **defines)(
                (segment_blocks,), (warps * config.WARP,),
                (experts, np.int64(n_tokens), np.int32(k), np.int32(n_experts), np.int64(n_segments),
                 segment_counts, offsets, capacity_arg, token, row),
                shared_mem=config.dispatch_shared_bytes("dispatch_scatter", n_experts),
            )
        self.keep_for_graph(segment_counts)
        return DispatchPlan(counts=counts, offsets=offsets, token=token, row=row)

    # -- permute, expert MLPs, combine ---------------------------------------

    def _index_array(self, a):
        return self.xp.ascontiguousarray(self.xp.asarray(a, dtype=np.int64))

    def _permute_kernel(self, width: int):
        if width == 16:
            return self.get_kernel("combine.cu", "permute_rows_16")
        if width == 8:
            return self.get_kernel("combine.cu", "permute_rows_8")
        if width == 4:
            return self.get_kernel("combine.cu", "permute_rows_4")
        return self.get_kernel("combine.cu", "permute_rows_2")

    def permute(self, x, plan: DispatchPlan):
        """rows[i] = x[plan.token[i]], copied in the widest aligned vectors (combine.cu)."""
        token = self._index_array(plan.token)
        n_rows = token.shape[0]
        d_model = x.shape[1]
        rows = self.xp.empty((n_rows, d_model), dtype=x.dtype)
        if n_rows == 0 or d_model == 0:
            return rows
        row_bytes = d_model * x.itemsize
        width = config.widest_access(row_bytes, self.device.address(x), self.device.address(rows))
        self._permute_kernel(width)(
            (self._grid(n_rows, config.ROW_WARPS),), (config.ROW_WARPS * config.WARP,),
            (x, token, rows, np.int64(n_rows), np.int64(row_bytes // width)),
        )
        return rows

    def expert_mlp(self, rows, offsets, w1, w2, w3, activation: str, *, max_expert_rows=None):
        """Every expert on its rows offsets[e]:offsets[e+1] (expert_mlp.cu, grouped GEMMs).
        max_expert_rows: a bound of any expert's rows that the caller knows (a layer's T),
        which chooses the kernel version under graph capture (see grouped_mlp)."""
        from .expert_mlp import grouped_mlp  # noqa: PLC0415 - its own module, loaded when first used

        return grouped_mlp(rows, self._index_array(offsets), w1, w2, w3, activation, device=self.device,
                           max_expert_rows=max_expert_rows)

    def _combine_kernel(self, dtype: np.dtype, vector: bool):
        if dtype == _FLOAT16:
            if vector:
                return self.get_kernel("combine.cu", "combine_f16_vector")
            return self.get_kernel("combine.cu", "combine_f16_scalar")
        if vector:
            return self.get_kernel("combine.cu", "combine_f32_vector")
        return self.get_kernel("combine.cu", "combine_f32_scalar")

    def combine(self, expert_out, weights, row):
        """y[t] = sum over kept j, in j order, of weights[t, j] * expert_out[row[t, j]] (combine.cu)."""
        row = self._index_array(row)
        n_tokens, k = row.shape
        d_model = expert_out.shape[1]
        y = self.xp.empty((n_tokens, d_model), dtype=expert_out.dtype)
        if n_tokens == 0 or d_model == 0:
            return y
        elements_per_vector = 16 // expert_out.itemsize
        vector = (
            d_model % elements_per_vector == 0
            and self.device.address(expert_out) % 16 == 0
            and self.device.address(y) % 16 == 0
        )
        self._combine_kernel(expert_out.dtype, vector)(
            (self._grid(n_tokens, config.ROW_WARPS),), (config.ROW_WARPS * config.WARP,),
            (expert_out, weights, row, np.int64(n_tokens), np.int32(k), np.int64(d_model), y),
        )
        return y

    # -- the dense baseline --------------------------------------------------

    def _activate_in_place(self, hidden, gate, activation: str) -> None:
        n = hidden.size
        if n == 0:
            return
        grid = ((self._grid(n, config.ELEMENTWISE_THREADS),), (config.ELEMENTWISE_THREADS,))
        half = hidden.dtype == _FLOAT16
        if activation == "relu":
            kernel = self.get_kernel("activation.cu", "activate_relu_f16" if half else "activate_relu_f32")
            kernel(*grid, (hidden, np.int64(n)))
        elif activation == "gelu":
            kernel = self.get_kernel("activation.cu", "activate_gelu_f16" if half else "activate_gelu_f32")
            kernel(*grid, (hidden, np.int64(n)))
        else:
            kernel = self.get_kernel("activation.cu", "activate_swiglu_f16" if half else "activate_swiglu_f32")
            kernel(*grid, (hidden, gate, np.int64(n)))

    def dense_mlp(self, x, w1, w2, w3, activation: str):
        """act(x @ w1) @ w2 or (silu(x @ w1) * (x @ w3)) @ w2: the GEMMs by the array
        module's matmul (cuBLAS through CuPy, float16 accumulating in float32; NumPy
        under the emulator, which has no cuBLAS), the activation by activation.cu
        in place on the fresh hidden array."""
        xp = self.xp
        hidden = xp.matmul(x, w1)
        gate = xp.matmul(x, w3) if activation == "swiglu" else None
        self._activate_in_place(hidden, gate, activation)
        return xp.matmul(hidden, w2)
