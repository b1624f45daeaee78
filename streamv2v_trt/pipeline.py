"""StreamV2V: streaming img2img with a stream batch, a feature bank, and any backend.

Per frame (DESIGN.md §2): encode -> noise at t_0 -> UNet on the stream batch (slot i = step i, each slot
with its own bank) -> LCM step -> re-noise into the next slots -> decode the frame leaving the last slot.
Every `interval` UNet calls the current k/v/o are stored into the bank (DyMe or FIFO).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .backends import Backend
from .bank import FeatureBank
from .config import BankConfig, CfgType, StreamConfig
from .frames import frame_to_tensor, tensor_to_frame
from .prompt import PromptEncoder
from .schedule import StreamSchedule

log = logging.getLogger(__name__)


class StreamV2V:
    """Translate an endless stream of frames: `out = stream(frame)`, `update_prompt(text)`, `reset()`."""

    def __init__(self, backend: Backend, prompt_encoder: PromptEncoder, scheduler, cfg: StreamConfig) -> None:
        if backend.layout.kind is not cfg.bank.kind or backend.layout.slots != cfg.bank.slots:
            raise ValueError(
                f"backend {backend.name} was built for a {backend.layout.kind.value} bank x{backend.layout.slots}, "
                f"the stream config asks {cfg.bank.kind.value} x{cfg.bank.slots}"
            )
        self.backend, self.cfg = backend, cfg
        self.prompt_encoder = prompt_encoder
        device, dtype = backend.device, backend.dtype
        self.device, self.dtype = device, dtype
        B, h, w = cfg.steps, cfg.height // 8, cfg.width // 8
        self.schedule = StreamSchedule(scheduler, cfg.t_index_list, cfg.num_inference_steps, device, dtype)
        self.bank = FeatureBank(backend.layout, cfg.bank, B, device, dtype)

        # Per-slot noise, drawn once per stream from the seed and reused for every frame.
        gen = torch.Generator().manual_seed(cfg.seed)
        self.noise = torch.randn(B, 4, h, w, generator=gen).to(device=device, dtype=dtype)  # [B, 4, h, w]
        self.stock_noise = self.noise.clone()  # RCFG "self": the negative's noise estimate
        self.latents = torch.zeros(B, 4, h, w, device=device, dtype=dtype)  # UNet input: slot i at step i
        self.prompt_embeds = torch.zeros(B, prompt_encoder.length, prompt_encoder.dim, device=device, dtype=dtype)
        self.timestep = self.schedule.timesteps.clone()
        self.frame_id = 0  # UNet calls since reset; drives the bank interval
        self.update_prompt("")

    @classmethod
    def from_pretrained(
        cls,
        model: str = "tiny",
        cfg: StreamConfig | None = None,
        *,
        prompt: str = "",
        vae: str = "taesd",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> StreamV2V:
        """The eager (PyTorch) pipeline for a preset, a local diffusers folder, or a hub id."""
        from .backends.eager import EagerBackend
        from .models import load_models

        models = load_models(model, vae=vae, device=device, dtype=dtype, seed=seed)
        if cfg is None:
            h, w = models.default_size
            cfg = StreamConfig(height=h, width=w, t_index_list=models.default_t_index_list)
        backend = EagerBackend(models, cfg.bank, (cfg.height // 8, cfg.width // 8))
        stream = cls(backend, PromptEncoder(models.tokenizer, models.text_encoder), models.scheduler, cfg)
        stream.update_prompt(prompt)
        return stream

    @property
    def bank_config(self) -> BankConfig:
        return self.cfg.bank

    def update_prompt(self, text: str) -> None:
        """Encode `text` once; every following frame uses it. No rebuild, no bank reset."""
        embeds = self.prompt_encoder(text).to(device=self.device, dtype=self.dtype)  # [1, 77, D]
        self.prompt_embeds.copy_(embeds.expand_as(self.prompt_embeds))
        self.prompt = text

    def reset(self) -> None:
        """Forget the stream: empty bank, empty stream batch, fresh noise state. The prompt stays."""
        self.bank.reset()
        self.latents.zero_()
        self.stock_noise.copy_(self.noise)
        self.frame_id = 0

    @torch.inference_mode()
    def __call__(self, frame: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """One frame in (uint8 HxWx3), one frame out. Latency: steps - 1 frames (earlier slots start from zeros)."""
        cfg = self.cfg
        image = frame_to_tensor(
            frame, cfg.height, cfg.width, resize=cfg.resize, device=self.device, dtype=self.dtype
        )  # validated before any state changes, so a bad frame leaves the stream usable
        latent = self.backend.encode(image)  # [1, 4, h, w]
        self.latents[0:1] = self.schedule.add_noise(latent, self.noise[0:1], slice(0, 1))
        if cfg.steps > 1:
            self.stock_noise = torch.cat([self.noise[0:1], self.stock_noise[:-1]])

        out = self.backend.unet(
            {
                "sample": self.latents,
                "timestep": self.timestep,
                "encoder_hidden_states": self.prompt_embeds,
                **self.bank.inputs(),
            }
        )
        eps = out["noise_pred"]
        if cfg.cfg_type is CfgType.SELF and cfg.guidance_scale > 1.0:
            uncond = self.stock_noise * cfg.delta
            eps = uncond + cfg.guidance_scale * (eps - uncond)
        denoised = self.schedule.step(self.latents, eps)  # [B, 4, h, w]
        if cfg.cfg_type is CfgType.SELF:
            self._update_stock_noise(eps)

        if self.frame_id % cfg.bank.interval == 0:
            self.bank.update(out)
        self.frame_id += 1
        if cfg.steps > 1:  # re-noise each denoised slot into the next step's slot
            self.latents[1:] = self.schedule.add_noise(denoised[:-1], self.noise[1:], slice(1, None))
        image = self.backend.decode(denoised[-1:])
        return tensor_to_frame(image, frame)

    def _update_stock_noise(self, eps: torch.Tensor) -> None:
        """StreamDiffusion's RCFG bookkeeping: the noise each slot carries into the next step."""
        s = self.schedule
        delta_x = s.step(s.beta * self.stock_noise, eps)
        ones = torch.ones_like(s.alpha[0:1])
        delta_x = torch.cat([s.alpha[1:], ones]) * delta_x / torch.cat([s.beta[1:], ones])
        self.stock_noise = torch.cat([self.noise[1:], self.noise[0:1]]) + delta_x
