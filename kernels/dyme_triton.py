"""Triton kernels for the DyMe bank update: cosine matching of the random split, then the mean-merge of K, V, O.

All kernels read the 2N tokens [bank ; current] straight from the two tensors (token t < N is bank[t], else
current[t - N]), so no concatenation is materialised, and none builds the [N, N] similarity matrix.

- `_dst_inv_norm_kernel` + `_dyme_assign_kernel`: for each source (perm[:N]), the destination (perm[N:]) of highest
  cosine similarity, computed block by block with a running argmax (ties -> lowest index, as torch.argmax).
- `_dyme_merge_kernel`: each destination becomes (dst + sum of its sources) / (1 + count). The sum is a matmul of
  a one-hot [destinations x sources] block with the source tokens: no atomics, so the result is deterministic
  (fixed summation order) and exact in the one-hot products. One launch per merged tensor (K, V, O).

Everything stays on the device: the permutation is a device tensor and nothing reads back to the host, so a
merge can be captured in a CUDA graph. `kernels.dyme.dyme_merge` is the entry point; `dyme_ref` the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.float32)


@triton.jit
def _load_tokens(bank_ptr, cur_ptr, b, tok, offs_c, N, C, mask):
    """Rows `tok` ([R] int64 indices into [bank ; current]) of batch element b, channels offs_c: [R, BLOCK_C]."""
    in_bank = tok < N
    row = tl.where(in_bank, tok, tok - N) + b.to(tl.int64) * N  # row within its own [B*N, C] tensor
    base = tl.where(in_bank, bank_ptr, cur_ptr) + row * C  # [R] row pointers
    return tl.load(base[:, None] + offs_c[None, :], mask=mask, other=0.0)


@triton.jit
def _dst_inv_norm_kernel(
    bank_ptr,  # [B, N, C] bank keys
    cur_ptr,  # [B, N, C] current keys
    perm_ptr,  # [B, 2N] int64
    inv_norm_ptr,  # [B, N] fp32 out: 1 / max(|key|, eps) of each destination
    N,
    C,
    eps,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_d, b = tl.program_id(0), tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < N
    tok_d = tl.load(perm_ptr + b.to(tl.int64) * 2 * N + N + offs_d, mask=mask_d, other=0)
    sq = tl.zeros([BLOCK_D], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        d = _load_tokens(bank_ptr, cur_ptr, b, tok_d, offs_c, N, C, mask_d[:, None] & (offs_c < C)[None, :])
        d = d.to(tl.float32)
        sq += tl.sum(d * d, axis=1)
    tl.store(inv_norm_ptr + b.to(tl.int64) * N + offs_d, 1.0 / tl.maximum(tl.sqrt(sq), eps), mask=mask_d)


@triton.jit
def _dyme_assign_kernel(
    bank_ptr,  # [B, N, C] bank keys
    cur_ptr,  # [B, N, C] current keys
    perm_ptr,  # [B, 2N] int64: sources perm[:, :N], destinations perm[:, N:]
    inv_norm_ptr,  # [B, N] fp32 from _dst_inv_norm_kernel
    assign_ptr,  # [B, N] int64 out: destination index (0..N-1, in destination order) of each source
    N,
    C,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_s, b = tl.program_id(0), tl.program_id(1)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < N
    perm_row = perm_ptr + b.to(tl.int64) * 2 * N
    tok_s = tl.load(perm_row + offs_s, mask=mask_s, other=0)  # [BLOCK_S]

    best = tl.full([BLOCK_S], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_S], tl.int64)
    for d0 in range(0, N, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < N
        tok_d = tl.load(perm_row + N + offs_d, mask=mask_d, other=0)  # [BLOCK_D]
        dots = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            a = _load_tokens(bank_ptr, cur_ptr, b, tok_s, offs_c, N, C, mask_s[:, None] & mask_c[None, :])
            d = _load_tokens(bank_ptr, cur_ptr, b, tok_d, offs_c, N, C, mask_d[:, None] & mask_c[None, :])
            # fp16 products are exact in the fp32 accumulator; "ieee" keeps fp32 inputs out of TF32.
            dots = tl.dot(a, tl.trans(d), dots, input_precision="ieee")  # [BLOCK_S, BLOCK_D]
        # Cosine up to the source's norm: a positive factor per row, which does not change the row's argmax.
        inv_norm = tl.load(inv_norm_ptr + b.to(tl.int64) * N + offs_d, mask=mask_d, other=0.0)
        sim = dots * inv_norm[None, :]
        sim = tl.where(mask_d[None, :], sim, float("-inf"))
        blk_best = tl.max(sim, axis=1)
        blk_idx = tl.argmax(sim, axis=1, tie_break_left=True).to(tl.int64) + d0
        better = blk_best > best  # strict: an equal value in a later block keeps the lower index
        best = tl.where(better, blk_best, best)
        best_idx = tl.where(better, blk_idx, best_idx)
    tl.store(assign_ptr + b.to(tl.int64) * N + offs_s, best_idx, mask=mask_s)


@triton.jit
def _dyme_merge_kernel(
    bank_ptr,  # [B, N, C] bank part (K, V or O)
    cur_ptr,  # [B, N, C] current part
    perm_ptr,  # [B, 2N] int64
    assign_ptr,  # [B, N] int64 from _dyme_assign_kernel
    out_ptr,  # [B, N, C] out: merged part, in destination order
    N,
    C,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_d, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < N
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    perm_row = perm_ptr + b.to(tl.int64) * 2 * N
    assign_row = assign_ptr + b.to(tl.int64) * N

    acc = tl.zeros([BLOCK_D, BLOCK_C], tl.float32)  # sum of the sources of each destination
    count = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, N, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask_s = offs_s < N
        dest = tl.load(assign_row + offs_s, mask=mask_s, other=-1)  # [BLOCK_S]
        hit = dest[None, :] == offs_d[:, None]  # [BLOCK_D, BLOCK_S] one-hot rows
        tok_s = tl.load(perm_row + offs_s, mask=mask_s, other=0)
        src = _load_tokens(bank_ptr, cur_ptr, b, tok_s, offs_c, N, C, mask_s[:, None] & mask_c[None, :])
        acc = tl.dot(hit.to(src.dtype), src, acc, input_precision="ieee")  # [BLOCK_D, BLOCK_C]
        count += tl.sum(hit.to(tl.float32), axis=1)

    tok_d = tl.load(perm_row + N + offs_d, mask=mask_d, other=0)
    mask = mask_d[:, None] & mask_c[None, :]
    dst = _load_tokens(bank_ptr, cur_ptr, b, tok_d, offs_c, N, C, mask).to(tl.float32)
    merged = (dst + acc) / (1.0 + count)[:, None]  # mean including the destination itself
    out_offs = b.to(tl.int64) * N * C + offs_d[:, None] * C + offs_c[None, :]
    tl.store(out_ptr + out_offs, merged.to(out_ptr.dtype.element_ty), mask=mask)


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(n)))  # tl.dot needs every block dim >= 16


def _check_inputs(bank: Sequence[torch.Tensor], current: Sequence[torch.Tensor], perm: torch.Tensor) -> None:
    if len(bank) == 0 or len(bank) != len(current):
        raise ValueError(
            f"DyMe needs the same parts (K, V[, O]) of bank and current, got {len(bank)} and {len(current)}"
        )
    k = bank[0]
    if k.dim() != 3:
        raise ValueError(f"DyMe tensors are [B, N, C], got bank K of shape {tuple(k.shape)}")
    if k.device.type != "cuda" and isinstance(_dyme_assign_kernel, triton.runtime.JITFunction):
        raise ValueError(
            f"the Triton DyMe kernels need CUDA tensors, got {k.device}; use kernels.dyme.dyme_merge (it falls back "
            "to dyme_ref), or set TRITON_INTERPRET=1 before importing triton to interpret them on the CPU"
        )
    B, N = k.shape[:2]
    for i, (x, y) in enumerate(zip(bank, current)):
        for name, t in ((f"bank[{i}]", x), (f"current[{i}]", y)):
            if t.dim() != 3 or tuple(t.shape[:2]) != (B, N) or t.shape != x.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected [{B}, {N}, C] like bank[{i}]")
            if t.dtype != k.dtype or t.dtype not in SUPPORTED_DTYPES:
                raise ValueError(f"{name} is {t.dtype}, expected {k.dtype} (one of {SUPPORTED_DTYPES}) like bank K")
            if not t.is_contiguous():
                raise ValueError(f"{name} is not contiguous: pass .contiguous() tensors")
            if t.device != k.device:
                raise ValueError(f"{name} is on {t.device}, expected {k.device} like bank K")
    if tuple(perm.shape) != (B, 2 * N) or perm.dtype != torch.int64 or perm.device != k.device:
        raise ValueError(
            f"perm must be an int64 [{B}, {2 * N}] permutation on {k.device}, got {perm.dtype} {tuple(perm.shape)} "
            f"on {perm.device}"
        )
    if not perm.is_contiguous():
        raise ValueError("perm is not contiguous: pass perm.contiguous()")


def dyme_assign_triton(bank_k: torch.Tensor, cur_k: torch.Tensor, perm: torch.Tensor, eps: float) -> torch.Tensor:
    """bank_k, cur_k: [B, N, C] keys; perm: [B, 2N] int64. Returns [B, N] int64: each source's destination."""
    _check_inputs([bank_k], [cur_k], perm)
    B, N, C = bank_k.shape
    block_s, block_d, block_c = _block(N, 32), _block(N, 64), _block(C, 64)
    inv_norm = torch.empty(B, N, dtype=torch.float32, device=bank_k.device)
    grid = (triton.cdiv(N, block_d), B)
    _dst_inv_norm_kernel[grid](bank_k, cur_k, perm, inv_norm, N, C, eps, BLOCK_D=block_d, BLOCK_C=block_c)
    assign = torch.empty(B, N, dtype=torch.int64, device=bank_k.device)
    grid = (triton.cdiv(N, block_s), B)
    _dyme_assign_kernel[grid](
        bank_k, cur_k, perm, inv_norm, assign, N, C, BLOCK_S=block_s, BLOCK_D=block_d, BLOCK_C=block_c
    )
    return assign


def dyme_merge_triton(
    bank: Sequence[torch.Tensor], current: Sequence[torch.Tensor], perm: torch.Tensor, eps: float
) -> list[torch.Tensor]:
    """As `kernels.dyme.dyme_ref`: bank/current (K, V[, O]) each [B, N, C], perm [B, 2N] int64 -> merged parts."""
    _check_inputs(bank, current, perm)
    assign = dyme_assign_triton(bank[0], current[0], perm, eps)  # [B, N]
    merged = []
    for x, y in zip(bank, current):
        B, N, C = x.shape
        out = torch.empty_like(x)
        block_d, block_s, block_c = _block(N, 64), _block(N, 64), _block(C, 64)
        grid = (triton.cdiv(N, block_d), triton.cdiv(C, block_c), B)
        _dyme_merge_kernel[grid](x, y, perm, assign, out, N, C, BLOCK_D=block_d, BLOCK_S=block_s, BLOCK_C=block_c)
        merged.append(out)
    return merged
