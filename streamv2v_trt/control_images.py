"""Control images for ControlNet, made on the device per frame: Canny edges, the frame itself, the previous output,
or frames the user gives.

A control image is what diffusers' `ControlNetModel` takes as `controlnet_cond`: [1, 3, H, W] in [0, 1].
`ControlImages.__call__` writes it into one buffer it owns, with device arithmetic only (no host sync, no host data),
so the stream can capture it into its CUDA graph with the rest of the frame.

`canny` follows OpenCV's `cv2.Canny` (3x3 Sobel, integer gradients, 4-direction non-maximum suppression with
OpenCV's tan(22.5 deg) fixed-point test, thresholds compared with `>`), which is what ControlNet's canny models were
trained on: the ControlNet annotator and the diffusers examples call `cv2.Canny(rgb_uint8, 100, 200)` on the raw
RGB frame. `cv2.Canny` itself does not blur, and on a colour image it takes, per pixel, the gradient of the channel
with the largest magnitude (not of a grayscale image); both are the defaults here. Grayscale (OpenCV's fixed-point
RGB2GRAY weights) and a Gaussian pre-blur are options. One difference is by design: hysteresis runs a fixed number
of 3x3 dilations constrained to weak edges (`HYSTERESIS_STEPS`), so a CUDA graph replays it; OpenCV follows weak
chains to any length. A weak chain longer than that many pixels from its strong end is cut (measured on photos in
tests/test_control_images.py). On CUDA the non-maximum suppression and thresholds run as one Triton kernel
(`streamv2v_trt.kernels.canny_triton`, where triton imports), the same arithmetic as `canny_candidates` here.
"""

from __future__ import annotations

import enum
import math

import numpy as np
import torch
import torch.nn.functional as F

from .frames import FrameError, as_tensor

try:  # the optional Triton kernel of the NMS + threshold step, used on CUDA tensors; else the torch version
    import triton  # noqa: F401
except ImportError:
    canny_triton = None
else:
    from .kernels import canny_triton

# 3x3 dilations per hysteresis: a weak pixel joins if a strong pixel is at most this many 8-connected weak steps
# away. On the skimage photos at 512x512, 32 leaves <= 0.11% of pixels different from OpenCV's unbounded search.
HYSTERESIS_STEPS = 32

# OpenCV's non-maximum suppression (imgproc/src/canny.cpp): tan(22.5 deg) in 15-bit fixed point. A gradient is
# horizontal if |dy| < tan22 |dx|, vertical if |dy| > tan67 |dx| = (tan22 + 2) |dx|, else diagonal. Integer
# arithmetic so the direction ties fall as OpenCV's do. kernels/canny_triton.py repeats them (a test checks).
_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _SHIFT) + 0.5)

# RGB -> gray in 16-bit fixed point (0.299, 0.587, 0.114); cv2.cvtColor rounds ~0.1% of pixels one level apart.
_GRAY = (19595, 38470, 7471)
_GRAY_SHIFT = 16


class ControlKind(str, enum.Enum):
    CANNY = "canny"  # edges of the input frame
    FRAME = "frame"  # the input frame itself (tile / identity ControlNets)
    PREVIOUS = "previous"  # the previous output frame (TemporalNet-style): zeros before the first output
    VIDEO = "video"  # frames the user gives (`ControlImages.set_frame`), e.g. a depth or pose video


def _to_gray(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] integer-valued float in 0..255 -> [N, 1, H, W], as cv2.cvtColor(RGB2GRAY) rounds it."""
    r, g, b = x.to(torch.int32).unbind(1)
    gray = (r * _GRAY[0] + g * _GRAY[1] + b * _GRAY[2] + (1 << (_GRAY_SHIFT - 1))) >> _GRAY_SHIFT
    return gray.unsqueeze(1).to(torch.float32)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (reflect-101 border, as OpenCV's default), rounded back to integers so the Sobel
    gradients stay integers. Kernel size as cv2.GaussianBlur picks it for uint8 and sigma alone (round(6 sigma + 1),
    odd); OpenCV's fixed-point taps round a few pixels one level apart."""
    radius = max(1, (round(6 * sigma + 1) | 1) // 2)
    taps = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-radius, radius + 1)]
    taps = [t / sum(taps) for t in taps]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    w = x.shape[-1] - 2 * radius
    x = sum(t * x[..., :, i : i + w] for i, t in enumerate(taps))  # python-float taps: no host tensor
    h = x.shape[-2] - 2 * radius
    x = sum(t * x[..., i : i + h, :] for i, t in enumerate(taps))
    return x.round()


def _sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """3x3 Sobel on [N, C, H, W] with a replicated border (as cv2.Canny): int32 dx, dy."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")  # [N, C, H+2, W+2]
    dx = p[..., :, 2:] - p[..., :, :-2]  # [N, C, H+2, W]
    dy = p[..., 2:, :] - p[..., :-2, :]  # [N, C, H, W+2]
    dx = dx[..., :-2, :] + 2 * dx[..., 1:-1, :] + dx[..., 2:, :]
    dy = dy[..., :, :-2] + 2 * dy[..., :, 1:-1] + dy[..., :, 2:]
    return dx.to(torch.int32), dy.to(torch.int32)  # exact: |d| <= 4 * 255 in float32


def _thresholds(low: float, high: float, l2: bool) -> tuple[int, int]:
    """cv2.Canny's integer thresholds: swapped if low > high; squared for the L2 magnitude; floored."""
    low, high = min(low, high), max(low, high)
    if l2:
        low, high = min(32767.0, low), min(32767.0, high)
        low, high = low * low if low > 0 else low, high * high if high > 0 else high
    return math.floor(low), math.floor(high)


def canny_candidates(
    dx: torch.Tensor, dy: torch.Tensor, mag: torch.Tensor, low: int, high: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-maximum suppression and double threshold, as cv2.Canny: int32 [N, 1, H, W] gradients and magnitude ->
    (weak, strong) bool maps. Weak: a local maximum across the gradient above `low`; strong: also above `high`."""
    p = F.pad(mag, (1, 1, 1, 1))  # [N, 1, H+2, W+2]; zero magnitude outside the image
    h, w = mag.shape[-2:]

    def at(dy_: int, dx_: int) -> torch.Tensor:  # the neighbour at (dy_, dx_)
        return p[..., 1 + dy_ : 1 + dy_ + h, 1 + dx_ : 1 + dx_ + w]

    ax = dx.abs()
    ay = dy.abs() << _SHIFT
    tg22x = ax * _TG22
    horizontal = ay < tg22x
    vertical = ay > tg22x + (ax << (_SHIFT + 1))
    diagonal = ~horizontal & ~vertical
    same_sign = (dx ^ dy) >= 0  # gradient along (1, 1): compare up-left and down-right
    # OpenCV's comparisons: strict towards the previous pixel, >= towards the next on the axes; strict on diagonals.
    peak = (
        (horizontal & (mag > at(0, -1)) & (mag >= at(0, 1)))
        | (vertical & (mag > at(-1, 0)) & (mag >= at(1, 0)))
        | (diagonal & same_sign & (mag > at(-1, -1)) & (mag > at(1, 1)))
        | (diagonal & ~same_sign & (mag > at(-1, 1)) & (mag > at(1, -1)))
    )
    weak = peak & (mag > low)
    return weak, weak & (mag > high)


def _dilate(edges: torch.Tensor, pool: bool) -> torch.Tensor:
    """3x3 dilation of a 0/1 map: max_pool2d on float (one kernel per step on a GPU), or ORs of shifted bool views
    (30x faster than max_pool2d on one CPU thread, measured at 512x512). The same result either way."""
    if pool:
        return F.max_pool2d(edges, 3, stride=1, padding=1)
    p = F.pad(edges.view(torch.uint8), (1, 1, 1, 1)).view(torch.bool)  # [N, 1, H+2, W+2]
    rows = p[..., :, :-2] | p[..., :, 1:-1] | p[..., :, 2:]  # [N, 1, H+2, W]
    return rows[..., :-2, :] | rows[..., 1:-1, :] | rows[..., 2:, :]


def hysteresis(
    weak: torch.Tensor, strong: torch.Tensor, steps: int = HYSTERESIS_STEPS, pool: bool | None = None
) -> torch.Tensor:
    """Edges: weak pixels 8-connected to a strong one within `steps` pixels, as a float 0/1 map. A fixed number of
    3x3 dilations (no data-dependent loop), so a CUDA graph can replay it. `pool`: dilate with max_pool2d (default
    on CUDA) or with bool ORs (default on the CPU)."""
    pool = weak.device.type == "cuda" if pool is None else pool
    mask = weak.to(torch.float32) if pool else weak
    edges = strong.to(mask.dtype)
    for _ in range(steps):
        edges = _dilate(edges, pool) * mask if pool else _dilate(edges, pool) & mask
    return edges.to(torch.float32)


def _strongest_channel(
    dx: torch.Tensor, dy: torch.Tensor, mag: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pixel, the gradient of the channel with the largest magnitude, the first on ties: [N, C, H, W] ->
    [N, 1, H, W] each. A running `where` rather than argmax over channels, which is 10x slower on the CPU."""
    bx, by, bm = dx[:, :1], dy[:, :1], mag[:, :1]
    for c in range(1, mag.shape[1]):
        better = mag[:, c : c + 1] > bm
        bx, by, bm = (torch.where(better, t[:, c : c + 1], b) for t, b in ((dx, bx), (dy, by), (mag, bm)))
    return bx, by, bm


def canny(
    image: torch.Tensor,
    low: float = 100.0,
    high: float = 200.0,
    *,
    l2: bool = False,
    gray: bool = False,
    blur_sigma: float = 0.0,
    steps: int = HYSTERESIS_STEPS,
) -> torch.Tensor:
    """Canny edges of [N, C, H, W] pixel values in 0..255 (uint8, or float holding integers) -> [N, 1, H, W] float
    0/1 on the same device. Thresholds on the gradient magnitude as cv2.Canny's (|dx| + |dy|, or the L2 norm with
    `l2`, cv2's L2gradient). A colour image takes each pixel's strongest channel, as cv2.Canny does; `gray` first
    converts RGB to gray as cv2.cvtColor does. `blur_sigma` > 0 blurs first (cv2.Canny does not)."""
    x = image.to(torch.float32)
    if gray:
        x = _to_gray(x)
    if blur_sigma > 0:
        x = _gaussian_blur(x, blur_sigma)
    dx, dy = _sobel(x)  # [N, C, H, W]
    mag = dx * dx + dy * dy if l2 else dx.abs() + dy.abs()
    if mag.shape[1] > 1:  # the channel with the largest magnitude, the first on ties (as cv2.Canny)
        dx, dy, mag = _strongest_channel(dx, dy, mag)
    nms = canny_triton.canny_candidates_triton if canny_triton is not None and mag.is_cuda else canny_candidates
    weak, strong = nms(dx, dy, mag, *_thresholds(low, high, l2))
    return hysteresis(weak, strong, steps)


def control_to_uint8(image: torch.Tensor) -> np.ndarray:
    """A control image [1, 3, H, W] in [0, 1] -> uint8 HxWx3 on the host (to show it: a host sync)."""
    return (image[0].float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


class ControlImages:
    """The control image of one stream: [1, 3, H, W] in [0, 1] in a buffer made once, refilled per frame.

    `__call__(image, previous)` takes the stream's input frame and its previous output ([1, 3, H, W] in [-1, 1],
    `previous=None` before the first output) and returns the same buffer every call. VIDEO takes its frame from
    `set_frame` (a host upload; call it before the frame, outside a captured graph).
    """

    def __init__(
        self,
        kind: ControlKind | str,
        height: int,
        width: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        low: float = 100.0,
        high: float = 200.0,
    ) -> None:
        self.kind = ControlKind(kind)
        self.height, self.width = height, width
        self.low, self.high = low, high
        self.image = torch.zeros(1, 3, height, width, device=device, dtype=dtype)  # what __call__ returns
        # VIDEO: the user's frame as uploaded (uint8 [H, W, 3]); converted inside the frame, on the device.
        self.frame = (
            torch.zeros(height, width, 3, device=device, dtype=torch.uint8) if self.kind is ControlKind.VIDEO else None
        )

    def set_frame(self, frame: np.ndarray | torch.Tensor) -> None:
        """Upload the next user control frame: uint8 HxWx3 (RGB), numpy or torch, of the stream's size."""
        if self.frame is None:
            raise ValueError(f"set_frame is for the video kind; this control image is {self.kind.value!r}")
        t = as_tensor(frame)
        if t.dtype != torch.uint8:
            raise FrameError(f"control frame dtype is {t.dtype}; expected uint8 HxWx3 (RGB)")
        if tuple(t.shape[:2]) != (self.height, self.width):
            raise FrameError(
                f"control frame is {t.shape[1]}x{t.shape[0]} (WxH); the stream expects {self.width}x{self.height}. "
                f"Resize the control video to {self.width}x{self.height} (or crop it as the input frames are)."
            )
        self.frame.copy_(t)

    def __call__(self, image: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """The control image for this frame, written into `self.image` (same tensor every call)."""
        if self.kind is ControlKind.CANNY:
            # [-1, 1] back to the 0..255 integers the frame came from (uint8_to_image), so gradients are exact.
            pixels = ((image.to(torch.float32) * 0.5 + 0.5) * 255).round().clamp(0, 255)
            self.image.copy_(canny(pixels, self.low, self.high).expand(-1, 3, -1, -1))
        elif self.kind is ControlKind.FRAME:
            self.image.copy_((image * 0.5 + 0.5).clamp(0, 1))
        elif self.kind is ControlKind.PREVIOUS:
            if previous is None:
                self.image.zero_()
            else:
                self.image.copy_((previous * 0.5 + 0.5).clamp(0, 1))
        else:
            self.image.copy_(self.frame.permute(2, 0, 1).unsqueeze(0) / 255.0)
        return self.image
