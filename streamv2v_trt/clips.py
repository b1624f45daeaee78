"""Generated clips with known motion: a pan across a real photo (scikit-image), or a moving pattern of any length."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _photo(name: str) -> np.ndarray | None:
    try:
        from skimage import data
    except ImportError:
        return None
    return getattr(data, name)()


def _synthetic(size: int = 512) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([np.sin(8 * x + 3 * y), np.cos(5 * y - 2 * x), np.sin(6 * (x + y))], -1)
    return ((img * 0.5 + 0.5) * 255).astype(np.uint8)


def pan_clip(frames: int, height: int, width: int, image: str = "astronaut", step: int = 4) -> list[np.ndarray]:
    """`frames` uint8 HxWx3 frames panning right by `step` source pixels per frame over a scikit-image photo
    (a synthetic pattern if scikit-image is missing), each window resized to height x width."""
    src = _photo(image)
    src = _synthetic() if src is None else src
    if src.ndim == 2:
        src = np.repeat(src[..., None], 3, axis=-1)
    h, w = src.shape[:2]
    win = min(h, w - step * (frames - 1))
    if win < 16:
        raise ValueError(f"{frames} frames at step {step} do not fit in the {w}x{h} source image; use fewer frames")
    out = []
    for i in range(frames):
        crop = torch.from_numpy(np.ascontiguousarray(src[:win, i * step : i * step + win, :3])).permute(2, 0, 1)
        crop = F.interpolate(crop[None].float(), size=(height, width), mode="bilinear", antialias=True)[0]
        out.append(crop.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    return out


def zoom_clip(frames: int, height: int, width: int, image: str = "astronaut", rate: float = 0.01) -> list[np.ndarray]:
    """`frames` uint8 HxWx3 frames zooming into the center of a scikit-image photo (a synthetic pattern if
    scikit-image is missing): the square window shrinks by `rate` of its side per frame, resized to height x width."""
    src = _photo(image)
    src = _synthetic() if src is None else src
    if src.ndim == 2:
        src = np.repeat(src[..., None], 3, axis=-1)
    h, w = src.shape[:2]
    side = min(h, w)
    if side * (1 - rate) ** (frames - 1) < 16:
        raise ValueError(f"{frames} frames at rate {rate} zoom below 16 source pixels; use fewer frames")
    out = []
    for i in range(frames):
        win = round(side * (1 - rate) ** i)
        y0, x0 = (h - win) // 2, (w - win) // 2
        crop = torch.from_numpy(np.ascontiguousarray(src[y0 : y0 + win, x0 : x0 + win, :3])).permute(2, 0, 1)
        crop = F.interpolate(crop[None].float(), size=(height, width), mode="bilinear", antialias=True)[0]
        out.append(crop.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    return out


def pattern_clip(frames: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """`frames` uint8 HxWx3 frames of a drifting sine pattern with a little noise: consecutive frames are similar,
    as in a camera stream, and any number of frames fits (what benchmarks loop over)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for i in range(frames):
        phase = i * 0.15
        r = 127 + 100 * np.sin(x / 9 + phase)
        g = 127 + 100 * np.sin(y / 7 - phase)
        b = 127 + 100 * np.sin((x + y) / 11 + 2 * phase)
        img = np.stack([r, g, b], -1) + rng.normal(0, 4, (height, width, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out
