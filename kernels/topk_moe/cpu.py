"""The fast CPU baseline: vectorised NumPy and BLAS in the input's dtype, on every core.

Same contract as `reference.py`, without Python loops over tokens: the router
is one GEMM and element-wise work across the experts, dispatch is a stable
counting sort, each expert runs BLAS GEMMs on blocks of its rows, and combine
is K gathers (no `np.add.at`, whose scatter is slow and whose order is not ours
to choose). float32 and float64.

Threads. Every stage (route, permute, the expert MLPs, combine, the dense MLP)
is cut into *tasks* that write disjoint parts of the output, and a pool of
worker threads runs them while BLAS is pinned to one thread per worker. NumPy
and BLAS release the GIL, so the workers run at once and both GEMMs and the
element-wise and gather work between them use every core; BLAS's own threads
would parallelise only the GEMMs. The number of workers is the thread count
BLAS has when the call starts (`threads()`; by default every core, set it with
`threadpoolctl.threadpool_limits` or OPENBLAS_NUM_THREADS). The BLAS setting
is the process's: calls made from several threads at once share it, so make
one call at a time.

Scratch. Each worker thread keeps its own buffers (`_Scratch`) for a block's
gathered rows, hidden activations and output, reused from block to block: a
fresh array per block would be a fresh allocation, which for arrays this large
means fresh pages from the kernel, faulted in and zeroed on every call. The
activation runs on ACTIVATION_ROWS rows at a time so that its temporaries stay
small.

Determinism. How a stage is cut into tasks depends only on the shapes and the
routing, never on the number of workers, and every task runs single-threaded
BLAS on the same arrays whichever worker takes it. So the same input gives
bitwise the same output whatever the number of threads
(tests/test_cpu_threads.py checks 1, 2 and 3).

How an expert (or the dense MLP) with n rows is cut: into blocks of about
ROW_BLOCK rows, each a whole MLP (first GEMM, activation, second GEMM) whose
hidden activations stay in cache; blocks are smaller when the layer has few
rows in all, so that there are MIN_TASKS of them to share out, but not below
MIN_BLOCK_ROWS (an expert with fewer rows is one block). Experts that are one
block each are grouped, consecutive experts together, into about MIN_TASKS
tasks of at most a block's rows: each group gathers its rows once, runs each
expert's GEMMs on that expert's rows and one activation over all of them, so
many experts with a few rows each (E = 64 at decode) cost a few tasks' Python,
not one task's per expert. The grouping depends only on the routing, and each
expert's products are the ones it makes alone. A stage with one task, or
an expert stage of little work in all (PARALLEL_MIN_WORK: a decode
step at small D and F), runs on the calling thread alone: handing work to a
helper and taking the GIL back costs 60 to 250 microseconds, more than a
second core would save on tasks that short. Blocks of at most GEMV_ROWS
rows multiply row by row (GEMV), not by GEMM.

`moe_forward` runs permute and combine inside the expert tasks: a block
gathers its own rows of x, scales its output rows by their routing weights and
adds them straight into y at their tokens (`_TokenSums`: for K = 2 under a
lock, in an order that cannot change the sum). The result is the one the
separate stages give, bit for bit (for K = 1 up to the sign of a zero).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
from scipy.special import erf
from threadpoolctl import ThreadpoolController

from .types import DispatchPlan, Routing

name = "cpu"
float_dtypes = (np.dtype(np.float32), np.dtype(np.float64))

#: Rows in one MLP block, about: an expert of n rows makes round(n / ROW_BLOCK)
#: blocks (at least one), so a block has at most 1.5 ROW_BLOCK rows. Its hidden
#: activations (rows x F, twice for swiglu) live in the worker's scratch, and
#: each block's GEMMs pack the expert's weights once, so larger blocks pack
#: less per row: 512 beat 256 by 4-8% single-threaded at T = 4096.
ROW_BLOCK = 512
#: Fewest rows in one MLP block (below it, BLAS spends more time packing the
#: weights than multiplying), unless the expert has fewer rows in all.
MIN_BLOCK_ROWS = 64
#: Blocks shrink (down to MIN_BLOCK_ROWS) until a stage has this many tasks,
#: enough to share out among the workers of a machine with a few cores.
MIN_TASKS = 8
#: Blocks of at most this many rows multiply by one GEMV per row, not a GEMM:
#: OpenBLAS packs the weights before a GEMM, and for a few rows that costs
#: more than reading the weights again from cache for each row (measured on
#: the whole layer, D = 512, F = 1024, E = 8, alternating calls: T = 16, k = 1
#: 14% faster, T = 4 3%, T = 1 and T = 64 the same within noise).
GEMV_ROWS = 3
#: An expert stage of less work than this runs on the calling thread alone,
#: however many tasks it has: handing tasks to a helper thread and waiting for
#: it costs 60 to 250 microseconds (the GIL passes back and forth at every
#: NumPy call), more than a second core saves on so little work. Work is
#: counted in multiply-adds (rows x D x F per weight matrix), plus
#: WEIGHT_READ_COST for each weight of the touched experts, which a decode
#: step reads from memory. Measured on the whole layer on two idle cores,
#: alternating one worker and two on the same inputs, weights rotated past
#: the cache: one worker was faster at T = 1, k = 2, D = 512, F = 1024 gelu
#: (31 M) and T = 4, k = 2, D = 256, F = 512 relu (31 M), the two the same
#: within noise at T = 16, D = 256, F = 512 (k = 1 relu, 30 M; k = 2 gelu,
#: 38 M; k = 1, E = 64 swiglu, 89 M), two workers faster at T = 1, k = 2,
#: D = 1024, F = 2048 gelu (126 M, 1.8 against 2.2 ms) and T = 16, k = 1,
#: D = 384, F = 768, E = 16 swiglu (150 M, 3.6 against 4.0 ms).
PARALLEL_MIN_WORK = 40_000_000
#: A weight read from memory costs about as long as this many multiply-adds:
#: one thread's GEMV reads about 2.5 G float32 weights per second from memory
#: (the bench's one-row read rate, about 10 GB/s here), where its GEMMs make
#: about 35 G multiply-adds per second.
WEIGHT_READ_COST = 14
#: Tokens per task in route and combine, rows per task in permute.
TOKEN_BLOCK = 1024
#: Rows of the hidden activations activated at a time (gelu's three work
#: arrays are this many rows). Fewer rows would fit L2 better, but every NumPy
#: call a worker makes has to take the GIL back when it ends, and with two
#: workers that wait grows with the number of calls: dense gelu at T = 4096 on
#: 2 threads ran about 10% slower with 32-row slices than with 128.
ACTIVATION_ROWS = 128

Task = Callable[[], None]


# ---------------------------------------------------------------- the worker pool


_blas: Optional[list] = None
_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_pool_lock = threading.Lock()


def _blas_controllers() -> list:
    """threadpoolctl's controllers of the BLAS libraries loaded in this process."""
    global _blas
    if _blas is None:
        _blas = ThreadpoolController().select(user_api="blas").lib_controllers
    return _blas


def threads() -> int:
    """Worker threads a call made now uses: the thread count BLAS has now
    (the largest, where several BLAS libraries are loaded; 1 where none is)."""
    return max((controller.get_num_threads() for controller in _blas_controllers()), default=1)


def _helpers(count: int) -> ThreadPoolExecutor:
    """A pool of at least ``count`` helper threads (the caller is one more worker)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < count:
            if _pool is not None:
                _pool.shutdown(wait=True)
            _pool, _pool_size = ThreadPoolExecutor(max_workers=count, thread_name_prefix="topk-moe-cpu"), count
        return _pool


def _drain(tasks: list[Task], next_index) -> None:
    # next() on an itertools.count is atomic under the GIL: each task runs once.
    for index in next_index:
        if index >= len(tasks):
            return
        tasks[index]()


_pinned = threading.local()  # .workers: the worker count of the pinned call this thread is in


@contextlib.contextmanager
def _pinned_blas():
    """Yield the worker count (``threads()``, read first) with BLAS pinned to
    one thread until the block ends; the caller's setting is restored after.
    Nested (a stage called by ``moe_forward``), it yields the outer count.
    The controllers are called directly: threadpoolctl's ``limit`` costs
    about 25 microseconds, a tenth of a decode step."""
    workers = getattr(_pinned, "workers", None)
    if workers is not None:
        yield workers
        return
    controllers = _blas_controllers()
    before = [controller.get_num_threads() for controller in controllers]
    workers = max(before, default=1)
    try:
        for controller in controllers:
            controller.set_num_threads(1)
        _pinned.workers = workers
        yield workers
    finally:
        _pinned.workers = None
        for controller, count in zip(controllers, before):
            controller.set_num_threads(count)


def _run(tasks: list[Task], workers: int) -> None:
    """Run every task on ``workers`` threads (the caller and helpers); call
    inside ``_pinned_blas``. Tasks write disjoint outputs, so which worker runs
    which task, and when, does not change the result. Tasks are taken in list
    order: put the largest first."""
    workers = min(workers, len(tasks))
    if workers <= 1:
        for task in tasks:
            task()
        return
    next_index = itertools.count()
    helpers = [_helpers(workers - 1).submit(_drain, tasks, next_index) for _ in range(workers - 1)]
    try:
        _drain(tasks, next_index)
    finally:
        for helper in helpers:
            helper.result()  # waits, and re-raises a helper's error


def _blocks(n: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of at most ``size`` covering range(n)."""
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _balanced_blocks(n: int, size: int) -> list[tuple[int, int]]:
    """round(n / size) ranges (at least one) of near-equal length covering
    range(n): each about ``size`` long, at most 1.5 ``size``. An expert a few
    rows over ``size`` stays one block rather than a full one and a sliver."""
    pieces = max(1, round(n / size))
    edges = [n * piece // pieces for piece in range(pieces + 1)]
    return list(zip(edges[:-1], edges[1:]))


class _Scratch(threading.local):
    """This thread's reusable buffers, one per (purpose, dtype), grown to the
    largest block seen and kept for the life of the thread: a block's rows and
    output (rows x D), hidden activations and gate (rows x F each) and the
    activation's work arrays (3 x ACTIVATION_ROWS x F). With blocks of up to
    768 rows in float32 that is about 10 MiB per worker at D = 512, F = 1024,
    and about 65 MiB after a swiglu MLP of width F = 8192."""

    def __init__(self):
        self.buffers: dict = {}

    def get(self, purpose: str, shape: tuple, dtype) -> np.ndarray:
        """An uninitialised C-contiguous array of ``shape`` in the ``purpose`` buffer."""
        dtype = np.dtype(dtype)
        size = math.prod(shape)
        buffer = self.buffers.get((purpose, dtype))
        if buffer is None or buffer.size < size:
            buffer = self.buffers[purpose, dtype] = np.empty(size, dtype=dtype)
        return buffer[:size].reshape(shape)


_scratch = _Scratch()


# ---------------------------------------------------------------- stages


def to_compute(a: np.ndarray) -> np.ndarray:
    """The CPU baseline computes in the input's own dtype (checked by the caller)."""
    return np.asarray(a)


def to_index(a) -> np.ndarray:
    return np.asarray(a, dtype=np.int64)


def all_finite(a: np.ndarray) -> bool:
    return bool(np.isfinite(a).all())


def route(x: np.ndarray, router: np.ndarray, k: int, renormalize: bool) -> Routing:
    with _pinned_blas() as workers:
        return _route(x, router, k, renormalize, workers)


def permute(x: np.ndarray, plan: DispatchPlan) -> np.ndarray:
    rows = np.empty((plan.token.shape[0], x.shape[1]), dtype=x.dtype)
    with _pinned_blas() as workers:
        # mode="clip": the plan's indices are in range, and with out= the
        # default mode="raise" makes NumPy gather into a temporary and copy.
        _run([functools.partial(np.take, x, plan.token[start:stop], axis=0, out=rows[start:stop], mode="clip")
              for start, stop in _blocks(rows.shape[0], TOKEN_BLOCK)], workers)
    return rows


def expert_mlp(rows, offsets, w1, w2, w3, activation) -> np.ndarray:
    out = np.empty((int(offsets[-1]), w2.shape[2]), dtype=rows.dtype)
    with _pinned_blas() as workers:
        _run_experts(rows, None, offsets, w1, w2, w3, activation, _RowsInto(out), workers)
    return out


def combine(expert_out: np.ndarray, weights: np.ndarray, row: np.ndarray) -> np.ndarray:
    y = np.zeros((row.shape[0], expert_out.shape[1]), dtype=expert_out.dtype)
    with _pinned_blas() as workers:
        _run([functools.partial(_combine_block, expert_out, weights[start:stop], row[start:stop],
                                y[start:stop])
              for start, stop in _blocks(row.shape[0], TOKEN_BLOCK)], workers)
    return y


def dense_mlp(x, w1, w2, w3, activation) -> np.ndarray:
    out = np.empty((x.shape[0], w2.shape[1]), dtype=x.dtype)
    with _pinned_blas() as workers:
        _run([task for _, task in _mlp_tasks(x, None, 0, x.shape[0], w1, w2, w3, activation, _RowsInto(out),
                                             _block_rows(x.shape[0]))], workers)
    return out


def moe_forward(x, router, w1, w2, w3, activation: str, k: int, renormalize: bool,
                capacity: Optional[int]) -> tuple:
    """(y, routing, plan): the stages in one pinned region, with permute and
    combine folded into the expert tasks (see the module docstring)."""
    with _pinned_blas() as workers:
        routing = _route(x, router, k, renormalize, workers)
        plan = dispatch(routing.experts, w1.shape[0], capacity)
        sums = _TokenSums(plan, routing.weights, x.shape[0], x.shape[1])
        _run_experts(x, plan.token, plan.offsets, w1, w2, w3, activation, sums, workers)
    return sums.y, routing, plan


def _route(x: np.ndarray, router: np.ndarray, k: int, renormalize: bool, workers: int) -> Routing:
    n_tokens, n_experts = x.shape[0], router.shape[1]
    experts = np.empty((n_tokens, k), dtype=np.int32)
    weights = np.empty((n_tokens, k), dtype=x.dtype)
    probs = np.empty((n_tokens, n_experts), dtype=x.dtype)
    _run([functools.partial(_route_block, x[start:stop], router, k, renormalize,
                            experts[start:stop], weights[start:stop], probs[start:stop])
          for start, stop in _blocks(n_tokens, TOKEN_BLOCK)], workers)
    return Routing(experts=experts, weights=weights, probs=probs)


def _route_block(x, router, k, renormalize, experts_out, weights_out, probs_out) -> None:
    # Experts along the first axis: every reduction over the E experts becomes
    # element-wise work between E contiguous rows, not E-wide rows one by one.
    logits = np.ascontiguousarray((x @ router).T)  # (E, tokens), accumulated by BLAS in the input dtype
    probs = logits - logits.max(axis=0)
    np.exp(probs, out=probs)
    probs /= probs.sum(axis=0)
    probs_out[...] = probs.T

    # argmax returns the first maximum, so a tie goes to the smaller index;
    # masking the winner and taking argmax again gives the runner-up with the
    # same rule. For K <= 2 this beats a sort.
    first = np.argmax(logits, axis=0)
    experts_out[:, 0] = first
    columns = np.arange(logits.shape[1])
    if k == 2:
        logits[first, columns] = -np.inf
        experts_out[:, 1] = np.argmax(logits, axis=0)
    weights_out[...] = probs[experts_out.T, columns].T
    if renormalize:
        weights_out /= weights_out.sum(axis=1, keepdims=True)


def dispatch(experts: np.ndarray, n_experts: int, capacity: Optional[int]) -> DispatchPlan:
    n_tokens, k = experts.shape
    # Assignment a = j * T + t, so a flat j-major list sorted stably by expert
    # keeps each expert's arrivals in the contract's order.
    assignment_expert = experts.T.reshape(-1)
    order = np.argsort(assignment_expert, kind="stable")
    arrivals = np.bincount(assignment_expert, minlength=n_experts)
    if capacity is None:
        counts, kept_assignment = arrivals, order
    else:
        first_arrival = np.cumsum(arrivals) - arrivals
        arrival_rank = np.arange(order.size) - first_arrival[assignment_expert[order]]
        counts = np.minimum(arrivals, capacity)
        kept_assignment = order[arrival_rank < capacity]
    offsets = np.zeros(n_experts + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    # Kept assignments, still sorted by (expert, arrival), are exactly rows 0..N-1.
    token = kept_assignment % n_tokens if n_tokens else kept_assignment
    row_of_assignment = np.full(order.size, -1, dtype=np.int64)
    row_of_assignment[kept_assignment] = np.arange(kept_assignment.size)
    row = row_of_assignment.reshape(k, n_tokens).T.copy()
    return DispatchPlan(counts=counts.astype(np.int64, copy=False), offsets=offsets,
                        token=token.astype(np.int64, copy=False), row=row)


def _combine_block(expert_out, weights, row, y) -> None:
    """y += weights[:, j] * expert_out[row[:, j]] for each kept j, in j order,
    so the sum is the same whatever the batch."""
    for j in range(row.shape[1]):
        rows_j = row[:, j]
        kept = rows_j >= 0
        if kept.all():
            contribution = np.take(expert_out, rows_j, axis=0)
            contribution *= weights[:, j, None]
            y += contribution
        elif kept.any():
            contribution = np.take(expert_out, rows_j[kept], axis=0)
            contribution *= weights[kept, j, None]
            y[kept] += contribution


# ---------------------------------------------------------------- where expert rows go


class _RowsInto:
    """Expert output row i goes to out[i] (the ``expert_mlp`` stage, the dense MLP)."""

    def __init__(self, out: np.ndarray):
        self.out = out

    def buffer(self, start: int, stop: int) -> np.ndarray:
        """Where the MLP writes rows start:stop (here: their place in out)."""
        return self.out[start:stop]

    def store(self, start: int, stop: int, computed: np.ndarray, pieces=None) -> None:
        pass  # computed in place


class _TokenSums:
    """Expert output row i, scaled by its routing weight, is added to y at
    its token, plan.token[i]; y starts at zero, so a token whose assignments
    were all dropped stays zero.

    For K = 1 no two rows share a token, so a block's rows are written
    straight into y. For K = 2 the two rows of a token come from two experts,
    maybe from blocks running at once on two workers, so a block adds its rows
    under a lock. The order the two arrive in does not change a bit of y:
    (0 + a) + b == (0 + b) + a in IEEE arithmetic (addition commutes, and
    0 + a differs from a only for a = -0, where both orders give +0), and it
    is the sum ``combine`` makes, y = (0 + slot 0) + slot 1. (For K = 1 a
    written -0 stays -0, where combine's 0 + (-0) is +0.) Adding in place
    keeps the layer's memory to one (T, D) output, as the dense MLP's."""

    def __init__(self, plan: DispatchPlan, weights: np.ndarray, n_tokens: int, width: int):
        self.k = plan.row.shape[1]
        self.y = np.zeros((n_tokens, width), dtype=weights.dtype)
        self.token = plan.token
        self.weight = np.empty(plan.token.shape[0], dtype=weights.dtype)
        for j in range(self.k):
            rows_j = plan.row[:, j]
            kept = rows_j >= 0
            self.weight[rows_j[kept]] = weights[kept, j]
        self.lock = threading.Lock()

    def buffer(self, start: int, stop: int) -> np.ndarray:
        """Where the MLP writes rows start:stop (this thread's scratch, moved by ``store``)."""
        return _scratch.get("out", (stop - start, self.y.shape[1]), self.y.dtype)

    def store(self, start: int, stop: int, computed: np.ndarray, pieces=None) -> None:
        """Rows start:stop (``computed``) into y. ``pieces``: [a, b) ranges
        of start:stop, one per expert, for rows of several experts (a group),
        where a token may come twice (K = 2)."""
        weight = self.weight[start:stop, None]
        if not (weight == 1).all():  # K = 1 with renormalisation: every weight is exactly 1
            computed *= weight
        token = self.token[start:stop]
        if self.k == 1:
            self.y[token] = computed  # no token twice in the layer's rows
            return
        with self.lock:
            # y[token] += rows adds once per distinct index: no token may come
            # twice in one add, and none does within one expert's rows.
            for a, b in pieces or [(start, stop)]:
                self.y[token[a - start:b - start]] += computed[a - start:b - start]


# ---------------------------------------------------------------- the MLP tasks


def _run_experts(source, index, offsets, w1, w2, w3, activation: str, target, workers: int) -> None:
    """Expert e applied to rows offsets[e]:offsets[e+1], where row i is
    source[i] (``index`` None) or source[index[i]] (a gather, folded in), each
    output row handed to ``target`` (``_RowsInto`` or ``_TokenSums``)."""
    bounds = offsets.tolist()
    block_rows = _block_rows(bounds[-1])
    touched = [e for e in range(w1.shape[0]) if bounds[e] < bounds[e + 1]]  # no rows, no task
    # An expert of fewer than 1.5 block_rows rows is one block; such experts
    # go into groups (one task each) of consecutive experts, whose rows are
    # consecutive too. A group is at most block_rows rows and at most
    # group_size experts, so that there are about MIN_TASKS groups to share out.
    small = [e for e in touched if bounds[e + 1] - bounds[e] < 1.5 * block_rows]
    group_size = max(1, math.ceil(len(small) / MIN_TASKS))
    tasks, group = [], []

    def close_group():
        if group:
            start, stop = bounds[group[0]], bounds[group[-1] + 1]
            tasks.append((stop - start, functools.partial(_mlp_group, source, index, group[:], bounds, w1, w2, w3,
                                                          activation, target)))
            group.clear()

    for e in touched:
        rows = bounds[e + 1] - bounds[e]
        if rows >= 1.5 * block_rows:
            close_group()
            gate_weights = w3[e] if w3 is not None else None
            tasks += _mlp_tasks(source, index, bounds[e], bounds[e + 1], w1[e], w2[e], gate_weights,
                                activation, target, block_rows)
            continue
        # Only experts without rows lie between a group's last expert and e
        # (a large one closes the group), so the group's rows stay consecutive.
        if group and (len(group) == group_size or bounds[e + 1] - bounds[group[0]] > block_rows):
            close_group()
        group.append(e)
    close_group()
    # Largest blocks first, so that the last tasks the workers take are short ones.
    tasks.sort(key=lambda sized: sized[0], reverse=True)
    _run([task for _, task in tasks], _workers_for(bounds[-1], len(touched), w1, w3, workers))


def _workers_for(total_rows: int, touched_experts: int, w1, w3, workers: int) -> int:
    """``workers``, or 1 for an expert stage too small to share out
    (PARALLEL_MIN_WORK). Which thread runs a task never changes its result,
    so this changes only the time."""
    weights_per_expert = w1.shape[1] * w1.shape[2] * (2 if w3 is None else 3)
    work = (total_rows + WEIGHT_READ_COST * touched_experts) * weights_per_expert
    return workers if work >= PARALLEL_MIN_WORK else 1


def _block_rows(total_rows: int) -> int:
    """Rows per MLP block for a stage of ``total_rows`` rows (all experts):
    ROW_BLOCK, or fewer so there are MIN_TASKS blocks, but not below MIN_BLOCK_ROWS."""
    return min(ROW_BLOCK, max(MIN_BLOCK_ROWS, math.ceil(total_rows / MIN_TASKS)))


def _mlp_tasks(source, index, start: int, stop: int, w1, w2, w3, activation: str, target,
               block_rows: int) -> list:
    """Rows start:stop of one MLP cut into blocks of about ``block_rows``
    rows (fewer rows: one block; none: no task), as (rows, task) pairs."""
    if stop == start:
        return []
    return [(b - a, functools.partial(_mlp_block, source, index, start + a, start + b, w1, w2, w3, activation, target))
            for a, b in _balanced_blocks(stop - start, block_rows)]


def _rows(source, index, start: int, stop: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Rows start:stop of the MLP's input: of ``source``, or gathered through ``index`` (into ``out``)."""
    if index is None:
        return source[start:stop]
    return np.take(source, index[start:stop], axis=0, out=out, mode="clip")  # "clip": see permute


def _mlp_block(source, index, start: int, stop: int, w1, w2, w3, activation: str, target) -> None:
    """Rows start:stop through the MLP, handed to ``target``; input rows,
    hidden activations and output in this thread's scratch."""
    rows = None if index is None else _scratch.get("rows", (stop - start, source.shape[1]), source.dtype)
    v = _rows(source, index, start, stop, rows)
    out = target.buffer(start, stop)
    _mlp_into(v, w1, w2, w3, activation, out)
    target.store(start, stop, out)


def _mlp_group(source, index, experts: list, bounds: list, w1, w2, w3, activation: str, target) -> None:
    """Consecutive experts, each of its rows bounds[e]:bounds[e + 1], as one
    task: one gather of all their rows, each expert's GEMMs on its own rows,
    one activation over all hidden rows (element-wise, so the same values as
    one per expert) and one store. Many experts with a few rows each (decode,
    E = 64) cost one task's Python instead of one per expert."""
    start, stop = bounds[experts[0]], bounds[experts[-1] + 1]
    if len(experts) == 1:
        e = experts[0]
        _mlp_block(source, index, start, stop, w1[e], w2[e], None if w3 is None else w3[e], activation, target)
        return
    rows = None if index is None else _scratch.get("rows", (stop - start, source.shape[1]), source.dtype)
    v = _rows(source, index, start, stop, rows)
    hidden = _scratch.get("hidden", (stop - start, w1.shape[2]), v.dtype)
    gate = None if activation != "swiglu" else _scratch.get("gate", hidden.shape, v.dtype)
    for e in experts:
        a, b = bounds[e] - start, bounds[e + 1] - start
        _matmul(v[a:b], w1[e], hidden[a:b])
        if gate is not None:
            _matmul(v[a:b], w3[e], gate[a:b])
    _activate(hidden, gate, activation)
    out = target.buffer(start, stop)
    for e in experts:
        a, b = bounds[e] - start, bounds[e + 1] - start
        _matmul(hidden[a:b], w2[e], out[a:b])
    target.store(start, stop, out, [(bounds[e], bounds[e + 1]) for e in experts])


def _mlp_into(v, w1, w2, w3, activation: str, out: np.ndarray) -> None:
    """out = act(v @ w1) @ w2 (swiglu: (silu(v @ w1) * (v @ w3)) @ w2), the
    hidden activations in this thread's scratch."""
    hidden = _scratch.get("hidden", (v.shape[0], w1.shape[1]), v.dtype)
    _matmul(v, w1, hidden)
    gate = None
    if activation == "swiglu":
        gate = _scratch.get("gate", hidden.shape, v.dtype)
        _matmul(v, w3, gate)
    _activate(hidden, gate, activation)
    _matmul(hidden, w2, out)


def _matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """out = a @ b: one GEMV per row for at most GEMV_ROWS rows, else one GEMM."""
    if a.shape[0] > GEMV_ROWS:
        np.matmul(a, b, out=out)
        return
    for i in range(a.shape[0]):
        np.matmul(a[i], b, out=out[i])


def _activate(hidden: np.ndarray, gate: Optional[np.ndarray], activation: str) -> None:
    """hidden = act(hidden), in place (swiglu: silu(hidden) * gate), ACTIVATION_ROWS rows at a time."""
    for start in range(0, hidden.shape[0], ACTIVATION_ROWS):
        _activate_rows(hidden[start:start + ACTIVATION_ROWS],
                       None if gate is None else gate[start:start + ACTIVATION_ROWS], activation)


def _activate_rows(hidden: np.ndarray, gate: Optional[np.ndarray], activation: str) -> None:
    if activation == "relu":
        # max(h, 0) as a clip to [0, inf]: NumPy's clip has a vectorised loop for
        # two finite-dtype bounds where its maximum does not, and is 2.5 to 3 times
        # faster (1024 x 1344 float32: 256 against 772 us). The same values, NaN
        # propagated; -0 stays -0, where maximum gives +0.
        np.clip(hidden, hidden.dtype.type(0), hidden.dtype.type(np.inf), out=hidden)
    elif activation == "gelu":
        _gelu_into(hidden)
    else:  # swiglu: silu(h) * gate = h * gate / (1 + exp(-h)), six times faster than scipy's expit
        denominator = np.negative(hidden, out=_scratch.get("activation", hidden.shape, hidden.dtype))
        with np.errstate(over="ignore"):  # exp(-h) = inf for h < -88 (float32): h / inf = 0, silu's limit
            np.exp(denominator, out=denominator)
        denominator += 1
        hidden *= gate
        hidden /= denominator


#: erf for float32 as a rational function of s on [-4, 4] (outside, erf is +-1 in
#: float32): s * P(s^2) / Q(s^2), the coefficients of Eigen's and XLA's float32
#: erf (highest power first), absolute error 4.3e-7 against float64 erf.
ERF_NUMERATOR = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
                 -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
ERF_DENOMINATOR = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
                   -1.42647390514189e-02)
#: GELU's clip: erf(h / sqrt 2) for |h / sqrt 2| >= 4 is +-1 in float32.
GELU_CLIP = 4 * math.sqrt(2)


def _gelu_polynomials() -> tuple[tuple, tuple]:
    """(A, B): 0.5 erf(h / sqrt 2) = c A(u) / B(u) with c = h clipped to
    +-GELU_CLIP and u = c^2, A monic (its leading 1 not stored), from the erf
    rational above: substituting s^2 = u / 2 and moving the constants
    0.5, 1 / sqrt 2 and P's leading coefficient into B saves four passes over
    the hidden activations per call."""
    degree_p, degree_q = len(ERF_NUMERATOR) - 1, len(ERF_DENOMINATOR) - 1
    p = [c * 0.5 ** (degree_p - i) for i, c in enumerate(ERF_NUMERATOR)]
    q = [c * 0.5 ** (degree_q - i) for i, c in enumerate(ERF_DENOMINATOR)]
    scale = 0.5 / math.sqrt(2) * p[0]
    return tuple(c / p[0] for c in p[1:]), tuple(c / scale for c in q)


GELU_NUMERATOR, GELU_DENOMINATOR = _gelu_polynomials()


def _gelu_into(hidden: np.ndarray) -> None:
    """hidden = 0.5 h (1 + erf(h / sqrt 2)), in place. float32: the rational
    form above, in 25 passes (NumPy calls) over three work arrays, at most 3.1e-7 max(1, |h|)
    from float64 GELU (about 2.6 ulp; tests/test_cpu_activations.py), below
    the rounding error float32 GEMM 1 leaves in h, and about ten times faster
    than scipy.special.erf, which computes in float64. The project's tolerance
    rule checks the layer's output with it (tests/test_contract.py).
    float64: scipy's erf."""
    if hidden.dtype != np.float32:
        cdf = np.multiply(hidden, 1 / math.sqrt(2), out=_scratch.get("activation", hidden.shape, hidden.dtype))
        erf(cdf, out=cdf)
        cdf += 1
        cdf *= 0.5
        hidden *= cdf
        return
    work = _scratch.get("activation", (3,) + hidden.shape, hidden.dtype)
    clipped, squared, value = work
    np.clip(hidden, np.float32(-GELU_CLIP), np.float32(GELU_CLIP), out=clipped)
    np.multiply(clipped, clipped, out=squared)
    np.add(squared, np.float32(GELU_NUMERATOR[0]), out=value)  # A is monic: u + a1, then Horner
    for coefficient in GELU_NUMERATOR[1:]:
        value *= squared
        value += np.float32(coefficient)
    clipped *= value
    np.multiply(squared, np.float32(GELU_DENOMINATOR[0]), out=value)
    value += np.float32(GELU_DENOMINATOR[1])
    for coefficient in GELU_DENOMINATOR[2:]:
        value *= squared
        value += np.float32(coefficient)
    clipped /= value
    clipped += np.float32(0.5)  # now 0.5 (1 + erf(h / sqrt 2))
    hidden *= clipped
