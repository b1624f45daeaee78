"""Shared test set-up. Keep minimal: every helper's tests load it."""

import os

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
