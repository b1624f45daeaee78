"""StreamV2V: streaming img2img with a stream batch, a feature bank, and any backend.

Per frame (docs/DESIGN.md, "Per-frame data flow"): encode -> noise at t_0 -> UNet on the stream batch (slot i =
step i, each slot with its own bank) -> LCM step -> re-noise into the next slots -> decode the frame leaving the
last slot. Every `interval` UNet calls the current k/v/o are stored into the bank (DyMe or FIFO).

A frame is three steps: `plan()` decides on the host what the frame runs (priming? which bank update?),
`render(plan, image)` is the device work and touches no host state, `advance(plan)` moves the host counters.
`__call__` runs the three; `CudaGraphStream` captures `render` once per plan and replays it.
Features (docs/FEATURES.md): RCFG none/self/initialize and full CFG, prompt and seed blending, similar-frame
skip, priming of the stream batch, LoRAs (fused at load; swapped at runtime on eager: `set_loras`), ControlNets
(the spec's; their scales and control image kinds live: `update_control`).
"""

from __future__ import annotations

import dataclasses
import logging
from os import PathLike
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from .bank import NO_UPDATE, BankOp, FeatureBank
from .blending import PromptBlend, SeedBlend, blend_prompts, blend_seeds
from .config import StreamConfig
from .control_images import ControlImages, ControlKind
from .control_net import control_buffers, run_controlnets
from .edge import FrameEdge
from .lora_set import LoraSet, lora_specs, swap_loras
from .prompt import PromptEncoder
from .schedule import StreamSchedule
from .source import Source, open_networks, pretrained
from .spec import CfgType, EngineSpec

if TYPE_CHECKING:
    from .backends import Backend
    from .similar_filter import SimilarFrameFilter
    from .spec import LoraSpec

log = logging.getLogger(__name__)


class FramePlan(NamedTuple):
    """What a frame runs besides the steady work; decided on the host, it picks the CUDA graph."""

    prime: bool  # first frame after a reset with `cfg.prime`: steps - 1 extra stream steps fill the batch
    bank: BankOp  # the bank update after the UNet call


class StreamV2V:
    """Translate an endless stream of frames: `out = stream(frame)`, `update_prompt(text)`, `reset()`."""

    def __init__(
        self,
        backend: Backend,
        prompt_encoder: PromptEncoder,
        scheduler,
        cfg: StreamConfig,
        *,
        views: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """`views`: the UNet input buffers this stream writes, by engine input name (`sample`, `timestep`,
        `encoder_hidden_states`, `bank_valid`, `bank_*`), e.g. its rows of a batch shared with other streams
        (`MultiStream`); by default the stream allocates its own and runs the networks itself."""
        layout = backend.layout
        if layout.kind is not cfg.spec.bank or layout.slots != cfg.spec.bank_slots:
            raise ValueError(
                f"backend {backend.name} was built for a {layout.kind.value} bank x{layout.slots}, "
                f"the stream config asks {cfg.spec.bank.value} x{cfg.spec.bank_slots}"
            )
        if views is None and cfg.spec.max_streams > 1:
            raise ValueError(
                f"this build batches {cfg.spec.max_streams} streams in every network call: run it with "
                "streamv2v_trt.multistream.MultiStream (python -m streamv2v_trt serve does)"
            )
        self.backend, self.cfg = backend, cfg
        self.prompt_encoder = prompt_encoder
        self.scheduler = scheduler  # kept so another stream (own bank) can share this backend
        device, dtype = backend.device, backend.dtype
        self.device, self.dtype = device, dtype
        B = cfg.steps
        # UNet batch Bu = [uncond elements ; B stream slots]: 0 uncond (none/self), 1 (initialize: slot 0's
        # negative), B (full CFG). Every element has its own bank, so the bank batch follows the UNet batch.
        self._n_uncond = cfg.stream_batch - B
        self.schedule = StreamSchedule(scheduler, cfg.t_index_list, cfg.num_inference_steps, device, dtype)
        ones = torch.ones_like(self.schedule.alpha[0:1])
        self._alpha_next = torch.cat([self.schedule.alpha[1:], ones])  # [B, 1, 1, 1]
        self._beta_next = torch.cat([self.schedule.beta[1:], ones])
        self.seed: SeedBlend = cfg.seed
        self._own_buffers = views is None  # False: rows of a MultiStream's batch, which resizes them (its resize)
        self._parked: dict[tuple[int, int], dict[str, object]] = {}  # size -> its buffers while at another size
        self._allocate(views)
        self.sample.zero_()
        self.frame_id = 0  # UNet calls since reset; drives the bank interval
        self.update_prompt("", negative_prompt="")

    # The buffers of one frame size (`resize` keeps each size's, so its CUDA graphs replay on the buffers they read).
    _SIZED = ("sample", "timestep", "encoder_hidden_states", "latents", "prompt_embeds", "negative_embeds", "bank",
              "noise", "stock_noise", "_noise_next", "_shift", "edge", "control_cond", "control_scale", "residuals",
              "previous", "_controls", "_cond_shift")  # fmt: skip

    def _allocate(self, views: dict[str, torch.Tensor] | None) -> None:
        """Every buffer of the size of `self.cfg`: `views` (rows of a shared batch) or its own. The noise is drawn
        from `self.seed`; the bank is empty."""
        cfg, device, dtype = self.cfg, self.device, self.dtype
        B, Bu, (h, w) = cfg.steps, cfg.stream_batch, cfg.spec.latent_hw
        D, L = self.prompt_encoder.dim, self.prompt_encoder.length
        if views is None:
            views = {
                "sample": torch.zeros(Bu, 4, h, w, device=device, dtype=dtype),  # [Bu, 4, h, w]
                "timestep": torch.zeros(Bu, device=device, dtype=torch.long),  # [Bu]
                "encoder_hidden_states": torch.zeros(Bu, L, D, device=device, dtype=dtype),  # [Bu, 77, D]
                **control_buffers(self.backend.layout, cfg.spec, Bu, device, dtype),  # with ControlNets
            }
        self.bank = FeatureBank(
            self.backend.layout, cfg.bank, Bu, device, dtype, views=views if "bank_valid" in views else None
        )
        # Per-slot noise, drawn once per stream from the seed and reused for every frame (update_seed blends).
        self.noise = blend_seeds(self.seed, (B, 4, h, w)).to(device=device, dtype=dtype)  # [B, 4, h, w]
        self.stock_noise = torch.zeros_like(self.noise)  # RCFG: the negative's noise estimate (0, as StreamDiffusion)
        # Every piece of stream state is a fixed buffer written in place, so a captured CUDA graph (cuda_graph.py)
        # and bound engine inputs keep seeing it; these are the constants and scratch of the in-place updates.
        self._noise_next = torch.roll(self.noise, -1, dims=0)  # slot i+1's noise moves to slot i
        self._shift = torch.empty_like(self.noise[1:])  # [B-1, 4, h, w]: stock noise moving one slot down
        # UNet inputs (engines bind them once); `latents` and `prompt_embeds` are views of the stream slots' part.
        self.sample = views["sample"]  # [Bu, 4, h, w]
        self.latents = self.sample[self._n_uncond :]  # [B, 4, h, w]: slot i at step i
        t = self.schedule.timesteps
        self.timestep = views["timestep"]  # [Bu]: an uncond element runs at its slot's step
        self.timestep.copy_(torch.cat([t[: self._n_uncond], t]))
        self.encoder_hidden_states = views["encoder_hidden_states"]  # [Bu, 77, D]
        self.prompt_embeds = self.encoder_hidden_states[self._n_uncond :]  # [B, 77, D]
        self.negative_embeds = self.encoder_hidden_states[: self._n_uncond]  # [Bu - B, 77, D]
        self.edge = FrameEdge(cfg, device, dtype)  # frames in and out: staging, similar-frame filter, last output
        # ControlNets: per ControlNet j its control images [Bu, 3, H, W] (stream slot i holds the image of the frame
        # its latent came from, so they move down the slots with the latents) and scales [Bu]; the UNet's summed
        # residual inputs; the previous output (a "previous" control image); the control image makers.
        n, H, W = len(cfg.spec.controlnets), cfg.height, cfg.width
        self.control_cond = [views[f"controlnet_cond.{j}"] for j in range(n)]  # [Bu, 3, H, W] each
        self.control_scale = [views[f"conditioning_scale.{j}"] for j in range(n)]  # [Bu] each
        self.residuals = {name: views[name] for name in self.backend.layout.residual_names()}
        self.previous = torch.zeros(1, 3, H, W, device=device, dtype=dtype) if n else None  # [1, 3, H, W]
        self._cond_shift = torch.empty(B - 1, 3, H, W, device=device, dtype=dtype) if n and B > 1 else None
        self._controls = [_control_images(kind, H, W, device, dtype) for kind in cfg.control_kinds]
        self._sync_control()

    @classmethod
    def from_source(
        cls, source: Source, cfg: StreamConfig | None = None, *, prompt: PromptBlend = "", negative_prompt: str = "",
        **runtime,
    ) -> StreamV2V:  # fmt: skip
        """The stream of `source`'s networks running `cfg` (`opening.open_stream` is this, CUDA-graphed when the
        source asks; `source.open_networks` says what `cfg` defaults to)."""
        stream = cls(*open_networks(source, cfg, runtime))
        stream.update_prompt(prompt, negative_prompt=negative_prompt)
        return stream

    @classmethod
    def from_pretrained(
        cls,
        model: str | EngineSpec | StreamConfig = "tiny",
        *,
        device: torch.device | str | None = "cpu",
        prompt: PromptBlend = "",
        negative_prompt: str = "",
        compile: bool | str = False,
        channels_last: bool | None = None,
    ) -> StreamV2V:
        """The eager (PyTorch) pipeline: `from_source(Source(model, device, ...), cfg)`.

        `model`: a preset name, a local diffusers folder or a hub id (the preset's size and steps, fp16 on a GPU
        and fp32 on the CPU), an `EngineSpec`, or a whole `StreamConfig`. The spec's LoRAs are fused into the
        UNet and text encoder before anything runs; `negative_prompt` is what RCFG initialize and full CFG
        guide away from. `compile=True` runs the UNet and VAE forwards through torch.compile with inductor (the first
        frames compile them: a minute or more); a string picks another torch.compile backend. `channels_last`
        (default: on for CUDA) lays the convolution networks out NHWC.
        """
        source, cfg = pretrained(model, device=device, compile=compile, channels_last=channels_last)
        return cls.from_source(source, cfg, prompt=prompt, negative_prompt=negative_prompt)

    @classmethod
    def from_engines(
        cls,
        directory: str | PathLike,
        backend: str | None = None,
        cfg: StreamConfig | None = None,
        *,
        prompt: PromptBlend = "",
        negative_prompt: str = "",
        device: torch.device | str | None = None,
        loras: tuple[LoraSpec, ...] | None = None,
        verify_hashes: bool = True,
        threads: int | None = None,
        **runtime,
    ) -> StreamV2V:
        """The pipeline on a `python -m build_engines` folder: `from_source(Source(engines=directory, ...), cfg)`.

        `backend`: "onnxruntime" (its ONNX; CPU, or CUDA with onnxruntime-gpu), "tensorrt" (TensorRT or
        TensorRT-RTX engines, GPU) or "aoti" (AOTInductor packages, for the device they were built for); default:
        what the folder was built for. The folder's manifest says what it was built for (`EngineSpec`); `cfg`
        (default: that spec with the `runtime` settings, e.g. `seed=3, t_index_list=(30,)`) must ask the same,
        else `EngineMismatch` names every difference and the command that rebuilds it. `loras`: the LoRA files
        the folder was built with (their text-encoder layers run here). Only open folders you built: engines and
        packages are native code that runs when loaded (docs/RUNTIME.md).
        """
        source = Source(engines=directory, backend=backend, device=device, threads=threads, loras=loras,
                        verify_hashes=verify_hashes)  # fmt: skip
        return cls.from_source(source, cfg, prompt=prompt, negative_prompt=negative_prompt, **runtime)

    def sibling(self) -> StreamV2V:
        """A new stream on the same loaded networks: its own bank, noise and counters; this one's config, prompt
        and negative prompt. (Streams sharing a backend must run one frame at a time: engine outputs are shared.)"""
        other = StreamV2V(self.backend, self.prompt_encoder, self.scheduler, self.cfg)
        other.update_prompt(self.prompt, negative_prompt=self.negative_prompt)
        return other

    @property
    def sizes(self) -> tuple[tuple[int, int], ...] | None:
        """The frame sizes `resize` takes, (height, width) each: the backend's built sizes (None: any multiple of 8,
        eager)."""
        return self.backend.sizes

    @property
    def similar_filter(self) -> SimilarFrameFilter | None:
        """The similar-frame filter (None when off; `edge.py`): its counters say how many frames it skipped."""
        return self.edge.similar_filter

    # -- what the stream says and changes ---------------------------------------------------------------------
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

    def set_loras(self, loras: LoraSet, *, reset: bool = False) -> None:
        """Run with this LoRA set from the next frame on: [(file or LoraSpec, scale), ...] in order, [] for none.

        Eager: the weights become base + the LoRAs' deltas, written in place (no recapture; the same weights as a
        stream opened with these LoRAs), and the prompt is re-encoded with the new text-encoder weights; `cfg`
        then names the set. Every file is read and checked first: a bad one raises `LoraError` and changes
        nothing. The bank is kept (the style changes smoothly); `reset=True` forgets the stream too. The weights
        belong to the networks, so streams sharing them (`sibling()`) share the set: call it on a `MultiStream`
        for its slots. A build folder with swappable weights swaps as eager does (an AOTInductor package's constants
        rewritten, a new ONNX Runtime session, a TensorRT refit); a folder with frozen weights raises
        `EngineMismatch` with the rebuild command (weights compiled in).
        """
        self.cfg = swap_loras(self.backend, self.cfg, lora_specs(loras))
        self.update_prompt(self.prompt, negative_prompt=self.negative_prompt)  # the text encoder changed too
        if reset:
            self.reset()

    def resize(self, height: int, width: int) -> None:
        """Run frames of `height` x `width` from the next frame on. A new size is a new scene: the stream is reset
        (empty bank, empty stream batch); the prompt, negative prompt, seed and LoRA set stay.

        The backend's networks at that size (`backend.at_size`: eager, any multiple of 8; a build folder, the sizes
        it was built for, else `ValueError` with the rebuild command, and the stream keeps running its size) and
        every buffer of that size: latents, noise from the seed, the bank for its token counts, the frame staging.
        Each size keeps its buffers, so resizing back reuses them (and a `CudaGraphStream` its graphs). Resizing
        to the current size changes nothing (no reset: a client repeating its size loses no frames; `reset()`
        forgets). A slot of a `MultiStream` shares one batch, of one size, with the others: resize the MultiStream.
        """
        if not self._own_buffers:
            raise ValueError(
                "this stream's buffers are rows of a MultiStream's batch, and one batch is one size: resize the "
                "MultiStream (MultiStream.resize(height, width)), which resizes every slot"
            )
        if (height, width) == (self.cfg.height, self.cfg.width):
            return
        backend = self.backend.at_size(height, width)  # raises for a size it was not built for: nothing changed yet
        self.switch_size(backend, self.cfg.with_spec(height=height, width=width))

    def switch_size(self, backend: Backend, cfg: StreamConfig, views: dict[str, torch.Tensor] | None = None) -> None:
        """`resize`'s work, for callers that checked the size: `backend` and `cfg` at the new size; `views`: this
        stream's rows of a new batch of that size (`MultiStream.resize`), used when the size is new to the stream."""
        embeds = self.encoder_hidden_states  # the prompt and negative prompt move over as embeddings (no re-encode)
        self._parked[(self.cfg.height, self.cfg.width)] = {name: getattr(self, name) for name in self._SIZED}
        self.backend, self.cfg = backend, cfg
        parked = self._parked.pop((cfg.height, cfg.width), None)
        if parked is None:
            self._allocate(views)
        else:  # the buffers this size ran with (its CUDA graphs read them); the seed may have changed since
            for name, value in parked.items():
                setattr(self, name, value)
            self.update_seed(self.seed)
            self._sync_control()  # scales and kinds may have changed since too
        self.encoder_hidden_states.copy_(embeds)
        self.reset()

    def update_control(self, scales: tuple[float, ...] | None = None, kinds: tuple[str, ...] | None = None) -> None:
        """Each ControlNet's scale (0 adds exactly nothing) and control image kind (None keeps them), one per
        ControlNet of the spec, from the next frame on; no reset. Scales are written into the buffers the ControlNets
        read (no recapture); a kind is another computation, which a `CudaGraphStream` captures as another graph."""
        changes = {k: tuple(v) for k, v in (("controlnet_scales", scales), ("control_kinds", kinds)) if v is not None}
        cfg = dataclasses.replace(self.cfg, **changes)  # ValueError: not one per ControlNet
        controls = self._control_makers(cfg)  # ValueError: an unknown kind; nothing has changed yet
        self.cfg, self._controls = cfg, controls
        self._sync_control()

    def _control_makers(self, cfg: StreamConfig) -> list[ControlImages]:
        """The control image makers of `cfg`'s kinds at the current size (those already made are kept)."""
        return [
            c if c.kind == kind else _control_images(kind, cfg.height, cfg.width, self.device, self.dtype)
            for c, kind in zip(self._controls, cfg.control_kinds)
        ]

    def set_control_frame(self, index: int, frame: np.ndarray | torch.Tensor) -> None:
        """The next frame's control image of ControlNet `index` when its kind is "video": a frame the user made
        (uint8 HxWx3 at the stream's size, e.g. a depth or pose video's frame). Call it before the frame; a wrong
        size raises `FrameError` and the previous control frame stays."""
        if not 0 <= index < len(self._controls):
            raise IndexError(f"ControlNet {index}: this stream has {len(self._controls)} ControlNet(s)")
        self._controls[index].set_frame(frame)  # ValueError: its kind is not "video"

    def control_image(self, index: int) -> torch.Tensor:
        """ControlNet `index`'s control image of the newest frame that entered: [1, 3, H, W] in [0, 1], the buffer
        the next frame overwrites (copy it to keep it); zeros before the first frame."""
        if not 0 <= index < len(self._controls):
            raise IndexError(f"ControlNet {index}: this stream has {len(self._controls)} ControlNet(s)")
        return self._controls[index].image

    def _sync_control(self) -> None:
        """The control buffers and makers of the current size follow `cfg`: scales written, changed kinds made."""
        for buffer, scale in zip(self.control_scale, self.cfg.controlnet_scales):
            buffer.fill_(scale)  # every row of this stream, its uncond elements' too
        self._controls = self._control_makers(self.cfg)

    def reset(self) -> None:
        """Forget the stream: empty bank, empty stream batch, fresh noise state. The prompt stays."""
        self.bank.reset()
        self.sample.zero_()
        self.stock_noise.zero_()
        for cond in self.control_cond:
            cond.zero_()
        if self.previous is not None:
            self.previous.zero_()
        self.frame_id = 0
        self.edge.reset()

    def unet_inputs(self) -> dict[str, torch.Tensor]:
        """The UNet call's named inputs: the same buffers every frame."""
        return {
            "sample": self.sample,
            "timestep": self.timestep,
            "encoder_hidden_states": self.encoder_hidden_states,
            **self.bank.inputs(),
            **self.residuals,
        }

    # -- one frame --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, frame: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """One frame in (uint8 HxWx3), one frame out of the same type.

        Latency: steps - 1 frames. Without `prime`, the first steps - 1 outputs decode slots that started from
        zero latents; with it, the first frame after a reset costs `steps` UNet calls and the first steps
        outputs all show frame 0's translation. A similar frame (when enabled) returns the previous output.
        """
        admitted = self.edge.admit(frame)  # validated before any state changes: a bad frame leaves it usable
        if admitted.skip:
            return self.edge.emit(None, frame)  # no UNet call, frame_id (bank interval) unchanged
        plan = self.plan()
        out = self.render(plan, admitted.image)
        self.advance(plan)
        self.edge.remember(out)
        return self.edge.emit(out, frame)

    def plan(self) -> FramePlan:
        """What the next frame runs, from the host counters alone."""
        prime = self.cfg.prime and self.frame_id == 0 and self.cfg.steps > 1
        return FramePlan(prime, self.bank.plan(self.frame_id))

    def render(self, plan: FramePlan, image: torch.Tensor) -> torch.Tensor:
        """The device work of one frame: image [1, 3, H, W] in [-1, 1] -> the decoded output of the last slot.

        Writes only device buffers, so running it inside CUDA graph capture records exactly one frame.
        """
        latent = self.backend.encode(image)  # [1, 4, h, w]
        if plan.prime:
            # Frame 0 through steps - 1 stream steps first, so every slot holds it at its own step, exactly as if
            # the stream had shown frame 0 for steps - 1 frames; nothing is stored in the (empty) bank.
            for _ in range(self.cfg.steps - 1):
                self._stream_step(latent, image, NO_UPDATE)
        out = self.backend.decode(self._stream_step(latent, image, plan.bank))
        if self.previous is not None:  # the next frame's "previous" control image
            self.previous.copy_(out)
        return out

    def advance(self, plan: FramePlan) -> None:
        """Host bookkeeping after a frame ran (eagerly or replayed from a graph)."""
        self.bank.advance(plan.bank)
        self.frame_id += 1

    def _stream_step(self, latent: torch.Tensor, image: torch.Tensor, bank_op: BankOp) -> torch.Tensor:
        """One UNet call on the stream batch with `latent` (of `image`) entering slot 0; returns the latent leaving
        the last slot [1, 4, h, w]. (A MultiStream runs `begin` for every stream, the ControlNets and one UNet call
        on the whole batch, then `finish`.)"""
        self.begin(latent, image)
        inputs = self.unet_inputs()
        if self._controls:  # each ControlNet on the batch the UNet runs: every slot at its own step
            run_controlnets(self.backend, inputs, self.control_cond, self.control_scale, self.residuals)
        return self.finish(self.backend.unet(inputs), bank_op)

    def begin(self, latent: torch.Tensor, image: torch.Tensor | None = None) -> None:
        """The stream batch before its UNet call: `latent` [1, 4, h, w] enters slot 0 at t_0, and with ControlNets
        the control images of `image` [1, 3, H, W] in [-1, 1] (the frame `latent` encodes) enter slot 0 too."""
        cfg = self.cfg
        self.latents[0:1].copy_(self.schedule.add_noise(latent, self.noise[0:1], slice(0, 1)))
        if self._controls:
            if image is None:
                raise ValueError("a stream with ControlNets needs the frame's image in begin(latent, image)")
            self._begin_control(image)
        if cfg.steps > 1:  # stock noise moves one slot down, slot 0 starts from its own noise (in place)
            self._shift.copy_(self.stock_noise[:-1])
            self.stock_noise[1:].copy_(self._shift)
            self.stock_noise[0:1].copy_(self.noise[0:1])
        if self._n_uncond:  # uncond elements see the same latents as their slots (initialize: slot 0; full: all)
            self.sample[: self._n_uncond].copy_(self.latents[: self._n_uncond])

    def _begin_control(self, image: torch.Tensor) -> None:
        """Every ControlNet's control images move one slot down with the latents; `image`'s enter slot 0."""
        n = self._n_uncond
        for cond, control in zip(self.control_cond, self._controls):
            rows = cond[n:]  # [B, 3, H, W]: the stream slots
            if self._cond_shift is not None:  # through scratch: an overlapping in-place copy is undefined
                self._cond_shift.copy_(rows[:-1])
                rows[1:].copy_(self._cond_shift)
            rows[0:1].copy_(control(image, self.previous))
            if n:  # uncond elements see their slots' control images, as their latents
                cond[:n].copy_(rows[:n])

    def finish(self, out: dict[str, torch.Tensor], bank_op: BankOp) -> torch.Tensor:
        """The stream batch after its UNet call (`out`: this stream's rows of the outputs): guidance, LCM step,
        the bank update, re-noising into the next slots. Returns the latent leaving the last slot [1, 4, h, w]."""
        cfg = self.cfg
        eps = self._guide(out["noise_pred"])  # [B, 4, h, w]
        denoised = self.schedule.step(self.latents, eps)  # [B, 4, h, w]
        if cfg.cfg_type in (CfgType.SELF, CfgType.INITIALIZE):
            self._update_stock_noise(eps)
        self.bank.apply(bank_op, out)
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


def _control_images(kind: str, height: int, width: int, device: torch.device, dtype: torch.dtype) -> ControlImages:
    """`ControlImages` of `kind`, or a ValueError naming the kinds there are."""
    if kind not in {k.value for k in ControlKind}:
        raise ValueError(
            f"control image kind {kind!r} is unknown: use one of {', '.join(k.value for k in ControlKind)}"
        )
    return ControlImages(kind, height, width, device, dtype)
