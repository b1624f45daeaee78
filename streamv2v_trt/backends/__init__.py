"""Backends run the three networks; the pipeline, bank and schedule are shared by all of them.

A backend provides: `name` (a `flavours.BackendKind`), `builder`, `device`, `dtype`, `layout` (the bank layout
its UNet was built with), `unet(inputs: dict[str, Tensor]) -> dict[str, Tensor]` keyed by the engine tensor names
(docs/DESIGN.md, "Engine I/O"), `encode(images) -> latents`, `decode(latents) -> images` and `lora_weights`
(eager and folders with swappable weights: the LoRA set, swappable at runtime; None where the weights are
compiled into the files), `sizes` (the frame sizes it was built for, (height, width) each; None: any multiple
of 8, eager) and `at_size(height, width)` (the same networks and weights at another size: that size's runners
and layout; `StreamV2V.resize` uses it).
With ControlNets in the spec (every backend): `controlnet(index, inputs) -> residuals` (control_net.py), and the
UNet's inputs include their summed residuals (`layout.residual_names()`).

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
    lora_weights: LoraWeights | None  # the swappable LoRA set (eager, swappable folders); None: compiled in
    sizes: tuple[tuple[int, int], ...] | None  # (height, width) it serves; None: any multiple of 8 (eager)

    def at_size(self, height: int, width: int) -> Backend:
        """The same networks and weights (the same `lora_weights` object) at that size: its runners and `layout`.
        Self when already at that size; a size it was not built for raises `ValueError` naming the built sizes and
        the rebuild command."""
        ...

    def unet(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...
