"""The accuracy study's corpus: the Python standard library of the running interpreter, as bytes.

Every machine that runs this project has it, so nothing is downloaded. The
corpus is byte-level (vocabulary 256): a model reads raw UTF-8 bytes, and one
"token" is one byte.

Which files: every ``*.py`` file under the interpreter's ``stdlib`` directory
(``sysconfig.get_paths()["stdlib"]``), except third-party packages
(``site-packages``, ``dist-packages``) and the test suites (any directory
named ``test``, ``tests`` or ``idle_test``), and the files an installation
generates for itself (``_sysconfigdata*.py`` and the ``config-*`` directory,
which hold the build's own paths and flags). Distributions disagree about
shipping the test suites (Debian, for one, splits them into another package),
so leaving them out, and the generated files, keeps the corpus the same for
one Python version wherever it was installed.

The split is by file, decided by a hash of the file's path relative to the
stdlib root: the first 8 bytes of ``sha256(path)`` as an integer, modulo 100,
below 80 train, below 90 validation, else test. A file never straddles two
splits, the assignment of a file never depends on which other files exist, and
the same path lands in the same split on every machine. The files of
``encodings/`` are codec tables generated from one template, near copies of
each other: they are hashed as one unit (by the directory's name), so they all
land in one split and none of the test text is a near copy of training text.

Within a split, files are concatenated in path order, each followed by one
``\\0`` byte (which never occurs inside a source file) as a document boundary.

``manifest()`` records what was read: interpreter version and implementation,
the root, file count and bytes per split, and a sha256 over every file's path
and content (in path order), so two runs can tell whether they saw the same
text.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

SPLITS = ("train", "validation", "test")
#: Upper bounds (exclusive) of each split's hash bucket, out of 100.
SPLIT_BUCKETS = {"train": 80, "validation": 90, "test": 100}
EXCLUDED_DIRECTORIES = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
#: Prefixes of names an installation generates for itself (build paths, flags).
EXCLUDED_DIRECTORY_PREFIXES = ("config-",)
EXCLUDED_FILE_PREFIXES = ("_sysconfigdata",)
#: Directories whose files are near copies of each other: split as one unit.
SPLIT_AS_ONE_UNIT = frozenset({"encodings"})
DOCUMENT_SEPARATOR = 0  # the byte written after each file
VOCAB_SIZE = 256


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str) -> str:
    """The split of a file, from its path relative to the corpus root (POSIX separators)."""
    top = relative_path.split("/", 1)[0]
    key = top if top in SPLIT_AS_ONE_UNIT and "/" in relative_path else relative_path
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    for name in SPLITS:
        if bucket < SPLIT_BUCKETS[name]:
            return name
    raise AssertionError("unreachable: the last bucket bound is 100")


def source_files(root: Path) -> list[str]:
    """Every ``*.py`` under ``root`` outside the excluded directories, as sorted POSIX relative paths."""
    found = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [name for name in subdirectories if name not in EXCLUDED_DIRECTORIES
                             and not name.startswith(EXCLUDED_DIRECTORY_PREFIXES)]
        for name in files:
            if name.endswith(".py") and not name.startswith(EXCLUDED_FILE_PREFIXES):
                found.append(Path(directory, name).relative_to(root).as_posix())
    return sorted(found)


@dataclass(frozen=True)
class Corpus:
    """The three splits as uint8 arrays, and the manifest that describes them."""

    splits: dict = field(repr=False)  # split name -> np.ndarray of uint8
    manifest: dict

    def __getitem__(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        return self.splits[split]


def build_corpus(root: Optional[os.PathLike] = None) -> Corpus:
    """Read and split the corpus under ``root`` (default: this interpreter's stdlib)."""
    root = Path(root) if root is not None else stdlib_root()
    paths = source_files(root)
    if not paths:
        raise FileNotFoundError(f"no *.py files under {root}")
    pieces = {name: [] for name in SPLITS}
    files = {name: 0 for name in SPLITS}
    content_hash = hashlib.sha256()
    for relative in paths:
        data = (root / relative).read_bytes()
        # Path and length go into the hash too, so that moving text between
        # files changes it.
        content_hash.update(f"{relative}\0{len(data)}\0".encode("utf-8"))
        content_hash.update(data)
        split = split_of(relative)
        pieces[split].append(data)
        pieces[split].append(bytes([DOCUMENT_SEPARATOR]))
        files[split] += 1
    splits = {name: np.frombuffer(b"".join(pieces[name]), dtype=np.uint8) for name in SPLITS}
    manifest = {
        "source": "python-stdlib",
        "root": str(root),
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "n_files": len(paths),
        "n_bytes": int(sum(array.size for array in splits.values())),
        "files": files,
        "bytes": {name: int(splits[name].size) for name in SPLITS},
        "sha256": content_hash.hexdigest(),
        "split_rule": "sha256(relative path)[:8] mod 100: <80 train, <90 validation, else test",
        "excluded_directories": sorted(EXCLUDED_DIRECTORIES),
    }
    return Corpus(splits=splits, manifest=manifest)


@functools.lru_cache(maxsize=4)
def _cached(root: str) -> Corpus:
    return build_corpus(root)


def load_corpus(root: Optional[os.PathLike] = None) -> Corpus:
    """``build_corpus``, read once per process and root."""
    return _cached(str(Path(root) if root is not None else stdlib_root()))


def manifest(root: Optional[os.PathLike] = None) -> dict:
    """The corpus manifest (see the module docstring)."""
    return dict(load_corpus(root).manifest)


def manifest_table(manifest: dict) -> "pandas.DataFrame":
    """Files and bytes per split, for the book."""
    import pandas

    rows = [{"split": split, "files": manifest["files"][split], "bytes": manifest["bytes"][split]}
            for split in SPLITS]
    rows.append({"split": "all", "files": manifest["n_files"], "bytes": manifest["n_bytes"]})
    return pandas.DataFrame(rows).set_index("split")


def split_paths(split: str, root: Optional[os.PathLike] = None) -> list[str]:
    """The relative paths of the files in `split`, in the order the split concatenates them."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    root = Path(root) if root is not None else stdlib_root()
    return [path for path in source_files(root) if split_of(path) == split]
