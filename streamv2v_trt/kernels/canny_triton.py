"""Triton kernel for Canny's non-maximum suppression and double threshold: one launch instead of ~30 torch ops.

The same arithmetic as `streamv2v_trt.control_images.canny_candidates` (the torch version, and the reference the
tests compare it with under `TRITON_INTERPRET=1`): OpenCV's fixed-point direction test in int32, its tie rules
(strict towards the previous pixel, >= towards the next on the axes, strict on diagonals), zero magnitude outside
the image, `>` against both thresholds. A program owns a BLOCK_Y x BLOCK_X tile and loads the magnitude at the
nine offsets with masked loads; it writes 0 (no edge), 1 (weak) or 2 (strong) per pixel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SHIFT = 15
TG22 = int(0.4142135623730950488016887242097 * (1 << SHIFT) + 0.5)


@triton.jit
def _mag_at(mag_ptr, base, y, x, H, W):
    """Magnitude at rows y [BY, 1], columns x [1, BX] of one image (0 outside it)."""
    inside = (y >= 0) & (y < H) & (x >= 0) & (x < W)
    return tl.load(mag_ptr + base + y * W + x, mask=inside, other=0)


@triton.jit
def _canny_nms_kernel(
    dx_ptr,  # [N, H, W] int32 Sobel x of each pixel's chosen channel
    dy_ptr,  # [N, H, W] int32 Sobel y
    mag_ptr,  # [N, H, W] int32 magnitude (|dx| + |dy| or dx^2 + dy^2)
    out_ptr,  # [N, H, W] uint8 out: 0 none, 1 weak, 2 strong
    H,
    W,
    low,
    high,
    TG22: tl.constexpr,
    SHIFT: tl.constexpr,
    BLOCK_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    n = tl.program_id(2)
    y = (tl.program_id(1) * BLOCK_Y + tl.arange(0, BLOCK_Y))[:, None]  # [BY, 1]
    x = (tl.program_id(0) * BLOCK_X + tl.arange(0, BLOCK_X))[None, :]  # [1, BX]
    base = n.to(tl.int64) * H * W
    inside = (y < H) & (x < W)
    offs = base + y * W + x
    dx = tl.load(dx_ptr + offs, mask=inside, other=0)
    dy = tl.load(dy_ptr + offs, mask=inside, other=0)
    m = tl.load(mag_ptr + offs, mask=inside, other=0)

    ax = tl.abs(dx)
    ay = tl.abs(dy) << SHIFT
    tg22x = ax * TG22
    horizontal = ay < tg22x
    vertical = ay > tg22x + (ax << (SHIFT + 1))
    diagonal = (~horizontal) & (~vertical)
    same_sign = (dx ^ dy) >= 0

    h_peak = (m > _mag_at(mag_ptr, base, y, x - 1, H, W)) & (m >= _mag_at(mag_ptr, base, y, x + 1, H, W))
    v_peak = (m > _mag_at(mag_ptr, base, y - 1, x, H, W)) & (m >= _mag_at(mag_ptr, base, y + 1, x, H, W))
    d1_peak = (m > _mag_at(mag_ptr, base, y - 1, x - 1, H, W)) & (m > _mag_at(mag_ptr, base, y + 1, x + 1, H, W))
    d2_peak = (m > _mag_at(mag_ptr, base, y - 1, x + 1, H, W)) & (m > _mag_at(mag_ptr, base, y + 1, x - 1, H, W))
    peak = (
        (horizontal & h_peak)
        | (vertical & v_peak)
        | (diagonal & same_sign & d1_peak)
        | (diagonal & (~same_sign) & d2_peak)
    )
    weak = peak & (m > low)
    strong = weak & (m > high)
    tl.store(out_ptr + offs, weak.to(tl.uint8) + strong.to(tl.uint8), mask=inside)


def canny_candidates_triton(
    dx: torch.Tensor, dy: torch.Tensor, mag: torch.Tensor, low: int, high: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weak, strong) bool [N, 1, H, W] from int32 [N, 1, H, W] gradients and magnitude, as `canny_candidates`."""
    for name, t in (("dx", dx), ("dy", dy), ("mag", mag)):
        if t.dtype != torch.int32 or t.dim() != 4 or t.shape[1] != 1 or t.shape != mag.shape:
            raise ValueError(f"{name}: {t.dtype} {tuple(t.shape)}; expected int32 [N, 1, H, W] like mag")
    n, _, h, w = mag.shape
    out = torch.empty(mag.shape, dtype=torch.uint8, device=mag.device)
    block_y, block_x = 16, 64
    grid = (triton.cdiv(w, block_x), triton.cdiv(h, block_y), n)
    _canny_nms_kernel[grid](
        dx.contiguous(), dy.contiguous(), mag.contiguous(), out, h, w, low, high,
        TG22=TG22, SHIFT=SHIFT, BLOCK_Y=block_y, BLOCK_X=block_x,
    )  # fmt: skip
    return out >= 1, out == 2
