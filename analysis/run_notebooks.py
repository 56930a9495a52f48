"""Execute the book's chapter notebooks with papermill.

    python -m analysis.run_notebooks [--only NAME ...] [-p KEY VALUE ...] [--output-dir DIR]

Each chapter's source, book/notebooks/<name>.ipynb, is executed in a python3
kernel whose working directory is the repository root (so `import topk_moe,
analysis` work without an install), and the executed copy is written to
<output-dir>/<name>.ipynb (default book/generated/), where the book picks it up.
The chapters, and the order they run in, are the `generated/<name>` entries of
book/_toc.yml: the table of contents is the one list. The first notebook that
fails stops the run with a non-zero exit status; its partly executed copy is left
in the output directory, with the failing cell's traceback in it.

Sections that depend on data. A cell tagged ``only-if:KEY`` stays in the executed
copy only when the notebook glued ``KEY`` (myst_nb ``glue``) as True, and one tagged
``unless:KEY`` only when it glued it as False. So a chapter whose records do not
exist yet (the GPU chapter on a machine that never saw a GPU) shows its note and
what will fill it, and no empty section.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
BOOK_DIR = REPO_ROOT / "book"
TOC_PATH = BOOK_DIR / "_toc.yml"
NOTEBOOK_DIR = BOOK_DIR / "notebooks"
GENERATED_PREFIX = "generated/"
DEFAULT_OUTPUT_DIR = BOOK_DIR / "generated"
KERNEL_NAME = "python3"


def _toc_files(node: Any) -> Iterable[str]:
    """Every `file:` entry of a _toc.yml tree, in reading order."""
    if isinstance(node, dict):
        if "file" in node:
            yield str(node["file"])
        for key in ("root", "parts", "chapters", "sections"):
            value = node.get(key)
            if isinstance(value, str):
                yield value
            elif value is not None:
                yield from _toc_files(value)
    elif isinstance(node, list):
        for item in node:
            yield from _toc_files(item)


def chapter_names(toc_path: Path = TOC_PATH) -> list[str]:
    """The chapter notebooks in run order: each `generated/<name>` entry in _toc.yml."""
    import yaml

    toc = yaml.safe_load(toc_path.read_text(encoding="utf-8"))
    names = []
    for entry in _toc_files(toc):
        entry = entry.removesuffix(".ipynb")
        if entry.startswith(GENERATED_PREFIX):
            names.append(entry[len(GENERATED_PREFIX):])
    return names


def parse_value(text: str) -> Any:
    """A parameter value from the command line, typed much as papermill's -p types it:
    Python literals (12, 1.5, None, True, "a b") become those values; anything
    else (swiglu) stays a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def run_notebook(name: str, output_dir: Path, parameters: Optional[dict] = None,
                 *, notebook_dir: Optional[Path] = None, log_output: bool = False) -> Path:
    """Execute book/notebooks/<name>.ipynb into <output_dir>/<name>.ipynb; return that path.

    Raises papermill.PapermillExecutionError when a cell fails (the partly
    executed copy is still written) and FileNotFoundError when there is no such
    chapter. `notebook_dir` defaults to book/notebooks.
    """
    import papermill

    source = (notebook_dir or NOTEBOOK_DIR) / f"{name}.ipynb"
    if not source.is_file():
        raise FileNotFoundError(f"chapter {name!r}: no notebook at {source}")
    output_dir.mkdir(parents=True, exist_ok=True)
    output = output_dir / f"{name}.ipynb"
    _make_repo_importable()
    papermill.execute_notebook(
        str(source),
        str(output),
        parameters=dict(parameters or {}),
        kernel_name=KERNEL_NAME,
        cwd=str(REPO_ROOT),
        progress_bar=False,
        log_output=log_output,
    )
    drop_conditional_cells(output)
    return output


GLUE_MIME = "application/papermill.record/text/plain"


def glued_values(notebook) -> dict:
    """Every value the notebook glued, as Python literals where its text is one (else the text)."""
    values = {}
    for cell in notebook.cells:
        for cell_output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            name = cell_output.get("metadata", {}).get("scrapbook", {}).get("name")
            if name is not None and GLUE_MIME in cell_output.get("data", {}):
                values[name] = parse_value(cell_output["data"][GLUE_MIME])
    return values


def keep_cell(tags, glued: dict) -> bool:
    """Whether a cell with ``tags`` stays: ``only-if:KEY`` needs KEY glued True,
    ``unless:KEY`` needs it glued False; a KEY never glued is an error."""
    for tag in tags:
        for prefix, wanted in (("only-if:", True), ("unless:", False)):
            if tag.startswith(prefix):
                key = tag[len(prefix):]
                if key not in glued:
                    raise ValueError(f"a cell is tagged {tag!r} but the notebook glued no {key!r}")
                if bool(glued[key]) is not wanted:
                    return False
    return True


def drop_conditional_cells(path: Path) -> None:
    """Remove the cells whose ``only-if:`` / ``unless:`` tags say so (module docstring)."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    glued = glued_values(notebook)
    kept = [cell for cell in notebook.cells if keep_cell(cell.get("metadata", {}).get("tags", []), glued)]
    if len(kept) != len(notebook.cells):
        notebook.cells = kept
        nbformat.write(notebook, path)


def _make_repo_importable() -> None:
    """Put the repository root on the kernel's PYTHONPATH. The kernel inherits this
    process's environment; the cwd alone is not enough if the kernel's Python
    does not put it on sys.path."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO_ROOT) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *paths])


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.run_notebooks",
        description="Execute the book's chapter notebooks with papermill, in the order of book/_toc.yml.",
    )
    parser.add_argument("--only", metavar="NAME", action="append", default=None,
                        help="run only this chapter (repeatable); default: every chapter in _toc.yml")
    parser.add_argument("-p", "--parameter", nargs=2, metavar=("KEY", "VALUE"), action="append", default=[],
                        help="set a notebook parameter, as papermill's -p (repeatable)")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR,
                        help="where executed notebooks go (default: book/generated)")
    parser.add_argument("--log-output", action="store_true",
                        help="echo each notebook's cell output while it runs")
    args = parser.parse_args(argv)

    chapters = chapter_names()
    if args.only:
        unknown = [name for name in args.only if name not in chapters]
        if unknown:
            parser.error(f"--only: unknown chapter(s) {', '.join(unknown)}; "
                         f"the chapters in {_display_path(TOC_PATH)} are: {', '.join(chapters)}")
        chapters = [name for name in chapters if name in args.only]
    parameters = {key: parse_value(value) for key, value in args.parameter}

    import papermill

    total = len(chapters)
    shown_parameters = f" with {parameters}" if parameters else ""
    for index, name in enumerate(chapters, start=1):
        output = args.output_dir / f"{name}.ipynb"
        print(f"[{index}/{total}] {name}: running {_display_path(NOTEBOOK_DIR / f'{name}.ipynb')}"
              f"{shown_parameters}", flush=True)
        started = time.perf_counter()
        try:
            run_notebook(name, args.output_dir, parameters, log_output=args.log_output)
        except papermill.PapermillExecutionError as error:
            print(f"[{index}/{total}] {name}: FAILED in cell {error.exec_count}: "
                  f"{error.ename}: {error.evalue}", file=sys.stderr)
            print(f"  the partly executed notebook, with the traceback, is {_display_path(output)}",
                  file=sys.stderr)
            return 1
        except Exception as error:  # kernel did not start, missing notebook, ...
            print(f"[{index}/{total}] {name}: FAILED: {type(error).__name__}: {error}", file=sys.stderr)
            return 1
        seconds = time.perf_counter() - started
        print(f"[{index}/{total}] {name}: done in {seconds:.1f} s -> {_display_path(output)}", flush=True)
    print(f"executed {total} notebook(s) into {_display_path(args.output_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
