"""Image operations on host frames that every surface shares (the web demo, the video command, the metrics)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def fit_to_size(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Center-crop an RGB uint8 [H, W, 3] frame to the target aspect ratio, then resize (antialiased)."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    # Crop rather than stretch: a stretched face or object translates worse than a cropped one.
    if w * height > h * width:  # too wide
        cw = max(1, round(h * width / height))
        x0 = (w - cw) // 2
        image = image[:, x0 : x0 + cw]
    else:  # too tall
        ch = max(1, round(w * height / width))
        y0 = (h - ch) // 2
        image = image[y0 : y0 + ch]
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0).float()  # [1, 3, h, w]
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
