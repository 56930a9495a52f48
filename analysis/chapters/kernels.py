"""Tables, numbers and the chart of the Kernels chapter (book/notebooks/kernels.ipynb).

The chapter explains the CUDA kernels of ``kernels/topk_moe/cuda`` without a GPU:
everything here is read from the sources, from the launchers' constants and
rules (``launch_config``, ``expert_mlp``; neither imports CuPy), from nvcc's
resource report (``build_report.resource_report``), which needs nvcc but no
GPU, and from the CPU emulator (``emulator_mutation_table``: the kernels run
on the CPU, labelled CPU emulation, never GPU results), and from the memory
traffic the emulator counts (``traffic_table``, ``traffic_by_k``,
``traffic_fix_table``: the committed records of ``analysis.measure.traffic``,
labelled ``TRAFFIC_LABEL``; ``traffic_k_answer`` is the Answers chapter's entry
for the k question). Where nvcc or a C++ compiler is absent, the chapter shows
a note instead and still runs.

The GPU-side verification is ``make device-check``; ``gpu_check_note`` says
whether a record of it is committed, and whether it is of the code here.
"""

from __future__ import annotations

import html
import inspect
import re
import subprocess
from dataclasses import dataclass
from typing import Optional, Sequence

import altair as alt
import numpy as np
import pandas as pd

import topk_moe as kernels_package
from analysis import display
from analysis.display import Note
from topk_moe.cuda import build_report, expert_mlp, launch_config

#: (kernel name prefix, family), the first match wins; the chapter's sections
#: follow these families. A kernel matching none is "other", so that a new
#: kernel shows up in the tables instead of breaking them.
FAMILY_PREFIXES = (
    ("router_", "router"),
    ("dispatch_", "dispatch"),
    ("permute_rows_", "permute"),
    ("combine_", "combine"),
    ("expert_mlp_v1_", "expert MLP v1"),
    ("expert_mlp_v2_", "expert MLP v2"),
    ("expert_mlp_v3_", "expert MLP v3"),
    ("expert_mlp_decode_", "expert MLP decode"),
    ("expert_mlp_tile_starts", "expert MLP tile starts"),
    ("activate_", "activation (dense)"),
)
OTHER_FAMILY = "other"

#: The columns of the resource table, in order.
RESOURCE_COLUMNS = ("file", "family", "kernel", "variant", "registers", "spill stores (bytes)",
                    "spill loads (bytes)", "static shared (bytes)", "stack (bytes)")
#: How a file compiled with its own #ifndef defaults (no -D set) is labelled.
FILE_DEFAULTS = "(the file's defaults)"

#: Okabe-Ito colours (colour-blind safe), one per .cu file.
FILE_COLOURS = {
    "router.cu": "#0072B2",
    "dispatch.cu": "#E69F00",
    "combine.cu": "#009E73",
    "expert_mlp.cu": "#D55E00",
    "activation.cu": "#CC79A7",
}
OTHER_COLOUR = "#999999"
BAR_HEIGHT = 13  # pixels per kernel in the registers chart
LABEL_LIMIT = 320  # pixels of axis label: room for a kernel name and its -D values

#: The register limits the chart marks, for sm_80 and sm_90 alike (CUDA C++ Programming
#: Guide, compute capabilities 8.0 and 9.0): a thread may have at most 255 registers
#: (ptxas spills beyond), and an SM's 65,536 registers hold all of its 2,048 threads
#: only at 32 registers per thread, half of them at 64.
MAX_REGISTERS_PER_THREAD = 255
REGISTERS_PER_SM = 65536
THREADS_PER_SM = 2048
#: (registers, label, label row above the plot, label alignment): the rows and alignments keep
#: the three labels apart, since 32 and 64 are close on the axis.
REGISTER_LIMITS = (
    (REGISTERS_PER_SM // THREADS_PER_SM, "32: all threads of an SM fit", 0, "left"),
    (REGISTERS_PER_SM // (THREADS_PER_SM // 2), "64: half of them fit", 1, "left"),
    (MAX_REGISTERS_PER_THREAD, "255: most per thread", 0, "right"),
)

#: Shapes for the launch-rule tables: (T, k, E) batches around the decode
#: threshold, expert counts for the router and dispatch layouts, row widths D.
VERSION_CASES = ((1, 1, 8), (1, 2, 8), (16, 2, 8), (17, 2, 8), (4096, 2, 8),
                 (1, 2, 64), (128, 2, 64), (129, 2, 64), (4096, 2, 64))
ROUTER_EXPERT_COUNTS = (1, 2, 3, 8, 16, 32, 64, 128, 256, 1024)
DISPATCH_EXPERT_COUNTS = (8, 64, 1024, 2048, 4096, launch_config.MAX_DISPATCH_EXPERTS)
ROW_WIDTHS = (33, 100, 104, 4096)


def kernel_family(kernel: str) -> str:
    """The chapter's family of a kernel, by its name (see FAMILY_PREFIXES)."""
    for prefix, family in FAMILY_PREFIXES:
        if kernel.startswith(prefix):
            return family
    return OTHER_FAMILY


def _family_rank(family: str) -> int:
    families = [name for _, name in FAMILY_PREFIXES]
    return families.index(family) if family in families else len(families)


# ---------------------------------------------------------------------------
# the sources


def kernel_inventory() -> pd.DataFrame:
    """One row per family: its file, how many kernels, and their names (from
    the ``extern "C" __global__`` definitions of the .cu files)."""
    by_family: dict = {}
    for file, kernel in build_report.source_kernels():
        by_family.setdefault((kernel_family(kernel), file), []).append(kernel)
    rows = [(family, file, len(names), ", ".join(sorted(names)))
            for (family, file), names in sorted(by_family.items(), key=lambda item: _family_rank(item[0][0]))]
    return pd.DataFrame(rows, columns=["family", "file", "kernels", "names"]).set_index("family")


# ---------------------------------------------------------------------------
# launch rules, from the launchers' own constants and functions


def launch_constants() -> dict:
    """The constants the chapter's prose quotes, by glue name, read from
    launch_config and expert_mlp (plain Python numbers)."""
    defines = expert_mlp.COMPILE_DEFINES
    return {
        "warp": launch_config.WARP,
        "router_warps": launch_config.ROUTER_WARPS,
        "router_threads": launch_config.ROUTER_WARPS * launch_config.WARP,
        "max_router_experts": launch_config.MAX_ROUTER_EXPERTS,
        "router_logits_per_lane": launch_config.ROUTER_LOGITS_PER_LANE,
        "max_router_tokens": launch_config.MAX_ROUTER_TOKENS,
        "dispatch_rounds": launch_config.DISPATCH_ROUNDS,
        "dispatch_segment": launch_config.DISPATCH_SEGMENT,
        "dispatch_max_warps": launch_config.DISPATCH_MAX_WARPS,
        "dispatch_shared_kib": launch_config.DISPATCH_SHARED_BYTES // 1024,
        "max_dispatch_experts": launch_config.MAX_DISPATCH_EXPERTS,
        "scan_threads": launch_config.SCAN_THREADS,
        "row_warps": launch_config.ROW_WARPS,
        "elementwise_threads": launch_config.ELEMENTWISE_THREADS,
        "blocks_per_sm": launch_config.BLOCKS_PER_SM,
        "mlp_threads": defines["THREADS"],
        "v1_block_cols": defines["V1_BLOCK_COLS"],
        "v2_block_rows": defines["V2_BLOCK_ROWS"],
        "v2_block_cols": defines["V2_BLOCK_COLS"],
        "v2_block_cols_gated": defines["V2_BLOCK_COLS_GATED"],
        "v3_block_rows": defines["V3_BLOCK_ROWS"],
        "v3_block_cols": defines["V3_BLOCK_COLS"],
        "v3_block_cols_gated": defines["V3_BLOCK_COLS_GATED"],
        "decode_rows": defines["DECODE_ROWS"],
        "decode_hidden_lanes": defines["DECODE_HIDDEN_LANES"],
        "decode_out_lanes": defines["DECODE_OUT_LANES"],
        "max_grid_y": expert_mlp.MAX_GRID_Y,
        "mlp_versions": ", ".join(expert_mlp.VERSIONS),
    }


def launch_constants_table() -> pd.DataFrame:
    """Every integer constant of launch_config, expert_mlp.COMPILE_DEFINES and
    expert_mlp.MAX_GRID_Y, with where it lives."""
    rows = [(f"launch_config.{name}", value) for name, value in sorted(vars(launch_config).items())
            if name.isupper() and isinstance(value, int)]
    rows += [(f"expert_mlp.COMPILE_DEFINES[{name!r}]", value) for name, value in expert_mlp.COMPILE_DEFINES.items()]
    rows += [("expert_mlp.MAX_GRID_Y", expert_mlp.MAX_GRID_Y)]
    return pd.DataFrame(rows, columns=["constant", "value"]).set_index("constant")


def version_choice_table(cases: Sequence[tuple] = VERSION_CASES) -> pd.DataFrame:
    """expert_mlp.choose_version on dropless batches (N = T * k rows) for float32 and
    float16 on an sm_80+ GPU, for two loads: balanced (the busiest expert gets
    ceil(N / E) rows) and one hot expert (every token picks it: T rows). The
    threshold, DECODE_ROWS, is ``version_choice_caption``'s."""
    rows = []
    for T, k, E in cases:
        N = T * k
        for load, busiest in (("balanced", -(-N // E)), ("one hot expert", T)):
            rows.append({
                "T": T, "k": k, "E": E, "load": load, "N = T k": N, "busiest expert's rows": busiest,
                "float32": expert_mlp.choose_version(busiest, E, np.float32),
                "float16": expert_mlp.choose_version(busiest, E, np.float16),
            })
    return pd.DataFrame(rows).set_index(["T", "k", "E", "load"])


def version_choice_caption() -> str:
    """The version table's caption: the threshold it is read against."""
    return (f"The version choose_version picks on an sm_80 or newer GPU: decode when the busiest expert "
            f"has at most {expert_mlp.COMPILE_DEFINES['DECODE_ROWS']} rows (DECODE_ROWS).")


def router_partial_logit_bytes(n_experts: int) -> int:
    """Static shared memory of router.cu's cross-warp sum for E experts:
    (ROUTER_WARPS - 1) x ROUTER_TOKENS x experts per lane x expert lanes float32,
    as declared in route_block (the report's shared bytes must agree)."""
    defines = launch_config.router_defines(n_experts)
    expert_lanes, per_lane = launch_config.router_lanes(n_experts)
    return 4 * max(1, defines["ROUTER_WARPS"] - 1) * defines["ROUTER_TOKENS"] * per_lane * expert_lanes


def router_layout_table(expert_counts: Sequence[int] = ROUTER_EXPERT_COUNTS) -> pd.DataFrame:
    """router.cu's warp layout for each E, from launch_config.router_lanes and router_defines."""
    rows = []
    for E in expert_counts:
        expert_lanes, per_lane = launch_config.router_lanes(E)
        defines = launch_config.router_defines(E)
        rows.append({
            "E": E, "expert lanes": expert_lanes, "column lanes": launch_config.WARP // expert_lanes,
            "experts per lane": per_lane, "tokens per block (ROUTER_TOKENS)": defines["ROUTER_TOKENS"],
            "logits per lane": per_lane * defines["ROUTER_TOKENS"],
            "partial-logit shared (bytes)": router_partial_logit_bytes(E),
        })
    return pd.DataFrame(rows).set_index("E")


def dispatch_layout_table(expert_counts: Sequence[int] = DISPATCH_EXPERT_COUNTS) -> pd.DataFrame:
    """dispatch.cu's warps per block and the dynamic shared memory its launcher
    gives each segment kernel (``launch_config.dispatch_shared_bytes``): the
    count kernel an int counter per expert per warp; the scatter per warp an
    int64 row base and a 16-bit counter per expert, and its staging."""
    rows = []
    for E in expert_counts:
        rows.append({"E": E, "warps per block": launch_config.dispatch_warps_per_block(E),
                     "count: shared (bytes)": launch_config.dispatch_shared_bytes("dispatch_count_segments", E),
                     "scatter: shared (bytes)": launch_config.dispatch_shared_bytes("dispatch_scatter", E)})
    return pd.DataFrame(rows).set_index("E")


def access_width_table(widths: Sequence[int] = ROW_WIDTHS) -> pd.DataFrame:
    """permute's access width (launch_config.widest_access) for rows of D elements at
    16-byte aligned addresses; the vector combine kernels need the full 16 bytes."""
    rows = []
    for D in widths:
        for dtype in (np.float32, np.float16):
            row_bytes = D * np.dtype(dtype).itemsize
            width = launch_config.widest_access(row_bytes, 0, 0)
            rows.append({"D": D, "dtype": np.dtype(dtype).name, "row bytes": row_bytes,
                         "permute kernel": f"permute_rows_{width}",
                         "combine": "vector" if width == 16 else "scalar"})
    return pd.DataFrame(rows).set_index(["D", "dtype"])


# ---------------------------------------------------------------------------
# nvcc's resource report


@dataclass(frozen=True)
class CompilerReport:
    """nvcc's report for one arch: the table and its raw rows, or a note saying why
    there is none."""

    arch: str
    rows: Optional[list]  # build_report.resource_report's dicts; None without nvcc
    table: Optional[pd.DataFrame]
    note: Optional[str]
    nvcc_release: Optional[str]

    @property
    def available(self) -> bool:
        return self.table is not None


def no_nvcc_note(arch: str) -> str:
    return (f"nvcc is not installed on the machine that executed this chapter (looked on PATH, in "
            f"$CUDA_HOME and /usr/local/cuda), so there is no resource report for {arch} here. "
            f"Install the CUDA toolkit and re-run the chapter to get it; nothing in it needs a GPU.")


def variant_label(defines: dict) -> str:
    """A -D set as it would be passed to nvcc, sorted by name."""
    if not defines:
        return FILE_DEFAULTS
    return " ".join(f"-D{name}={value}" for name, value in sorted(defines.items()))


def _short_variant_labels(rows: Sequence[dict]) -> list:
    """Per row, only the -D values that differ between the variants of its file
    ("" for a file compiled once): short enough for a chart axis."""
    varying: dict = {}
    for row in rows:
        for name, value in row["defines"].items():
            varying.setdefault((row["file"], name), set()).add(value)
    labels = []
    for row in rows:
        shown = [f"{name}={value}" for name, value in sorted(row["defines"].items())
                 if len(varying[(row["file"], name)]) > 1]
        labels.append(" ".join(shown))
    return labels


def _sorted_rows(rows: Sequence[dict]) -> list:
    """Report rows by family (the chapter's order), then file, kernel and -D values."""
    return sorted(rows, key=lambda row: (_family_rank(kernel_family(row["kernel"])), row["file"], row["kernel"],
                                         sorted(row["defines"].items())))


def resource_table(rows: Sequence[dict]) -> pd.DataFrame:
    """build_report.resource_report's rows as the chapter's table (RESOURCE_COLUMNS).
    Registers are empty for a device function that ptxas did not inline."""
    rows = _sorted_rows(rows)
    return pd.DataFrame({
        "file": [row["file"] for row in rows],
        "family": [kernel_family(row["kernel"]) for row in rows],
        "kernel": [row["kernel"] for row in rows],
        "variant": [variant_label(row["defines"]) for row in rows],
        "registers": pd.array([row["registers"] for row in rows], dtype="Int64"),
        "spill stores (bytes)": [int(row["spill_stores"]) for row in rows],
        "spill loads (bytes)": [int(row["spill_loads"]) for row in rows],
        "static shared (bytes)": [int(row["shared_bytes"]) for row in rows],
        "stack (bytes)": [int(row["stack_bytes"]) for row in rows],
    }, columns=list(RESOURCE_COLUMNS))


def nvcc_release(nvcc: str) -> Optional[str]:
    """'release 13.0, V13.0.88' from ``nvcc --version``; None when it can't be read."""
    try:
        done = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release [^\n]+", done.stdout)
    return match.group(0).strip() if match else None


def compiler_report(arch: str, *, files: Optional[Sequence[str]] = None) -> CompilerReport:
    """nvcc's resource report of kernels/topk_moe/cuda for ``arch`` (every .cu file, or the
    named ``files``), or, where nvcc is absent, a CompilerReport with only a note.
    A failing compile raises build_report.BuildError: that is a bug, not a missing tool."""
    nvcc = build_report.nvcc_path()
    if nvcc is None:
        return CompilerReport(arch=arch, rows=None, table=None, note=no_nvcc_note(arch), nvcc_release=None)
    sources = None
    if files is not None:
        by_name = {path.name: path for path in build_report.kernel_sources()}
        unknown = sorted(set(files) - set(by_name))
        if unknown:
            raise ValueError(f"files: no such kernel source(s) {unknown}; the sources are {sorted(by_name)}")
        sources = [by_name[name] for name in files]
    rows = build_report.resource_report(arch, sources=sources)
    return CompilerReport(arch=arch, rows=rows, table=resource_table(rows), note=None,
                          nvcc_release=nvcc_release(nvcc))


def report_display(report: CompilerReport):
    """What the chapter shows: the whole table (no row limit; columns that are zero
    for every kernel, such as spills, named in its caption instead), or the note.
    A device function that ptxas did not inline shows "(not inlined)" for registers.
    The file and family columns are left out (a kernel's name says both; the inventory
    table at the top of the chapter lists them), so the table fits the page."""
    if not report.available:
        return Note("No compiler report", report.note)
    table = report.table.drop(columns=["file", "family"]).astype({"registers": object})
    table["registers"] = [("(not inlined)" if pd.isna(value) else int(value)) for value in table["registers"]]
    return display.table(table, caption=f"ptxas's resource report for {report.arch}, one row per kernel "
                                        f"and -D set.", drop_constant=True, unbroken=["variant"])


NOT_AVAILABLE = "not available (no nvcc)"


def report_numbers(report: CompilerReport) -> dict:
    """The report's numbers for the prose, by glue name; text saying they are not
    available where nvcc is absent (so the same prose renders either way)."""
    keys = ("n_kernels", "n_compiled", "n_files", "max_spill_bytes", "max_stack_bytes", "max_registers",
            "max_registers_kernel", "max_static_shared", "max_static_shared_kernel", "nvcc_release",
            "router_shared_check")
    if not report.available:
        return {key: NOT_AVAILABLE for key in keys}
    table = report.table
    spills = table["spill stores (bytes)"] + table["spill loads (bytes)"]
    entries = table[table["registers"].notna()]
    heaviest = entries.loc[entries["registers"].astype(int).idxmax()]
    largest_shared = table.loc[table["static shared (bytes)"].idxmax()]
    return {
        "n_kernels": int(len({(row["file"], row["kernel"]) for row in report.rows})),
        "n_compiled": int(len(table)),
        "n_files": int(table["file"].nunique()),
        "max_spill_bytes": int(spills.max()),
        "max_stack_bytes": int(table["stack (bytes)"].max()),
        "max_registers": int(heaviest["registers"]),
        "max_registers_kernel": _kernel_and_variant(heaviest),
        "max_static_shared": int(largest_shared["static shared (bytes)"]),
        "max_static_shared_kernel": _kernel_and_variant(largest_shared),
        "nvcc_release": report.nvcc_release or "unknown",
        "router_shared_check": router_shared_check(report.rows),
    }


def _kernel_and_variant(row: pd.Series) -> str:
    return row["kernel"] if row["variant"] == FILE_DEFAULTS else f"{row['kernel']} ({row['variant']})"


def router_shared_check(rows: Sequence[dict]) -> str:
    """Whether the router's static shared memory in the report equals
    router_partial_logit_bytes(E) for every compiled E; raises if not."""
    router_rows = [row for row in rows if row["file"] == "router.cu" and row["registers"] is not None]
    if not router_rows:
        return "no router variant compiled"
    wrong = [f"{row['kernel']} E={row['defines']['N_EXPERTS']}: {row['shared_bytes']} bytes, expected "
             f"{router_partial_logit_bytes(row['defines']['N_EXPERTS'])}"
             for row in router_rows if row["shared_bytes"] != router_partial_logit_bytes(row["defines"]["N_EXPERTS"])]
    if wrong:
        raise AssertionError("router.cu's shared memory differs from its layout:\n" + "\n".join(wrong))
    experts = sorted({row["defines"]["N_EXPERTS"] for row in router_rows})
    return f"equal for all {len(router_rows)} compiled router kernels (E = {', '.join(map(str, experts))})"


def registers_chart(report: CompilerReport) -> alt.TopLevelMixin:
    """Registers per thread of every compiled kernel and variant, coloured by file, with
    the limits of REGISTER_LIMITS drawn as dashed rules and labelled at the top."""
    rows = _sorted_rows(report.rows)
    labels = [f"{row['kernel']} {short}".strip() for row, short in zip(rows, _short_variant_labels(rows))]
    data = pd.DataFrame({
        "kernel": labels,
        "file": [row["file"] for row in rows],
        "registers": [row["registers"] for row in rows],
    }).dropna(subset=["registers"])
    files = list(dict.fromkeys(data["file"]))
    colours = [FILE_COLOURS.get(file, OTHER_COLOUR) for file in files]
    x_scale = alt.Scale(domain=[0, MAX_REGISTERS_PER_THREAD + 1], nice=False)
    bars = alt.Chart(data).mark_bar().encode(
        x=alt.X("registers:Q", title=f"registers per thread (ptxas, {report.arch})", scale=x_scale,
                axis=alt.Axis(values=[0] + [limit[0] for limit in REGISTER_LIMITS])),
        y=alt.Y("kernel:N", sort=list(data["kernel"]), title=None, axis=alt.Axis(labelLimit=LABEL_LIMIT)),
        color=alt.Color("file:N", scale=alt.Scale(domain=files, range=colours), title="file",
                        legend=alt.Legend(orient="bottom", columns=len(files))),
    )
    limits = pd.DataFrame([{"registers": value, "limit": label} for value, label, _, _ in REGISTER_LIMITS])
    rules = alt.Chart(limits).mark_rule(strokeDash=[4, 3], color="#000000").encode(
        x=alt.X("registers:Q", scale=x_scale))
    # Each limit's label above the plot (not over the bars), in its row, starting or ending at its rule.
    labels = [alt.Chart(limits[limits["registers"] == value]).mark_text(
                  align=align, baseline="bottom", dx=3 if align == "left" else -3, fontSize=10).encode(
                  x=alt.X("registers:Q", scale=x_scale), y=alt.value(-4 - 13 * row), text="limit:N")
              for value, _, row, align in REGISTER_LIMITS]
    return alt.layer(bars, rules, *labels).properties(
        width=320, height=BAR_HEIGHT * len(data),
        title=alt.Title(f"Registers per thread of each kernel ({report.arch}), against the SM's limits",
                        anchor="start", offset=34))


def registers_figure(report: CompilerReport):
    """The chart as the chapter's next numbered figure, or None (nothing shown; the
    table's note says why)."""
    if not report.available:
        return None
    from analysis import charts  # noqa: PLC0415 - vl-convert only where there is a chart

    entries = [row for row in report.rows if row["registers"] is not None]
    heaviest = max(entries, key=lambda row: row["registers"])
    spilling = sum(1 for row in report.rows if row["spill_stores"] or row["spill_loads"])
    spills = "none spills" if spilling == 0 else f"{spilling} spill to local memory"
    limits = ", ".join(str(limit[0]) for limit in REGISTER_LIMITS)
    return charts.figure(
        registers_chart(report),
        f"Registers per thread that ptxas gives each kernel and -D set for {report.arch}; the dashed lines are "
        f"the limits. The most is {heaviest['registers']}, under the {MAX_REGISTERS_PER_THREAD}-register limit "
        f"({spills}); above {REGISTERS_PER_SM // THREADS_PER_SM} registers not all of an SM's "
        f"{THREADS_PER_SM:,} threads can be resident, which matters only where occupancy limits speed.",
        f"Horizontal bar chart: one bar per compiled kernel and variant ({len(entries)} bars), coloured by source "
        f"file, its length the registers per thread, from 0 to {heaviest['registers']} "
        f"({heaviest['kernel']}); dashed vertical lines at {limits} registers.")


# ---------------------------------------------------------------------------
# the GPU checks that are still to be run


def gpu_check_note(results_dir=None) -> str:
    """One sentence on the newest committed ``gpu-tests`` record (make device-check):
    device, date, counts, and whether it was made with the kernels sources here."""
    from analysis.measure.device_check import newest_gpu_check  # noqa: PLC0415

    record, same_code = newest_gpu_check(results_dir)
    if record is None:
        return ("No gpu-tests record is committed (results/<device>/gpu-tests.jsonl): the checks listed in "
                "this chapter have not yet been run on a GPU for this code.")
    return (f"The newest gpu-tests record is from {record.get('device') or 'an unnamed device'} on "
            f"{str(record.get('utc', '?'))[:10]}: {record.get('passed')} passed, {record.get('failed')} failed, "
            f"{record.get('errors')} errors, {record.get('skipped')} skipped. It was made with "
            + ("these kernel sources (same source hash)." if same_code else
               "other kernel sources than these (its source hash differs), so it does not vouch for this code."))


def source_numbers() -> dict:
    """What the chapter describes, by glue name: the number of kernels and .cu files
    in kernels/topk_moe/cuda, and the start of build_report.source_hash() that names them."""
    defined = build_report.source_kernels()
    return {"n_source_kernels": len(defined), "n_source_files": len({file for file, _ in defined}),
            "source_hash": build_report.source_hash()[:12]}


def emulator_mutation_table(names: Optional[Sequence[str]] = None) -> Optional[pd.DataFrame]:
    """CPU emulation: each realistic GPU bug of topk_moe.cuda.emulator.mutants injected
    into a copy of the kernels, run on the emulator, and what caught it (the tolerance
    rule, an exact plan, bitwise equality across schedules, a fault the emulator
    raises, or a data race the emulated racecheck reports). None where the emulator
    cannot run. These are CPU runs, not GPU runs.
    names: the mutants to run (default: all)."""
    if "cuda-emulated" not in kernels_package.available_backends():
        return None
    from topk_moe.cuda.emulator import mutants

    return pd.DataFrame(mutants.verify(names))


def emulator_numbers(table: Optional[pd.DataFrame]) -> dict:
    """For the prose: mutants injected and caught, and the kernels the emulator has
    launched in this process (of those the sources define)."""
    if table is None:
        return {"emulated_mutants": 0, "emulated_mutants_caught": 0, "emulated_kernels_launched": 0}
    from topk_moe.cuda.emulator import loader

    defined = build_report.source_kernels()
    return {"emulated_mutants": int(len(table)), "emulated_mutants_caught": int(table["caught"].sum()),
            "emulated_kernels_launched": len(defined & set(loader.LAUNCHES))}


def emulator_note(table: Optional[pd.DataFrame]) -> str:
    if table is not None:
        return ""
    from topk_moe.backends import emulator_unavailable_reason

    return f"The CPU emulator cannot run here: {emulator_unavailable_reason()}."


def choose_version_source() -> str:
    """The source text of expert_mlp.choose_version: the whole rule, as the launcher runs it."""
    return inspect.getsource(expert_mlp.choose_version).rstrip()


def choose_version_display():
    """choose_version's source as the page shows it: a plain preformatted block, the
    rule quoted from the module (an output, not a code cell of the chapter)."""
    from IPython.display import HTML  # noqa: PLC0415

    return HTML(f'<pre class="moe-source" style="white-space:pre-wrap">{html.escape(choose_version_source())}</pre>')


# ---------------------------------------------------------------------------
# Memory traffic counted on the CPU emulator (analysis.measure.traffic records)

TRAFFIC_LABEL = ("counted in CPU emulation: the requests the kernel makes, not DRAM traffic "
                 "(no caches are modelled)")
_STAGE_ORDER = ("route", "dispatch", "permute", "expert_mlp", "combine", "dense_activation")


CURRENT_SOURCES = "working tree"


def _traffic_key(record: dict) -> tuple:
    # Per stage: a run may count only some stages (analysis.measure.traffic --stages).
    p = record["params"]
    return (p["layer"], p["k"], p["T"], p["D"], p["F"], p["E"], p["dtype"], p.get("sources", CURRENT_SOURCES),
            record["stage"])


def traffic_records(results_dir=None, device: Optional[str] = None, sources: Optional[str] = CURRENT_SOURCES) -> list:
    """The committed 'traffic' records (analysis.measure.traffic) of kernel
    sources ``sources`` (None: every source), the newest run per (layer, k, shape,
    sources, stage) only; [] where none is committed."""
    from analysis import records

    try:
        found = records.read_records("traffic", results_dir=results_dir, device=device)
    except FileNotFoundError:
        return []
    if sources is not None:
        found = [r for r in found if r["params"].get("sources", CURRENT_SOURCES) == sources]
    latest: dict = {}
    for r in found:
        latest[_traffic_key(r)] = max(latest.get(_traffic_key(r), ""), r["utc"])
    return [r for r in found if r["utc"] == latest[_traffic_key(r)]]


#: The traffic table's two halves, so that each fits the page: the bytes against the
#: ideal, and the requests against their minimum.
TRAFFIC_PARTS = {"bytes": ("ideal (KiB)", "sector bytes / ideal", "compulsory / ideal"),
                 "requests": ("sectors / minimum", "wavefronts / minimum")}


def traffic_table(found: Sequence[dict], part: Optional[str] = None) -> pd.DataFrame:
    """Per layer, k and kernel (in stage order; a kernel's name says its stage): sector
    bytes and compulsory bytes over the ideal (each byte once), global sectors against
    the minimum (coalescing), and shared wavefronts against the minimum (bank conflicts).
    ``part``: "bytes" or "requests" (TRAFFIC_PARTS) keeps only those columns; None: all."""
    if part is not None and part not in TRAFFIC_PARTS:
        raise ValueError(f"part: expected one of {sorted(TRAFFIC_PARTS)} or None, got {part!r}")
    rows = []
    for r in found:
        def ratio(a, b):
            return a / b if b else float("nan")

        rows.append({
            "layer": r["params"]["layer"] + ("" if r["params"]["layer"] == "moe" else f" (F = {r['params']['F_dense']})"),
            "k": r["params"]["k"],
            "kernel": r["kernel"],
            "ideal (KiB)": r["ideal_bytes"] / 1024,
            "sector bytes / ideal": ratio(r["sector_bytes"], r["ideal_bytes"]),
            "compulsory / ideal": ratio(r["compulsory_bytes"], r["ideal_bytes"]),
            "sectors / minimum": ratio(r["global_sectors"], r["global_min_sectors"]),
            "wavefronts / minimum": ratio(r["shared_wavefronts"], r["shared_min_wavefronts"]),
            "_order": (_STAGE_ORDER.index(r["stage"]), r["launch"]),
        })
    if not rows:
        return pd.DataFrame(columns=["layer", "k", "kernel"])
    table = pd.DataFrame(rows)
    table = table.sort_values(["layer", "_order", "k"], key=lambda c: c if c.name != "layer" else c.str.len())
    table = table.drop(columns="_order").reset_index(drop=True)
    if part is not None:
        table = table[["layer", "k", "kernel", *TRAFFIC_PARTS[part]]]
    return table


def traffic_by_k(found: Sequence[dict]) -> pd.DataFrame:
    """The k question in traffic: per stage of the MoE layer, sector bytes at
    k = 1 and k = 2 (counted in CPU emulation), and their ratio."""
    moe = [r for r in found if r["params"]["layer"] == "moe"]
    if not moe:
        return pd.DataFrame(columns=["stage", "k = 1 (KiB)", "k = 2 (KiB)", "k = 2 / k = 1"])
    totals: dict = {}
    for r in moe:
        totals.setdefault(r["stage"], {}).setdefault(r["params"]["k"], 0)
        totals[r["stage"]][r["params"]["k"]] += r["sector_bytes"]
    rows = []
    for stage in [s for s in _STAGE_ORDER if s in totals]:
        one, two = totals[stage].get(1), totals[stage].get(2)
        rows.append({"stage": stage, "k = 1 (KiB)": None if one is None else one / 1024,
                     "k = 2 (KiB)": None if two is None else two / 1024,
                     "k = 2 / k = 1": two / one if one and two else float("nan")})
    return pd.DataFrame(rows)


def traffic_k_answer(results_dir=None) -> pd.DataFrame:
    """For the Answers chapter's k question: per stage of the MoE layer, the
    bytes its requests move at k = 1 and k = 2 (counted in CPU emulation at the
    committed shape; see TRAFFIC_LABEL) and their ratio; no rows without records."""
    return traffic_by_k(traffic_records(results_dir))


#: The before-and-after table's two halves: global memory (the epilogue's stores)
#: and shared memory (the cp.async writes of the A tile).
TRAFFIC_FIX_PARTS = {"global": ("store requests", "store sectors / minimum", "all sectors / minimum"),
                     "shared": ("shared write wavefronts / minimum", "all wavefronts / minimum")}


#: The "before" runs of the dispatch fixes (issue 21), oldest first; the run
#: before the issue-14 fixes (6853676) holds the same dispatch code as e15b27a.
DISPATCH_FIX_SOURCES = ("before the issue-21 dispatch fix (e15b27a)",
                        "before the second issue-21 dispatch fix (baa3f94)")


def traffic_fix_table(results_dir=None, kernels: Sequence[str] = ("expert_mlp_v3_hidden_f16", "expert_mlp_v3_out_f16"),
                      part: Optional[str] = None, sources: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """Counts of the fixed kernels before and after the fixes, every committed
    source label side by side: the global stores' sectors and all global
    sectors against the minimum, the shared writes' wavefronts (the cp.async
    tile copies) and all shared wavefronts against the minimum. ``part``:
    "global" or "shared" (TRAFFIC_FIX_PARTS) keeps only those columns; None: all.
    ``sources``: the "before" labels to show, in this order (oldest first), then
    the current sources; None: every label, sorted."""
    if part is not None and part not in TRAFFIC_FIX_PARTS:
        raise ValueError(f"part: expected one of {sorted(TRAFFIC_FIX_PARTS)} or None, got {part!r}")
    rows = []
    order = None if sources is None else {label: i for i, label in enumerate([*sources, CURRENT_SOURCES])}
    for r in traffic_records(results_dir, sources=None):
        if r["kernel"] not in kernels or r["params"]["layer"] != "moe":
            continue
        label = r["params"].get("sources", CURRENT_SOURCES)
        if order is not None and label not in order:
            continue
        stores = [s for s in r["sites"] if s["space"] == "global" and s["kind"] == "write"]
        stored_sectors = sum(s["sectors"] for s in stores)
        stored_min = sum(s["min_sectors"] for s in stores)
        shared_writes = [s for s in r["sites"] if s["space"] == "shared" and s["kind"] == "write"]
        written_wavefronts = sum(s["wavefronts"] for s in shared_writes)
        written_min = sum(s["min_wavefronts"] for s in shared_writes)
        rows.append({
            "order": label if order is None else order[label],
            "sources": _sources_label(label),
            "k": r["params"]["k"],
            "kernel": r["kernel"],
            "store requests": sum(s["requests"] for s in stores),
            "store sectors / minimum": stored_sectors / stored_min if stored_min else float("nan"),
            "all sectors / minimum": r["global_sectors"] / r["global_min_sectors"] if r["global_min_sectors"]
            else float("nan"),
            "shared write wavefronts / minimum": written_wavefronts / written_min if written_min else float("nan"),
            "all wavefronts / minimum": r["shared_wavefronts"] / r["shared_min_wavefronts"]
            if r["shared_min_wavefronts"] else float("nan"),
        })
    if not rows:
        return pd.DataFrame(columns=["sources", "k", "kernel"])
    table = pd.DataFrame(rows).sort_values(["kernel", "k", "order"]).drop(columns="order").reset_index(drop=True)
    if part is not None:
        table = table[["sources", "k", "kernel", *TRAFFIC_FIX_PARTS[part]]]
    return table


def _sources_label(sources: str) -> str:
    """A short name for a run's kernel sources, so the table fits the page: "now" for the
    working tree; for a "before" label that names its commit in parentheses, the commit
    (several fixes, each with its own "before"; the prose says which commit precedes
    which fix); "before" for one that names none."""
    if sources == CURRENT_SOURCES:
        return "now"
    if not sources.startswith("before"):
        return sources
    commit = re.search(r"\(([0-9a-f]{7,40})\)\s*$", sources)
    return commit.group(1) if commit else "before"


def traffic_numbers(found: Sequence[dict]) -> dict:
    """Glue values of the traffic section: the shape of the committed run."""
    if not found:
        return {"traffic_shape": "no shape (no traffic records are committed)", "traffic_skew": "unknown"}
    p = found[0]["params"]
    skew = sorted({round(r["routing_max_over_mean"], 2) for r in found if r.get("routing_max_over_mean")})
    return {"traffic_shape": f"T = {p['T']}, D = {p['D']}, F = {p['F']}, E = {p['E']}, {p['dtype']}, "
                             f"{p['activation']}",
            "traffic_skew": ", ".join(f"{v:g}" for v in skew) or "-"}
