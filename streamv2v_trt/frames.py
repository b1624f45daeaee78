"""Frames in and out: uint8 HxWx3 (numpy or torch) <-> [1, 3, H, W] in [-1, 1] on the model's device.

`HostStaging` moves host frames through one pinned buffer each way, so uploads and downloads are true
asynchronous copies and the work between them stays on the device (and capturable in a CUDA graph).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class FrameError(ValueError):
    """A frame the stream cannot take; the stream state is untouched and the next frame can be sent."""


def as_tensor(frame: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The frame as a torch tensor of shape HxWx3, without copying or converting its values."""
    if isinstance(frame, np.ndarray):
        if frame.dtype == object:
            raise FrameError("frame is a numpy object array; expected uint8 HxWx3 (RGB)")
        t = torch.from_numpy(np.ascontiguousarray(frame))
    elif isinstance(frame, torch.Tensor):
        t = frame
    else:
        raise FrameError(
            f"frame is a {type(frame).__name__}; expected a numpy array or torch tensor, uint8 HxWx3 (RGB)"
        )
    if t.ndim != 3 or t.shape[-1] != 3:
        raise FrameError(
            f"frame has shape {tuple(t.shape)}; expected HxWx3 (RGB). Convert grayscale or RGBA frames to RGB first."
        )
    if t.dtype != torch.uint8 and not t.dtype.is_floating_point:
        raise FrameError(f"frame dtype is {t.dtype}; expected uint8 (0-255) or float (0-1)")
    return t


def uint8_to_image(frame: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [H, W, 3] -> [1, 3, H, W] in [-1, 1]: device arithmetic only (no check, no host sync)."""
    return (frame.permute(2, 0, 1).unsqueeze(0).to(torch.float32) / 255.0 * 2 - 1).to(dtype)


def image_to_uint8(image: torch.Tensor) -> torch.Tensor:
    """[1, 3, H, W] in [-1, 1] -> uint8 [H, W, 3] on the same device."""
    return ((image[0].float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)


def frame_to_tensor(
    frame: np.ndarray | torch.Tensor,
    height: int,
    width: int,
    *,
    resize: bool,
    device: torch.device | str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Validate and convert one frame. uint8 in [0, 255], or float in [0, 1]; HxWx3 (RGB)."""
    t = as_tensor(frame)
    if t.dtype == torch.uint8 and tuple(t.shape[:2]) == (height, width):
        return uint8_to_image(t.to(device), dtype)  # the same arithmetic a CUDA graph replays
    if t.dtype == torch.uint8:
        x = t.to(device=device, dtype=torch.float32) / 255.0
    else:
        x = t.to(device=device, dtype=torch.float32)
        if not torch.isfinite(x).all():  # a host sync, but only for float frames, which need the check
            raise FrameError("frame contains NaN or infinite values")
        if x.min() < 0 or x.max() > 1:
            raise FrameError(f"float frame has values in [{float(x.min()):.3g}, {float(x.max()):.3g}]; expected [0, 1]")
    x = x.permute(2, 0, 1).unsqueeze(0)  # [1, 3, H, W]
    if x.shape[-2:] != (height, width):
        if not resize:
            raise FrameError(
                f"frame is {x.shape[-2]}x{x.shape[-1]} (HxW); the stream runs at {height}x{width}. "
                "Resize it, or create the stream with resize=True."
            )
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return (x * 2 - 1).to(dtype)


def tensor_to_frame(image: torch.Tensor, like: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """[1, 3, H, W] in [-1, 1] -> uint8 HxWx3, numpy if the input frame was numpy."""
    out = image_to_uint8(image)
    return out.cpu().numpy() if isinstance(like, np.ndarray) else out


def is_host(frame: np.ndarray | torch.Tensor) -> bool:
    return isinstance(frame, np.ndarray) or frame.device.type == "cpu"


class HostStaging:
    """One pinned host buffer for frames in and one for frames out, and the device input buffer `frame_in`.

    `upload` copies a host uint8 frame into pinned memory and from there into `frame_in` without blocking;
    `download` copies a device frame out through pinned memory and hands back a fresh array (valid after the
    next call), with the one host sync a host frame needs.
    """

    def __init__(self, height: int, width: int, device: torch.device) -> None:
        self.shape = (height, width, 3)
        self.frame_in = torch.zeros(self.shape, dtype=torch.uint8, device=device)
        self._host_in = torch.empty(self.shape, dtype=torch.uint8, pin_memory=True)
        self._host_out = torch.empty(self.shape, dtype=torch.uint8, pin_memory=True)

    def accepts(self, frame: np.ndarray | torch.Tensor) -> bool:
        """A host or device uint8 frame of the stream's size (anything else takes the general path)."""
        arrays = (np.ndarray, torch.Tensor)  # anything else goes to frame_to_tensor, which says what it expects
        return isinstance(frame, arrays) and tuple(frame.shape) == self.shape and frame.dtype in (np.uint8, torch.uint8)

    def upload(self, frame: np.ndarray | torch.Tensor) -> torch.Tensor:
        t = as_tensor(frame)
        if t.device.type == "cpu":
            self._host_in.copy_(t)
            t = self._host_in  # pinned: the copy below does not block the host
        return self.frame_in.copy_(t, non_blocking=True)

    def download(self, out: torch.Tensor, like: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """`out` (device uint8 [H, W, 3]) as a host frame of `like`'s type; a device `like` gets `out` itself."""
        if not is_host(like):
            return out
        self._host_out.copy_(out, non_blocking=True)
        torch.cuda.current_stream(out.device).synchronize()  # the host asked for pixels: the frame's one sync
        host = self._host_out.clone()  # the pinned buffer is reused by the next frame
        return host.numpy() if isinstance(like, np.ndarray) else host
