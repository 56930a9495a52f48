"""The provenance index (book/notebooks/provenance.ipynb): every results file and where it came from.

Reads every ``*.jsonl`` under the results folder (``records.results_root``),
at any depth, and summarises each file's records by their provenance fields
(``records.PROVENANCE_FIELDS``): device, git commit and dirty flag, first and
last UTC time, and the software versions. A line that is not JSON (a file
being written while this runs) is counted, not fatal.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pandas as pd

from analysis import records
from analysis.display import Note

#: Columns of the index whose values come straight from record fields, in order.
VERSION_FIELDS = ("python", "numpy", "torch", "cupy", "driver", "cuda_driver", "cuda_runtime")
COMMIT_LENGTH = 12
MISSING = "—"


def results_files(results_dir=None) -> list:
    """Every *.jsonl under the results folder, sorted by path; [] when there is no folder."""
    root = records.results_root(results_dir)
    if not root.is_dir():
        return []
    return sorted(path for path in root.rglob("*.jsonl") if path.is_file())


def load_lines(path: Path) -> tuple:
    """(records, unreadable lines) of one jsonl file."""
    found, unreadable = [], 0
    with open(path, encoding="utf-8", errors="replace") as results_file:
        for line in results_file:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                unreadable += 1
                continue
            if isinstance(record, dict):
                found.append(record)
            else:
                unreadable += 1
    return found, unreadable


def distinct(values, shorten: Optional[int] = None) -> str:
    """The distinct non-missing values, in first-seen order, joined by ', '; MISSING if none."""
    seen = []
    for value in values:
        if value is None:
            continue
        text = str(value)[:shorten] if shorten else str(value)
        if text not in seen:
            seen.append(text)
    return ", ".join(seen) if seen else MISSING


def file_row(path: Path, root: Path) -> dict:
    """One line of the index for one results file."""
    found, unreadable = load_lines(path)
    times = sorted(str(record["utc"]) for record in found if record.get("utc"))
    row = {
        "path": path.relative_to(root).as_posix(),
        "kind": distinct(record.get("kind") for record in found) if found else path.stem,
        "records": len(found),
        "unreadable lines": unreadable,
        "device": distinct(record.get("device") for record in found),
        "git commit": distinct((record.get("git_commit") for record in found), COMMIT_LENGTH),
        "git dirty": distinct(record.get("git_dirty") for record in found),
        "first utc": times[0] if times else MISSING,
        "last utc": times[-1] if times else MISSING,
    }
    for field in VERSION_FIELDS:
        row[field] = distinct(record.get(field) for record in found)
    return row


def provenance_table(results_dir=None) -> pd.DataFrame:
    """The index: one row per results file (empty, with the columns, when there is none)."""
    root = records.results_root(results_dir)
    rows = [file_row(path, root) for path in results_files(results_dir)]
    columns = ["path", "kind", "records", "unreadable lines", "device", "git commit", "git dirty",
               "first utc", "last utc", *VERSION_FIELDS]
    return pd.DataFrame(rows, columns=columns).set_index("path")


def checkpoints_summary(results_dir=None) -> dict:
    """The checkpoints folder (<results>/checkpoints): its files, at any depth, and their total bytes."""
    folder = records.results_root(results_dir) / "checkpoints"
    files = [path for path in folder.rglob("*") if path.is_file()] if folder.is_dir() else []
    return {"folder": shown_path(folder), "exists": folder.is_dir(), "n_files": len(files),
            "total_bytes": int(sum(path.stat().st_size for path in files))}


def size_text(n_bytes: int) -> str:
    """Bytes in binary units: '5.8 MiB'."""
    size = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def numbers(table: pd.DataFrame, checkpoints: dict) -> dict:
    """For the prose: files, records, devices, commits and the checkpoint folder."""
    devices = set()
    commits = set()
    for text in table["device"]:
        devices.update(value for value in text.split(", ") if value != MISSING)
    for text in table["git commit"]:
        commits.update(value for value in text.split(", ") if value != MISSING)
    return {
        "n_files": int(len(table)),
        "n_records": int(table["records"].sum()) if len(table) else 0,
        "n_unreadable": int(table["unreadable lines"].sum()) if len(table) else 0,
        "n_devices": len(devices),
        "n_commits": len(commits),
        "any_dirty": bool(any("True" in text for text in table["git dirty"])),
        "n_checkpoints": checkpoints["n_files"],
        "checkpoints_size": size_text(checkpoints["total_bytes"]),
    }


def index_note(table: pd.DataFrame, results_dir=None) -> Note:
    """A visible note: where the index was read, and whether there was anything to read."""
    root = shown_path(records.results_root(results_dir))
    if table.empty:
        return Note("No results", f"No results file (*.jsonl) was found under {root}/: nothing has been "
                    "measured and committed yet.")
    return Note("Read live", f"This index was built while the chapter ran, from {len(table)} files under "
                f"{root}/. A file being written at that moment is read as far as it goes.")


def dirty_text(summary: dict) -> str:
    """One sentence on the dirty flags."""
    if summary["any_dirty"]:
        return ("Some records were made from a working tree with uncommitted changes (git dirty True): "
                "their commit alone does not name the code that made them.")
    return "No record was made from a working tree with uncommitted changes."


def shown_path(path: Path) -> str:
    """A folder as the book shows it: relative to the repository, never the builder's absolute path."""
    path = Path(path).resolve()
    try:
        return path.relative_to(records.REPO_ROOT).as_posix()
    except ValueError:
        return path.name


def validate_parameters(results_dir) -> None:
    """The chapter's one parameter, in one clear sentence (ValueError)."""
    if results_dir is not None and not Path(results_dir).is_dir():
        raise ValueError(f"results_dir: expected None or an existing folder, got {results_dir!r}")


def records_view(table: pd.DataFrame) -> pd.DataFrame:
    """Per file: records, commits, dirty flags and the days its records span (the file's
    folder names its device and its name the kind; the versions are in ``versions_view``)."""
    view = table.reset_index()
    days = [_days(first, last) for first, last in zip(view["first utc"], view["last utc"])]
    # The file is <folder>/<kind>.jsonl; its folder is named by the device (under predicted-model/
    # for the GPU model's predictions, whose kinds say so), so kind and device name it.
    commits = [", ".join(c[:7] for c in text.split(", ")) for text in view["git commit"]]
    shown = pd.DataFrame({"kind": view["kind"], "device": view["device"],
                          "records": view["records"], "git commit": commits,
                          "dirty": [_dirty_word(text) for text in view["git dirty"]],
                          "dates (UTC)": days})
    if table["unreadable lines"].sum():
        shown["unreadable lines"] = view["unreadable lines"].to_numpy()
    return shown


def _dirty_word(text: str) -> str:
    """The dirty flags of one file's records in a word: yes, no, or some (both)."""
    values = set(text.split(", "))
    if values == {"True"}:
        return "yes"
    if values == {"False"}:
        return "no"
    return "some" if values == {"True", "False"} else text


def _days(first: str, last: str) -> str:
    if first == MISSING:
        return MISSING
    first, last = first[:10], last[:10]
    if first == last:
        return first
    return f"{first} to {last[5:]}" if first[:4] == last[:4] else f"{first} to {last}"


def versions_view(table: pd.DataFrame) -> pd.DataFrame:
    """Per file: the software versions its records carry (only the fields some record has)."""
    view = table.reset_index()[["path", *VERSION_FIELDS]]
    present = [field for field in VERSION_FIELDS if (view[field] != MISSING).any()]
    return view[["path", *present]]


def checkpoints_table(checkpoints: dict) -> pd.DataFrame:
    """The checkpoints folder as one row: where, how many files, how large."""
    return pd.DataFrame([{"folder": checkpoints["folder"], "files": checkpoints["n_files"],
                          "size": size_text(checkpoints["total_bytes"])}])


def counted(n: int, noun: str) -> str:
    """"1 device", "3 devices": a count with its noun, for the prose."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


# ---------------------------------------------------------------- what each chapter reads (issue 23, item 7)

#: The record kinds each chapter reads, as the chapters' modules read them (a chapter not
#: listed reads none: it computes live). tests/test_provenance_chapter.py checks that every
#: kind under results/ is here, so a new kind is placed in the book or said to be unread.
CHAPTER_RECORDS = {
    "answers": ("sweep", "bench-cpu", "memory", "traffic", "accuracy-eval", "accuracy-rescore",
                "accuracy-train-log", "arm-cost"),
    "kernels": ("traffic",),
    "gpu_performance": ("sweep", "gpu-tests", "gpu-occupancy", "gpu-prediction", "gpu-sanity", "traffic"),
    "cpu_baseline": ("sweep", "bench-cpu", "bench-cpu-grid", "memory"),
    "accuracy": ("accuracy-eval", "accuracy-rescore", "accuracy-train-log", "arm-cost"),
    "routing": ("accuracy-eval", "accuracy-rescore", "accuracy-train-log"),
    "expert_parallel": ("expert-parallel",),
}
#: Kinds no chapter shows, each with where it is used instead.
UNREAD_KINDS = {"torch-overhead": "quoted by the contract's section on PyTorch (its command and fields)"}


def chapter_map(table: pd.DataFrame) -> pd.DataFrame:
    """Per chapter: the record kinds it reads, and which of them have a results file now."""
    present = set(table["kind"])
    rows = []
    for chapter, wanted in CHAPTER_RECORDS.items():
        missing = [kind for kind in wanted if kind not in present]
        rows.append({"chapter": chapter.replace("_", " "), "record kinds it reads": ", ".join(wanted),
                     "kinds without records yet": ", ".join(missing) if missing else "none"})
    for kind, where in UNREAD_KINDS.items():
        rows.append({"chapter": f"none ({where})", "record kinds it reads": kind,
                     "kinds without records yet": "none" if kind in present else kind})
    return pd.DataFrame(rows)


def machine_view(table: pd.DataFrame, results_dir=None) -> pd.DataFrame:
    """Per results file: its kind and device kind, the machine (CPU model or GPU), its cores,
    NumPy's BLAS and the BLAS/OpenMP thread settings its records were made with."""
    root = records.results_root(results_dir)
    rows = []
    for path in table.index:
        found, _ = load_lines(root / path)
        settings = distinct(", ".join(f"{k}={v}" for k, v in sorted((r.get("thread_settings") or {}).items())
                                      if v is not None) or "unset" for r in found)
        rows.append({"file": path, "kind": table.loc[path, "kind"],
                     "device kind": distinct(r.get("device_kind") for r in found),
                     "device": table.loc[path, "device"], "cores": distinct(r.get("cpu_count") for r in found),
                     "BLAS": distinct(r.get("blas") for r in found), "BLAS and OpenMP threads": settings})
    return pd.DataFrame(rows, columns=["file", "kind", "device kind", "device", "cores", "BLAS",
                                       "BLAS and OpenMP threads"])


def machines_table(view: pd.DataFrame) -> pd.DataFrame:
    """machine_view grouped: one row per distinct machine setting, with how many files used it."""
    keys = ["device kind", "device", "cores", "BLAS", "BLAS and OpenMP threads"]
    grouped = view.groupby(keys, sort=False).agg(files=("file", "count"), kinds=("kind", ", ".join))
    return grouped.reset_index()
