"""Dynamic merging (DyMe) of a layer's bank with the current frame's tokens.

`dyme_ref` is the torch reference (and the runtime's path where Triton cannot run): random bipartite soft
matching with ratio 0.5 over the concatenation [bank ; current] (2N tokens), cosine similarity of L2-normalised
keys, each source merged into its most similar destination by a mean that includes the destination itself.
The same assignment merges K, V and O. Output: N tokens in destination order.

`dyme_merge` is what the runtime calls: the Triton kernels of `dyme_triton` (beside this file) on CUDA tensors where
triton imports, else `dyme_ref`. Tests compare the two under `TRITON_INTERPRET=1` (tests/test_kernels.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

try:  # the one import point of the optional Triton kernels; without triton the runtime uses the reference
    import triton  # noqa: F401
except ImportError:
    dyme_triton = None
else:
    from . import dyme_triton

COSINE_EPS = 1e-4  # fp16-safe (see streamv2v_trt.attention)


def _gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def dyme_assign(metric: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """metric: [B, 2N, C] keys; perm: [B, 2N] permutation. Returns [B, N]: for each source, its destination."""
    n = perm.shape[1] // 2
    m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)
    a = _gather_tokens(m, perm[:, :n])  # sources      [B, N, C]
    d = _gather_tokens(m, perm[:, n:])  # destinations [B, N, C]
    return (a @ d.transpose(1, 2)).argmax(dim=-1)  # [B, N]


def dyme_ref(bank: Sequence[torch.Tensor], current: Sequence[torch.Tensor], perm: torch.Tensor) -> list[torch.Tensor]:
    """bank/current: (K, V[, O]) each [B, N, C]; perm: [B, 2N] int64. Returns the merged (K, V[, O]), [B, N, C]."""
    n = bank[0].shape[1]
    both = [torch.cat([b, c], dim=1) for b, c in zip(bank, current)]  # [B, 2N, C]
    assign = dyme_assign(both[0], perm)
    merged = []
    for x in both:
        src = _gather_tokens(x, perm[:, :n])
        dst = _gather_tokens(x, perm[:, n:])
        index = assign.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        merged.append(dst.scatter_reduce(1, index, src, reduce="mean", include_self=True))
    return merged


def dyme_merge(bank: Sequence[torch.Tensor], current: Sequence[torch.Tensor], perm: torch.Tensor) -> list[torch.Tensor]:
    """The runtime entry point: the Triton kernels on CUDA tensors where triton imports, else the torch reference.

    Same contract as `dyme_ref`. The Triton path allocates its outputs but never syncs with the host, so it can run
    inside a captured CUDA graph.
    """
    if dyme_triton is not None and bank[0].is_cuda:
        return dyme_triton.dyme_merge_triton(bank, current, perm, eps=COSINE_EPS)
    return dyme_ref(bank, current, perm)
