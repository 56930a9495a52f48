"""The fast CPU baseline: vectorised NumPy and BLAS in the input's dtype, on every core.

Same contract as `reference.py`, without Python loops over tokens: the router
is one GEMM and two arg-maxes, dispatch is a stable counting sort, each expert
runs BLAS GEMMs on its contiguous block of rows, and combine is K gathers (no
`np.add.at`, whose scatter is slow and whose order is not ours to choose).
float32 and float64.

Threads. Every stage (route, permute, the expert MLPs, combine, the dense MLP)
is cut into *tasks* that write disjoint parts of the output, and a pool of
worker threads runs them while BLAS is pinned to one thread per worker
(threadpoolctl). NumPy and BLAS release the GIL, so the workers run at once
and both GEMMs and the elementwise and gather work between them use every
core; BLAS's own threads would parallelise only the GEMMs. The number of
workers is the thread count BLAS has when the call starts (`threads()`; by
default every core, set it with `threadpoolctl.threadpool_limits` or
OPENBLAS_NUM_THREADS). The BLAS setting is the process's: calls made from
several threads at once share it, so make one call at a time.

Determinism. How a stage is cut into tasks depends only on the shapes and the
routing, never on the number of workers, and every task runs single-threaded
BLAS on the same arrays whichever worker takes it. So the same input gives
bitwise the same output whatever the number of threads
(tests/test_cpu_threads.py checks 1, 2 and 3).

How an expert (or the dense MLP) with n rows is cut:

- n >= MIN_BLOCK_ROWS: blocks of rows, each a whole MLP (first GEMM,
  activation, second GEMM) whose hidden activations stay in cache. Blocks
  have at most ROW_BLOCK rows, and are smaller when the layer has few rows in
  all, so that there are MIN_TASKS of them to share out.
- n < MIN_BLOCK_ROWS (decode): in chunks of HIDDEN_CHUNK columns of F. Task c
  computes `act(v @ w1[:, c]) @ w2[c, :]`, a partial output, and once all are
  done they are added up in chunk order. Each task reads its own slice of the
  weights, so the workers share the reading of an expert's weights, which is
  all decode does, and one round of tasks does it.
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

#: Most rows in one MLP block. Each block's hidden activations (ROW_BLOCK x F,
#: twice for swiglu) are made, activated and consumed by the second GEMM while
#: they are still in cache; a whole large batch's hidden would stream through
#: DRAM three times. 512 rows keep single-threaded BLAS at full speed.
ROW_BLOCK = 512
#: Fewest rows in one MLP block (below it, BLAS spends more time packing the
#: weights than multiplying): an expert with fewer rows is cut into chunks of F.
MIN_BLOCK_ROWS = 64
#: Blocks shrink (down to MIN_BLOCK_ROWS) until a stage has this many tasks,
#: enough to share out among the workers of a machine with a few cores.
MIN_TASKS = 8
#: Columns of F per task of the chunked MLP (decode).
HIDDEN_CHUNK = 256
#: Tokens per task in route and combine, rows per task in permute.
TOKEN_BLOCK = 1024

Task = Callable[[], None]


# ---------------------------------------------------------------- the worker pool


_blas: Optional[object] = None
_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_pool_lock = threading.Lock()


def _blas_libraries():
    """threadpoolctl's handle on the BLAS libraries loaded in this process."""
    global _blas
    if _blas is None:
        _blas = ThreadpoolController().select(user_api="blas")
    return _blas


def threads() -> int:
    """Worker threads a call made now uses: the thread count BLAS has now
    (the largest, where several BLAS libraries are loaded; 1 where none is)."""
    return max((library["num_threads"] for library in _blas_libraries().info()), default=1)


def _helpers(count: int) -> ThreadPoolExecutor:
    """A pool of at least ``count`` helper threads (the caller is one more worker)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < count:
            if _pool is not None:
                _pool.shutdown(wait=True)
            _pool, _pool_size = ThreadPoolExecutor(max_workers=count, thread_name_prefix="kernels-cpu"), count
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
    Nested (a stage called by ``moe_forward``), it yields the outer count."""
    workers = getattr(_pinned, "workers", None)
    if workers is not None:
        yield workers
        return
    workers = threads()
    with _blas_libraries().limit(limits=1):
        _pinned.workers = workers
        try:
            yield workers
        finally:
            _pinned.workers = None


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
    """ceil(n / size) ranges of near-equal length covering range(n)."""
    pieces = max(1, math.ceil(n / size))
    edges = [n * piece // pieces for piece in range(pieces + 1)]
    return list(zip(edges[:-1], edges[1:]))


# ---------------------------------------------------------------- stages


def to_compute(a: np.ndarray) -> np.ndarray:
    """The CPU baseline computes in the input's own dtype (checked by the caller)."""
    return np.asarray(a)


def to_index(a) -> np.ndarray:
    return np.asarray(a, dtype=np.int64)


def all_finite(a: np.ndarray) -> bool:
    return bool(np.isfinite(a).all())


def route(x: np.ndarray, router: np.ndarray, k: int, renormalize: bool) -> Routing:
    n_tokens, n_experts = x.shape[0], router.shape[1]
    experts = np.empty((n_tokens, k), dtype=np.int32)
    weights = np.empty((n_tokens, k), dtype=x.dtype)
    probs = np.empty((n_tokens, n_experts), dtype=x.dtype)
    with _pinned_blas() as workers:
        _run([functools.partial(_route_block, x[start:stop], router, k, renormalize,
                                experts[start:stop], weights[start:stop], probs[start:stop])
              for start, stop in _blocks(n_tokens, TOKEN_BLOCK)], workers)
    return Routing(experts=experts, weights=weights, probs=probs)


def permute(x: np.ndarray, plan: DispatchPlan) -> np.ndarray:
    rows = np.empty((plan.token.shape[0], x.shape[1]), dtype=x.dtype)
    with _pinned_blas() as workers:
        _run([functools.partial(np.take, x, plan.token[start:stop], axis=0, out=rows[start:stop])
              for start, stop in _blocks(rows.shape[0], TOKEN_BLOCK)], workers)
    return rows


def expert_mlp(rows, offsets, w1, w2, w3, activation) -> np.ndarray:
    with _pinned_blas() as workers:
        return _expert_mlp(rows, None, offsets, w1, w2, w3, activation, workers)


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
        tasks, sums = _mlp_tasks(x, None, 0, x.shape[0], w1, w2, w3, activation, out, _block_rows(x.shape[0]))
        _run(tasks, workers)
        _add_partials(sums)
    return out


def moe_forward(x, router, w1, w2, w3, activation: str, k: int, renormalize: bool,
                capacity: Optional[int]) -> tuple:
    """(y, routing, plan): the stages above in one pinned region, with permute
    folded into the expert tasks (each gathers its own rows of x), so decode
    pays for one pin and one barrier fewer."""
    with _pinned_blas() as workers:
        routing = route(x, router, k, renormalize)
        plan = dispatch(routing.experts, w1.shape[0], capacity)
        expert_out = _expert_mlp(x, plan.token, plan.offsets, w1, w2, w3, activation, workers)
        y = combine(expert_out, routing.weights, plan.row)
    return y, routing, plan


def _route_block(x, router, k, renormalize, experts_out, weights_out, probs_out) -> None:
    logits = x @ router  # (T, E), accumulated by BLAS in the input dtype
    np.subtract(logits, logits.max(axis=1, keepdims=True), out=probs_out)
    np.exp(probs_out, out=probs_out)
    probs_out /= probs_out.sum(axis=1, keepdims=True)

    # argmax returns the first maximum, so a tie goes to the smaller index;
    # masking the winner and taking argmax again gives the runner-up with the
    # same rule. For K <= 2 this beats a sort.
    first = np.argmax(logits, axis=1)
    experts_out[:, 0] = first
    if k == 2:
        logits[np.arange(logits.shape[0]), first] = -np.inf
        experts_out[:, 1] = np.argmax(logits, axis=1)
    weights_out[...] = np.take_along_axis(probs_out, experts_out, axis=1)
    if renormalize:
        weights_out /= weights_out.sum(axis=1, keepdims=True)


def dispatch(experts: np.ndarray, n_experts: int, capacity: Optional[int]) -> DispatchPlan:
    n_tokens, k = experts.shape
    # Assignment a = j * T + t, so a flat j-major list sorted stably by expert
    # keeps each expert's arrivals in the contract's order.
    assignment_expert = np.ascontiguousarray(experts.T).reshape(-1).astype(np.int64)
    order = np.argsort(assignment_expert, kind="stable")
    sorted_expert = assignment_expert[order]

    arrivals = np.bincount(assignment_expert, minlength=n_experts).astype(np.int64)
    first_arrival = np.concatenate(([0], np.cumsum(arrivals)[:-1]))
    arrival_rank = np.arange(order.size, dtype=np.int64) - first_arrival[sorted_expert]
    if capacity is None:
        kept = np.ones(order.size, dtype=bool)
        counts = arrivals
    else:
        kept = arrival_rank < capacity
        counts = np.minimum(arrivals, capacity)

    offsets = np.zeros(n_experts + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    # Kept assignments, still sorted by (expert, arrival), are exactly rows 0..N-1.
    kept_assignment = order[kept]
    token = kept_assignment % n_tokens if n_tokens else kept_assignment
    row_of_assignment = np.full(order.size, -1, dtype=np.int64)
    row_of_assignment[kept_assignment] = np.arange(kept_assignment.size, dtype=np.int64)
    row = np.ascontiguousarray(row_of_assignment.reshape(k, n_tokens).T)
    return DispatchPlan(counts=counts, offsets=offsets, token=token.astype(np.int64), row=row)


def _expert_mlp(source, index, offsets, w1, w2, w3, activation: str, workers: int) -> np.ndarray:
    """Expert e applied to rows offsets[e]:offsets[e+1], where row i is
    source[i] (``index`` None) or source[index[i]] (a gather, folded in)."""
    n_rows = int(offsets[-1])
    out = np.empty((n_rows, w2.shape[2]), dtype=source.dtype)
    block_rows = _block_rows(n_rows)
    tasks, sums = [], []
    for e in range(w1.shape[0]):
        start, stop = int(offsets[e]), int(offsets[e + 1])
        gate_weights = w3[e] if w3 is not None else None
        expert_tasks, expert_sums = _mlp_tasks(source, index, start, stop, w1[e], w2[e], gate_weights, activation,
                                               out, block_rows)
        tasks += expert_tasks
        sums += expert_sums
    _run(_largest_first(tasks), workers)
    _add_partials(sums)
    return out


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


# ---------------------------------------------------------------- the MLP tasks


def _block_rows(total_rows: int) -> int:
    """Rows per MLP block for a stage of ``total_rows`` rows (all experts):
    ROW_BLOCK, or fewer so there are MIN_TASKS blocks, but not below MIN_BLOCK_ROWS."""
    return min(ROW_BLOCK, max(MIN_BLOCK_ROWS, math.ceil(total_rows / MIN_TASKS)))


def _rows(source, index, start: int, stop: int) -> np.ndarray:
    """Rows start:stop of the MLP's input: of ``source``, or gathered through ``index``."""
    return source[start:stop] if index is None else np.take(source, index[start:stop], axis=0)


def _mlp_tasks(source, index, start: int, stop: int, w1, w2, w3, activation: str, out: np.ndarray,
               block_rows: int) -> tuple[list, list]:
    """(tasks, sums): tasks that make out[start:stop] = expert(rows start:stop)
    (see ``_rows``), and for an expert cut into chunks, its (partial outputs,
    out[start:stop]) for ``_add_partials`` once the tasks are done. See the
    module docstring for the two ways of cutting."""
    n = stop - start
    if n == 0:
        return [], []
    if n >= MIN_BLOCK_ROWS:
        return [functools.partial(_mlp_block_into, source, index, start + a, start + b, w1, w2, w3,
                                  activation, out) for a, b in _balanced_blocks(n, block_rows)], []
    v = _rows(source, index, start, stop)  # fewer than MIN_BLOCK_ROWS rows: gathered here, once
    chunks = _blocks(w1.shape[1], HIDDEN_CHUNK)
    partials = np.empty((len(chunks), n, w2.shape[1]), dtype=v.dtype)
    tasks = [functools.partial(_chunk_into, v, w1, w2, w3, activation, a, b, partials[c])
             for c, (a, b) in enumerate(chunks)]
    return tasks, [(partials, out[start:stop])]


def _add_partials(sums: list) -> None:
    """out = partials[0] + partials[1] + ..., in chunk order (so the same bits on any number of threads)."""
    for partials, out in sums:
        out[...] = partials[0]
        for partial in partials[1:]:
            out += partial


def _largest_first(tasks: list) -> list:
    """Row-block tasks by size, largest first (chunk tasks after them, in
    their order), so the last tasks the workers take are short ones."""
    def rows(task):
        return task.args[3] - task.args[2] if task.func is _mlp_block_into else 0
    return sorted(tasks, key=rows, reverse=True)


def _activate(hidden: np.ndarray, gate: Optional[np.ndarray], activation: str) -> None:
    """hidden = act(hidden), in place; swiglu: silu(hidden) * gate."""
    if activation == "relu":
        np.maximum(hidden, 0, out=hidden)
    elif activation == "gelu":  # 0.5 v (1 + erf(v / sqrt 2))
        scaled = hidden * hidden.dtype.type(1 / np.sqrt(2))
        _erf_into(scaled)
        scaled += 1
        hidden *= scaled
        hidden *= hidden.dtype.type(0.5)
    else:  # swiglu: silu(h) * gate = h * gate / (1 + exp(-h)), six times faster than scipy's expit
        denominator = np.negative(hidden)
        with np.errstate(over="ignore"):  # exp(-h) = inf for h < -88 (float32): h / inf = 0, silu's limit
            np.exp(denominator, out=denominator)
        denominator += 1
        hidden *= gate
        hidden /= denominator


#: erf for float32 as a rational function of x on [-4, 4] (outside, erf is +-1 in
#: float32): x * P(x^2) / Q(x^2), the coefficients of Eigen's and XLA's float32
#: erf. Absolute error at most 4.3e-7 against float64 erf (about 3.5 ulp at 1;
#: scipy's float32 erf: 3e-8; tests/test_cpu_activations.py), below the rounding
#: error float32 GEMM 1 leaves in the hidden values it is applied to, and about
#: ten times faster than scipy.special.erf, which computes in float64. The
#: project's tolerance rule checks the layer's output with it (tests/test_contract.py).
ERF_NUMERATOR = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
                 -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
ERF_DENOMINATOR = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
                   -1.42647390514189e-02)


def _polynomial(t: np.ndarray, coefficients: tuple) -> np.ndarray:
    """c0 t^n + c1 t^(n-1) + ... + cn (Horner), in float32."""
    value = t * np.float32(coefficients[0])
    value += np.float32(coefficients[1])
    for coefficient in coefficients[2:]:
        value *= t
        value += np.float32(coefficient)
    return value


def _erf_into(x: np.ndarray) -> None:
    """x = erf(x), in place: the rational form above for float32, scipy's erf for float64."""
    if x.dtype != np.float32:
        erf(x, out=x)
        return
    np.clip(x, np.float32(-4), np.float32(4), out=x)
    squared = x * x
    x *= _polynomial(squared, ERF_NUMERATOR)
    denominator = _polynomial(squared, ERF_DENOMINATOR)
    x /= denominator


def _mlp_block_into(source, index, start: int, stop: int, w1, w2, w3, activation: str,
                    out: np.ndarray) -> None:
    """out[start:stop] = expert(rows start:stop), the hidden block made and used in cache."""
    v = _rows(source, index, start, stop)
    hidden = v @ w1
    _activate(hidden, v @ w3 if activation == "swiglu" else None, activation)
    np.matmul(hidden, w2, out=out[start:stop])


def _chunk_into(v, w1, w2, w3, activation: str, start: int, stop: int, partial: np.ndarray) -> None:
    """partial = act(v @ w1[:, start:stop]) @ w2[start:stop] (swiglu: the gate's columns too):
    hidden columns start:stop of the MLP and what they add to its output."""
    hidden = v @ w1[:, start:stop]
    _activate(hidden, v @ w3[:, start:stop] if activation == "swiglu" else None, activation)
    np.matmul(hidden, w2[start:stop], out=partial)
