"""Backends run the three networks; the pipeline, bank and schedule are shared by all of them.

A backend provides: `name`, `device`, `dtype`, `layout` (the bank layout its UNet was built with),
`unet(inputs: dict[str, Tensor]) -> dict[str, Tensor]` keyed by the engine tensor names (DESIGN.md §4),
`encode(images) -> latents` and `decode(latents) -> images`.

Backends: `eager` (PyTorch, eager.py), `onnxruntime` (the build's ONNX, onnxruntime.py), `tensorrt` (its
engines, tensorrt.py); engines.py opens a build folder for the last two. Engine backends return their own
preallocated output buffers, the same tensors every call: a result is valid until the next call of that
network, so the pipeline consumes it (bank update, scheduler step) before calling again. Inputs are bound by
pointer, so callers pass the same buffers every frame (binding.py).
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..layout import BankLayout


class Backend(Protocol):
    name: str
    device: torch.device
    dtype: torch.dtype
    layout: BankLayout

    def unet(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...
