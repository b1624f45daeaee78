"""StreamV2V: streaming img2img with a stream batch, a feature bank, and any backend.

Per frame (DESIGN.md §2): encode -> noise at t_0 -> UNet on the stream batch (slot i = step i, each slot
with its own bank) -> LCM step -> re-noise into the next slots -> decode the frame leaving the last slot.
Every `interval` UNet calls the current k/v/o are stored into the bank (DyMe or FIFO).
Features (docs/FEATURES.md): RCFG none/self/initialize and full CFG, prompt and seed blending, similar-frame
skip, priming of the stream batch, LoRAs fused at load.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from os import PathLike

import numpy as np
import torch

from .backends import Backend
from .bank import FeatureBank
from .blending import PromptBlend, SeedBlend, blend_prompts, blend_seeds
from .config import BankConfig, CfgType, StreamConfig
from .frames import frame_to_tensor, tensor_to_frame
from .models.lora import LoraSpec
from .prompt import PromptEncoder
from .schedule import StreamSchedule
from .similar_filter import SimilarFrameFilter

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
        self.scheduler = scheduler  # kept so another stream (own bank) can share this backend
        device, dtype = backend.device, backend.dtype
        self.device, self.dtype = device, dtype
        B, h, w = cfg.steps, cfg.height // 8, cfg.width // 8
        # UNet batch Bu = [uncond elements ; B stream slots]: 0 uncond (none/self), 1 (initialize: slot 0's
        # negative), B (full CFG). Every element has its own bank, so the bank batch follows the UNet batch.
        Bu = cfg.unet_batch
        self._n_uncond = Bu - B
        self.schedule = StreamSchedule(scheduler, cfg.t_index_list, cfg.num_inference_steps, device, dtype)
        self.bank = FeatureBank(backend.layout, cfg.bank, Bu, device, dtype)

        # Per-slot noise, drawn once per stream from the seed and reused for every frame (update_seed blends).
        self.noise = blend_seeds(cfg.seed, (B, 4, h, w)).to(device=device, dtype=dtype)  # [B, 4, h, w]
        self.seed: SeedBlend = cfg.seed
        self.stock_noise = torch.zeros_like(self.noise)  # RCFG: the negative's noise estimate (0, as StreamDiffusion)
        # Every piece of stream state is a fixed buffer written in place, so a captured CUDA graph (cuda_graph.py)
        # and bound engine inputs keep seeing it; these are the constants and scratch of the in-place updates.
        self._noise_next = torch.cat([self.noise[1:], self.noise[0:1]])  # slot i+1's noise moves to slot i
        ones = torch.ones_like(self.schedule.alpha[0:1])
        self._alpha_next = torch.cat([self.schedule.alpha[1:], ones])  # [B, 1, 1, 1]
        self._beta_next = torch.cat([self.schedule.beta[1:], ones])
        self._shift = torch.empty_like(self.noise[1:])  # [B-1, 4, h, w]: stock noise moving one slot down
        # UNet inputs (engines bind them once); `latents` and `prompt_embeds` are views of the stream slots' part.
        self.sample = torch.zeros(Bu, 4, h, w, device=device, dtype=dtype)  # [Bu, 4, h, w]
        self.latents = self.sample[self._n_uncond :]  # [B, 4, h, w]: slot i at step i
        t = self.schedule.timesteps
        self.timestep = torch.cat([t[: self._n_uncond], t])  # [Bu]: an uncond element runs at its slot's step
        D, L = prompt_encoder.dim, prompt_encoder.length
        self.encoder_hidden_states = torch.zeros(Bu, L, D, device=device, dtype=dtype)  # [Bu, 77, D]
        self.prompt_embeds = self.encoder_hidden_states[self._n_uncond :]  # [B, 77, D]
        self.negative_embeds = self.encoder_hidden_states[: self._n_uncond]  # [Bu - B, 77, D]
        self.frame_id = 0  # UNet calls since reset; drives the bank interval
        self.similar_filter = SimilarFrameFilter(cfg.similar_filter) if cfg.similar_filter.enabled else None
        # Decoded output of the last processed frame, which a skipped frame returns. A copy: an engine backend's
        # output buffer is overwritten by the next decode (of this stream or another sharing the backend).
        self._last_image: torch.Tensor | None = None
        self.update_prompt("", negative_prompt="")

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
        loras: Sequence[LoraSpec] = (),
        negative_prompt: str = "",
    ) -> StreamV2V:
        """The eager (PyTorch) pipeline for a preset, a local diffusers folder, or a hub id.

        `loras` are fused into the UNet (and text encoder) weights before anything runs; `negative_prompt`
        is what RCFG initialize and full CFG guide away from.
        """
        from .backends.eager import EagerBackend
        from .models import load_models
        from .models.lora import fuse_loras

        models = load_models(model, vae=vae, device=device, dtype=dtype, seed=seed)
        if loras:
            fuse_loras(models.unet, loras, text_encoder=models.text_encoder)
        if cfg is None:
            h, w = models.default_size
            cfg = StreamConfig(height=h, width=w, t_index_list=models.default_t_index_list)
        backend = EagerBackend(models, cfg.bank, (cfg.height // 8, cfg.width // 8))
        stream = cls(backend, PromptEncoder(models.tokenizer, models.text_encoder), models.scheduler, cfg)
        stream.update_prompt(prompt, negative_prompt=negative_prompt)
        return stream

    @classmethod
    def from_engines(
        cls,
        directory: str | PathLike,
        backend: str = "onnxruntime",
        cfg: StreamConfig | None = None,
        *,
        prompt: str = "",
        device: torch.device | str | None = None,
        **options,
    ) -> StreamV2V:
        """The pipeline on a `python -m build_engines` folder: backend "onnxruntime" (its ONNX; CPU, or CUDA with
        onnxruntime-gpu) or "tensorrt" (its engines, on a GPU). The manifest is checked against `cfg` (default:
        what the folder was built for); a mismatch raises `EngineMismatch` with the rebuild command.
        `options`: precision, seed, verify_hashes, threads (see `backends.engines.open_engines`)."""
        from .backends.engines import open_engines

        opened = open_engines(directory, backend, cfg, device=device, **options)
        stream = cls(opened.backend, opened.prompt_encoder, opened.scheduler, opened.cfg)
        stream.manifest = opened.manifest
        stream.update_prompt(prompt)
        return stream

    @property
    def bank_config(self) -> BankConfig:
        return self.cfg.bank

    def update_prompt(self, prompt: PromptBlend, negative_prompt: str | None = None) -> None:
        """A prompt, or a weighted blend [(text, weight), ...] (embeddings mixed linearly, weights normalised).

        Encoded once and written into the UNet's prompt buffer in place: no rebuild, recapture or bank reset.
        `negative_prompt` (None keeps the current one) is used by RCFG initialize and full CFG only.
        """
        embeds = blend_prompts(self.prompt_encoder, prompt).to(device=self.device, dtype=self.dtype)  # [1, 77, D]
        if negative_prompt is not None:
            if not isinstance(negative_prompt, str):
                raise TypeError(f"negative_prompt must be a str, got {type(negative_prompt).__name__}")
            if self._n_uncond:
                neg = self.prompt_encoder(negative_prompt).to(device=self.device, dtype=self.dtype)
                self.negative_embeds.copy_(neg.expand_as(self.negative_embeds))
            self.negative_prompt = negative_prompt
        self.prompt_embeds.copy_(embeds.expand_as(self.prompt_embeds))
        self.prompt = prompt

    def update_seed(self, seed: SeedBlend) -> None:
        """A seed, or a blend [(seed, weight), ...] of the per-slot noise, normalised to unit variance
        (docs/FEATURES.md). Written into the noise buffer in place, from the next frame on; no reset."""
        self.noise.copy_(blend_seeds(seed, tuple(self.noise.shape)))
        self._noise_next.copy_(torch.roll(self.noise, -1, dims=0))  # RCFG's rolled copy of the noise
        self.seed = seed

    def reset(self) -> None:
        """Forget the stream: empty bank, empty stream batch, fresh noise state. The prompt stays."""
        self.bank.reset()
        self.sample.zero_()
        self.stock_noise.zero_()
        self.frame_id = 0
        if self.similar_filter is not None:
            self.similar_filter.reset()

    def unet_inputs(self) -> dict[str, torch.Tensor]:
        """The UNet call's named inputs: the same buffers every frame."""
        return {
            "sample": self.sample,
            "timestep": self.timestep,
            "encoder_hidden_states": self.encoder_hidden_states,
            **self.bank.inputs(),
        }

    @torch.inference_mode()
    def __call__(self, frame: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """One frame in (uint8 HxWx3), one frame out.

        Latency: steps - 1 frames. Without `prime`, the first steps - 1 outputs decode slots that started from
        zero latents; with it, the first frame after a reset costs `steps` UNet calls and the first steps
        outputs all show frame 0's translation. A similar frame (when enabled) returns the previous output.
        """
        cfg = self.cfg
        image = frame_to_tensor(
            frame, cfg.height, cfg.width, resize=cfg.resize, device=self.device, dtype=self.dtype
        )  # validated before any state changes, so a bad frame leaves the stream usable
        if self.similar_filter is not None and self.similar_filter.should_skip(image):
            return tensor_to_frame(self._last_image, frame)  # no UNet call, frame_id (bank interval) unchanged
        latent = self.backend.encode(image)  # [1, 4, h, w]
        if cfg.prime and self.frame_id == 0:
            self._prime(latent)
        image = self.backend.decode(self._stream_step(latent))
        if self.similar_filter is not None:
            if self._last_image is None:
                self._last_image = torch.empty_like(image)  # [1, 3, H, W], once per stream
            self._last_image.copy_(image)
        return tensor_to_frame(image, frame)

    def _prime(self, latent: torch.Tensor) -> None:
        """Run frame 0 through steps - 1 stream steps first, so every slot holds it at its own step, exactly
        as if the stream had shown frame 0 for steps - 1 frames; nothing is stored in the (empty) bank."""
        for _ in range(self.cfg.steps - 1):
            self._stream_step(latent, store=False)

    def _stream_step(self, latent: torch.Tensor, *, store: bool = True) -> torch.Tensor:
        """One UNet call on the stream batch with `latent` entering slot 0; returns the latent leaving the last
        slot [1, 4, h, w]. store=False (priming) leaves the bank and frame_id alone."""
        cfg = self.cfg
        self.latents[0:1].copy_(self.schedule.add_noise(latent, self.noise[0:1], slice(0, 1)))
        if cfg.steps > 1:  # stock noise moves one slot down, slot 0 starts from its own noise (in place)
            self._shift.copy_(self.stock_noise[:-1])
            self.stock_noise[1:].copy_(self._shift)
            self.stock_noise[0:1].copy_(self.noise[0:1])
        if self._n_uncond:  # uncond elements see the same latents as their slots (initialize: slot 0; full: all)
            self.sample[: self._n_uncond].copy_(self.latents[: self._n_uncond])

        out = self.backend.unet(self.unet_inputs())
        eps = self._guide(out["noise_pred"])  # [B, 4, h, w]
        denoised = self.schedule.step(self.latents, eps)  # [B, 4, h, w]
        if cfg.cfg_type in (CfgType.SELF, CfgType.INITIALIZE):
            self._update_stock_noise(eps)

        if store:
            if self.frame_id % cfg.bank.interval == 0:
                self.bank.update(out)
            self.frame_id += 1
        if cfg.steps > 1:  # re-noise each denoised slot into the next step's slot
            self.latents[1:].copy_(self.schedule.add_noise(denoised[:-1], self.noise[1:], slice(1, None)))
        return denoised[-1:]

    def _guide(self, noise_pred: torch.Tensor) -> torch.Tensor:
        """StreamDiffusion's guidance on the UNet output [Bu, 4, h, w] -> eps of the B stream slots.

        eps = u + g * (eps_text - u) when g > 1 and cfg is not none, else eps_text; the negative u is
        delta * stock_noise (self, initialize) or the uncond elements' output (full). initialize first sets
        stock_noise[0] to its uncond element's output.
        """
        cfg, n = self.cfg, self._n_uncond
        eps_text = noise_pred[n:]
        if cfg.cfg_type is CfgType.INITIALIZE:
            self.stock_noise[0:1].copy_(noise_pred[0:1])
        if cfg.cfg_type is CfgType.NONE or cfg.guidance_scale <= 1.0:
            return eps_text
        uncond = noise_pred[:n] if cfg.cfg_type is CfgType.FULL else self.stock_noise * cfg.delta
        return uncond + cfg.guidance_scale * (eps_text - uncond)

    def _update_stock_noise(self, eps: torch.Tensor) -> None:
        """StreamDiffusion's RCFG bookkeeping: the noise each slot carries into the next step."""
        s = self.schedule
        delta_x = s.step(s.beta * self.stock_noise, eps)
        delta_x = self._alpha_next * delta_x / self._beta_next
        torch.add(self._noise_next, delta_x, out=self.stock_noise)
