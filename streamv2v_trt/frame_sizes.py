"""Frame sizes as the surfaces speak them: "WIDTHxHEIGHT" text (as build folder names write them) and the built size
nearest an input's.

In code a size is (height, width), as `EngineSpec` and `Backend.sizes` hold it; in text it is WIDTHxHEIGHT
("768x512" = 768 wide, 512 high). `nearest_size` is the rule `video` uses to run an input on a build of several
sizes: the nearest aspect ratio first, then the nearest area (both compared as log ratios, so 2x too big and 2x too
small are equally far), then the earlier size in the build's order.
"""

from __future__ import annotations

import math
import re

Size = tuple[int, int]  # (height, width)

_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def size_text(size: Size) -> str:
    """(512, 768) -> "768x512" (WIDTHxHEIGHT)."""
    height, width = size
    return f"{width}x{height}"


def parse_size(text: str) -> Size:
    """Text "768x512" (WIDTHxHEIGHT) -> (512, 768); anything else raises ValueError saying the expected form."""
    match = _SIZE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"a frame size is WIDTHxHEIGHT, e.g. 768x512; got {text!r}")
    width, height = int(match[1]), int(match[2])
    return height, width


def nearest_size(sizes: tuple[Size, ...], height: int, width: int) -> Size:
    """The size of `sizes` nearest an input of height x width: aspect ratio first, then area, then order."""
    if not sizes:
        raise ValueError("no sizes to choose from")
    if height < 1 or width < 1:
        raise ValueError(f"an input size must be positive, got {width}x{height}")

    def distance(i_size: tuple[int, Size]) -> tuple[float, float, int]:
        i, (h, w) = i_size
        aspect = abs(math.log((w / h) / (width / height)))
        area = abs(math.log((w * h) / (width * height)))
        return round(aspect, 9), area, i  # rounded: equal aspects computed two ways compare equal

    return min(enumerate(sizes), key=distance)[1]
