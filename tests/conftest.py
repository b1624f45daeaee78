"""Shared test set-up. Keep minimal: every helper's tests load it."""

import hashlib
import os
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors. Triton reads the flag when a kernel
# is decorated (at `import streamv2v_trt.kernels.dyme_triton`), so it is set here, before any test module imports
# the kernels.
# With CUDA the kernels are compiled, so GPU tests exercise the real code (and can be captured in CUDA graphs).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist runs one worker per core: each worker's torch uses its share of the cores, not all of them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


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


def free_port() -> int:
    """A free local TCP port (released just before the server under test binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, what: str, seconds: float = 1.0) -> None:
    """Poll `condition` until it holds; fail saying `what` did not happen within `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {seconds:g} s"
        time.sleep(0.01)


def _build_root(tmp_path_factory) -> Path:
    """Where session builds live: with pytest-xdist one folder all workers share (the workers' temp folders sit
    side by side under it), so a build made by one worker is reused by the others."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "builds"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory):
    """`tiny_build(spec, **build_options) -> Path`: a build folder, built once per test run per distinct
    (spec, options) and shared by every test module and pytest-xdist worker (exports take seconds each on a 2-core
    CPU; an AOTInductor compile about two minutes). Folders are `<root>/<spec.folder_name(builder)>` (`.parent` is
    the root; tools find builds by that name) unless another build took the name first. Tests must not modify a
    folder: copy it first (`shutil.copytree`) to damage files."""
    from filelock import FileLock

    from build_engines import BuildConfig, build

    root = _build_root(tmp_path_factory)

    def get(spec=None, **options) -> Path:
        spec = spec or tiny_spec()
        builder = options.get("builder")
        options.setdefault("onnx_only", builder is None)
        key = repr((spec, sorted(options.items())))
        plain = root / spec.folder_name(builder)
        # The name rule leaves some fields out (LoRAs, fusion settings, ...): the first build claims the plain
        # name, another build that maps to it gets a folder named with its key's hash.
        for out in (plain, root / f"{hashlib.sha256(key.encode()).hexdigest()[:8]}-{plain.name}"):
            with FileLock(str(out.with_name(out.name + ".lock"))):  # one worker builds, the others wait and reuse
                claim = out.with_name(out.name + ".key")
                if not claim.exists():
                    build(replace(BuildConfig(spec, **options), out=out))
                    claim.write_text(key)
                if claim.read_text() == key:
                    return out
        raise AssertionError(f"two builds claim {out}")  # a sha256 prefix collision

    return get
