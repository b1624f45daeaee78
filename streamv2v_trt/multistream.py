"""MultiStream: K independent streams on one set of networks, batched into one encode, UNet and decode per tick.

At 512x512 and batch 1 the GPU idles between kernels; the UNet batch already gives every element its own bank,
so K streams can share one UNet call (batch K x steps). Each slot is a `StreamV2V` whose network inputs are its
rows of the shared batch buffers (its own bank, prompt, noise, frame counter and bank plan); a tick runs

    encode [K frames] -> begin (each stream with a frame) -> UNet [K x Bu] -> finish (each) -> bank updates
      -> decode [K]

A slot without a frame this tick does not begin or finish, so its state does not move (an idle slot costs its
share of the batch, nothing else). With ControlNets, each ControlNet runs once on the whole batch between the begins
and the UNet (phase ("control",)); a slot's control images and scales are its rows (`slots[i].update_control`), kept
across `resize` and `set_loras`. Batch rows are independent, so a slot's frames equal that stream run alone.
Priming (a stream's first frame after a reset, with `prime`) runs extra UNet calls for the slots that need it.
Frames come in and go out through each slot's own `FrameEdge` (edge.py): validation, staging, the similar-frame
filter, the last output and the download are the slot's, exactly as for the stream alone.

With `cuda_graphs=True` every phase runs through one `GraphCache` (graph_cache.py: captured on its second
occurrence, replayed after, one memory pool). Keys:

    ("encode",), ("unet",), ("decode",)      once each
    ("begin", run), ("finish", run)          run: a maximal range of consecutive active slots, e.g. range(0, 4)
                                             (with ControlNets, begin's key also holds the run's control kinds)
    ("control",)                             with ControlNets: every ControlNet on the whole batch, once
    ("bank", op, run)                        run: consecutive active slots whose bank update this tick is `op`

A steady tick (active slots consecutive, no bank update) launches 5 graphs whatever K is (per-slot graphs took
2K + 3); each run of slots updating their banks alike adds one, each gap among the active slots two. Keying by
runs bounds the graphs by K(K+1)/2 per kind of phase: 3 + (2 + U) K(K+1)/2 in all for U kinds of bank update
(DyMe: store, merge; FIFO of k frames: k stores), e.g. 43 for K = 4. Keying by the exact set of active slots
would launch 5 always but allow 2^K - 1 graphs per phase, and every new set costs eager runs and a capture
(which synchronises) while clients come and go; runs are what a server mostly sees (slots of clients streaming
together), and a gap costs two launches, not a new set of graphs. The bank updates run after the slots' other
work, not inside `finish`: they touch only the bank, so the result is the same, and the per-slot graphs need not
depend on the update. Joining, leaving, prompt changes and resets need no recapture; merges of different streams
may fall on any tick.

Tensors that cross phases (the encoded latents, the UNet's outputs, the decoded batch) are graph outputs, kept
alive by the cache, so no later capture reuses their memory. A graph captured before them may keep scratch where
they live; the encode, UNet and decode graphs are captured on the second tick that runs, after only the phases
that precede them in every tick, so none of that scratch is written between a tensor's write and its reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Iterable
from os import PathLike

import numpy as np
import torch

from .bank import NO_UPDATE, BankOp
from .config import StreamConfig
from .control_net import control_buffers, run_controlnets
from .edge import FrameEdge
from .flavours import CAPTURABLE_BACKENDS
from .graph_cache import GraphCache, cuda_capture
from .lora_set import LoraSet, lora_specs, swap_loras
from .pipeline import FramePlan, StreamV2V
from .source import Source, open_networks, pretrained
from .spec import EngineSpec, LoraSpec


class MultiStream:
    """`K` stream slots sharing the networks: `submit(slot, frame)` for each stream with a frame, then `tick()`.

    `slots[i]` is slot i's stream (prompt, seed, reset: `slots[i].update_prompt(...)`, `slots[i].reset()`); the
    LoRA set is the networks', so the MultiStream's (`set_loras`).
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
        self.device, self.dtype = backend.device, backend.dtype
        self._L, self._D = prompt_encoder.length, prompt_encoder.dim
        views = self._allocate()
        self.slots = [StreamV2V(backend, prompt_encoder, scheduler, cfg, views=v) for v in views]
        self._pending: dict[int, tuple[np.ndarray | torch.Tensor, bool]] = {}  # slot -> (frame, skipped)
        self._rows = cfg.stream_batch
        # phase -> graph, for the current size; `resize` parks each size's buffers and graphs while at another
        self.graphs: GraphCache | None = GraphCache(cuda_capture(self.device)) if cuda_graphs else None
        self._parked: dict[tuple[int, int], tuple] = {}

    def _allocate(self) -> list[dict[str, torch.Tensor]]:
        """The batch buffers of the size of `self.cfg`; returns each slot's views of the networks' inputs."""
        K, cfg, layout, device, dtype = self.streams, self.cfg, self.backend.layout, self.device, self.dtype
        Bu, (h, w) = cfg.stream_batch, cfg.spec.latent_hw
        # The networks' inputs, all K streams side by side; slot i owns rows [i*Bu, (i+1)*Bu).
        self.inputs = {
            "sample": torch.zeros(K * Bu, 4, h, w, device=device, dtype=dtype),
            "timestep": torch.zeros(K * Bu, device=device, dtype=torch.long),
            "encoder_hidden_states": torch.zeros(K * Bu, self._L, self._D, device=device, dtype=dtype),
            "bank_valid": torch.zeros(K * Bu, layout.slots, device=device, dtype=dtype),
            **{
                name: torch.zeros(layout.bank_shape(layer, K * Bu), device=device, dtype=dtype)
                for layer in layout.layers
                for name in (f"bank_{p}.{layer.index}" for p in layout.parts(layer))
            },
            # With ControlNets: each slot's control images and scales (its rows), the UNet's residual inputs.
            **control_buffers(layout, cfg.spec, K * Bu, device, dtype),
        }
        self.images = torch.zeros(K, 3, cfg.height, cfg.width, device=device, dtype=dtype)  # encode input
        self.decode_in = torch.zeros(K, 4, h, w, device=device, dtype=dtype)  # the latents leaving each stream
        return [{n: t[i * Bu : (i + 1) * Bu] for n, t in self.inputs.items()} for i in range(K)]

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

    @property
    def sizes(self) -> tuple[tuple[int, int], ...] | None:
        """The frame sizes `resize` takes, (height, width) each (None: any multiple of 8, eager)."""
        return self.backend.sizes

    def set_loras(self, loras: LoraSet, *, reset: bool = False) -> None:
        """Run every slot with this LoRA set from the next tick on: [(file or LoraSpec, scale), ...], [] for none.

        The slots share one set of networks, so a LoRA set is the MultiStream's (per model), never per slot:
        it is set here, not on `slots[i]`. Eager: swapped in place (no recapture), each slot's prompt re-encoded
        with the new text-encoder weights, the banks kept (`reset=True` resets every slot). A bad file raises
        `LoraError` and changes nothing. A build folder with swappable weights swaps as eager does (backends/
        aoti_loras.py, onnx_loras.py); a folder with frozen weights raises `EngineMismatch` with the rebuild command.
        """
        self.cfg = swap_loras(self.backend, self.cfg, lora_specs(loras))
        for slot in self.slots:
            slot.cfg = self._slot_cfg(slot, self.cfg)
            slot.update_prompt(slot.prompt, negative_prompt=slot.negative_prompt)
            if reset:
                slot.reset()

    def resize(self, height: int, width: int) -> None:
        """Every slot at `height` x `width` from the next tick on: one batch is one size, so all slots move together,
        each as `StreamV2V.resize` moves a stream (a new scene: reset; prompts, seeds and the LoRA set stay).

        The backend's networks at that size (a size it was not built for raises `ValueError` with the rebuild
        command, nothing changed) and the batch buffers of that size; each size keeps its buffers and, with
        `cuda_graphs`, its graphs, so resizing back replays them. Frames staged and not yet ticked are dropped
        (they are of the old size). The current size changes nothing (no reset)."""
        if (height, width) == (self.cfg.height, self.cfg.width):
            return
        backend = self.backend.at_size(height, width)  # raises for a size it was not built for: nothing changed yet
        cfg = self.cfg.with_spec(height=height, width=width)
        self._parked[(self.cfg.height, self.cfg.width)] = (self.inputs, self.images, self.decode_in, self.graphs)
        parked = self._parked.pop((height, width), None)
        self.backend, self.cfg = backend, cfg
        if parked is None:
            views = self._allocate()
            if self.graphs is not None:  # a new set of graphs for the new buffers, through the same capture
                self.graphs = GraphCache(self.graphs.capture, capture_after=self.graphs.capture_after)
        else:
            self.inputs, self.images, self.decode_in, self.graphs = parked
            views = [None] * self.streams  # each slot has its rows of these buffers parked too
        self._pending = {}
        for slot, v in zip(self.slots, views):
            slot.switch_size(backend, self._slot_cfg(slot, cfg), v)

    @staticmethod
    def _slot_cfg(slot: StreamV2V, cfg: StreamConfig) -> StreamConfig:
        """`cfg` with what is the slot's own: its ControlNet scales and control image kinds (`update_control`)."""
        own = {"controlnet_scales": slot.cfg.controlnet_scales, "control_kinds": slot.cfg.control_kinds}
        return dataclasses.replace(cfg, **own)

    # -- one tick ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def submit(self, slot: int, frame: np.ndarray | torch.Tensor) -> None:
        """Stage slot `slot`'s next frame (a newer one replaces it until `tick`). A bad frame raises `FrameError`
        and changes nothing."""
        self._admit(slot, frame, self._edge(slot).stage(frame))

    def _edge(self, slot: int) -> FrameEdge:
        if not 0 <= slot < self.streams:
            raise IndexError(f"slot {slot} does not exist: this MultiStream has slots 0..{self.streams - 1}")
        return self.slots[slot].edge

    def _admit(self, slot: int, frame: np.ndarray | torch.Tensor, staged: torch.Tensor) -> None:
        # As StreamV2V.__call__: every frame goes through the slot's edge (the filter sees the first one too).
        admitted = self.slots[slot].edge.admit(frame, staged)
        if not admitted.skip:
            self.images[slot : slot + 1].copy_(admitted.image)
        self._pending[slot] = (frame, admitted.skip)

    @torch.inference_mode()
    def tick(self) -> dict[int, np.ndarray | torch.Tensor]:
        """Run every staged frame in one batched pass; returns each slot's output frame (the frame's type)."""
        pending, self._pending = self._pending, {}
        active = {i: self.slots[i].plan() for i, (_, skipped) in pending.items() if not skipped}
        decoded = self._run(active) if active else None  # [K, 3, H, W]
        out = {}
        for i, (frame, skipped) in pending.items():
            s, image = self.slots[i], None  # None: a skipped frame, the edge gives the last output
            if not skipped:
                s.advance(active[i])
                image = decoded[i : i + 1]
                s.edge.remember(image)
            out[i] = s.edge.emit(image, frame)
        return out

    def __call__(self, frames: dict[int, np.ndarray | torch.Tensor]) -> dict[int, np.ndarray | torch.Tensor]:
        """submit every frame, then tick. Frames are validated first: a bad one raises before anything is staged
        or runs (frames staged earlier with `submit` stay staged)."""
        staged = {i: self._edge(i).stage(f) for i, f in frames.items()}
        for i, f in frames.items():
            self._admit(i, f, staged[i])
        return self.tick()

    def _run(self, active: dict[int, FramePlan]) -> torch.Tensor:
        """One batched pass for the `active` slots (slot -> plan); returns the decoded batch [K, 3, H, W].

        Per-slot work runs as one phase per run of consecutive active slots (`runs`), so a graph serves a run
        whatever the other slots do; the bank updates run after the slots' other work (they touch only the bank:
        the same result as inside `finish`), one phase per run of slots with the same update."""
        phase = self.graphs.run if self.graphs is not None else _eager
        latents = phase(("encode",), lambda: self.backend.encode(self.images))  # [K, 4, h, w]
        priming = [i for i, plan in active.items() if plan.prime]
        for _ in range(self.cfg.steps - 1 if priming else 0):  # rare (a reset with `prime`): not graphed
            for i in priming:
                self.slots[i].begin(latents[i : i + 1], self.images[i : i + 1])
            self._control()
            out = self.backend.unet(self.inputs)
            for i in priming:
                self.slots[i].finish(self._rows_of(out, i), NO_UPDATE)
        slots = runs(active)
        for r in slots:  # with ControlNets, the slots' control image kinds pick the computation: part of the key
            kinds = tuple(self.slots[i].cfg.control_kinds for i in r) if self.cfg.spec.controlnets else ()
            phase(("begin", r, *kinds), lambda r=r: self._begin(latents, r))
        if self.cfg.spec.controlnets:  # every slot's ControlNet inputs are in place: one call per ControlNet
            phase(("control",), self._control)
        out = phase(("unet",), lambda: self.backend.unet(self.inputs))
        for r in slots:
            phase(("finish", r), lambda r=r: self._finish(out, r))
        updates = {plan.bank for plan in active.values()} - {NO_UPDATE}
        for op in sorted(updates):
            for r in runs(i for i, plan in active.items() if plan.bank == op):
                phase(("bank", op, r), lambda op=op, r=r: self._update(out, op, r))
        return phase(("decode",), self._decode)

    def _control(self) -> None:
        n = len(self.cfg.spec.controlnets)
        conds = [self.inputs[f"controlnet_cond.{j}"] for j in range(n)]
        scales = [self.inputs[f"conditioning_scale.{j}"] for j in range(n)]
        residuals = {name: self.inputs[name] for name in self.backend.layout.residual_names()}
        run_controlnets(self.backend, self.inputs, conds, scales, residuals)

    def _decode(self) -> torch.Tensor:
        decoded = self.backend.decode(self.decode_in)  # [K, 3, H, W]
        for i, slot in enumerate(self.slots):  # each slot's "previous" control image (an idle slot's row decodes
            if slot.previous is not None:  # its last latent again: its last output)
                slot.previous.copy_(decoded[i : i + 1])
        return decoded

    def _begin(self, latents: torch.Tensor, slots: range) -> None:
        for i in slots:  # each stream's encoded frame enters its slot 0 (with its control images, if any)
            self.slots[i].begin(latents[i : i + 1], self.images[i : i + 1])

    def _finish(self, out: dict[str, torch.Tensor], slots: range) -> None:
        for i in slots:  # the latent leaving each stream -> its row of the decode batch
            self.decode_in[i : i + 1].copy_(self.slots[i].finish(self._rows_of(out, i), NO_UPDATE))

    def _update(self, out: dict[str, torch.Tensor], op: BankOp, slots: range) -> None:
        for i in slots:
            self.slots[i].bank.apply(op, self._rows_of(out, i))

    def _rows_of(self, out: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
        r = self._rows
        return {name: t[i * r : (i + 1) * r] for name, t in out.items()}


def runs(slots: Iterable[int]) -> list[range]:
    """Maximal runs of consecutive slot indices: [3, 0, 1, 5] -> [range(0, 2), range(3, 4), range(5, 6)]."""
    found: list[range] = []
    for i in sorted(slots):
        if found and found[-1].stop == i:
            found[-1] = range(found[-1].start, i + 1)
        else:
            found.append(range(i, i + 1))
    return found


def _eager(_key: Hashable, fn: Callable[[], object]) -> object:
    return fn()
