"""MultiStream: K independent streams on one set of networks, batched into one encode, UNet and decode per tick.

At 512x512 and batch 1 the GPU idles between kernels; the UNet batch already gives every element its own bank,
so K streams can share one UNet call (batch K x steps). Each slot is a `StreamV2V` whose network inputs are its
rows of the shared batch buffers (its own bank, prompt, noise, frame counter and bank plan); a tick runs

    encode [K frames] -> begin (each stream with a frame) -> UNet [K x Bu] -> finish (each) -> decode [K]

A slot without a frame this tick does not begin or finish, so its state does not move (an idle slot costs its
share of the batch, nothing else). Batch rows are independent, so a slot's frames equal that stream run alone.
Priming (a stream's first frame after a reset, with `prime`) runs extra UNet calls for the slots that need it.

With `cuda_graphs=True` every phase is captured on its second occurrence and replayed: encode, UNet and decode
once, `begin` per slot, `finish` per slot and bank update. Joining, leaving, prompt changes and resets need no
recapture; merges of different streams may fall on any tick. Tensors that cross phases are kept alive, so
graphs sharing one memory pool never hand each other's live memory out (they replay one at a time).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable
from os import PathLike

import numpy as np
import torch

from .bank import NO_UPDATE
from .config import StreamConfig
from .flavours import CAPTURABLE_BACKENDS
from .frames import frame_to_tensor, image_to_uint8, is_host, tensor_to_frame, uint8_to_image
from .pipeline import FramePlan, StreamV2V
from .source import Source, open_networks, pretrained
from .spec import EngineSpec, LoraSpec

log = logging.getLogger(__name__)


class MultiStream:
    """`K` stream slots sharing the networks: `submit(slot, frame)` for each stream with a frame, then `tick()`.

    `slots[i]` is slot i's stream (prompt, seed, reset: `slots[i].update_prompt(...)`, `slots[i].reset()`).
    Not thread-safe: one thread runs submit, tick and the updates (the serving loop, `serving.py`, does).
    """

    def __init__(
        self, backend, prompt_encoder, scheduler, cfg: StreamConfig, *, streams: int | None = None,
        cuda_graphs: bool = False,
    ) -> None:  # fmt: skip
        K = streams or cfg.spec.max_streams
        kind = backend.name.info
        if kind.runs_folders and K != cfg.spec.max_streams:
            asked = dataclasses.replace(cfg.spec, max_streams=K)
            rebuild = asked.rebuild_command(backend.name, built=backend.builder)
            raise ValueError(
                f"the {backend.name.value} networks were built for {cfg.spec.max_streams} stream(s), asked {K}; "
                f"rebuild: {rebuild}"
            )
        if cuda_graphs and not kind.capturable:
            raise ValueError(
                f"the {backend.name.value} backend cannot be captured into a CUDA graph (its calls synchronise); "
                f"use one of {', '.join(CAPTURABLE_BACKENDS)}, or cuda_graphs=False"
            )
        self.backend, self.cfg, self.streams = backend, cfg, K
        device, dtype = backend.device, backend.dtype
        self.device, self.dtype = device, dtype
        Bu, (h, w) = cfg.stream_batch, cfg.spec.latent_hw
        L, D = prompt_encoder.length, prompt_encoder.dim
        layout = backend.layout
        # The networks' inputs, all K streams side by side; slot i owns rows [i*Bu, (i+1)*Bu).
        self.inputs = {
            "sample": torch.zeros(K * Bu, 4, h, w, device=device, dtype=dtype),
            "timestep": torch.zeros(K * Bu, device=device, dtype=torch.long),
            "encoder_hidden_states": torch.zeros(K * Bu, L, D, device=device, dtype=dtype),
            "bank_valid": torch.zeros(K * Bu, layout.slots, device=device, dtype=dtype),
            **{
                name: torch.zeros(layout.bank_shape(layer, K * Bu), device=device, dtype=dtype)
                for layer in layout.layers
                for name in (f"bank_{p}.{layer.index}" for p in layout.parts(layer))
            },
        }
        views = [{n: t[i * Bu : (i + 1) * Bu] for n, t in self.inputs.items()} for i in range(K)]
        self.slots = [StreamV2V(backend, prompt_encoder, scheduler, cfg, views=v) for v in views]
        self.images = torch.zeros(K, 3, cfg.height, cfg.width, device=device, dtype=dtype)  # encode input
        self.decode_in = torch.zeros(K, 4, h, w, device=device, dtype=dtype)  # the latents leaving each stream
        self._pending: dict[int, tuple[np.ndarray | torch.Tensor, bool]] = {}  # slot -> (frame, skipped)
        self._rows = Bu
        self.graphs = _PhaseGraphs(device) if cuda_graphs else None

    @classmethod
    def from_source(
        cls, source: Source, cfg: StreamConfig | None = None, streams: int | None = None, *, prompt: str = "",
        negative_prompt: str = "", **runtime,
    ) -> MultiStream:  # fmt: skip
        """`streams` slots (default: `cfg.spec.max_streams`, a folder's K) of `source`'s networks running `cfg`,
        each with this prompt (`opening.open_multistream` is this). A build folder runs exactly the K it was built
        for; another K is refused with the command that builds it. Eager runs any K."""
        if streams is not None and streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        multi = cls(*open_networks(source, cfg, runtime), streams=streams, cuda_graphs=source.cuda_graphs)
        for slot in multi.slots:
            slot.update_prompt(prompt, negative_prompt=negative_prompt)
        return multi

    @classmethod
    def from_pretrained(
        cls,
        model: str | EngineSpec | StreamConfig = "tiny",
        streams: int = 4,
        *,
        device: torch.device | str | None = "cpu",
        prompt: str = "",
        cuda_graphs: bool = False,
        compile: bool | str = False,
    ) -> MultiStream:
        """`streams` slots on the eager (PyTorch) networks, any number without a build:
        `from_source(Source(model, ...), cfg, streams)`."""
        source, cfg = pretrained(model, device=device, compile=compile, cuda_graphs=cuda_graphs)
        return cls.from_source(source, cfg, streams, prompt=prompt)

    @classmethod
    def from_engines(
        cls, directory: str | PathLike, backend: str | None = None, cfg: StreamConfig | None = None, *,
        prompt: str = "", device: torch.device | str | None = None, streams: int | None = None,
        cuda_graphs: bool = False, loras: tuple[LoraSpec, ...] | None = None, verify_hashes: bool = True,
        threads: int | None = None, **runtime,
    ) -> MultiStream:  # fmt: skip
        """The slots of a build folder made with `--max-streams K`: `from_source(Source(engines=directory, ...),
        cfg, streams)`. `streams` (default: the folder's K) other than K is refused with the command that builds
        it."""
        source = Source(engines=directory, backend=backend, device=device, threads=threads, loras=loras,
                        verify_hashes=verify_hashes, cuda_graphs=cuda_graphs)  # fmt: skip
        return cls.from_source(source, cfg, streams, prompt=prompt, **runtime)

    # -- one tick ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def submit(self, slot: int, frame: np.ndarray | torch.Tensor) -> None:
        """Stage slot `slot`'s next frame (a newer one replaces it until `tick`). A bad frame raises `FrameError`
        and changes nothing."""
        self._stage(slot, frame, self._image(slot, frame))

    def _image(self, slot: int, frame: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Check the slot and the frame (IndexError, FrameError) without changing any state: [1, 3, H, W]."""
        if not 0 <= slot < self.streams:
            raise IndexError(f"slot {slot} does not exist: this MultiStream has slots 0..{self.streams - 1}")
        staging = self.slots[slot].staging
        if staging is not None and staging.accepts(frame):  # host uint8 frames through the slot's pinned buffer
            return uint8_to_image(staging.upload(frame), self.dtype)
        cfg = self.cfg
        return frame_to_tensor(frame, cfg.height, cfg.width, resize=cfg.resize, device=self.device, dtype=self.dtype)

    def _stage(self, slot: int, frame: np.ndarray | torch.Tensor, image: torch.Tensor) -> None:
        s = self.slots[slot]
        # As StreamV2V.__call__: every frame goes through the filter (the first one becomes its reference).
        skipped = s.similar_filter is not None and s.similar_filter.should_skip(image)
        if not skipped:
            self.images[slot : slot + 1].copy_(image)
        self._pending[slot] = (frame, skipped)

    @torch.inference_mode()
    def tick(self) -> dict[int, np.ndarray | torch.Tensor]:
        """Run every staged frame in one batched pass; returns each slot's output frame (the frame's type)."""
        pending, self._pending = self._pending, {}
        active = {i: self.slots[i].plan() for i, (_, skipped) in pending.items() if not skipped}
        if active:
            self._run(active)
        out = {}
        for i, (frame, skipped) in pending.items():
            s = self.slots[i]
            if not skipped:
                s.advance(active[i])
                if s.similar_filter is not None:
                    if s._last_image is None:
                        s._last_image = torch.empty_like(self.images[i : i + 1])
                    s._last_image.copy_(self._decoded[i : i + 1])
                image = self._decoded[i : i + 1]
            else:
                image = s._last_image
            if s.staging is not None and is_host(frame):
                out[i] = s.staging.download(image_to_uint8(image), frame)
            elif isinstance(frame, np.ndarray):
                out[i] = tensor_to_frame(image, frame)
            else:
                out[i] = image_to_uint8(image).clone()  # the next tick overwrites the decoded batch
        return out

    def __call__(self, frames: dict[int, np.ndarray | torch.Tensor]) -> dict[int, np.ndarray | torch.Tensor]:
        """submit every frame, then tick. Frames are validated first: a bad one raises before anything is staged
        or runs (frames staged earlier with `submit` stay staged)."""
        images = {i: self._image(i, f) for i, f in frames.items()}
        for i, f in frames.items():
            self._stage(i, f, images[i])
        return self.tick()

    def _run(self, active: dict[int, FramePlan]) -> None:
        phase = self.graphs.run if self.graphs is not None else (lambda _key, fn: fn())
        latents = phase(("encode",), lambda: self.backend.encode(self.images))  # [K, 4, h, w]
        priming = [i for i, plan in active.items() if plan.prime]
        for _ in range(self.cfg.steps - 1 if priming else 0):  # rare (a reset with `prime`): not graphed
            for i in priming:
                self.slots[i].begin(latents[i : i + 1])
            out = self.backend.unet(self.inputs)
            for i in priming:
                self.slots[i].finish(self._rows_of(out, i), NO_UPDATE)
        for i in active:
            phase(("begin", i), lambda i=i: self.slots[i].begin(latents[i : i + 1]))
        out = phase(("unet",), lambda: self.backend.unet(self.inputs))
        for i, plan in active.items():
            phase(
                ("finish", i, plan.bank),
                lambda i=i, plan=plan: self.decode_in[i : i + 1].copy_(
                    self.slots[i].finish(self._rows_of(out, i), plan.bank)
                ),
            )
        self._decoded = phase(("decode",), lambda: self.backend.decode(self.decode_in))  # [K, 3, H, W]

    def _rows_of(self, out: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
        r = self._rows
        return {name: t[i * r : (i + 1) * r] for name, t in out.items()}


class _PhaseGraphs:
    """One CUDA graph per phase key, captured on the key's second occurrence (the first is eager: warm-up)."""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, this MultiStream runs on {device}")
        self.pool = torch.cuda.graph_pool_handle()  # phases replay one at a time: one pool
        self.captured: dict[tuple, tuple[torch.cuda.CUDAGraph, object]] = {}
        self.seen: Counter[tuple] = Counter()

    def run(self, key: tuple, fn: Callable[[], object]) -> object:
        captured = self.captured.get(key)
        if captured is None and self.seen[key] >= 1:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                result = fn()  # recorded, not run; kept alive so the pool never reuses its memory
            captured = self.captured[key] = (graph, result)
            log.info("captured a CUDA graph for %s (%d graphs)", key, len(self.captured))
        if captured is None:
            self.seen[key] += 1
            return fn()
        captured[0].replay()
        return captured[1]
