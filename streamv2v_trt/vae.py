"""VAE encode/decode as plain modules with tensor I/O: what eager runs and ONNX exports.

Images are [B, 3, H, W] in [-1, 1]; latents are [B, 4, H/8, W/8], scaled for the UNet.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from torch import nn


class VaeEncoder(nn.Module):
    def __init__(self, vae: AutoencoderTiny | AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if isinstance(self.vae, AutoencoderTiny):
            latents = self.vae.encode(images).latents
        else:
            latents = self.vae.encode(images).latent_dist.mode()  # deterministic: the mean, no sampling
        return latents * self.scale


class VaeDecoder(nn.Module):
    def __init__(self, vae: AutoencoderTiny | AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scale).sample
