"""ControlNet beside the bank: the network module eager runs (and a build will export), and the per-frame glue.

`ControlNet` wraps one diffusers `ControlNetModel` as a network with named I/O (`BankLayout.controlnet_specs`):
the UNet's sample, timestep and prompt embeddings, the control image and a per-batch-element scale in, the scaled
residuals out. Its attention is diffusers' plain processor: the bank belongs to the UNet's self-attention, and a
ControlNet only reads the current latents and the control image (docs/DESIGN.md, "ControlNet"). Each ControlNet is
its own network; `run_controlnets` runs them in turn and sums their residuals into the UNet's residual inputs.

The control images come from `control_images.ControlImages` (canny, frame, previous, video): `control(image,
previous) -> [1, 3, H, W] in [0, 1]`, written into a buffer it owns (no allocation per frame, capturable).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from .layout import residual_names

if TYPE_CHECKING:
    from diffusers import ControlNetModel

    from .layout import BankLayout
    from .spec import EngineSpec


class ControlNet(nn.Module):
    """forward(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale) -> (*down, mid).

    `conditioning_scale` is a tensor [B] (one per UNet batch element: a MultiStream slot has its own), so the scale
    is runtime state of a built network and 0 gives residuals of exactly 0 (x * 0 = 0 for finite x)."""

    def __init__(self, controlnet: ControlNetModel) -> None:
        super().__init__()
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.controlnet = controlnet
        # Plain attention everywhere: the ControlNet never sees the bank (the UNet's processors are bank-aware).
        controlnet.set_attn_processor(AttnProcessor2_0())
        self.count = len(controlnet.controlnet_down_blocks) + 1  # down residuals + the mid one
        self.output_names = residual_names(self.count)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        scale = conditioning_scale.view(-1, 1, 1, 1)  # [B, 1, 1, 1]: diffusers multiplies every residual by it
        down, mid = self.controlnet(
            sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=scale, return_dict=False
        )
        return (*down, mid)

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named I/O, the same contract as an engine (`BankLayout.controlnet_specs`)."""
        args = [inputs[n] for n in INPUT_NAMES]
        return dict(zip(self.output_names, self(*args)))


INPUT_NAMES = ("sample", "timestep", "encoder_hidden_states", "controlnet_cond", "conditioning_scale")


class ControlBackend(Protocol):
    def controlnet(self, index: int, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


def run_controlnets(
    backend: ControlBackend,
    unet_inputs: dict[str, torch.Tensor],
    conds: list[torch.Tensor],
    scales: list[torch.Tensor],
    residuals: dict[str, torch.Tensor],
) -> None:
    """Every ControlNet on the UNet's sample, timestep and prompt embeddings (the whole batch: each stream slot at
    its own step), ControlNet j with its control images `conds[j]` [B, 3, H, W] and scales `scales[j]` [B]; their
    residuals, each already scaled, summed into the UNet's residual input buffers `residuals` in place."""
    shared = {n: unet_inputs[n] for n in INPUT_NAMES[:3]}
    for j, (cond, scale) in enumerate(zip(conds, scales)):
        out = backend.controlnet(j, {**shared, "controlnet_cond": cond, "conditioning_scale": scale})
        for name, buffer in residuals.items():
            if j == 0:
                buffer.copy_(out[name])
            else:
                buffer.add_(out[name])


def control_buffers(layout: BankLayout, spec: EngineSpec, batch: int, device, dtype) -> dict[str, torch.Tensor]:
    """The ControlNet buffers of a UNet batch of `batch` rows, by name: per ControlNet j its control images
    `controlnet_cond.{j}` [batch, 3, H, W] and scales `conditioning_scale.{j}` [batch], and the UNet's residual
    inputs (`layout.residual_names()`, [batch, C, h, w] each). Empty without ControlNets."""
    out = {}
    for j in range(len(spec.controlnets)):
        out[f"controlnet_cond.{j}"] = torch.zeros(batch, 3, spec.height, spec.width, device=device, dtype=dtype)
        out[f"conditioning_scale.{j}"] = torch.zeros(batch, device=device, dtype=dtype)
    for name, shape in zip(layout.residual_names(), layout.residuals):
        out[name] = torch.zeros(batch, *shape, device=device, dtype=dtype)
    return out
