"""The package's names live beside the PyTorch and Hugging Face ecosystem.

The import name is ``topk_moe`` (its source is kernels/topk_moe/), so it never
shadows Hugging Face's ``kernels`` (which transformers 5.x imports), and the
wheel installs ``topk_moe`` alone: no top-level ``kernels`` and no
``analysis``. The imports run in subprocesses with this interpreter (the
venv's), from the repository root and from another directory, in both orders.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def _hugging_face_kernels_reason():
    found = _python("import importlib.util; print(importlib.util.find_spec('kernels') is not None)", REPOSITORY)
    if found.stdout.strip() != "True":
        return "Hugging Face's kernels is not installed (transformers 5.x, in the test extra, requires it)"
    return None


IMPORTS = {
    "topk_moe first": "import topk_moe, kernels",
    "kernels first": "import kernels, topk_moe",
}

CHECK = """
from pathlib import Path
theirs = Path(kernels.__file__).resolve()
ours = Path(topk_moe.__file__).resolve()
assert theirs.parent.name == "kernels" and theirs.parent.parent.name == "site-packages", theirs
assert ours.parent.name == "topk_moe", ours
assert hasattr(kernels, "get_kernel"), sorted(vars(kernels))  # Hugging Face's API, not a folder of ours
assert callable(topk_moe.moe_forward)
print("ok")
"""

HUGGING_FACE_KERNELS = pytest.mark.skipif(_hugging_face_kernels_reason() is not None,
                                          reason=str(_hugging_face_kernels_reason()))


@HUGGING_FACE_KERNELS
@pytest.mark.parametrize("order", sorted(IMPORTS))
@pytest.mark.parametrize("where", ["repository root", "another directory"])
def test_topk_moe_and_hugging_face_kernels_import_in_one_process(order, where, tmp_path):
    cwd = REPOSITORY if where == "repository root" else tmp_path
    result = _python(IMPORTS[order] + "\n" + CHECK, cwd)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.mark.slow
@HUGGING_FACE_KERNELS
def test_transformers_mixtral_imports_from_the_repository_root_beside_the_torch_entry():
    """The failure that started the rename: transformers 5.x imports Hugging Face's
    kernels, which our kernels/ folder shadowed when it was a package."""
    code = ("import topk_moe.torch\n"
            "import transformers.models.mixtral.modeling_mixtral\n"
            "import kernels\n"
            "assert 'site-packages' in kernels.__file__, kernels.__file__\n"
            "print('ok')")
    result = _python(code, REPOSITORY)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_the_wheel_installs_topk_moe_alone(tmp_path):
    """Built from a copy of what the build reads (pyproject.toml, README.md,
    kernels/), so the build leaves no build/ folder in the shared checkout."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPOSITORY / name, source / name)
    shutil.copytree(REPOSITORY / "kernels", source / "kernels",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.o"))
    out = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), "."],
        cwd=source, capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = out.glob("topk_moe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"topk_moe"}
    sources = {str(p.relative_to(REPOSITORY / "kernels")) for p in (REPOSITORY / "kernels/topk_moe").rglob("*.py")}
    assert sources <= set(names)  # every module, the torch entry and the emulator included
    assert {"topk_moe/torch.py", "topk_moe/hf.py", "topk_moe/cuda/router.cu"} <= set(names)
