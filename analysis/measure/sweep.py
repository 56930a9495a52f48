"""The benchmark sweep: ``python -m analysis.measure.sweep [--plan NAME] [overrides]``.

Times the MoE layer per stage and end to end, its peers and its dense
baselines over layer shapes, token counts T, k, dtypes and routing skews,
beside a roofline built from ceilings measured in the same run; profiles
GPU utilisation (``analysis.measure.utilisation``); writes one tidy ``sweep`` record
per measurement (``analysis.records``) and prints two short tables: times per
T, and, on a GPU, the study's goals as measured ratios. Each cell's MoE output
is validated against the float64 reference before it is timed; a cell that
fails is reported and not timed (``analysis.measure.sweep_cells``).

Plans (``PLANS`` in ``analysis.measure.sweep_plan``; ``--plan``, default ``gpu-default`` where CuPy finds a GPU,
else ``cpu-default``):

  gpu-default  about 3-5 minutes on an H100, run by ``make device-check``:
               mixtral float16 at every T (stages, whole layer eager and as
               graph replays for T <= 64, peers, dense at equal active FLOPs
               and equal parameters, cuBLAS on the same FLOPs); every skew at
               T = 4096; small and fine in float16 and float32 at four T;
               Nsight Compute and NVML at mixtral T = 8192, k = 1 and 2.
  gpu-full     every preset, T, k, dtype and skew (about an hour).
  cpu-default  the CPU baseline at CPU-sized shapes (preset "cpu"), a few minutes.
  cpu-tiny     seconds: for tests and for a chapter run live at tiny sizes.

Any of ``--presets --tokens --k --dtypes --skews`` replaces that field in every
block of the plan. ``--budget-s`` stops starting new cells once that much time
has passed (the cells skipped are listed in the run's summary record), so a
caller's timeout never kills the sweep before it has written anything:
records are written after each layer shape.

With ``$OUT`` set (the GPU machine), this run's records are also copied to
``$OUT/sweep.jsonl``.

Dimension letters as in the contract: T tokens, D model width, F expert hidden
width, E experts, K experts per token.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Optional

import numpy
from tqdm import tqdm

from analysis import records as record_io
from analysis.measure import sweep_cells, sweep_plan, utilisation

RECORD_KIND = "sweep"


# ---------------------------------------------------------------- the run


@dataclasses.dataclass
class SweepResult:
    plan: sweep_plan.Plan
    run_id: str
    records: list
    problems: list
    skipped: list
    paths: list


class _Run:
    """The state of one sweep: its records, what failed and what was skipped."""

    def __init__(self, plan: sweep_plan.Plan, write: bool, results_dir, echo):
        self.plan = plan
        self.run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        self.write = write
        self.results_dir = results_dir
        self.echo = echo
        self.pending: list = []
        self.records: list = []
        self.problems: list = []
        self.skipped: list = []
        self.paths: list = []
        self.started = time.perf_counter()

    def report(self, what: str, error: Exception) -> None:
        message = f"{type(error).__name__}: {error}"
        self.problems.append({"what": what, "error": message})
        self.echo(f"[sweep] {what}: {message}")

    def add(self, new_records: list) -> None:
        for record in new_records:
            record.setdefault("run_id", self.run_id)
            record.setdefault("plan", self.plan.name)
        self.pending.extend(new_records)

    def flush(self) -> None:
        """Write what was measured so far (one batch, one provenance)."""
        if not self.pending:
            return
        if self.write:
            kind = "gpu" if self.plan.device == "cuda" else "cpu"
            path = record_io.write_records(RECORD_KIND, self.pending, device_kind=kind,
                                           results_dir=self.results_dir)
            if path not in self.paths:
                self.paths.append(path)
            lines = path.read_text(encoding="utf-8").splitlines()[-len(self.pending):]
            self.records.extend(json.loads(line) for line in lines)
        else:
            self.records.extend(self.pending)
        self.pending = []

    def over_budget(self) -> bool:
        return self.plan.budget_s is not None and time.perf_counter() - self.started > self.plan.budget_s


#: The longest the Nsight Compute block may take (profile_kernels' limit); the
#: sweep starts it only with at least this much of its time budget left.
UTILISATION_LIMIT_S = 150.0


def run_sweep(plan: sweep_plan.Plan, *, progress: bool = True, write: bool = True, results_dir=None,
              echo=print) -> SweepResult:
    """Measure everything ``plan`` asks for; records are written after each layer
    shape (unless ``write`` is False) and returned with the provenance merged in."""
    sweep_plan.check_plan(plan)
    run = _Run(plan, write, results_dir, echo)
    device = sweep_cells.Device(plan.device, plan.budget)
    dtypes = tuple(sorted({dtype for block in plan.blocks for dtype in block.dtypes}))
    ceilings, ceiling_records = sweep_cells.measure_ceilings(device, dtypes, copy_bytes=plan.ceiling_copy_bytes,
                                                             gemm_n=plan.ceiling_gemm_n)
    run.add(ceiling_records)
    run.flush()  # on disk before the Nsight block, which may run up to its own limit
    echo(f"[sweep] ceilings: copy {ceilings.copy_bytes_per_s / 1e9:.1f} GB/s; GEMM " +
         ", ".join(f"{dtype} {rate / 1e9:.4g} GFLOP/s" for dtype, rate in ceilings.gemm_flop_per_s.items()))

    if plan.utilisation is not None:  # first: the cells after it stop at the time budget, it cannot
        left_s = None if plan.budget_s is None else plan.budget_s - (time.perf_counter() - run.started)
        if left_s is not None and left_s < UTILISATION_LIMIT_S:
            run.report("utilisation", RuntimeError(
                f"not measured: {max(left_s, 0):.0f} s of the {plan.budget_s:.0f} s budget left, "
                f"and Nsight Compute may take {UTILISATION_LIMIT_S:.0f} s"))
        else:
            device.free()
            run.add(measure_utilisation(plan, device, run))
            run.flush()

    todo = sweep_plan.cells(plan)
    layer = None
    dense_done: set = set()
    with tqdm(total=len(todo), desc=f"sweep {plan.name}", unit="cell", disable=not progress,
              file=sys.stdout, mininterval=1.0) as bar:
        for block, preset, dtype, T, k, skew_name in todo:
            bar.set_postfix_str(f"{preset} {dtype} T={T} k={k} {skew_name}")
            if run.over_budget():
                run.skipped.append({"preset": preset, "dtype": dtype, "tokens": T, "top_k": k, "skew": skew_name})
                bar.update()
                continue
            if layer is None or (layer.name, layer.dtype) != (preset, dtype):
                layer = _next_layer(run, device, layer, preset, dtype)
                if layer is None:
                    bar.update()
                    continue
            try:
                run.add(sweep_cells.measure_moe(layer, T, k, skew_name, block.what, ceilings, run.report))
                dense_key = (preset, dtype, T)
                if block.what & {"dense", "gemm"} and dense_key not in dense_done:
                    dense_done.add(dense_key)
                    run.add(sweep_cells.measure_dense(layer, T, block.top_ks, block.what, ceilings, run.report))
            except sweep_cells.ValidationError as error:  # wrong output: the cell is not timed at all
                run.report(f"cell {preset} {dtype} T={T} k={k} {skew_name} not timed, its output failed validation",
                           error)
            except Exception as error:  # a whole cell failed (its inputs, or the call validated first)
                run.report(f"cell {preset} {dtype} T={T} k={k} {skew_name}", error)
                traceback.print_exc(file=sys.stderr)
            if T >= 8192:  # large intermediates: give the pools' cached blocks back
                device.free()
            bar.update()
    layer = None
    device.free()
    run.flush()
    run.add([summary_record(run)])
    run.flush()
    copy_to_out(run)
    return SweepResult(plan, run.run_id, run.records, run.problems, run.skipped, run.paths)


def _next_layer(run: _Run, device, previous, preset: str, dtype: str):
    """Write the last layer's records, free it, load the next."""
    run.flush()
    del previous
    device.free()
    shape = sweep_plan.PRESETS[preset]
    try:
        return sweep_cells.load_layer(preset, shape.d_model, shape.d_ff, shape.n_experts, shape.activation,
                                      dtype, device)
    except Exception as error:
        run.report(f"weights of {preset} {dtype}", error)
        return None


def measure_utilisation(plan: sweep_plan.Plan, device, run: _Run) -> list:
    """Nsight Compute per kernel and NVML over a loop, at (preset, T, dtype), k = 1 and 2."""
    preset, T, dtype = plan.utilisation
    top_ks = (1, 2)
    params = lambda k: {"preset": preset, "tokens": T, "top_k": k, "dtype": dtype, "skew": "uniform",  # noqa: E731
                        **dataclasses.asdict(sweep_plan.PRESETS[preset])}
    rows = utilisation.profile_kernels(preset, T, top_ks, dtype, timeout_s=UTILISATION_LIMIT_S)
    found = []
    for row in rows:
        k = row.pop("top_k", None)
        found.append({"measurement": "ncu", **row, "params": params(k)})
        if row.get("message"):
            run.echo(f"[sweep] Nsight Compute, k={k}: {row['message']}")
    for k in top_ks:
        found.append({"measurement": "nvml", **nvml_row(device, preset, T, k, dtype), "params": params(k)})
    return found


def nvml_row(device, preset: str, T: int, k: int, dtype: str) -> dict:
    """NVML samples over two seconds of back-to-back ``moe_forward`` calls."""
    reason = utilisation.nvml_unavailable_reason()
    if reason is not None or device.name != "cuda":
        return utilisation.empty_nvml_row(reason or "no GPU: NVML has nothing to sample")
    import topk_moe  # noqa: PLC0415

    shape = sweep_plan.PRESETS[preset]
    cfg = shape.config(k)
    try:
        weights = sweep_cells.device_weights(cfg, dtype, seed=0)
        x = sweep_cells.make_tokens("uniform", T, weights.router, k, dtype=dtype, device="cuda", seed=0)
        row = utilisation.nvml_during(lambda: topk_moe.moe_forward(x, weights, cfg, backend="cuda", check_finite=False),
                                      seconds=2.0, synchronize=device.synchronize)
    except Exception as error:
        row = utilisation.empty_nvml_row(f"NVML sampling failed: {type(error).__name__}: {error}")
    finally:
        device.free()
    return row


def summary_record(run: _Run) -> dict:
    return {"measurement": "run", "elapsed_s": time.perf_counter() - run.started, "budget_s": run.plan.budget_s,
            "problems": run.problems, "skipped": run.skipped,
            "params": {"plan": run.plan.name, "device": run.plan.device,
                       "blocks": [dict(dataclasses.asdict(block), what=sorted(block.what))
                                  for block in run.plan.blocks],
                       "budget": dataclasses.asdict(run.plan.budget), "utilisation": run.plan.utilisation}}


def copy_to_out(run: _Run) -> None:
    """This run's records to $OUT/sweep.jsonl, where the GPU machine's files come back from."""
    out = os.environ.get("OUT")
    if not out or not run.write or not Path(out).is_dir():
        return
    with open(Path(out) / f"{RECORD_KIND}.jsonl", "a", encoding="utf-8") as copy:
        for record in run.records:
            copy.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------- tables


def valid_timing(record: dict) -> bool:
    """A timing record the tables and charts may show: not one marked
    ``valid: false`` (a peer whose output differed from the layer's,
    ``sweep_cells.PEER_ERROR_LIMIT``). Records from before the flag count as valid."""
    return record.get("measurement") == "time" and record.get("valid", True) is not False


def time_rows(records: list) -> dict:
    """{(preset, dtype, skew, T, k, implementation, stage, launch, width): record}
    of the valid timing records, for the tables."""
    found = {}
    for record in records:
        if not valid_timing(record):
            continue
        p = record["params"]
        key = (p["preset"], p["dtype"], p.get("skew", "uniform"), p["tokens"], p.get("top_k"),
               record["implementation"], record["stage"], record.get("launch", "eager"), p.get("width"))
        found[key] = record
    return found


def summary_table(records: list) -> list:
    """One row per (preset, dtype, T, k) of the uniform cells: the whole layer's
    time beside the dense baselines and the peers (seconds), and % of roofline."""
    rows = time_rows(records)
    table = []
    cells_seen = sorted({key[:5] for key in rows if key[2] == "uniform" and key[4] is not None},
                        key=lambda c: (c[0], c[1], c[3], c[4]))
    shapes = {}
    for record in records:
        if record.get("measurement") == "time":
            p = record["params"]
            shapes[(p["preset"], p["dtype"])] = (p["d_ff"], p["n_experts"])
    for preset, dtype, skew_name, T, k in cells_seen:
        F, E = shapes[(preset, dtype)]
        get = lambda impl, stage="end_to_end", launch="eager", width=None, kk=k: rows.get(  # noqa: E731
            (preset, dtype, skew_name, T, kk, impl, stage, launch, width))
        moe = get("moe")
        dense_active = get("dense", kk=None, width=k * F)
        dense_params = get("dense", kk=None, width=E * F)
        median = lambda r: None if r is None else r["median_s"]  # noqa: E731
        table.append({
            "preset": preset, "dtype": dtype, "tokens": T, "top_k": k,
            "moe_s": median(moe), "moe_graph_s": median(get("moe", launch="graph")),
            "dense_active_s": median(dense_active), "dense_params_s": median(dense_params),
            "hf_eager_s": median(get("hf-eager")), "grouped_mm_s": median(get("torch-grouped-mm")),
            "moe_fraction_of_roofline": None if moe is None else moe["fraction_of_roofline"],
        })
    return table


def _ratio(numerator, denominator):
    return None if numerator is None or denominator in (None, 0) else numerator / denominator


def goal_table(records: list, preset: str = "mixtral", dtype: str = "float16") -> list:
    """The study's GPU goals, as ratios measured in one run at (preset, dtype),
    uniform routing. Each row: goal, measured (the worst case), target, met,
    where (the worst case's T and k), or measured None when the run lacks it."""
    rows = time_rows(records)
    ceiling = {r["implementation"]: r for r in records if r.get("measurement") == "ceiling"}
    copy = ceiling["copy"]["bytes_per_s"] if "copy" in ceiling else None
    mine = {key: record for key, record in rows.items() if key[0] == preset and key[1] == dtype and key[2] == "uniform"}
    tokens = sorted({key[3] for key in mine})
    ks = sorted({key[4] for key in mine if key[4] is not None})
    get = lambda T, k, impl, stage="end_to_end", launch="eager", width=None: mine.get(  # noqa: E731
        (preset, dtype, "uniform", T, k, impl, stage, launch, width))
    shape = sweep_plan.PRESETS.get(preset)

    def worst(values):
        values = [(value, where) for value, where in values if value is not None]
        return min(values, key=lambda item: item[0]) if values else (None, None)

    router, movement, gemms, decode, versus_hf, versus_grouped = [], [], [], [], [], []
    for T in tokens:
        for k in ks:
            where = f"T={T} k={k}"
            stage = {name: get(T, k, "moe", name) for name in ("router", "dispatch", "permute", "combine", "expert_mlp")}
            if T >= 8192 and stage["router"] and copy:
                router.append((stage["router"]["achieved_bytes_per_s"] / copy, where))
            if T >= 8192 and copy and all(stage[name] for name in ("dispatch", "permute", "combine")):
                moved = sum(stage[name]["bytes"] for name in ("dispatch", "permute", "combine"))
                seconds = sum(stage[name]["median_s"] for name in ("dispatch", "permute", "combine"))
                movement.append((moved / seconds / copy, where))
            gemm_same = shape and get(T, None, "gemm-same-flops", width=k * shape.d_ff)
            if T == 8192 and stage["expert_mlp"] and gemm_same:
                gemms.append((_ratio(stage["expert_mlp"]["achieved_flop_per_s"], gemm_same["achieved_flop_per_s"]), where))
            moe = get(T, k, "moe", launch="graph") or get(T, k, "moe")
            if T <= 16 and moe and copy and shape:
                weight_bytes = (moe["experts_used"] * (_gemms(shape.activation)) * shape.d_model * shape.d_ff
                                * numpy.dtype(dtype).itemsize)
                decode.append((weight_bytes / moe["median_s"] / copy, where + f" ({moe.get('launch')})"))
            eager = get(T, k, "moe")
            for peer, sink in (("hf-eager", versus_hf), ("torch-grouped-mm", versus_grouped)):
                other = get(T, k, peer)
                if eager and other:
                    sink.append((other["median_s"] / eager["median_s"], where))
    goals = [
        ("router: % of copy bandwidth, T >= 8192", router, 0.80, "fraction"),
        ("dispatch + permute + combine: % of copy bandwidth, T >= 8192", movement, 0.70, "fraction"),
        ("expert GEMMs: % of cuBLAS on the same FLOPs, T = 8192", gemms, 0.75, "fraction"),
        ("decode (T <= 16): expert weights read, % of copy bandwidth", decode, 0.75, "fraction"),
        ("HF eager loop time / MoE time, every T (> 1: MoE faster)", versus_hf, 1.0, "ratio"),
        ("torch._grouped_mm time / MoE time, every T (> 1: MoE faster)", versus_grouped, 1.0, "ratio"),
    ]
    table = []
    for goal, values, target, unit in goals:
        measured, where = worst(values)
        met = None if measured is None else (measured > target if unit == "ratio" else measured >= target)
        table.append({"goal": goal, "measured": measured, "target": target, "unit": unit, "met": met,
                      "worst_at": where, "cases": len(values)})
    return table


def _gemms(activation: str) -> int:
    from analysis.measure.roofline import gemms_per_mlp  # noqa: PLC0415

    return gemms_per_mlp(activation)


def format_table(rows: list, columns: list) -> str:
    """Plain text, right-aligned: (header, key, format) per column."""
    def cell(value, fmt):
        if value is None:
            return "-"
        return fmt(value) if callable(fmt) else format(value, fmt)

    lines = [[header for header, _, _ in columns]]
    lines += [[cell(row.get(key), fmt) for _, key, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    text = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


MILLISECONDS = lambda seconds: f"{seconds * 1e3:.3g}"  # noqa: E731
PERCENT = lambda fraction: f"{100 * fraction:.1f}%"  # noqa: E731

SUMMARY_COLUMNS = [("preset", "preset", ""), ("dtype", "dtype", ""), ("T", "tokens", "d"), ("k", "top_k", "d"),
                   ("moe ms", "moe_s", MILLISECONDS), ("graph ms", "moe_graph_s", MILLISECONDS),
                   ("dense K*F ms", "dense_active_s", MILLISECONDS), ("dense E*F ms", "dense_params_s", MILLISECONDS),
                   ("HF loop ms", "hf_eager_s", MILLISECONDS), ("grouped_mm ms", "grouped_mm_s", MILLISECONDS),
                   ("moe % roofline", "moe_fraction_of_roofline", PERCENT)]


def format_goals(goals: list) -> str:
    rows = []
    for goal in goals:
        as_text = PERCENT if goal["unit"] == "fraction" else (lambda value: f"{value:.2f}x")
        rows.append({"goal": goal["goal"],
                     "measured": None if goal["measured"] is None else as_text(goal["measured"]),
                     "target": ("> " if goal["unit"] == "ratio" else ">= ") + as_text(goal["target"]),
                     "met": {True: "MET", False: "NOT MET", None: "not measured"}[goal["met"]],
                     "worst at": goal["worst_at"]})
    columns = [(name, name, "") for name in ("goal", "measured", "target", "met", "worst at")]
    return format_table(rows, columns)


# ---------------------------------------------------------------- command line


def parse_plan(argv) -> tuple:
    parser = argparse.ArgumentParser(prog="python -m analysis.measure.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", choices=sorted(sweep_plan.PLANS), help="default: gpu-default with a GPU, else cpu-default")
    parser.add_argument("--presets", nargs="+", choices=sorted(sweep_plan.PRESETS))
    parser.add_argument("--tokens", nargs="+", type=int)
    parser.add_argument("--k", nargs="+", type=int, dest="top_ks")
    parser.add_argument("--dtypes", nargs="+", choices=("float16", "float32"))
    parser.add_argument("--skews", nargs="+")
    parser.add_argument("--budget-s", type=float, help="start no new cell after this many seconds")
    parser.add_argument("--no-utilisation", action="store_true", help="skip Nsight Compute and NVML")
    parser.add_argument("--no-write", action="store_true", help="print only; write no records")
    parser.add_argument("--results-dir", help="results folder (default: $MOE_RESULTS_DIR or <repo>/results)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    plan = sweep_plan.PLANS[args.plan or sweep_plan.default_plan_name()]
    plan = sweep_plan.with_overrides(plan, presets=args.presets, tokens=args.tokens, top_ks=args.top_ks, dtypes=args.dtypes,
                          skews=args.skews)
    if args.budget_s is not None:
        plan = dataclasses.replace(plan, budget_s=args.budget_s)
    if args.no_utilisation:
        plan = dataclasses.replace(plan, utilisation=None)
    if args.presets and plan.judged[0] not in args.presets:
        plan = dataclasses.replace(plan, judged=(args.presets[0], plan.judged[1]))
    try:
        sweep_plan.check_plan(plan)
    except ValueError as error:
        parser.error(str(error))
    return plan, args


def main(argv=None) -> int:
    plan, args = parse_plan(argv)
    if plan.device == "cuda":
        from topk_moe.backends import cuda_unavailable_reason  # noqa: PLC0415

        reason = cuda_unavailable_reason()
        if reason is not None:
            print(f"sweep: plan {plan.name!r} needs a GPU: {reason}")
            return 2
    print(f"[sweep] plan {plan.name} on {plan.device}: {len(sweep_plan.cells(plan))} cells"
          + (f", budget {plan.budget_s:.0f} s" if plan.budget_s else ""), flush=True)
    result = run_sweep(plan, progress=not args.quiet, write=not args.no_write, results_dir=args.results_dir)
    print()
    print(format_table(summary_table(result.records), SUMMARY_COLUMNS))
    if result.skipped:
        print(f"\n{len(result.skipped)} cells skipped: the time budget ({plan.budget_s:.0f} s) ran out")
    if result.problems:
        print(f"\n{len(result.problems)} problems (also in the run's summary record):")
        for problem in result.problems:
            print(f"  {problem['what']}: {problem['error']}")
    for path in result.paths:
        print(f"records appended to {path}")
    if plan.device == "cuda":  # last, so that the end of the log shows it
        preset, dtype = plan.judged
        print(f"\nGoals, measured in this run on {result.records[0].get('device', 'this GPU')} "
              f"({preset}, {dtype}, uniform routing):")
        print(format_goals(goal_table(result.records, preset, dtype)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
