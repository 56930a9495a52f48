"""The book's chapter notebooks: they run at tiny sizes, they only call, and the
runner (analysis.run_notebooks) finds them, runs them and fails loudly.

Executing a notebook starts a Jupyter kernel (a few seconds each), so these
tests are marked slow; they need the `book` extra (papermill, altair,
vl-convert, pandas, myst-nb) and skip with the reason where it is missing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

from analysis import run_notebooks  # noqa: E402  (after the skip above)

NOTEBOOK_DIR = run_notebooks.NOTEBOOK_DIR
SOURCE_NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))

# Tiny parameters for each chapter: every chapter in _toc.yml needs an entry, so
# that the test suite runs it in seconds. A chapter may have several variants.
TINY_PARAMETERS = {
    # The committed records and checkpoints, the routing on few bytes.
    "answers": [
        pytest.param({"routing_bytes": 512, "experiment_bytes": 512}, id="committed-records"),
    ],
    "semantics": [
        pytest.param({"T": 6, "D": 4, "F": 8, "E": 3, "k": 2, "capacity_factor": 1.0, "seed": 1},
                     id="k2-swiglu-capacity1"),
        pytest.param({"T": 5, "D": 4, "F": 6, "E": 3, "k": 1, "activation": "gelu",
                      "capacity_factor": None}, id="k1-gelu-dropless"),
        # C = ceil(0.25 * 6 * 2 / 3) = 1: most assignments dropped, some tokens lose both.
        pytest.param({"T": 6, "D": 4, "F": 8, "E": 3, "k": 2, "activation": "relu",
                      "capacity_factor": 0.25}, id="k2-relu-heavy-drops"),
    ],
    # Both chapters train the `tiny` preset (every arm, two seeds; seconds) into a
    # temporary folder instead of reading the committed checkpoints.
    "accuracy": [
        pytest.param({"preset": "tiny", "scratch": True, "experiment_bytes": 1024, "check_bytes": 512},
                     id="tiny-scratch"),
    ],
    "routing": [
        pytest.param({"preset": "tiny", "scratch": True, "routing_bytes": 1024}, id="tiny-scratch"),
    ],
    # nvcc's report of every .cu file (about 10 s on 2 cores), for sm_80 so that
    # the parameter is exercised; without nvcc the chapter shows a note instead.
    "kernels": [
        pytest.param({"arch": "sm_80"}, id="sm80-all-files"),
    ],
    # Without a GPU: the newest committed GPU records, or the note that there are none.
    "gpu_performance": [
        pytest.param({"source": "records"}, id="committed-records-or-note"),
    ],
    # The sweep run live at tiny sizes (seconds).
    "cpu_baseline": [
        pytest.param({"source": "live", "plan": "cpu-tiny"}, id="live-tiny"),
    ],
    # Live on the CPU backends at tiny sizes (odd T so that no size is a power of two).
    "correctness": [
        pytest.param({"T": 33, "D": 8, "F": 12, "E": 4, "seeds": [0], "routing_T": 257, "repeats": 2,
                      "batch_sizes": [2, 33], "probes": 2}, id="tiny-live"),
    ],
    # Two processes spawned from the kernel, a tiny layer, two timed calls per phase (seconds).
    "expert_parallel": [
        pytest.param({"source": "live", "ranks": [2], "tokens": [8], "top_k": [1, 2], "shape": [8, 8, 4],
                      "repeats": 2}, id="live-tiny"),
    ],
    # The committed results/ (whatever is there, or the note that there is none).
    "provenance": [
        pytest.param({}, id="default-results"),
    ],
}

GLUE_ROLE = re.compile(r"\{glue(?::[a-z]+)?\}`([^`]+)`")
FORBIDDEN_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


def _book_extras():
    for module in ("papermill", "ipykernel", "altair", "vl_convert", "pandas", "myst_nb"):
        pytest.importorskip(module, reason=f"the book extra is not installed ({module} missing)")


def _chapter_cases():
    cases = []
    for name in run_notebooks.chapter_names():
        for variant in TINY_PARAMETERS.get(name, [pytest.param(None, id="no-tiny-parameters")]):
            cases.append(pytest.param(name, variant.values[0], id=f"{name}-{variant.id}",
                                      marks=pytest.mark.slow))
    return cases


def _code_sources(notebook) -> list[str]:
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


def _as_python(source: str) -> str:
    """A code cell as plain Python (IPython magics turned into calls)."""
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(source)


def _outputs(notebook):
    for cell in notebook.cells:
        if cell.cell_type == "code":
            yield from cell.get("outputs", [])


def _glued_names(notebook) -> set[str]:
    return {output.get("metadata", {}).get("scrapbook", {}).get("name") for output in _outputs(notebook)} - {None}


def _glue_references(notebook) -> set[str]:
    """The keys that markdown cells paste with {glue}/{glue:text}/... roles (local keys only)."""
    keys = set()
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            for reference in GLUE_ROLE.findall(cell.source):
                if "::" not in reference:
                    keys.add(reference.rsplit(":", 1)[0] if ":" in reference else reference)
    return keys


# ---------------------------------------------------------------------------
# Static checks of the sources


def test_there_are_chapter_notebooks():
    assert SOURCE_NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


def test_toc_and_notebook_folder_agree():
    """Every source notebook is a chapter in _toc.yml (else the runner never runs it),
    and every chapter in _toc.yml has a source notebook."""
    chapters = run_notebooks.chapter_names()
    sources = [path.stem for path in SOURCE_NOTEBOOKS]
    assert sorted(chapters) == sorted(sources)
    assert len(set(chapters)) == len(chapters), f"a chapter is listed twice: {chapters}"


def test_every_chapter_has_tiny_parameters():
    missing = [name for name in run_notebooks.chapter_names() if name not in TINY_PARAMETERS]
    assert not missing, f"add tiny parameters for {missing} to TINY_PARAMETERS in this file"


@pytest.mark.parametrize("path", SOURCE_NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_defines_no_function_or_class(path):
    """Notebooks call, they don't define: logic lives in analysis/ and kernels/."""
    notebook = nbformat.read(path, as_version=4)
    found = []
    for index, source in enumerate(_code_sources(notebook)):
        tree = ast.parse(_as_python(source), filename=f"{path.name} code cell {index}")
        for node in ast.walk(tree):
            if isinstance(node, FORBIDDEN_DEFINITIONS):
                found.append(f"code cell {index}, line {node.lineno}: {type(node).__name__}")
    assert not found, f"{path.name} defines functions or classes; move them to analysis/: {found}"


@pytest.mark.parametrize("path", SOURCE_NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_has_one_parameters_cell_and_no_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: expected one cell tagged 'parameters', got {len(tagged)}"
    assert tagged[0].cell_type == "code"
    with_outputs = [i for i, cell in enumerate(notebook.cells)
                    if cell.cell_type == "code" and (cell.outputs or cell.execution_count)]
    assert not with_outputs, f"{path.name}: sources are committed unexecuted; cells {with_outputs} have outputs"


@pytest.mark.parametrize("path", SOURCE_NOTEBOOKS, ids=lambda path: path.stem)
def test_every_code_cell_says_whether_its_code_is_shown(path):
    """A reader sees results, not the calls that made them: every code cell is
    tagged remove-input, or hide-input (the parameters a reader may change), so
    a cell added without a tag does not print its source on the page."""
    notebook = nbformat.read(path, as_version=4)
    untagged = [i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"
                and not {"remove-input", "hide-input"} & set(cell.metadata.get("tags", []))]
    assert not untagged, f"{path.name}: code cells {untagged} have neither remove-input nor hide-input"


@pytest.mark.parametrize("path", SOURCE_NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_starts_with_its_title(path):
    notebook = nbformat.read(path, as_version=4)
    first = notebook.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), (
        f"{path.name}: the first cell must be a markdown cell with the chapter's '# title'")


# ---------------------------------------------------------------------------
# Running the chapters


@pytest.mark.parametrize("name, parameters", _chapter_cases())
def test_chapter_runs_at_tiny_parameters(name, parameters, tmp_path):
    _book_extras()
    assert parameters is not None, f"no tiny parameters for chapter {name!r}"
    output = run_notebooks.run_notebook(name, tmp_path, parameters)
    assert output == tmp_path / f"{name}.ipynb"
    notebook = nbformat.read(output, as_version=4)

    assert not notebook.metadata.papermill.exception
    assert notebook.metadata.papermill.parameters == parameters
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.execution_count is not None, f"a cell did not run: {cell.source[:60]!r}"
            assert all(output.output_type != "error" for output in cell.outputs)

    # Every number the prose pastes was glued by a cell.
    missing = _glue_references(notebook) - _glued_names(notebook)
    assert not missing, f"markdown pastes glue keys no cell glued: {sorted(missing)}"

    # Charts are static SVG, rendered at execution time; nothing for a browser to fetch:
    # an SVG output, or a numbered figure (analysis.charts.figure) holding the SVG inline.
    svgs = [output.data["image/svg+xml"] for output in _outputs(notebook)
            if "image/svg+xml" in output.get("data", {})]
    figures = [output.data["text/html"] for output in _outputs(notebook)
               if 'class="moe-figure"' in str(output.get("data", {}).get("text/html", ""))]
    if name == "semantics":
        assert len(svgs) + len(figures) == 1
        assert all("<svg" in svg for svg in svgs) and all("data:image/svg+xml;base64," in f for f in figures)
    for output in _outputs(notebook):
        data = output.get("data", {})
        assert not any(mime.startswith("application/vnd.vegalite") for mime in data)
        assert "cdn.jsdelivr" not in str(data.get("text/html", ""))


# ---------------------------------------------------------------------------
# The runner


def test_chapter_names_come_from_the_toc_in_order(tmp_path):
    toc = tmp_path / "_toc.yml"
    toc.write_text(
        "format: jb-book\nroot: intro\nparts:\n"
        "  - caption: One\n    chapters:\n      - file: generated/b\n      - file: other\n"
        "  - caption: Two\n    chapters:\n      - file: generated/a.ipynb\n"
        "        sections:\n          - file: generated/c\n",
        encoding="utf-8",
    )
    assert run_notebooks.chapter_names(toc) == ["b", "a", "c"]


@pytest.mark.parametrize("text, value", [
    ("12", 12), ("1.5", 1.5), ("None", None), ("True", True), ("swiglu", "swiglu"), ("'a b'", "a b"),
])
def test_parameter_values_are_typed(text, value):
    assert run_notebooks.parse_value(text) == value
    assert type(run_notebooks.parse_value(text)) is type(value)


def test_unknown_chapter_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_notebooks.main(["--only", "no-such-chapter"])
    assert exit_info.value.code != 0
    assert "no-such-chapter" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_runs_a_chapter_with_parameters(tmp_path, capsys):
    _book_extras()
    status = run_notebooks.main(["--only", "semantics", "--output-dir", str(tmp_path),
                                 "-p", "T", "4", "-p", "E", "2", "-p", "k", "1", "-p", "D", "4", "-p", "F", "4"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "[1/1] semantics" in printed and "done" in printed
    notebook = nbformat.read(tmp_path / "semantics.ipynb", as_version=4)
    assert notebook.metadata.papermill.parameters == {"T": 4, "E": 2, "k": 1, "D": 4, "F": 4}


@pytest.mark.slow
def test_a_failing_notebook_fails_the_run(tmp_path, monkeypatch, capsys):
    _book_extras()
    sources = tmp_path / "notebooks"
    sources.mkdir()
    broken = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("n = 1", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("raise RuntimeError('broken chapter')"),
    ])
    broken.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(broken, sources / "broken.ipynb")
    monkeypatch.setattr(run_notebooks, "NOTEBOOK_DIR", sources)
    monkeypatch.setattr(run_notebooks, "chapter_names", lambda: ["broken"])

    status = run_notebooks.main(["--output-dir", str(tmp_path / "out")])
    assert status == 1
    assert "broken: FAILED" in capsys.readouterr().err
    assert "broken chapter" in (tmp_path / "out" / "broken.ipynb").read_text(encoding="utf-8")


def test_missing_notebook_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-chapter"):
        run_notebooks.run_notebook("no-such-chapter", tmp_path, notebook_dir=tmp_path)


def test_runner_paths_point_into_the_repository():
    assert (run_notebooks.REPO_ROOT / "kernels").is_dir()
    assert (run_notebooks.REPO_ROOT / "analysis").is_dir()
    assert Path(run_notebooks.TOC_PATH).is_file()


# ---------------------------------------------------------------------------
# Sections that depend on data (only-if: / unless: tags)


def test_conditional_cells_follow_their_glued_flag(tmp_path):
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("glue", outputs=[nbformat.v4.new_output(
            "display_data", data={run_notebooks.GLUE_MIME: "False"}, metadata={"scrapbook": {"name": "has_records"}})]),
        nbformat.v4.new_markdown_cell("## Numbers", metadata={"tags": ["only-if:has_records"]}),
        nbformat.v4.new_markdown_cell("Nothing measured yet.", metadata={"tags": ["unless:has_records"]}),
        nbformat.v4.new_markdown_cell("Always."),
    ])
    path = tmp_path / "chapter.ipynb"
    nbformat.write(notebook, path)
    run_notebooks.drop_conditional_cells(path)
    kept = [cell.source for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "markdown"]
    assert kept == ["Nothing measured yet.", "Always."]


def test_a_condition_on_a_key_never_glued_is_an_error():
    with pytest.raises(ValueError, match="glued no 'missing'"):
        run_notebooks.keep_cell(["only-if:missing"], {})
    assert run_notebooks.keep_cell(["remove-input"], {})
