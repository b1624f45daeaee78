"""Backends run the three networks; the pipeline, bank and schedule are shared by all of them.

A backend provides: `name`, `device`, `dtype`, `layout` (the bank layout its UNet was built with),
`unet(inputs: dict[str, Tensor]) -> dict[str, Tensor]` keyed by the engine tensor names (docs/DESIGN.md,
"Engine I/O"), `encode(images) -> latents` and `decode(latents) -> images`.

Backends: `eager` (PyTorch, eager.py), and on a build folder (`build_folder.py` opens it) `onnxruntime` (its
ONNX, onnxruntime.py), `tensorrt` (its TensorRT / TensorRT-RTX engines, tensorrt.py) and `aoti` (its
AOTInductor packages, aoti.py), all three as a `named_io.NamedIOBackend` over one runner per network.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..layout import BankLayout

ENGINE_BACKENDS = ("onnxruntime", "tensorrt", "aoti")  # what a build folder can be opened with


class Backend(Protocol):
    name: str
    device: torch.device
    dtype: torch.dtype
    layout: BankLayout

    def unet(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...
