"""FrameEdge: where one stream's frames come in and go out (docs/RUNTIME.md, "A frame").

Every stream-like object meets its frames here, the same way: `StreamV2V.__call__`, `CudaGraphStream.__call__`
and each slot of a `MultiStream` (`submit` / `tick`). Each `StreamV2V` owns one edge (`stream.edge`):

    admit(frame)        validate (FrameError: nothing has changed) and stage it on the device, [1, 3, H, W] in
                        [-1, 1] (on CUDA, uint8 frames of the stream's size through one pinned buffer); then the
                        similar-frame filter, when on, says whether it is a near-repeat to skip
    remember(image)     the decoded output of a processed frame, kept for the skipped frames after it
    emit(image, frame)  the output in the frame's type: host frames downloaded through the pinned buffer (the
                        frame's one sync), device frames as a device tensor; a skipped frame gets the remembered one

A CUDA graph reads its frame from a fixed buffer: `upload(frame)` puts a uint8 frame of the stream's size into
`frame_in` and nothing else (the graph converts it itself). The edge owns its staging buffers, the filter and the
last output; the wrappers call these methods and write none of its fields.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .config import StreamConfig
from .frames import FrameError, HostStaging, frame_to_tensor, image_to_uint8, is_host, tensor_to_frame, uint8_to_image
from .similar_filter import SimilarFrameFilter


class Admitted(NamedTuple):
    """A frame the stream took."""

    image: torch.Tensor  # [1, 3, H, W] in [-1, 1] on the stream's device
    skip: bool  # a near-repeat: run nothing, `emit(None, frame)` returns the last output


class FrameEdge:
    """One stream's frames in and out: `admit`, `remember`, `emit` (module docstring)."""

    def __init__(self, cfg: StreamConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.height, self.width, self.resize = cfg.height, cfg.width, cfg.resize
        self.device, self.dtype = device, dtype
        # Pinned buffers make uploads and downloads true asynchronous copies (CUDA only; on the CPU a frame is
        # already where the networks run).
        self.staging = HostStaging(cfg.height, cfg.width, device) if device.type == "cuda" else None
        self.similar_filter = SimilarFrameFilter(cfg.similar_filter) if cfg.similar_filter.enabled else None
        # Decoded output of the last processed frame, which a skipped frame returns. A copy: an engine's or a graph's
        # output buffer is overwritten by the next decode (of this stream or of another sharing the networks).
        self._last: torch.Tensor | None = None

    @property
    def frame_in(self) -> torch.Tensor:
        """The fixed device buffer [H, W, 3] uint8 that `upload` writes (what a CUDA graph reads)."""
        if self.staging is None:
            raise ValueError(f"a fixed frame buffer needs a CUDA device, this stream runs on {self.device}")
        return self.staging.frame_in

    def stage(self, frame: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Validate one frame and put it on the device: [1, 3, H, W] in [-1, 1]. Raises `FrameError`; changes
        nothing but the staging buffers (the filter has not seen the frame: `admit(frame, staged)` does that)."""
        if self.staging is not None and self.staging.accepts(frame):
            return uint8_to_image(self.staging.upload(frame), self.dtype)
        return frame_to_tensor(frame, self.height, self.width, resize=self.resize, device=self.device, dtype=self.dtype)

    def upload(self, frame: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A uint8 HxWx3 frame of the stream's size (host or device) into `frame_in`, asynchronously; anything
        else raises `FrameError`, since a graph replays one fixed conversion with no resize or checks."""
        buffer = self.frame_in  # raises ValueError on a CPU stream
        if not self.staging.accepts(frame):
            got = f"{tuple(frame.shape)} {frame.dtype}" if hasattr(frame, "shape") else type(frame).__name__
            raise FrameError(
                f"graphed frames must be uint8 {self.staging.shape} (HxWx3 RGB), got {got}; resize/convert first"
            )
        self.staging.upload(frame)
        return buffer

    def admit(self, frame: np.ndarray | torch.Tensor, staged: torch.Tensor | None = None) -> Admitted:
        """Take one frame: `stage` it (unless `staged` is what `stage(frame)` returned, for a caller that checks
        several frames before admitting any), then ask the similar-frame filter (when on) whether to skip it."""
        image = self.stage(frame) if staged is None else staged
        skip = self.similar_filter is not None and self.similar_filter.should_skip(image)
        return Admitted(image, skip)

    def remember(self, image: torch.Tensor) -> None:
        """Keep a processed frame's decoded output [1, 3, H, W] for skipped frames (only when the filter is on)."""
        if self.similar_filter is None:
            return
        if self._last is None:
            self._last = torch.empty_like(image)  # once per stream
        self._last.copy_(image)

    def emit(self, image: torch.Tensor | None, frame: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """The output for `frame`, in its type (numpy or torch; torch on its device), uint8 HxWx3.

        `image`: the decoded output [1, 3, H, W] in [-1, 1]; or a uint8 [H, W, 3] device frame a CUDA graph
        already converted (a device `frame` gets that buffer itself: valid until the next frame); or None for a
        skipped frame, which gets the remembered output. Otherwise a torch result is a fresh tensor, never a buffer
        the networks or the next tick overwrite."""
        if image is None:
            image = self._last
        if self.staging is not None and is_host(frame):
            pixels = image if image.dtype == torch.uint8 else image_to_uint8(image)
            return self.staging.download(pixels, frame)
        if image.dtype == torch.uint8:
            return image
        return tensor_to_frame(image, frame)  # a fresh uint8 tensor (numpy for a numpy frame)

    def reset(self) -> None:
        """Forget the frames seen: the filter's reference (the next frame is processed). The last output stays
        until a processed frame replaces it; a frame after a reset is never skipped."""
        if self.similar_filter is not None:
            self.similar_filter.reset()
