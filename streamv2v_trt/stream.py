"""`Stream`: what every stream-like object offers, so every surface (video, serve, benchmarks) takes any of them.

`StreamV2V` (eager or engines) and `CudaGraphStream` (whole frames replayed from CUDA graphs) implement it.
A frame is uint8 HxWx3 RGB (numpy or torch); the result has the frame's type (and, for torch, its device).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    import torch

    from .blending import PromptBlend, SeedBlend
    from .config import StreamConfig
    from .lora_set import LoraSet


@runtime_checkable
class Stream(Protocol):
    cfg: StreamConfig  # the spec it runs (size, steps, bank) and its runtime settings
    prompt: PromptBlend  # the prompt the next frame uses
    device: torch.device  # where its networks run
    sizes: tuple[tuple[int, int], ...] | None  # (height, width) it can `resize` to; None: any multiple of 8 (eager)

    def __call__(self, frame: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """One frame in, one frame out (the stream batch delays output by `cfg.steps - 1` frames)."""
        ...

    def update_prompt(self, prompt: PromptBlend, negative_prompt: str | None = None) -> None:
        """From the next frame on; no rebuild, no recapture, the bank stays."""
        ...

    def update_seed(self, seed: SeedBlend) -> None:
        """New per-slot noise from the next frame on."""
        ...

    def set_loras(self, loras: LoraSet, *, reset: bool = False) -> None:
        """From the next frame on, this LoRA set [(file, scale), ...] (eager and AOTInductor folders with
        swappable weights: swapped; another build folder raises `EngineMismatch` with the rebuild command)."""
        ...

    def update_control(self, scales: tuple[float, ...] | None = None, kinds: tuple[str, ...] | None = None) -> None:
        """Each ControlNet's scale and control image kind (one per `cfg.spec.controlnets`; None keeps them) from the
        next frame on; no reset. A stream without ControlNets takes only empty tuples."""
        ...

    def set_control_frame(self, index: int, frame: np.ndarray | torch.Tensor) -> None:
        """The next frame's control image of ControlNet `index` when its kind is "video": a user-made frame,
        uint8 HxWx3 RGB of the stream's size (outside a captured graph: a host upload)."""
        ...

    def reset(self) -> None:
        """Forget the stream (empty bank, empty stream batch); the prompt stays."""
        ...

    def resize(self, height: int, width: int) -> None:
        """Frames of height x width from the next frame on (a size `backend.sizes` holds; eager: any multiple of 8),
        as a new scene (reset; prompt, seed and LoRAs stay). The current size changes nothing. A size not built
        raises `ValueError` (with the rebuild command) and the stream keeps running its size."""
        ...
