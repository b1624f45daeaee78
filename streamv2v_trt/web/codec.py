"""Frames on the wire: JPEG/PNG/WebP bytes in (decoded no larger than needed, fitted to the stream), JPEG out."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..client_limits import Limits
from ..images import fit_to_size

IMAGE_FORMATS = {"JPEG", "PNG", "WEBP"}


class BadFrame(ValueError):
    """A frame message that is not a usable image; reported to the page, the connection goes on."""


def decode_frame(data: bytes, limits: Limits, height: int, width: int) -> np.ndarray:
    """JPEG/PNG/WebP bytes -> RGB uint8 [height, width, 3], center-cropped and resized as `fit_to_size` does;
    BadFrame for anything else. The decoder does no more work than the output needs: a JPEG decodes at 1/2, 1/4
    or 1/8 scale (`draft`), and any image is box-reduced by an integer factor before the antialiased resize."""
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise BadFrame(f"frame of {len(data)} bytes is not an image; send JPEG, PNG or WebP bytes") from e
    if img.format not in IMAGE_FORMATS:
        raise BadFrame(f"frame is {img.format}; send JPEG, PNG or WebP")
    w, h = img.size
    if w * h > limits.max_frame_pixels:
        raise BadFrame(f"frame is {w}x{h}, over the limit of {limits.max_frame_pixels} pixels; send frames near "
                       f"the stream size ({width}x{height})")  # fmt: skip
    try:
        scale = min(w / width, h / height)  # the center crop is `scale` times the output on both sides
        if img.format == "JPEG" and scale >= 2:  # decode at 1/2, 1/4 or 1/8 size, never below the output's
            img.draft("RGB", (math.ceil(w / scale), math.ceil(h / scale)))
        img = img.convert("RGB")  # before reducing: averaging palette indices would be meaningless
        factor = int(min(img.width / width, img.height / height))
        if factor >= 2:  # an integer box filter: cheap, and the crop stays at least the output's size
            img = img.reduce(factor)
        image = np.array(img)  # [h', w', 3], a writable copy: torch warns on read-only arrays
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # truncated or corrupt image data
        raise BadFrame(f"frame could not be decoded: {' '.join(str(e).split())}") from e
    return fit_to_size(image, height, width)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
