"""CUDA graphs for a stream: each kind of frame is captured once and replayed (DESIGN.md §2).

A frame is preprocess -> VAE encode -> noise -> UNet -> scheduler step -> VAE decode -> postprocess, and on
every `interval`-th frame the bank update. The kind of frame, decided on the host before any GPU work, is its
`FramePlan`: a steady frame; the first frame after a reset (priming, the bank's first store); a DyMe merge; a
FIFO store into slot s. Each plan gets its own graph the second time it is seen (the first run is eager and
doubles as the warm-up that capture needs), so a DyMe stream settles on two graphs: steady and merge.

Everything a graph reads lives in fixed buffers that are written in place: the input frame (`frame_in`), the
stream's latents, noise and prompt embeddings, the bank, the DyMe permutation index. So `update_prompt`,
`update_seed` and `reset` take effect on the next replay without recapture.

Capture runs the frame's Python once without running its kernels, so the host counters it advances
(`frame_id`, `bank.stored`) are put back afterwards and advanced on every replay by the same amounts.
Backends whose calls cannot be captured (onnxruntime synchronises inside `run`) are refused.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import NamedTuple

import numpy as np
import torch

from .config import BankKind
from .frames import FrameError
from .pipeline import StreamV2V

log = logging.getLogger(__name__)

CAPTURABLE_BACKENDS = ("eager", "tensorrt")


class FramePlan(NamedTuple):
    """What the next frame runs besides the steady work; decided on the host, it picks the graph."""

    first: bool  # frame_id == 0: priming (when configured) and the bank's first store
    bank: str  # "none", "store" (copy into `slot`) or "merge" (DyMe)
    slot: int = 0


def frame_plan(stream: StreamV2V) -> FramePlan:
    """Mirrors `StreamV2V._stream_step` and `FeatureBank.update`: which bank update the next frame runs."""
    bank = stream.bank
    first = stream.frame_id == 0
    if stream.frame_id % stream.cfg.bank.interval != 0:
        return FramePlan(first, "none")
    if bank.cfg.kind is BankKind.FIFO or bank.stored == 0:
        return FramePlan(first, "store", bank.stored % bank.cfg.slots)
    return FramePlan(first, "merge")


class _Captured(NamedTuple):
    graph: torch.cuda.CUDAGraph
    out: torch.Tensor  # [H, W, 3] uint8 on the device, written by every replay
    frame_step: int  # how much the frame advanced stream.frame_id
    stored_step: int  # ... and stream.bank.stored


class CudaGraphStream:
    """`out = graphed(frame)`: the same frames as `stream(frame)`, replayed from CUDA graphs.

    Takes uint8 HxWx3 frames (numpy or torch, host or device) at the stream's resolution. A host frame gives a
    host frame back (one host sync per frame: the caller asked for host pixels); a device frame gives a device
    tensor (no sync; valid until the next call). `update_prompt`, `update_seed`, `reset` go to `stream`.
    """

    def __init__(self, stream: StreamV2V, *, capture_after: int = 1) -> None:
        if stream.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a stream on a CUDA device, this one runs on {stream.device}")
        if stream.backend.name not in CAPTURABLE_BACKENDS:
            raise ValueError(
                f"the {stream.backend.name} backend cannot be captured into a CUDA graph (its calls synchronise); "
                f"use one of {CAPTURABLE_BACKENDS}, or call the stream directly"
            )
        if stream.similar_filter is not None:
            raise ValueError(
                "the similar-frame filter decides on the host from the frame's pixels (a sync), which a CUDA graph "
                "cannot replay; disable it (StreamConfig.similar_filter) or call the stream directly"
            )
        if capture_after < 1:
            raise ValueError(f"capture_after must be >= 1 (eager runs before capture, as warm-up), got {capture_after}")
        self.stream = stream
        self.capture_after = capture_after
        cfg = stream.cfg
        self.frame_in = torch.zeros(cfg.height, cfg.width, 3, dtype=torch.uint8, device=stream.device)
        self._host_in = torch.empty(cfg.height, cfg.width, 3, dtype=torch.uint8, pin_memory=True)
        self._host_out = torch.empty(cfg.height, cfg.width, 3, dtype=torch.uint8, pin_memory=True)
        self.cuda_stream = torch.cuda.Stream(stream.device)
        self.pool = torch.cuda.graph_pool_handle()  # graphs replay one at a time on one stream: they share memory
        self.graphs: dict[FramePlan, _Captured] = {}
        self.seen: Counter[FramePlan] = Counter()

    def update_prompt(self, *args, **kwargs) -> None:
        self.stream.update_prompt(*args, **kwargs)

    def update_seed(self, seed) -> None:
        self.stream.update_seed(seed)

    def reset(self) -> None:
        self.stream.reset()

    def _load(self, frame: np.ndarray | torch.Tensor) -> None:
        cfg = self.stream.cfg
        shape = (cfg.height, cfg.width, 3)
        t = torch.from_numpy(np.ascontiguousarray(frame)) if isinstance(frame, np.ndarray) else frame
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != torch.uint8:
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(frame).__name__
            raise FrameError(f"graphed frames must be uint8 {shape} (HxWx3 RGB), got {got}; resize/convert first")
        if t.device.type == "cpu":
            self._host_in.copy_(t)  # pinned, so the upload below is a true async copy
            t = self._host_in
        self.frame_in.copy_(t, non_blocking=True)

    def _capture(self, plan: FramePlan) -> _Captured:
        s = self.stream
        frame_id, stored = s.frame_id, s.bank.stored
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.cuda_stream):
            out = s(self.frame_in)
        captured = _Captured(graph, out, s.frame_id - frame_id, s.bank.stored - stored)
        s.frame_id, s.bank.stored = frame_id, stored  # capture ran no kernels: the frame itself is the replay
        log.info("captured a CUDA graph for %s (%d graphs)", plan, len(self.graphs) + 1)
        return captured

    @torch.inference_mode()
    def __call__(self, frame: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        s = self.stream
        # Work queued on the caller's stream (a prompt update, a frame upload) happens before this frame.
        self.cuda_stream.wait_stream(torch.cuda.current_stream(s.device))
        with torch.cuda.stream(self.cuda_stream):
            self._load(frame)
            plan = frame_plan(s)
            captured = self.graphs.get(plan)
            if captured is None and self.seen[plan] >= self.capture_after:
                captured = self.graphs[plan] = self._capture(plan)
            if captured is None:
                self.seen[plan] += 1
                out = s(self.frame_in)
            else:
                captured.graph.replay()
                s.frame_id += captured.frame_step
                s.bank.stored += captured.stored_step
                out = captured.out
            if isinstance(frame, np.ndarray) or frame.device.type == "cpu":  # the result goes where the frame was
                self._host_out.copy_(out, non_blocking=True)
                self.cuda_stream.synchronize()  # the one host sync of a frame: host pixels were asked for
                host = self._host_out.clone()
                return host.numpy() if isinstance(frame, np.ndarray) else host
        torch.cuda.current_stream(s.device).wait_stream(self.cuda_stream)
        return out
