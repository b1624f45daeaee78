"""Prompt blending and seed blending: weighted mixes written into the stream's existing buffers.

Prompts: E = sum_i (w_i / sum_j w_j) * E_i, linear on the CLIP last hidden states [1, 77, D] (what the UNet
cross-attends to). A blend of one prompt is that prompt's embedding; 50/50 is the mean of the two.

Seeds: n = sum_i w_i * n_i / sqrt(sum_j w_j^2), with n_i the per-slot noise of seed i (torch.randn on the CPU
generator seeded with i, the same draw as the stream's own seed). The n_i are independent standard normals,
so Var(n) = sum_i w_i^2 / sum_j w_j^2 = 1: the blend keeps unit variance and stays a valid diffusion noise
(a plain weighted mean would shrink it, e.g. to 1/sqrt(2) at 50/50, and wash out the output). One seed with
any positive weight gives exactly that seed's noise.

Both land in preallocated buffers with `copy_` (same data_ptr), so bound engine inputs and captured CUDA
graphs see the change on the next frame with no rebuild or recapture.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

PromptBlend = str | Sequence[tuple[str, float]]
SeedBlend = int | Sequence[tuple[int, float]]


def _weights(items: Sequence[tuple[object, float]], what: str) -> list[float]:
    if not items:
        raise ValueError(f"a {what} blend needs at least one ({what}, weight) pair, got an empty list")
    weights = [float(w) for _, w in items]
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"{what} blend weights must be finite, >= 0 and not all 0, got {weights}")
    return weights


def prompt_blend_items(prompt: PromptBlend) -> list[tuple[str, float]]:
    """A prompt or a weighted list of prompts, checked, as [(text, weight)]."""
    if isinstance(prompt, str):
        return [(prompt, 1.0)]
    if isinstance(prompt, Sequence) and all(
        isinstance(p, Sequence) and len(p) == 2 and isinstance(p[0], str) for p in prompt
    ):
        items = [(text, float(w)) for text, w in prompt]
        _weights(items, "prompt")
        return items
    raise TypeError(f"prompt must be a str or a list of (str, weight) pairs, got {prompt!r}")


def blend_prompts(encode: Callable[[str], torch.Tensor], prompt: PromptBlend) -> torch.Tensor:
    """sum_i w_i / sum_j w_j * encode(text_i): [1, 77, D]. Repeated texts are encoded once."""
    items = prompt_blend_items(prompt)
    weights = _weights(items, "prompt")
    total = sum(weights)
    cache: dict[str, torch.Tensor] = {}
    out = None
    for (text, _), w in zip(items, weights):
        if text not in cache:
            cache[text] = encode(text)
        term = cache[text].float() * (w / total)
        out = term if out is None else out + term
    return out.to(cache[items[0][0]].dtype)


def seed_blend_items(seed: SeedBlend) -> list[tuple[int, float]]:
    if isinstance(seed, int) and not isinstance(seed, bool):
        return [(seed, 1.0)]
    if isinstance(seed, Sequence) and all(
        isinstance(s, Sequence) and len(s) == 2 and isinstance(s[0], int) for s in seed
    ):
        items = [(int(s), float(w)) for s, w in seed]
        _weights(items, "seed")
        return items
    raise TypeError(f"seed must be an int or a list of (int, weight) pairs, got {seed!r}")


def seed_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The per-slot noise of one seed (CPU generator, so every device and backend draws the same numbers)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def blend_seeds(seed: SeedBlend, shape: tuple[int, ...]) -> torch.Tensor:
    """sum_i w_i * noise(seed_i) / sqrt(sum_j w_j^2): unit variance for independent seeds (float32, CPU)."""
    items = seed_blend_items(seed)
    merged: dict[int, float] = {}
    for s, w in items:  # a seed listed twice is one noise: its weights add (else the variance is off)
        merged[s] = merged.get(s, 0.0) + w
    merged = {s: w for s, w in merged.items() if w > 0}
    if len(merged) == 1:
        return seed_noise(next(iter(merged)), shape)  # exact, not scaled by w / |w| in floating point
    norm = math.sqrt(sum(w * w for w in merged.values()))
    out = torch.zeros(shape)
    for s, w in merged.items():
        out.add_(seed_noise(s, shape), alpha=w / norm)
    return out
