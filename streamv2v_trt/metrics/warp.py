"""Warp error: how much the output flickers where the input moved smoothly (the StreamV2V paper's metric).

Exact definition (`warp_error(inputs, outputs)`), for every pair of consecutive frames t, t+1:

1. The input frames are fitted to the output size (center crop + resize, as `video` does) and turned to
   grayscale. Optical flow is computed on the INPUT video, with OpenCV's Farneback (no learned weights;
   the paper's script uses RAFT): F_b = flow(I_{t+1} -> I_t), F_f = flow(I_t -> I_{t+1}), in pixels, such
   that I_{t+1}(x) ~ I_t(x + F_b(x)).
2. The previous OUTPUT frame is warped to t+1 by backward warping with bilinear sampling:
   W(x) = O_t(x + F_b(x)).
3. Occlusion mask by forward-backward consistency (UnFlow's constants, as in the paper's script,
   alpha = 0.01, beta = 0.5): with F_f'(x) = F_f(x + F_b(x)), pixel x of frame t+1 is occluded when
   |F_b(x) + F_f'(x)| > alpha * (|F_b(x)| + |F_f'(x)|) + beta, or when x + F_b(x) falls outside the frame.
   (The paper's script evaluates its mask on frame t's grid and counts out-of-frame samples as black; we
   use frame t+1's grid, where the warped image lives, and leave those pixels out.)
4. The pair's error over the non-occluded pixels x and the 3 channels c:
   - "l1" (default, the paper's script): mean |O_{t+1}(x, c) - W(x, c)| on the 0-255 scale. (The script
     subtracts uint8 arrays, so its negative differences wrap around modulo 256; this is the value it meant.)
   - "mse" (Lai et al. 2018): mean (O_{t+1}(x, c) - W(x, c))^2 on the 0-1 scale.
5. The video's warp error is the mean over pairs (pairs with no non-occluded pixel are skipped).

A still video scores 0; temporally shuffled frames score high; a smooth pan scores near 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import cv2
import numpy as np

from ..images import fit_to_size

ALPHA, BETA = 0.01, 0.5


@dataclass(frozen=True)
class WarpError:
    value: float  # mean over pairs
    per_pair: tuple[float, ...]
    valid_fraction: float  # mean share of non-occluded pixels
    error: str  # "l1" or "mse"


def flow(a_gray: np.ndarray, b_gray: np.ndarray) -> np.ndarray:
    """Dense flow F [H, W, 2] (x, y) in pixels with a(x) ~ b(x + F(x)); Farneback, fixed parameters."""
    levels = max(1, min(5, int(np.log2(min(a_gray.shape) / 16)) + 1))  # coarsest level >= ~16 px
    return cv2.calcOpticalFlowFarneback(
        a_gray, b_gray, None, pyr_scale=0.5, levels=levels, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0
    )


def _sample_grid(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = f.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return xs + f[..., 0], ys + f[..., 1]


def _remap(image: np.ndarray, map_x: np.ndarray, map_y: np.ndarray) -> np.ndarray:
    return cv2.remap(image, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def pair_error(
    in_prev: np.ndarray, in_cur: np.ndarray, out_prev: np.ndarray, out_cur: np.ndarray, error: str = "l1"
) -> tuple[float, float]:
    """(error, non-occluded fraction) of one pair; RGB uint8 frames, inputs already at the output size."""
    g_prev = cv2.cvtColor(in_prev, cv2.COLOR_RGB2GRAY)
    g_cur = cv2.cvtColor(in_cur, cv2.COLOR_RGB2GRAY)
    f_b = flow(g_cur, g_prev)  # [H, W, 2]: I_cur(x) ~ I_prev(x + f_b(x))
    f_f = flow(g_prev, g_cur)
    map_x, map_y = _sample_grid(f_b)
    h, w = f_b.shape[:2]
    inside = (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)
    f_f_warped = _remap(f_f, map_x, map_y)  # F_f(x + F_b(x))
    diff = np.linalg.norm(f_b + f_f_warped, axis=-1)
    bound = ALPHA * (np.linalg.norm(f_b, axis=-1) + np.linalg.norm(f_f_warped, axis=-1)) + BETA
    valid = inside & (diff <= bound)  # [H, W]
    if not valid.any():
        return float("nan"), 0.0
    warped = _remap(out_prev.astype(np.float32), map_x, map_y)  # [H, W, 3]
    d = out_cur.astype(np.float32) - warped
    if error == "l1":
        e = float(np.abs(d)[valid].mean())
    elif error == "mse":
        e = float(((d / 255.0) ** 2)[valid].mean())
    else:
        raise ValueError(f"error must be 'l1' or 'mse', got {error!r}")
    return e, float(valid.mean())


def warp_error(inputs: Iterable[np.ndarray], outputs: Iterable[np.ndarray], error: str = "l1") -> WarpError:
    """Warp error of `outputs` given the `inputs` they were translated from (frame i out = frame i in).

    Both may be iterators (frames are consumed pairwise, so a long video is never held in memory); the
    shorter one sets the number of frames.
    """
    errors, fractions = [], []
    prev: tuple[np.ndarray, np.ndarray] | None = None
    n = 0
    for frame_in, frame_out in zip(inputs, outputs):
        frame_in = fit_to_size(frame_in, *frame_out.shape[:2])
        if prev is not None:
            e, frac = pair_error(prev[0], frame_in, prev[1], frame_out, error)
            fractions.append(frac)
            if not np.isnan(e):
                errors.append(e)
        prev = (frame_in, frame_out)
        n += 1
    if n < 2:
        raise ValueError(f"warp error needs at least 2 frames in both videos, got {n}")
    if not errors:
        raise ValueError("every pair of frames is fully occluded: the input moves too much to measure warp error")
    return WarpError(float(np.mean(errors)), tuple(errors), float(np.mean(fractions)), error)
