"""What the PyTorch entry adds to a call: topk_moe.torch against the NumPy call, on the CPU.

    python -m analysis.measure.torch_overhead [--preset cpu] [--tokens 1 4096] [--top-k 2]
                                              [--rounds 61] [--results-dir DIR]

Three ways to run the same layer on the same memory (the tensors are views of
the NumPy arrays, so each call reads the very same bytes):

- ``numpy``: ``topk_moe.moe_forward`` on NumPy arrays (the baseline);
- ``torch-function``: ``topk_moe.torch.moe_forward`` on tensors (checks the
  tensors, makes NumPy views, converts the results' arrays back to tensors);
- ``moe-layer``: ``topk_moe.torch.MoELayer`` called under ``torch.no_grad()``
  on (1, T, D) hidden states (the module call, the reshape and the above).

The calls alternate in rounds within one process: each round times the
NumPy call and each torch entry, in reverse order every other round
(``analysis.measure.timing.time_function``, ``repeats`` calls each: many for
a small T, one for a large one), so a burst of load from elsewhere on the
machine hits the neighbours it is compared with. The overhead of an entry
is, per round, its median minus the NumPy median of that round; a record
gives the median over the rounds and their 20th and 80th percentiles, and
the same difference of the rounds' fastest fifth of calls (20th percentiles). Each
record's params say whether the machine was shared (load average at the
start): the overhead is microseconds, and at a large T the noise of a shared
machine is far larger than that.
Writes ``torch-overhead`` records (analysis.records.write_records).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy

RECORD_KIND = "torch-overhead"
ENTRIES = ("torch-function", "moe-layer")


def _load_average() -> Optional[float]:
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def _calls(shape, tokens: int, top_k: int, seed: int = 0) -> dict:
    """The three callables on one set of arrays (the tensors are views of them)."""
    import torch  # noqa: PLC0415 - the measurement is of the torch entry

    import topk_moe  # noqa: PLC0415
    import topk_moe.torch as moe_torch  # noqa: PLC0415

    cfg = shape.config(top_k)
    weights = topk_moe.init_weights(cfg, seed=seed, dtype=numpy.float32)
    x = numpy.random.default_rng(seed).standard_normal((tokens, cfg.d_model)).astype(numpy.float32)
    tensor_weights = topk_moe.MoEWeights(*(None if a is None else torch.from_numpy(a)
                                           for a in (weights.router, weights.w1, weights.w2, weights.w3)))
    x_tensor = torch.from_numpy(x)
    hidden = x_tensor.reshape(1, tokens, cfg.d_model)
    layer = moe_torch.MoELayer(tensor_weights, cfg, backend="cpu")

    def layer_call():
        with torch.no_grad():
            return layer(hidden)

    return {
        "numpy": lambda: topk_moe.moe_forward(x, weights, cfg, backend="cpu"),
        "torch-function": lambda: moe_torch.moe_forward(x_tensor, tensor_weights, cfg, backend="cpu"),
        "moe-layer": layer_call,
    }


def measure(shape, tokens: int, top_k: int, *, rounds: int, repeats: int) -> dict:
    """Per-round timings (analysis.measure.timing.Timing) of each of the three calls, alternated."""
    from analysis.measure.timing import time_function  # noqa: PLC0415

    if rounds < 1 or repeats < 1:
        raise ValueError(f"rounds, repeats: expected at least 1 each, got {rounds} and {repeats}")
    calls = _calls(shape, tokens, top_k)
    for call in calls.values():  # warm-up once (first touch, BLAS threads), not in every round
        call()
        call()
    timings = {name: [] for name in calls}
    names = list(calls)
    for round_index in range(rounds):
        # Every other round runs the calls in reverse, so that being first (or
        # following a particular neighbour) favours none of them.
        for name in names if round_index % 2 == 0 else names[::-1]:
            timings[name].append(time_function(calls[name], warmup=0, repeats=repeats))
    return timings


def to_records(timings: dict, params: dict) -> list:
    """One record per torch entry: its overhead over the NumPy call, round by round.

    ``overhead_*`` compare the rounds' medians; ``overhead_fast_calls_s``
    compares the rounds' 20th percentiles (the fast calls, which a shared
    machine's load touches least), the median over the rounds.
    """
    numpy_medians = numpy.asarray([timing.median_s for timing in timings["numpy"]])
    numpy_fast = numpy.asarray([timing.p20_s for timing in timings["numpy"]])
    found = []
    for entry in ENTRIES:
        entry_medians = numpy.asarray([timing.median_s for timing in timings[entry]])
        entry_fast = numpy.asarray([timing.p20_s for timing in timings[entry]])
        overheads = entry_medians - numpy_medians
        p20, median, p80 = numpy.percentile(overheads, [20, 50, 80])
        numpy_median = float(numpy.median(numpy_medians))
        found.append({
            "measurement": "overhead", "entry": entry,
            "overhead_median_s": float(median), "overhead_p20_s": float(p20), "overhead_p80_s": float(p80),
            "overhead_fast_calls_s": float(numpy.median(entry_fast - numpy_fast)),
            "numpy_median_s": numpy_median, "torch_median_s": float(numpy.median(entry_medians)),
            "overhead_fraction": float(median) / numpy_median,
            "rounds": len(overheads),
            "params": {**params, "entry": entry},
        })
    return found


def run(preset: str = "cpu", tokens: Sequence[int] = (1, 4096), top_k: int = 2, *, rounds: int = 61,
        repeats: Optional[int] = None, results_dir=None, echo=print) -> list:
    """Measure each token count and write its ``torch-overhead`` records; return them.

    ``repeats`` (calls per timing) defaults to 20 for T <= 16 and to 1
    above: a large T's calls are then paired one to one, the NumPy call and
    each torch entry back to back, which is as close as noise lets them be.
    """
    from analysis import records as record_io  # noqa: PLC0415
    from analysis.measure.sweep_plan import PRESETS  # noqa: PLC0415
    from topk_moe import cpu  # noqa: PLC0415

    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    shape = PRESETS[preset]
    load = _load_average()
    cores = os.cpu_count()
    found = []
    for T in tokens:
        calls_per_timing = repeats if repeats is not None else (20 if T <= 16 else 1)
        timings = measure(shape, T, top_k, rounds=rounds, repeats=calls_per_timing)
        params = {
            "preset": preset, "tokens": T, "top_k": top_k, "d_model": shape.d_model, "d_ff": shape.d_ff,
            "n_experts": shape.n_experts, "activation": shape.activation, "dtype": "float32", "backend": "cpu",
            "threads": cpu.threads(), "rounds": rounds, "repeats_per_timing": calls_per_timing,
            "load_average_at_start": load,
            "machine": (f"shared: load average {load:.1f} on {cores} cores at the start" if load is not None
                        and cores and load > 0.5 else "idle at the start (load average below 0.5)"),
            "what": "per round: median of the torch entry minus median of topk_moe.moe_forward on NumPy views "
                    "of the same memory, calls alternated in one process",
        }
        for record in to_records(timings, params):
            found.append(record)
            echo(f"T={T:5d} {record['entry']:15s} numpy {record['numpy_median_s'] * 1e6:10.1f} us, "
                 f"overhead {record['overhead_median_s'] * 1e6:8.1f} us "
                 f"[{record['overhead_p20_s'] * 1e6:.1f}, {record['overhead_p80_s'] * 1e6:.1f}] "
                 f"({100 * record['overhead_fraction']:.1f}%), fast calls {record['overhead_fast_calls_s'] * 1e6:.1f} us")
    path = record_io.write_records(RECORD_KIND, found, device_kind="cpu", results_dir=results_dir)
    echo(f"wrote {len(found)} records to {path}")
    return found


def overhead_frame(found: list):
    """The records as a table a chapter can show (analysis.display.table): one row
    per token count and entry, times in microseconds, the machine's load beside them."""
    import pandas as pd  # noqa: PLC0415 - the book's dependency, only where a table is made

    rows = [{
        "T": record["params"]["tokens"], "entry": record["entry"],
        "NumPy call (us)": record["numpy_median_s"] * 1e6,
        "overhead, median (us)": record["overhead_median_s"] * 1e6,
        "overhead p20 (us)": record["overhead_p20_s"] * 1e6, "overhead p80 (us)": record["overhead_p80_s"] * 1e6,
        "overhead of the fast calls (us)": record["overhead_fast_calls_s"] * 1e6,
        "overhead (% of the NumPy call)": 100 * record["overhead_fraction"],
        "machine": record["params"]["machine"], "commit": (record.get("git_commit") or "")[:7],
    } for record in found]
    return pd.DataFrame(rows).sort_values(["T", "entry"], kind="stable").reset_index(drop=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.measure.torch_overhead",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", help="layer shape (analysis.measure.sweep_plan.PRESETS)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4096])
    parser.add_argument("--top-k", type=int, default=2, choices=(1, 2))
    parser.add_argument("--rounds", type=int, default=61)
    parser.add_argument("--repeats", type=int, default=None, help="calls per timing (default: by T)")
    parser.add_argument("--results-dir", default=None, help="where records go (default: results/)")
    args = parser.parse_args(argv)
    run(args.preset, args.tokens, args.top_k, rounds=args.rounds, repeats=args.repeats, results_dir=args.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
