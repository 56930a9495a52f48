"""The Kernels chapter's helpers (analysis/chapters/kernels.py) on fake nvcc
reports, the no-nvcc branch, and the launch-rule tables against the launchers'
own functions. Nothing here compiles (tests/test_cuda_build.py does) or needs a GPU."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("altair", reason="the book extra is not installed (altair missing)")

from analysis.chapters import kernels as chapter  # noqa: E402  (after the skip above)
from topk_moe.cuda import build_report, expert_mlp, launch_config  # noqa: E402


def fake_row(file, kernel, defines=None, registers=32, spill_stores=0, spill_loads=0, shared_bytes=0,
             stack_bytes=0, arch="sm_90"):
    return {"file": file, "kernel": kernel, "arch": arch, "defines": dict(defines or {}), "registers": registers,
            "spill_stores": spill_stores, "spill_loads": spill_loads, "shared_bytes": shared_bytes,
            "stack_bytes": stack_bytes}


def router_row(kernel, E, registers):
    defines = launch_config.router_defines(E)
    return fake_row("router.cu", kernel, defines, registers=registers,
                    shared_bytes=chapter.router_partial_logit_bytes(E))


FAKE_REPORT = [
    fake_row("expert_mlp.cu", "expert_mlp_v2_out_f32", registers=157, shared_bytes=32768),
    fake_row("combine.cu", "combine_f32_vector", registers=44),
    router_row("router_top1_f32", 1024, 115),
    router_row("router_top1_f32", 2, 48),
    fake_row("dispatch.cu", "dispatch_scatter", {"DISPATCH_ROUNDS": 8}, registers=26, spill_stores=8, spill_loads=4),
    fake_row("dispatch.cu", "not_inlined_helper", {"DISPATCH_ROUNDS": 8}, registers=None, stack_bytes=16),
]


def fake_report(rows=FAKE_REPORT, arch="sm_90"):
    return chapter.CompilerReport(arch=arch, rows=list(rows), table=chapter.resource_table(rows), note=None,
                                  nvcc_release="release 13.0, V13.0.88")


# ---------------------------------------------------------------------------
# the resource table


def test_resource_table_has_one_row_per_kernel_and_variant_in_chapter_order():
    table = chapter.resource_table(FAKE_REPORT)
    assert tuple(table.columns) == chapter.RESOURCE_COLUMNS
    assert len(table) == len(FAKE_REPORT)
    # the chapter's family order, a kernel of no family last; E ascending within the router
    assert list(table["family"]) == ["router", "router", "dispatch", "combine", "expert MLP v2",
                                     chapter.OTHER_FAMILY]
    assert list(table["registers"][:2]) == [48, 115]
    assert table["variant"].iloc[0] == "-DN_EXPERTS=2 -DROUTER_TOKENS=8 -DROUTER_WARPS=8"
    assert table.loc[table["kernel"] == "expert_mlp_v2_out_f32", "variant"].item() == chapter.FILE_DEFAULTS
    assert str(table["registers"].dtype) == "Int64"
    assert table.loc[table["kernel"] == "not_inlined_helper", "registers"].isna().all()


def test_resource_table_of_an_empty_report_keeps_its_columns():
    table = chapter.resource_table([])
    assert table.empty and tuple(table.columns) == chapter.RESOURCE_COLUMNS


def test_report_numbers():
    numbers = chapter.report_numbers(fake_report())
    assert numbers["n_kernels"] == 5  # router_top1_f32 twice (two E), counted once
    assert numbers["n_compiled"] == 6
    assert numbers["n_files"] == 4
    assert numbers["max_spill_bytes"] == 12  # stores + loads of one kernel
    assert numbers["max_stack_bytes"] == 16
    assert numbers["max_registers"] == 157
    assert numbers["max_registers_kernel"] == "expert_mlp_v2_out_f32"
    assert numbers["max_static_shared"] == 32768
    assert numbers["router_shared_check"].startswith("equal for all 2 compiled router kernels (E = 2, 1024)")
    assert all(isinstance(value, (int, str)) for value in numbers.values())


def test_router_shared_check_fails_on_a_layout_mismatch():
    wrong = [router_row("router_top2_f16", 64, 62) | {"shared_bytes": 1}]
    with pytest.raises(AssertionError, match="router_top2_f16 E=64"):
        chapter.router_shared_check(wrong)


@pytest.mark.parametrize("E, expected", [(2, 448), (8, 1792), (64, 14336), (1024, 28672)])
def test_router_shared_bytes_by_hand(E, expected):
    # (ROUTER_WARPS - 1) * ROUTER_TOKENS * experts per lane * expert lanes * 4 bytes, as
    # ptxas reports it for router.cu (sm_80 and sm_90, nvcc 13).
    assert chapter.router_partial_logit_bytes(E) == expected


def test_variant_labels():
    assert chapter.variant_label({}) == chapter.FILE_DEFAULTS
    assert chapter.variant_label({"B": 2, "A": 1}) == "-DA=1 -DB=2"
    rows = [fake_row("router.cu", "r", {"N_EXPERTS": 2, "ROUTER_WARPS": 8}),
            fake_row("router.cu", "r", {"N_EXPERTS": 64, "ROUTER_WARPS": 8}),
            fake_row("dispatch.cu", "d", {"DISPATCH_ROUNDS": 8})]
    assert chapter._short_variant_labels(rows) == ["N_EXPERTS=2", "N_EXPERTS=64", ""]


def test_kernel_family():
    assert chapter.kernel_family("router_top2_f16") == "router"
    assert chapter.kernel_family("permute_rows_16") == "permute"
    assert chapter.kernel_family("expert_mlp_decode_out_f32") == "expert MLP decode"
    assert chapter.kernel_family("expert_mlp_tile_starts") == "expert MLP tile starts"
    assert chapter.kernel_family("something_new") == chapter.OTHER_FAMILY


def test_every_source_kernel_has_a_family():
    assert all(chapter.kernel_family(kernel) != chapter.OTHER_FAMILY
               for _, kernel in build_report.source_kernels())
    inventory = chapter.kernel_inventory()
    assert inventory["kernels"].sum() == len(build_report.source_kernels())


def test_registers_chart_is_offline_svg_with_one_bar_per_entry_function():
    report = fake_report()
    spec = json.loads(chapter.registers_chart(report).to_json())
    bars = next(layer for layer in spec["layer"] if layer["mark"]["type"] == "bar")
    values = spec["datasets"][bars["data"]["name"]]
    assert len(values) == len(FAKE_REPORT) - 1  # the not-inlined device function has no registers
    assert "router_top1_f32 N_EXPERTS=1024 ROUTER_TOKENS=1" in {value["kernel"] for value in values}
    layers = spec["layer"]
    assert spec["title"]["text"].startswith("Registers per thread")
    limits = [layer for layer in layers if layer["mark"]["type"] == "rule"]
    assert len(limits) == 1  # the limits, one dashed rule each
    limit_values = sorted(value["registers"] for value in spec["datasets"][limits[0]["data"]["name"]])
    assert sum(layer["mark"]["type"] == "text" for layer in layers) == len(chapter.REGISTER_LIMITS)  # labelled
    assert limit_values == [32, 64, chapter.MAX_REGISTERS_PER_THREAD]
    figure = chapter.registers_figure(report)
    markup = figure._repr_mimebundle_()["text/html"]
    assert markup.startswith('<figure') and "Figure " in markup and "data:image/svg+xml" in markup
    # the caption and alt text come from the report: its heaviest kernel and its one spilling kernel
    assert "The most is 157" in figure.caption and "1 spill to local memory" in figure.caption
    assert "expert_mlp_v2_out_f32" in figure.alt and "5 bars" in figure.alt


def test_report_display_is_the_whole_table():
    shown = chapter.report_display(fake_report())
    markup = shown._repr_html_()
    assert markup.count("<tr") == len(FAKE_REPORT) + 1  # a header row and every kernel, none elided
    assert "(not inlined)" in markup
    # a flag never breaks at its hyphen
    assert '<span style="white-space:nowrap">-DN_EXPERTS=1024</span>' in markup
    # columns that vary are kept, and a column that is the same in every row goes to the caption
    assert "spill stores (bytes)" in list(shown.frame.columns)
    constant = chapter.report_display(fake_report(FAKE_REPORT[:3]))
    assert "spill stores (bytes)" not in list(constant.frame.columns)
    assert "spill stores (bytes): 0" in constant.caption


# ---------------------------------------------------------------------------
# without nvcc


@pytest.fixture
def no_nvcc(monkeypatch):
    monkeypatch.setattr(build_report, "nvcc_path", lambda: None)

    def must_not_compile(*args, **kwargs):
        raise AssertionError("resource_report called without nvcc")

    monkeypatch.setattr(build_report, "resource_report", must_not_compile)


def test_without_nvcc_the_chapter_gets_a_note(no_nvcc):
    report = chapter.compiler_report("sm_80")
    assert not report.available and report.table is None and report.rows is None
    assert "nvcc is not installed" in report.note and "sm_80" in report.note

    shown = chapter.report_display(report)
    bundle = shown._repr_mimebundle_()
    assert 'class="admonition note"' in bundle["text/html"]
    assert "nvcc is not installed" in bundle["text/plain"]

    numbers = chapter.report_numbers(report)
    assert set(numbers) == set(chapter.report_numbers(fake_report()))
    assert set(numbers.values()) == {chapter.NOT_AVAILABLE}
    assert chapter.registers_figure(report) is None


def test_with_nvcc_the_report_function_is_called_with_the_arch_and_files(monkeypatch):
    calls = []
    monkeypatch.setattr(build_report, "nvcc_path", lambda: "/opt/fake/nvcc")
    monkeypatch.setattr(build_report, "resource_report",
                        lambda arch, sources=None: calls.append((arch, sources)) or FAKE_REPORT)
    monkeypatch.setattr(chapter, "nvcc_release", lambda nvcc: "release 99.9")
    report = chapter.compiler_report("sm_90", files=["router.cu"])
    assert report.available and len(report.table) == len(FAKE_REPORT)
    assert report.nvcc_release == "release 99.9"
    (arch, sources), = calls
    assert arch == "sm_90" and [path.name for path in sources] == ["router.cu"]
    with pytest.raises(ValueError, match="no_such.cu"):
        chapter.compiler_report("sm_90", files=["no_such.cu"])


def test_nvcc_release_of_a_missing_program_is_none(tmp_path):
    assert chapter.nvcc_release(str(tmp_path / "no-nvcc")) is None


# ---------------------------------------------------------------------------
# launch rules, read from the launchers


def test_launch_constants_are_the_modules_own():
    constants = chapter.launch_constants()
    assert constants["max_router_experts"] == launch_config.MAX_ROUTER_EXPERTS
    assert constants["max_dispatch_experts"] == launch_config.MAX_DISPATCH_EXPERTS
    assert constants["decode_rows"] == expert_mlp.COMPILE_DEFINES["DECODE_ROWS"]
    assert constants["router_threads"] == launch_config.ROUTER_WARPS * launch_config.WARP
    assert all(isinstance(value, (int, str)) for value in constants.values())
    table = chapter.launch_constants_table()
    assert table.loc["launch_config.DISPATCH_SEGMENT", "value"] == launch_config.DISPATCH_SEGMENT
    assert table.loc["expert_mlp.COMPILE_DEFINES['THREADS']", "value"] == expert_mlp.COMPILE_DEFINES["THREADS"]


def test_version_choice_table_follows_choose_version():
    table = chapter.version_choice_table([(2, 2, 8), (16, 2, 8), (4096, 2, 64)])
    threshold = expert_mlp.COMPILE_DEFINES["DECODE_ROWS"]
    assert f"at most {threshold} rows" in chapter.version_choice_caption()
    for (T, k, E, load), row in table.iterrows():
        busiest = -(-T * k // E) if load == "balanced" else T
        assert row["busiest expert's rows"] == busiest
        assert row["float32"] == expert_mlp.choose_version(busiest, E, np.float32)
        assert row["float16"] == expert_mlp.choose_version(busiest, E, np.float16)
    # balanced 16 tokens over 8 experts: 4 rows each, decode; all 16 on one expert: a GEMM
    assert table.loc[(16, 2, 8, "balanced"), "float32"] == "decode"
    assert table.loc[(16, 2, 8, "one hot expert"), "float32"] == "v2"
    assert table.loc[(4096, 2, 64, "balanced"), "float16"] == "v3"
    assert "def choose_version" in chapter.choose_version_source()


def test_choose_version_avoids_v3_before_sm80():
    assert expert_mlp.choose_version(1000, 8, np.float16, arch=75) == "v1"
    assert expert_mlp.choose_version(1000, 8, np.float16, arch=80) == "v3"


def test_emulator_mutation_table_reports_what_caught_each_mutant():
    # two mutants (a fault and a wrong result); the chapter's notebook run covers them all
    names = ["barrier after an early exit", "swapped ldmatrix.trans registers"]
    table = chapter.emulator_mutation_table(names)
    if table is None:
        pytest.skip(chapter.emulator_note(table))
    assert list(table["mutant"]) == names and table["caught"].all(), table
    assert "__syncthreads reached by" in table["caught by"][0]
    assert "exceeds the bound" in table["caught by"][1]
    numbers = chapter.emulator_numbers(table)
    assert numbers["emulated_mutants_caught"] == numbers["emulated_mutants"] == 2
    assert numbers["emulated_kernels_launched"] >= 5
    with pytest.raises(ValueError, match="unknown mutants"):
        chapter.emulator_mutation_table(["no such bug"])


def test_layout_tables():
    router = chapter.router_layout_table([2, 64, launch_config.MAX_ROUTER_EXPERTS])
    assert list(router["expert lanes"]) == [2, 32, 32]
    assert (router["expert lanes"] * router["column lanes"] == launch_config.WARP).all()
    assert (router["logits per lane"] <= launch_config.ROUTER_LOGITS_PER_LANE).all()
    dispatch = chapter.dispatch_layout_table([8, launch_config.MAX_DISPATCH_EXPERTS])
    for kernel in ("count", "scatter"):
        assert (dispatch[f"{kernel}: shared (bytes)"] <= launch_config.DISPATCH_SHARED_BYTES).all()
    assert (dispatch["scatter: shared (bytes)"] > dispatch["count: shared (bytes)"]).all()  # bases, staging
    widths = chapter.access_width_table([33, 104])
    assert widths.loc[(33, "float32"), "permute kernel"] == "permute_rows_4"
    assert widths.loc[(104, "float16"), "combine"] == "vector"


# ---------------------------------------------------------------------------
# the GPU record


def test_gpu_check_note_without_records(tmp_path):
    assert chapter.gpu_check_note(tmp_path).startswith("No gpu-tests record is committed")


@pytest.mark.parametrize("same_code", [True, False])
def test_gpu_check_note_reads_the_newest_record(tmp_path, same_code):
    folder = tmp_path / "nvidia-h100"
    folder.mkdir()
    source_hash = build_report.source_hash() if same_code else "0" * 64
    records = [
        {"utc": "2026-01-01T00:00:00Z", "device": "NVIDIA H100", "passed": 1, "failed": 9, "errors": 0,
         "skipped": 0, "source_hash": "old"},
        {"utc": "2026-02-03T04:05:06Z", "device": "NVIDIA H100", "passed": 500, "failed": 0, "errors": 0,
         "skipped": 2, "source_hash": source_hash},
    ]
    (folder / "gpu-tests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    note = chapter.gpu_check_note(tmp_path)
    assert "NVIDIA H100 on 2026-02-03: 500 passed, 0 failed" in note
    assert ("these kernel sources" in note) == same_code
    assert ("does not vouch for this code" in note) == (not same_code)


def test_source_numbers():
    numbers = chapter.source_numbers()
    assert numbers["n_source_kernels"] == len(build_report.source_kernels())
    assert numbers["source_hash"] == build_report.source_hash()[:12]


@pytest.mark.skipif(__import__("topk_moe.backends", fromlist=["x"]).emulator_unavailable_reason() is not None,
                    reason="the CUDA emulator can't run here (no C++ compiler)")
def test_traffic_tables_from_the_traffic_command(tmp_path):
    """The chapter's traffic tables read the records analysis.measure.traffic writes:
    every stage at k = 1 and k = 2, ratios at or above 1 where a minimum exists."""
    from analysis.measure import traffic as command

    assert command.main(["--T", "16", "--D", "64", "--F", "64", "--E", "4", "--k", "1", "2",
                         "--results-dir", str(tmp_path)]) == 0
    found = chapter.traffic_records(results_dir=tmp_path)
    table = chapter.traffic_table(found)
    # every stage's kernels are there (a kernel's name says its stage; the table has no stage column)
    families = {chapter.kernel_family(kernel) for kernel in table["kernel"]}
    assert {"router", "dispatch", "permute", "combine", "activation (dense)"} <= families
    assert any(family.startswith("expert MLP") for family in families)
    assert set(table["k"]) == {1, 2}
    assert (table["sectors / minimum"].dropna() >= 1).all()
    assert (table["wavefronts / minimum"].dropna() >= 1).all()
    assert (table["compulsory / ideal"].dropna() >= 1).all()
    # the page shows it in two halves that share the layer, k and kernel columns
    halves = [chapter.traffic_table(found, part) for part in chapter.TRAFFIC_PARTS]
    assert all(list(half.columns[:3]) == ["layer", "k", "kernel"] and len(half) == len(table) for half in halves)
    assert sum(len(half.columns) - 3 for half in halves) == len(table.columns) - 3
    with pytest.raises(ValueError, match="part"):
        chapter.traffic_table(found, "everything")
    by_k = chapter.traffic_by_k(found)
    assert list(by_k["stage"]) == ["route", "dispatch", "permute", "expert_mlp", "combine"]
    # permute moves k rows per token: twice the bytes at k = 2 (index arrays aside)
    permute = by_k.set_index("stage").loc["permute", "k = 2 / k = 1"]
    assert 1.8 < permute < 2.2
    assert chapter.traffic_k_answer(tmp_path).equals(by_k)
    fixes = chapter.traffic_fix_table(tmp_path)
    assert set(fixes["sources"]) == {"now"} and set(fixes["k"]) == {1, 2}
    assert (fixes["store sectors / minimum"] >= 1).all()
    assert list(chapter.traffic_fix_table(tmp_path, part="shared").columns) == [
        "sources", "k", "kernel", "shared write wavefronts / minimum", "all wavefronts / minimum"]
    assert chapter.traffic_records(results_dir=tmp_path / "none") == []
    assert chapter.traffic_table([]).empty and chapter.traffic_by_k([]).empty


def test_sources_label_is_short():
    assert chapter._sources_label(chapter.CURRENT_SOURCES) == "now"
    assert chapter._sources_label("before the issue-14 fixes (6853676)") == "6853676"
    assert chapter._sources_label("before the second issue-21 dispatch fix (baa3f94)") == "baa3f94"
    assert chapter._sources_label("before some change") == "before"
    assert chapter._sources_label("some other label") == "some other label"


def test_choose_version_display_quotes_the_rule_without_a_code_block():
    markup = chapter.choose_version_display().data
    assert markup.startswith('<pre class="moe-source"') and "def choose_version" in markup
    assert "&lt;= COMPILE_DEFINES" in markup  # escaped, shown as the module has it
