"""Backends run the three networks; the pipeline, bank and schedule are shared by all of them.

A backend provides: `name`, `device`, `dtype`, `layout` (the bank layout its UNet was built with),
`unet(inputs: dict[str, Tensor]) -> dict[str, Tensor]` keyed by the engine tensor names (DESIGN.md §4),
`encode(images) -> latents` and `decode(latents) -> images`.
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
