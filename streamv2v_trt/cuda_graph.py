"""CUDA graphs for a stream: each kind of frame is captured once and replayed (docs/RUNTIME.md, "CUDA graphs").

A frame is preprocess -> VAE encode -> noise -> UNet -> scheduler step -> bank update -> VAE decode ->
postprocess. What kind of frame comes next is the stream's `plan()` (priming or not, and the bank's update:
none, a store into slot s, a DyMe merge), decided on the host before any GPU work. `CudaGraphStream` only maps
plans to graphs (`GraphCache`, graph_cache.py: each plan is captured the second time it is seen, the first run is
eager and doubles as the warm-up capture needs); every frame, replayed or not, ends with the stream's own
`advance(plan)`. Frames come in and go out through the stream's `FrameEdge` (edge.py). A DyMe stream settles on
two graphs: steady and merge (plus the first frame after a reset).

Everything a graph reads lives in fixed buffers written in place: the input frame (`edge.frame_in`), the
stream's latents, noise and prompt embeddings, the bank, the DyMe permutation index, the eager weights
(`set_loras` writes them in place, models/lora_weights.py), the ControlNet scales. So `update_prompt`,
`update_seed`, `reset`, `set_loras` and a ControlNet scale take effect on the next replay without recapture (a
control image kind is another graph). `resize` switches to the graphs of the new size
(each size has its own buffers and graphs; a size seen before replays its graphs). Backends whose calls cannot be
captured (onnxruntime synchronises inside `run`) are refused.
"""

from __future__ import annotations

import numpy as np
import torch

from .blending import PromptBlend, SeedBlend
from .config import StreamConfig
from .flavours import CAPTURABLE_BACKENDS
from .frames import image_to_uint8, uint8_to_image
from .graph_cache import GraphCache, cuda_capture
from .lora_set import LoraSet
from .pipeline import FramePlan, StreamV2V


class CudaGraphStream:
    """`out = graphed(frame)`: the same frames as `stream(frame)`, replayed from CUDA graphs. A `Stream`.

    Takes uint8 HxWx3 frames (numpy or torch, host or device) at the stream's resolution. A host frame gives a
    host frame back (one host sync per frame: the caller asked for host pixels; the array stays valid after the
    next call); a device frame gives a device tensor (no sync; valid until the next call).
    """

    def __init__(self, stream: StreamV2V, *, capture_after: int = 1) -> None:
        if stream.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a stream on a CUDA device, this one runs on {stream.device}")
        if not stream.backend.name.info.capturable:
            raise ValueError(
                f"the {stream.backend.name.value} backend cannot be captured into a CUDA graph (its calls "
                f"synchronise); use one of {', '.join(CAPTURABLE_BACKENDS)}, or call the stream directly"
            )
        if stream.similar_filter is not None:
            raise ValueError(
                "the similar-frame filter decides on the host from the frame's pixels (a sync), which a CUDA graph "
                "cannot replay; disable it (StreamConfig.similar_filter) or call the stream directly"
            )
        self.stream = stream
        self.cuda_stream = torch.cuda.Stream(stream.device)
        # plan -> (graph, uint8 [H, W, 3] output) for the current size; graphs replay one at a time on this
        # stream: one memory pool. One cache per size (`resize`): a size's graphs read that size's buffers.
        self.graphs = GraphCache(cuda_capture(stream.device, self.cuda_stream), capture_after=capture_after)
        self.graphs_by_size = {(stream.cfg.height, stream.cfg.width): self.graphs}

    # The Stream interface: the wrapped stream's config and prompt, its updates (no recapture needed).
    @property
    def cfg(self) -> StreamConfig:
        return self.stream.cfg

    @property
    def prompt(self) -> PromptBlend:
        return self.stream.prompt

    @property
    def device(self) -> torch.device:
        return self.stream.device

    @property
    def sizes(self) -> tuple[tuple[int, int], ...] | None:
        return self.stream.sizes

    def update_prompt(self, prompt: PromptBlend, negative_prompt: str | None = None) -> None:
        self.stream.update_prompt(prompt, negative_prompt=negative_prompt)

    def update_seed(self, seed: SeedBlend) -> None:
        self.stream.update_seed(seed)

    def update_control(self, scales: tuple[float, ...] | None = None, kinds: tuple[str, ...] | None = None) -> None:
        # Scales: written into the buffers the graphs read. Kinds: the next frame runs (or captures) their graph.
        self.stream.update_control(scales, kinds)

    def set_control_frame(self, index: int, frame: np.ndarray | torch.Tensor) -> None:
        # Uploaded into the buffer the graphs read (ControlImages.frame), before the replay, as the input frame is.
        self.stream.set_control_frame(index, frame)

    def set_loras(self, loras: LoraSet, *, reset: bool = False) -> None:
        # In place into the weights the graphs read (queued on the caller's stream, which the next frame waits
        # for, after the last frame's work): the next replay runs the new set, no recapture.
        self.stream.set_loras(loras, reset=reset)

    def reset(self) -> None:
        self.stream.reset()

    def resize(self, height: int, width: int) -> None:
        # The stream keeps each size's buffers (`StreamV2V.resize`), so each size keeps its graphs: a size seen
        # before replays the graphs captured on its buffers, a new one captures its own (same capture, one pool).
        self.stream.resize(height, width)  # raises for a size the backend lacks: nothing changed
        graphs = self.graphs_by_size.get((height, width))
        if graphs is None:
            graphs = GraphCache(self.graphs.capture, capture_after=self.graphs.capture_after)
            self.graphs_by_size[(height, width)] = graphs
        self.graphs = graphs

    def _frame(self, plan: FramePlan) -> torch.Tensor:
        """The device work of one frame, from the fixed input buffer to a uint8 [H, W, 3] device frame."""
        s = self.stream
        return image_to_uint8(s.render(plan, uint8_to_image(s.edge.frame_in, s.dtype)))

    @torch.inference_mode()
    def __call__(self, frame: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        s, edge = self.stream, self.stream.edge
        # Work queued on the caller's stream (a prompt update, a frame upload) happens before this frame.
        self.cuda_stream.wait_stream(torch.cuda.current_stream(s.device))
        with torch.cuda.stream(self.cuda_stream):
            edge.upload(frame)  # a bad frame raises FrameError here, before anything changed
            plan = s.plan()
            # A control image kind is another computation: with ControlNets the kinds are part of the key.
            key = (plan, s.cfg.control_kinds) if s.cfg.control_kinds else plan
            out = self.graphs.run(key, lambda: self._frame(plan))
            s.advance(plan)
            result = edge.emit(out, frame)
        torch.cuda.current_stream(s.device).wait_stream(self.cuda_stream)
        return result
