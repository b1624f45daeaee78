"""Shared test set-up. Keep minimal: every helper's tests load it."""

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors. Triton reads the flag when a kernel
# is decorated (at `import kernels.dyme_triton`), so it is set here, before any test module imports the kernels.
# With CUDA the kernels are compiled, so GPU tests exercise the real code (and can be captured in CUDA graphs).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module: beside ONNX Runtime's pool, torch's spinning OpenMP threads stall
    it on a 2-core machine (measured 8 vs 56 FPS). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_spec(**fields):
    """The tiny random-weight model at 64x64, fp32, 1 step, DyMe: what most CPU tests run."""
    from streamv2v_trt.spec import EngineSpec

    return EngineSpec(**{"model": "tiny", "height": 64, "width": 64, "precision": "fp32", **fields})


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory):
    """`tiny_build(spec, **build_options) -> Path`: a build folder, built once per test session per distinct
    (spec, options) and shared by every test module (exports take seconds each on a 2-core CPU; an AOTInductor
    compile about a minute). Folders are `<root>/<spec.folder_name(builder)>` (`.parent` is the root). Tests must
    not modify a folder: copy it first (`shutil.copytree`) to damage files."""
    from build_engines import BuildConfig, build

    root: Path = tmp_path_factory.mktemp("builds")
    built: dict = {}

    def get(spec=None, **options) -> Path:
        spec = spec or tiny_spec()
        options.setdefault("onnx_only", options.get("builder") is None)
        key = (spec, tuple(sorted(options.items())))
        if key not in built:
            cfg = BuildConfig(spec, **options)
            # Named by the one folder rule, so tools that find folders by name (benchmarks) find these too.
            out = root / spec.folder_name(options.get("builder"))
            if out.exists():  # the same spec with other options (onnx_only, ...)
                out = root / f"{len(built)}-{out.name}"
            built[key] = build(replace(cfg, out=out)).out
        return built[key]

    return get
