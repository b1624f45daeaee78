"""Backends run the three networks; the pipeline, bank and schedule are shared by all of them.

A backend provides: `name` (a `flavours.BackendKind`), `builder`, `device`, `dtype`, `layout` (the bank layout
its UNet was built with), `unet(inputs: dict[str, Tensor]) -> dict[str, Tensor]` keyed by the engine tensor names
(docs/DESIGN.md, "Engine I/O"), `encode(images) -> latents`, `decode(latents) -> images` and `lora_weights`
(eager: the LoRA set, swappable at runtime; None where the weights are compiled into the files).

Backends: `eager` (PyTorch, eager.py), and on a build folder (`build_folder.py` opens it) `onnxruntime` (its
ONNX, onnxruntime.py), `tensorrt` (its TensorRT / TensorRT-RTX engines, tensorrt.py) and `aoti` (its
AOTInductor packages, aoti.py), all three as a `named_io.NamedIOBackend` over one runner per network.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from ..flavours import BackendKind, Builder
from ..layout import BankLayout

if TYPE_CHECKING:
    from ..models.lora_weights import LoraWeights


class Backend(Protocol):
    name: BackendKind  # its row in the backend table (flavours.py): files, CUDA-graph capture, default device
    builder: Builder | None  # what built the files it runs (None: eager, or an --onnx-only folder)
    device: torch.device
    dtype: torch.dtype
    layout: BankLayout
    lora_weights: LoraWeights | None  # the swappable LoRA set (eager, swappable AOTI); None: compiled in
    sizes: tuple[tuple[int, int], ...] | None  # every (height, width) it runs (None: any multiple of 8, eager)

    def at_size(self, height: int, width: int) -> Backend:
        """The same networks and weights (the same `lora_weights`) at another size: that size's runners and
        `layout`; self when already there. A size it was not built for raises ValueError with the rebuild command."""
        ...

    def unet(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...
