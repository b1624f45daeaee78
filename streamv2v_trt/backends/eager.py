"""PyTorch eager backend: the reference the engines are traced from."""

from __future__ import annotations

import torch

from ..bank_unet import BankUNet
from ..config import BankConfig
from ..models import Models
from ..vae import VaeDecoder, VaeEncoder


class EagerBackend:
    name = "eager"

    def __init__(self, models: Models, bank: BankConfig, latent_hw: tuple[int, int]) -> None:
        self.bank_unet = BankUNet(models.unet, bank, latent_hw)
        self.layout = self.bank_unet.layout
        self.encoder = VaeEncoder(models.vae)
        self.decoder = VaeDecoder(models.vae)
        p = next(models.unet.parameters())
        self.device, self.dtype = p.device, p.dtype

    @torch.inference_mode()
    def unet(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.bank_unet.run(inputs)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents)
