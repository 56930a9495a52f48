"""One cell of the sweep: inputs on the device, every timing at one shape, one record each.

``analysis.measure.sweep`` decides which cells to run; this module makes each cell's
inputs and measures it. A cell is (layer shape, dtype, T, k, skew); per cell:

- the five stages as the backend runs them (route, dispatch, permute,
  expert_mlp = GEMM 1 + activation + GEMM 2, combine), each called through
  the backend module's own function on inputs made by the stage before (the
  public ``kernels.*`` functions check their arguments, and ``dispatch``'s
  range check reads the experts back, which is not the kernel's time);
- the whole layer, ``topk_moe.moe_forward`` (``check_finite=False`` on the
  GPU, so it never waits for the host), eagerly and, for small T on the GPU,
  as CUDA-graph replays;
- the peers (``analysis.measure.peers``), checked against the layer's output first;

and per T (shared by both k) the dense MLP at equal active FLOPs (width K·F)
and equal total parameters (width E·F), and the GEMMs alone at width K·F
("gemm-same-flops": the same FLOPs as the experts' GEMMs, through cuBLAS or
NumPy's BLAS), the rate the expert GEMMs are held to.

Nothing wrong is timed: before any timing, the cell's ``moe_forward`` output
must pass the project's one tolerance rule against the float64 reference
(``check_moe_output``, on a spread of token rows). A cell that fails raises
``ValidationError``; the sweep reports it as a problem (the run's summary
record, the chapters' "could not measure" table) and times nothing of it.
A peer whose output differs from the layer's by more than
``PEER_ERROR_LIMIT`` is still timed, but its record says ``valid: false``
and the tables and charts leave it out (``sweep.time_rows``,
``perf_chapters.timing_frame``); the sweep reports it as a problem too.

Inputs rotate: each timed call takes the next of several argument sets (tokens
and, on the CPU, weight copies) that together exceed twice the last-level
cache; on the GPU, L2 is also overwritten before every call (untimed), since
a small layer's weights would otherwise stay in L2 between calls.

Dimension letters as in the contract: T tokens, D model width, F expert hidden
width, E experts, K experts per token, N kept assignments.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Callable, Optional

import numpy

import topk_moe
import topk_moe.testing
from analysis.measure import peers, roofline, skew, timing
from analysis import records
from topk_moe.backends import resolve

#: On the GPU, the whole layer is also timed as CUDA-graph replays up to this T.
GRAPH_MAX_TOKENS = 64
#: Rotation never uses more argument sets than this (small T: the flush does the rest).
MAX_ROTATION_SETS = 8
#: A peer whose output differs from the layer's by more than this (relative to
#: the output's largest magnitude) is reported, and its record is marked
#: invalid; bfloat16 alone gives ~1e-2. (The tolerance rule can't judge a peer:
#: on the GPU torch._grouped_mm computes in bfloat16, which NumPy can't run as
#: the rule's plain implementation.)
PEER_ERROR_LIMIT = 5e-2
#: The MoE output of a cell is checked on at most this many token rows ...
VALIDATION_MAX_ROWS = 64
#: ... and on fewer where the plain implementation the tolerance rule needs
#: (the reference's code in the layer's dtype, in NumPy on the host) would cost
#: more FLOPs than this. NumPy has no float16 BLAS (well under 1 GFLOP/s), and
#: a Mixtral row costs 0.35 GFLOP per expert it chose: a float16 Mixtral cell
#: checks 2 rows at k = 1 and 1 at k = 2, a CPU-sized layer all 64.
VALIDATION_MAX_PLAIN_FLOPS = 1e9


class Device:
    """Where the cell runs: the backend module, the array module, the timer's options."""

    def __init__(self, name: str, budget: timing.Budget):
        if name not in ("cpu", "cuda"):
            raise ValueError(f"device: expected 'cpu' or 'cuda', got {name!r}")
        self.name = name
        self.budget = budget
        self.impl = resolve(name)
        if name == "cuda":
            import cupy  # noqa: PLC0415 - only for GPU sweeps

            self.xp = cupy
            self.cache_bytes = timing.gpu_l2_cache_bytes()
            self.flush_bytes = timing.l2_flush_bytes()
            self.check = {"check_finite": False}
        else:
            self.xp = numpy
            self.cache_bytes = timing.last_level_cache_bytes()
            self.flush_bytes = 0
            self.check = {}

    def synchronize(self) -> None:
        if self.name == "cuda":
            self.xp.cuda.Device().synchronize()

    def free(self) -> None:
        """Give cached device memory back (between layer shapes)."""
        if self.name != "cuda":
            return
        self.synchronize()
        self.xp.get_default_memory_pool().free_all_blocks()
        if "torch" in sys.modules:
            torch = sys.modules["torch"]
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def host(self, a) -> numpy.ndarray:
        if hasattr(a, "detach"):
            return a.detach().float().cpu().numpy()
        return numpy.asarray(a.get() if hasattr(a, "get") else a)

    def rotation_sets(self, bytes_per_set: int) -> int:
        return min(MAX_ROTATION_SETS, timing.sets_to_exceed_cache(max(1, bytes_per_set),
                                                                  cache_bytes=self.cache_bytes))

    def time(self, fn: Callable, args_sets: list, *, graph: bool = False) -> timing.Timing:
        """Median and p20/p80 with repeats fitted to the budget (``timing.time_within_budget``)."""
        return timing.time_within_budget(fn, args_sets, self.budget, device=self.name,
                                         flush_bytes=self.flush_bytes, cuda_graph=graph)


# ---------------------------------------------------------------- inputs


def device_weights(cfg: topk_moe.MoEConfig, dtype: str, *, seed: int, device: str = "cuda") -> topk_moe.MoEWeights:
    """Random weights at ``topk_moe.init_weights``'s scale (standard deviation
    1/sqrt(fan-in)). On the GPU the expert matrices are drawn there (a
    Mixtral layer is 2.8 GB in float16; drawing it on the host in float64
    would take 11 GB and most of a minute); the router is drawn on the host."""
    if device == "cpu":
        return topk_moe.init_weights(cfg, seed=seed, dtype=dtype)
    import cupy  # noqa: PLC0415

    D, F, E = cfg.d_model, cfg.d_ff, cfg.n_experts
    router = numpy.random.default_rng([seed, 0]).standard_normal((D, E)) / math.sqrt(D)

    def matrix(shape, fan_in, stream):
        drawn = skew.standard_normal(cupy, shape, seed=[seed, stream])
        drawn *= 1.0 / math.sqrt(fan_in)
        return drawn.astype(dtype)

    return topk_moe.MoEWeights(router=cupy.asarray(router.astype(dtype)),
                              w1=matrix((E, D, F), D, 1), w2=matrix((E, F, D), F, 2),
                              w3=matrix((E, D, F), D, 3) if cfg.has_gate else None)


def device_dense_weights(D: int, width: int, activation: str, dtype: str, *, seed: int,
                         device: str = "cuda") -> tuple:
    """(w1 (D, width), w2 (width, D), w3 or None) of a dense MLP, drawn like one expert."""
    single = device_weights(topk_moe.MoEConfig(D, width, 1, 1, activation=activation), dtype,
                            seed=seed, device=device)
    return single.w1[0], single.w2[0], None if single.w3 is None else single.w3[0]


def make_tokens(skew_name: str, T: int, router, k: int, *, dtype: str, device: str, seed: int):
    """(T, D) tokens routed by ``router`` as ``skew_name`` says (``analysis.measure.skew``)."""
    xp = numpy
    if device == "cuda":
        import cupy as xp  # noqa: PLC0415
    return skew.skewed_inputs(skew_name, T, router, k, seed=seed, dtype=dtype, xp=xp)


def weight_copies(weights, count: int, device: Device) -> list:
    """On the CPU, ``count`` copies in fresh memory (rotation); on the GPU the
    same weights ``count`` times (the L2 flush keeps them out of cache)."""
    if device.name == "cuda":
        return [weights] * count
    copy = lambda a: None if a is None else a.copy()  # noqa: E731
    if isinstance(weights, topk_moe.MoEWeights):
        return [weights] + [topk_moe.MoEWeights(copy(weights.router), copy(weights.w1), copy(weights.w2),
                                               copy(weights.w3)) for _ in range(count - 1)]
    return [weights] + [tuple(copy(a) for a in weights) for _ in range(count - 1)]


def nbytes(*arrays) -> int:
    return sum(int(a.nbytes) for a in arrays if a is not None)


# ---------------------------------------------------------------- validation


class ValidationError(AssertionError):
    """A backend's ``moe_forward`` output broke the tolerance rule: nothing of its cell is timed."""


def validation_rows(T: int, flops_per_row: float, *, max_rows: int = VALIDATION_MAX_ROWS,
                    max_plain_flops: float = VALIDATION_MAX_PLAIN_FLOPS) -> numpy.ndarray:
    """The token rows to check: as many as ``max_rows`` and ``max_plain_flops``
    allow (at least one), spread evenly over the batch with the first row
    first and, from two rows on, the last row last (a partial last tile is
    where an indexing bug shows)."""
    if T <= 0:
        return numpy.zeros(0, dtype=numpy.int64)
    count = max(1, min(T, max_rows, int(max_plain_flops // max(flops_per_row, 1.0))))
    return numpy.unique(numpy.linspace(0, T - 1, count).round().astype(numpy.int64))


def _host_rows(a, rows) -> numpy.ndarray:
    """``a[rows]`` on the host; a CuPy array is gathered on the device first, so
    only those rows cross to the host."""
    if hasattr(a, "get"):
        import cupy  # noqa: PLC0415 - only for CuPy input

        return a[cupy.asarray(rows)].get()
    return numpy.asarray(a)[rows]


def check_moe_output(x, weights: topk_moe.MoEWeights, cfg: topk_moe.MoEConfig, output: topk_moe.MoEOutput, *,
                     name: str, max_rows: int = VALIDATION_MAX_ROWS,
                     max_plain_flops: float = VALIDATION_MAX_PLAIN_FLOPS) -> dict:
    """Check ``output = topk_moe.moe_forward(x, weights, cfg, backend=...)`` (NumPy or
    CuPy) by the project's one tolerance rule (``topk_moe.testing``): at most
    twice the error of a plain implementation in the same dtype, both against
    the float64 reference, routed as the tested backend routed (near-ties may
    route differently in low precision, and that is not an error).

    On a subset of token rows (``validation_rows``) where the layer is
    dropless (``cfg.capacity_factor`` None): then y[t] depends only on x[t]
    and its own routing, so the reference run on those rows alone gives
    exactly those rows of the whole batch's reference. A capacity couples the
    tokens (whether an assignment is kept depends on every token before it,
    and the capacity on T), so then every row is checked. Only the experts the
    checked rows chose reach the host: they are renumbered 0..U-1 and the
    router's columns reordered to match, which changes no probability.

    Returns ``{"validated_rows", "relative_error_vs_reference"}`` for the
    records; raises ``ValidationError`` with the rule's numbers.
    """
    experts_all = topk_moe.testing.to_host(output.routing.experts)
    T, K = experts_all.shape
    D, F, E = cfg.d_model, cfg.d_ff, cfg.n_experts
    if cfg.capacity_factor is None:
        rows = validation_rows(T, roofline.moe_flops(1, D, F, E, K, cfg.activation), max_rows=max_rows,
                               max_plain_flops=max_plain_flops)
    else:
        rows = numpy.arange(T)
    experts = experts_all[rows]
    used = numpy.unique(experts)
    order = numpy.concatenate([used, numpy.setdiff1d(numpy.arange(E), used)])
    renumbered = numpy.empty(E, dtype=numpy.int64)
    renumbered[order] = numpy.arange(E)
    experts = renumbered[experts].astype(numpy.int32)
    compact = topk_moe.MoEWeights(
        router=topk_moe.testing.to_host(weights.router)[:, order],
        w1=_host_rows(weights.w1, used), w2=_host_rows(weights.w2, used),
        w3=None if weights.w3 is None else _host_rows(weights.w3, used))
    routing = topk_moe.Routing(experts=experts, weights=None, probs=None)  # only the choices are used
    x_rows, y_rows = _host_rows(x, rows), _host_rows(output.y, rows)
    expected = topk_moe.testing.expected_moe_forward(x_rows, compact, cfg, routing)
    try:
        topk_moe.testing.assert_close_to_reference(
            y_rows, expected, topk_moe.testing.plain_moe_forward(x_rows, compact, cfg, routing),
            name=f"{name} ({len(rows)} of {T} rows)",
            scale=topk_moe.testing.moe_term_scale(x_rows, compact, cfg, experts))
    except AssertionError as failure:
        raise ValidationError(str(failure)) from None
    return {"validated_rows": int(len(rows)), "relative_error_vs_reference": peers.relative_error(y_rows, expected)}


# ---------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """The machine's ceilings, measured in this run."""

    copy_bytes_per_s: float
    gemm_flop_per_s: dict  # dtype name -> FLOP/s

    def gemm(self, dtype: str) -> float:
        return self.gemm_flop_per_s.get(dtype) or self.gemm_flop_per_s.get("float16") or \
            next(iter(self.gemm_flop_per_s.values()))


def time_record(implementation: str, stage: str, measured: timing.Timing, costs: list,
                ceilings: Ceilings, dtype: str, params: dict, **extra) -> dict:
    """One timing as a tidy record, beside its roofline (``costs`` run one after another)."""
    flops = sum(cost.flops for cost in costs)
    moved = sum(cost.bytes for cost in costs)
    gemm = ceilings.gemm(dtype)
    floor = roofline.pipeline_roofline_seconds(costs, gemm, ceilings.copy_bytes_per_s)
    bound = roofline.bound(roofline.Cost(flops, moved, ""), gemm, ceilings.copy_bytes_per_s)
    return {
        "measurement": "time",
        "implementation": implementation,
        "stage": stage,
        **measured.as_dict(),
        "flops": flops,
        "bytes": moved,
        "formula": " + ".join(cost.formula for cost in costs),
        "roofline_s": floor,
        "fraction_of_roofline": floor / measured.median_s,
        "bound": bound,
        "achieved_flop_per_s": flops / measured.median_s,
        "achieved_bytes_per_s": moved / measured.median_s,
        "copy_bytes_per_s": ceilings.copy_bytes_per_s,
        "gemm_flop_per_s": gemm,
        **extra,
        "params": params,
    }


# ---------------------------------------------------------------- the MoE cell


@dataclasses.dataclass
class Layer:
    """One layer shape and dtype, loaded on the device, with what its cells share."""

    name: str
    D: int
    F: int
    E: int
    activation: str
    dtype: str
    device: Device
    weights: Any
    seed: int = 0
    copies: list = dataclasses.field(default_factory=list)
    dense: dict = dataclasses.field(default_factory=dict)  # width -> list of weight copies
    torch_layers: dict = dataclasses.field(default_factory=dict)

    @property
    def itemsize(self) -> int:
        return numpy.dtype(self.dtype).itemsize

    def config(self, k: int) -> topk_moe.MoEConfig:
        return topk_moe.MoEConfig(self.D, self.F, self.E, k, activation=self.activation)

    def weight_sets(self, count: int) -> list:
        if len(self.copies) < count:
            self.copies = weight_copies(self.weights, count, self.device)
        return self.copies[:count]

    def dense_sets(self, width: int, count: int) -> list:
        have = self.dense.get(width, [])
        if len(have) < count:
            first = have[0] if have else device_dense_weights(self.D, width, self.activation, self.dtype,
                                                              seed=self.seed + 1, device=self.device.name)
            have = weight_copies(first, count, self.device)
            self.dense[width] = have
        return have[:count]

    def params(self, T: int, **more) -> dict:
        threads = {"threads": cpu_threads()} if self.device.name == "cpu" else {}
        return {"preset": self.name, "tokens": T, "d_model": self.D, "d_ff": self.F, "n_experts": self.E,
                "activation": self.activation, "dtype": self.dtype, "backend": self.device.name,
                "seed": self.seed, **threads, **more}


#: Environment variables that set the CPU libraries' thread counts; they act
#: only when set before NumPy and PyTorch start (``make sweep-cpu SWEEP_THREADS=1``).
THREAD_VARIABLES = records.THREAD_VARIABLES


def cpu_threads() -> dict:
    """The thread settings a CPU timing ran under: on a shared machine they
    decide the numbers (a BLAS thread waiting for a busy core stalls every call)."""
    import os  # noqa: PLC0415

    settings = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    settings["cpu_count"] = os.cpu_count()
    if "torch" in sys.modules:
        settings["torch_threads"] = sys.modules["torch"].get_num_threads()
    return settings


def measure_moe(layer: Layer, T: int, k: int, skew_name: str, what: frozenset, ceilings: Ceilings,
                report: Callable[[str, Exception], None]) -> list:
    """Records of one MoE cell: stages, the whole layer (eager, graph), the peers;
    none before ``check_moe_output`` has passed (``ValidationError`` otherwise)."""
    device, impl = layer.device, layer.device.impl
    cfg = layer.config(k)
    x_bytes = T * layer.D * layer.itemsize
    weight_bytes = nbytes(layer.weights.router, layer.weights.w1, layer.weights.w2, layer.weights.w3)
    per_set = x_bytes * (2 + 2 * k) + (weight_bytes if device.name == "cpu" else 0)
    count = device.rotation_sets(per_set)
    weight_sets = layer.weight_sets(count)
    x_sets = [make_tokens(skew_name, T, layer.weights.router, k, dtype=layer.dtype, device=device.name,
                          seed=layer.seed * 1000 + index) for index in range(count)]

    forward = topk_moe.moe_forward(x_sets[0], weight_sets[0], cfg, backend=device.name, **device.check)
    # Before anything is timed; a ValidationError ends the cell (the sweep reports it).
    checked = check_moe_output(x_sets[0], weight_sets[0], cfg, forward,
                               name=f"{device.name} moe_forward, {layer.name} {layer.dtype} T={T} k={k} {skew_name}")
    load = skew.load_summary(forward.plan.counts)
    kept = forward.plan.n_kept
    costs = roofline.stage_costs(T, layer.D, layer.F, layer.E, k, layer.activation, layer.itemsize,
                                 kept_assignments=kept, experts_used=load["experts_used"])
    params = layer.params(T, top_k=k, skew=skew_name)
    extra = {"kept_assignments": kept, **load, "rotation_sets": count, "l2_flush_bytes": device.flush_bytes}
    stage_costs = {"router": [costs["router"]], "dispatch": [costs["dispatch"]], "permute": [costs["permute"]],
                   "expert_mlp": [costs["expert_gemm1"], costs["expert_gemm2"]], "combine": [costs["combine"]]}
    whole_layer = [costs[stage] for stage in roofline.STAGES]
    records = []
    validated = dict(checked, valid=True)

    def timed(implementation, stage, fn, args_sets, cost_list, *, graph=False):
        try:
            measured = device.time(fn, args_sets, graph=graph)
        except Exception as error:  # one failed timing must not end the sweep
            report(f"{layer.name} {layer.dtype} T={T} k={k} {skew_name} {implementation}/{stage}"
                   f"{' (graph)' if graph else ''}", error)
            return
        records.append(time_record(implementation, stage, measured, cost_list, ceilings, layer.dtype, params,
                                   launch="graph" if graph else "eager", **validated, **extra))

    if "stages" in what:
        route_kw = device.check
        routings = [impl.route(x, w.router, k, cfg.renormalize, **route_kw) for x, w in zip(x_sets, weight_sets)]
        plans = [impl.dispatch(r.experts, layer.E, None) for r in routings]
        rows = [impl.permute(x, p) for x, p in zip(x_sets, plans)]
        outs = [impl.expert_mlp(r, p.offsets, w.w1, w.w2, w.w3, layer.activation)
                for r, p, w in zip(rows, plans, weight_sets)]
        timed("moe", "router", lambda x, w: impl.route(x, w.router, k, cfg.renormalize, **route_kw),
              list(zip(x_sets, weight_sets)), stage_costs["router"])
        timed("moe", "dispatch", lambda r: impl.dispatch(r.experts, layer.E, None),
              [(r,) for r in routings], stage_costs["dispatch"])
        timed("moe", "permute", impl.permute, list(zip(x_sets, plans)), stage_costs["permute"])
        timed("moe", "expert_mlp", lambda r, p, w: impl.expert_mlp(r, p.offsets, w.w1, w.w2, w.w3, layer.activation),
              list(zip(rows, plans, weight_sets)), stage_costs["expert_mlp"])
        timed("moe", "combine", lambda o, r, p: impl.combine(o, r.weights, p.row),
              list(zip(outs, routings, plans)), stage_costs["combine"])
        del routings, plans, rows, outs

    moe_call = lambda x, w: topk_moe.moe_forward(x, w, cfg, backend=device.name, **device.check)  # noqa: E731
    if "end_to_end" in what:
        timed("moe", "end_to_end", moe_call, list(zip(x_sets, weight_sets)), whole_layer)
    if "graph" in what and device.name == "cuda" and T <= GRAPH_MAX_TOKENS:
        timed("moe", "end_to_end", moe_call, list(zip(x_sets, weight_sets)), whole_layer, graph=True)
    if "peers" in what:
        records += measure_peers(layer, T, k, cfg, x_sets, forward.y, whole_layer, params, extra, ceilings, report)
    return records


def measure_peers(layer: Layer, T: int, k: int, cfg, x_sets: list, expected_y, costs: list, params: dict,
                  extra: dict, ceilings: Ceilings, report) -> list:
    """The HF-style eager loop and the torch._grouped_mm layer on the same tokens."""
    device = layer.device
    reason = peers.torch_unavailable_reason(device.name)
    if reason is not None:
        report(f"peers at T={T} k={k}", RuntimeError(reason))
        return []
    records = []
    if "eager" not in layer.torch_layers:
        layer.torch_layers["eager"] = peers.torch_layer(layer.weights, cfg)
        layer.torch_layers["grouped_reason"] = peers.grouped_mm_unavailable_reason(device.name)
        if layer.torch_layers["grouped_reason"] is not None:
            report(f"torch-grouped-mm on {layer.name} {layer.dtype}", RuntimeError(layer.torch_layers["grouped_reason"]))
    eager = dataclasses.replace(layer.torch_layers["eager"], top_k=k)
    candidates = [("hf-eager", layer.dtype, peers.hf_eager_moe, eager)]
    if layer.torch_layers["grouped_reason"] is None:
        grouped_dtype = peers.grouped_mm_dtype(device.name)
        if "grouped" not in layer.torch_layers:
            layer.torch_layers["grouped"] = peers.grouped_layer(eager, grouped_dtype)
        candidates.append(("torch-grouped-mm", grouped_dtype, peers.grouped_mm_moe,
                           dataclasses.replace(layer.torch_layers["grouped"], top_k=k)))
    for name, compute_dtype, function, torch_weights in candidates:
        where = f"{name} at {layer.name} {layer.dtype} T={T} k={k}"
        try:
            x_torch = [peers.as_torch(x, compute_dtype) for x in x_sets]
            error = peers.relative_error(function(x_torch[0], torch_weights), expected_y)
            valid = error <= PEER_ERROR_LIMIT  # False for NaN too
            if not valid:
                report(where, ValidationError(
                    f"relative error {error:.2e} against topk_moe.moe_forward exceeds {PEER_ERROR_LIMIT:g}: "
                    f"timed, but its record is marked invalid and left out of the tables and charts"))
            measured = device.time(lambda x: function(x, torch_weights), [(x,) for x in x_torch])
        except Exception as failure:
            report(where, failure)
            continue
        # Its roofline at the rate of the dtype it computes in (bfloat16: the float16 rate).
        records.append(time_record(name, "end_to_end", measured, costs, ceilings, compute_dtype,
                                   dict(params, compute_dtype=compute_dtype), launch="eager",
                                   relative_error_vs_moe=error, valid=valid, **extra))
    return records


def measure_dense(layer: Layer, T: int, top_ks: tuple, what: frozenset, ceilings: Ceilings,
                  report: Callable[[str, Exception], None]) -> list:
    """Per T: the dense MLP at width K·F (each k) and E·F, and the GEMMs alone at width K·F."""
    device, impl, xp = layer.device, layer.device.impl, layer.device.xp
    widths: dict = {}
    for k in top_ks:
        widths.setdefault(k * layer.F, []).append(f"equal-active-k{k}")
    widths.setdefault(layer.E * layer.F, []).append("equal-params")
    records = []
    for width, roles in widths.items():
        G = roofline.gemms_per_mlp(layer.activation) - 1
        weight_bytes = (G + 1) * layer.D * width * layer.itemsize
        count = device.rotation_sets(T * (layer.D + width) * layer.itemsize * 2
                                     + (weight_bytes if device.name == "cpu" else 0))
        weight_sets = layer.dense_sets(width, count)
        x_sets = [make_tokens("uniform", T, layer.weights.router, 1, dtype=layer.dtype, device=device.name,
                              seed=layer.seed * 1000 + index) for index in range(count)]
        costs = roofline.dense_costs(T, layer.D, width, layer.activation, layer.itemsize)
        params = layer.params(T, width=width, compared_as=roles)
        extra = {"rotation_sets": count, "l2_flush_bytes": device.flush_bytes, "launch": "eager"}
        cost_list = [costs["gemm1"], costs["gemm2"]]
        jobs = []
        if "dense" in what:
            jobs.append(("dense", lambda x, w: impl.dense_mlp(x, w[0], w[1], w[2], layer.activation)))
        if "gemm" in what and any(role.startswith("equal-active") for role in roles):
            hidden = skew.standard_normal(xp, (T, width), seed=[layer.seed, T, width]).astype(layer.dtype)
            jobs.append(("gemm-same-flops", lambda x, w: _gemms_only(xp, x, w, hidden)))
        for implementation, function in jobs:
            try:
                measured = device.time(function, list(zip(x_sets, weight_sets)))
            except Exception as error:
                report(f"{implementation} width {width} at {layer.name} {layer.dtype} T={T}", error)
                continue
            records.append(time_record(implementation, "end_to_end", measured, cost_list, ceilings, layer.dtype,
                                       params, **extra))
    return records


def _gemms_only(xp, x, weights, hidden):
    """The dense MLP's GEMMs with nothing between them (cuBLAS or BLAS)."""
    w1, w2, w3 = weights
    xp.matmul(x, w1)
    if w3 is not None:
        xp.matmul(x, w3)
    return xp.matmul(hidden, w2)


def load_layer(name: str, D: int, F: int, E: int, activation: str, dtype: str, device: Device,
               seed: int = 0) -> Layer:
    cfg = topk_moe.MoEConfig(D, F, E, 1, activation=activation)
    weights = device_weights(cfg, dtype, seed=seed, device=device.name)
    return Layer(name=name, D=D, F=F, E=E, activation=activation, dtype=dtype, device=device,
                 weights=weights, seed=seed)


#: The ceilings' sizes where a plan names none: a copy of this many bytes ...
CEILING_COPY_BYTES = {"cpu": 256 * 2**20, "cuda": 2**30}
#: ... and an n x n x n GEMM; both large enough to leave the caches behind.
CEILING_GEMM_N = {"cpu": 2048, "cuda": 8192}


def measure_ceilings(device: Device, dtypes: tuple, *, copy_bytes: Optional[int] = None,
                     gemm_n: Optional[int] = None) -> tuple:
    """(Ceilings, records): copy bandwidth and the GEMM rate of each dtype, measured now.
    Sizes: ``copy_bytes`` and ``gemm_n``, or ``CEILING_COPY_BYTES`` and
    ``CEILING_GEMM_N`` of the device; the records say which were used."""
    copy_bytes = CEILING_COPY_BYTES[device.name] if copy_bytes is None else int(copy_bytes)
    gemm_n = CEILING_GEMM_N[device.name] if gemm_n is None else int(gemm_n)
    copy = roofline.copy_bandwidth(device.name, copy_bytes)
    rates = {dtype: roofline.gemm_rate(device.name, dtype, gemm_n) for dtype in dtypes}
    records = [{"measurement": "ceiling", "implementation": "copy", "bytes_per_s": copy,
                "params": {"device": device.name, "nbytes": copy_bytes, "what": "copy, bytes read plus written"}}]
    records += [{"measurement": "ceiling", "implementation": "gemm", "flop_per_s": rate,
                 "params": {"device": device.name, "dtype": dtype, "n": gemm_n,
                            "library": "cuBLAS (cupy.matmul)" if device.name == "cuda" else "NumPy BLAS"}}
                for dtype, rate in rates.items()]
    return Ceilings(copy, rates), records
