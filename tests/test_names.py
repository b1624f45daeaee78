"""Our import names are ours: nothing the wheel installs, and no importable package at the repository root, shares
a top-level name with another installed distribution.

Why: transformers >= 5.24 depends on Hugging Face's `kernels` package, and our DyMe kernels used to be a top-level
`kernels/`. From the repository root (first on sys.path) diffusers imported ours in place of theirs and every model
load failed; a wheel would have installed a `kernels/` over theirs. The kernels now live in streamv2v_trt/kernels/.
"""

import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTION = "streamv2v-trt"
SHIPPED = {"streamv2v_trt", "build_engines"}  # what the wheel installs: the runtime and `python -m build_engines`


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def root_packages(root: Path = ROOT) -> set[str]:
    """Names importable from the repository root (which `python -m ...` puts first on sys.path): regular packages
    and modules. A folder without `__init__.py` would be a namespace package, which every regular package of the
    same name elsewhere on sys.path wins over, so it cannot shadow anything."""
    packages = {p.name for p in root.iterdir() if (p / "__init__.py").is_file()}
    return packages | {p.stem for p in root.glob("*.py")}


def clashes(names: set[str], providers: dict[str, list[str]]) -> dict[str, list[str]]:
    """name -> the other distributions providing it, from `importlib.metadata.packages_distributions()`."""
    found = {n: sorted({d for d in providers.get(n, []) if canonical(d) != DISTRIBUTION}) for n in names}
    return {n: d for n, d in found.items() if d}


def test_no_other_distribution_provides_a_name_of_ours():
    names = root_packages() | SHIPPED
    assert SHIPPED <= root_packages(), f"the wheel's packages live at the repository root: {SHIPPED}"
    found = clashes(names, importlib.metadata.packages_distributions())
    assert not found, (
        f"these import names of ours are also top-level names of other installed distributions: {found}. "
        "Whichever comes first on sys.path hides the other; move ours under streamv2v_trt/."
    )


def test_a_clash_is_reported():
    """The check sees a clash such as the one it was written for, and does not count our own distribution."""
    providers = {"kernels": ["kernels", "streamv2v-trt"], "streamv2v_trt": ["streamv2v_trt"]}
    assert clashes({"kernels", "streamv2v_trt", "benchmarks"}, providers) == {"kernels": ["kernels"]}


def test_root_packages_are_regular_packages_and_modules(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").touch()
    (tmp_path / "namespace").mkdir()
    (tmp_path / "tool.py").touch()
    assert root_packages(tmp_path) == {"pkg", "tool"}


@pytest.mark.slow
def test_the_wheel_holds_only_our_packages(tmp_path):
    """Build the wheel from the checkout's files (tracked and new, not ignored: no stale build/ folder) and read
    its file list: every top-level entry is one of our packages or the wheel's own metadata."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    src = tmp_path / "src"
    for name in filter(None, (f.decode() for f in files)):
        if (ROOT / name).is_file():  # a file deleted but not yet staged is still listed
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    out = tmp_path / "wheel"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        tops = {n.split("/")[0] for n in z.namelist()}
    metadata = {t for t in tops if t.endswith((".dist-info", ".data"))}
    assert tops - metadata == SHIPPED, f"the wheel installs {sorted(tops - metadata)}, expected {sorted(SHIPPED)}"
