"""Similar-frame skip (StreamDiffusion's SimilarImageFilter): a static scene does not need the UNet every frame.

For each input frame x (preprocessed, [1, 3, H, W] in [-1, 1]) and the last frame that was processed p:

    s = cos(x, p)                                              (flattened, eps 1e-6)
    skip_prob = 0                                  if threshold >= 1
              = max(0, 1 - (1 - s) / (1 - threshold))  otherwise
    skip  <=>  u < skip_prob  and  skips_in_a_row < max_skip,   u ~ U[0, 1) from a seeded RNG

so frames below the threshold are always processed, identical frames (s = 1) are always skipped, and the
probability grows linearly in between. Two deliberate differences from StreamDiffusion: the RNG is seeded
(reproducible streams and tests), and the cap is exact (StreamDiffusion allows max_skip + 1 skips in a row
and never resets its counter on a processed frame). As there, `p` only changes on a processed frame, so a
slow drift still ends up processed.

The decision needs one scalar on the host (it changes which work is enqueued), so it syncs once per frame:
that is why it is off by default and meant for live sources, where a skipped frame saves a whole UNet call.
"""

from __future__ import annotations

import random

import torch

from .config import SimilarFilterConfig

COSINE_EPS = 1e-6


def skip_probability(similarity: float, threshold: float) -> float:
    if threshold >= 1.0:
        return 0.0
    return max(0.0, 1.0 - (1.0 - similarity) / (1.0 - threshold))


class SimilarFrameFilter:
    """`should_skip(image)` per input frame; the caller returns its previous output when it says True."""

    def __init__(self, cfg: SimilarFilterConfig) -> None:
        self.cfg = cfg
        self._rng = random.Random(cfg.seed)
        self._prev: torch.Tensor | None = None  # last processed frame, flattened; allocated once
        self._has_prev = False
        self.skipped_in_a_row = 0
        self.skipped_total = 0

    def reset(self) -> None:
        """Forget the previous frame (the next one is processed); the RNG goes back to its seed."""
        self._rng.seed(self.cfg.seed)
        self._has_prev = False
        self.skipped_in_a_row = 0
        self.skipped_total = 0

    def should_skip(self, image: torch.Tensor) -> bool:
        """Decide for one frame. A frame that is not skipped becomes the new reference."""
        flat = image.reshape(-1)
        if self._has_prev:
            # One host sync: the decision picks what to enqueue next.
            sim = float(torch.cosine_similarity(self._prev, flat.to(self._prev.dtype), dim=0, eps=COSINE_EPS))
            u = self._rng.random()
            if u < skip_probability(sim, self.cfg.threshold) and self.skipped_in_a_row < self.cfg.max_skip:
                self.skipped_in_a_row += 1
                self.skipped_total += 1
                return True
        if self._prev is None or self._prev.shape != flat.shape or self._prev.device != flat.device:
            self._prev = torch.empty_like(flat, dtype=torch.float32)
        self._prev.copy_(flat)
        self._has_prev = True
        self.skipped_in_a_row = 0
        return False
