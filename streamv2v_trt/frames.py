"""Frames in and out: uint8 HxWx3 (numpy or torch) <-> [1, 3, H, W] in [-1, 1] on the model's device."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class FrameError(ValueError):
    """A frame the stream cannot take; the stream state is untouched and the next frame can be sent."""


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
    if t.dtype == torch.uint8:
        x = t.to(device=device, dtype=torch.float32) / 255.0
    elif t.dtype.is_floating_point:
        x = t.to(device=device, dtype=torch.float32)
        if not torch.isfinite(x).all():  # a host sync, but only for float frames, which need the check
            raise FrameError("frame contains NaN or infinite values")
        if x.min() < 0 or x.max() > 1:
            raise FrameError(f"float frame has values in [{float(x.min()):.3g}, {float(x.max()):.3g}]; expected [0, 1]")
    else:
        raise FrameError(f"frame dtype is {t.dtype}; expected uint8 (0-255) or float (0-1)")
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
    out = ((image[0].float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
    return out.cpu().numpy() if isinstance(like, np.ndarray) else out
