"""Shared test set-up. Keep minimal: every helper's tests load it."""

import os

import torch

# Without a GPU the Triton kernels run under Triton's interpreter on CPU tensors. Triton reads the flag when a kernel
# is decorated (at `import kernels.dyme_triton`), so it is set here, before any test module imports the kernels.
# With CUDA the kernels are compiled, so GPU tests exercise the real code (and can be captured in CUDA graphs).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
