"""Triton kernels for the DyMe bank update: cosine matching of the random split, then the mean-merge of K, V, O.

Token t of [bank ; current] (2N tokens) is bank[t] for t < N, else current[t - N]; no concatenation is materialised.
Four launches per merge, none syncing with the host, so a merge can be captured in a CUDA graph:

1. `_dyme_prepare_kernel` gathers the source keys (perm[:N]) and destination keys (perm[N:]) into contiguous
   [B, N, C] buffers in the input dtype, so the matmul below streams plain tiles; writes 1 / max(|dst|, eps).
2. `_dyme_assign_kernel`: sources x destinations on tensor cores (`tl.dot`, fp16 in, fp32 accumulate), a running
   argmax per source (ties -> lowest index, as torch.argmax), and never the [N, N] matrix. The dot uses raw keys
   scaled by the destination's inverse norm: the source's norm is a positive factor per row and cannot move its
   argmax, and fp16 keys stay exact (normalising them in fp16 would round them and flip near-ties against the
   fp32 reference). fp32 inputs use "ieee" precision (no TF32) for the same reason. The destinations are split
   over programs to fill the GPU; the splits meet in an integer `atomic_max` of (similarity, -index) packed in
   an int64, which is order independent, hence deterministic.
3. `_dyme_segments_kernel`: a stable sort of the sources by destination. Each source's position is the number
   of (destination, source) keys below its own; each destination's segment start the number of sources with a
   smaller destination. Integer compares only (O(N^2) int ops, no C factor), one launch, no atomics.
4. `_dyme_merge_kernel`: a program owns a block of destinations x a block of channels of one part (K, V or O,
   all parts in one launch) and walks its destinations' sources, a contiguous range of the sorted list, in
   fixed chunks. A chunk is added to its destinations with a [destinations x chunk] one-hot `tl.dot` (exact
   products, fp32 accumulation), so total work is O(N·C) loads and O(N·BLOCK_D·C) tensor-core flops, and a
   destination that draws every source costs N / BLOCK_T chunks, not N serial steps. Then (dst + sum) / (1 + n).
   Same order every run: bitwise deterministic.

`streamv2v_trt.kernels.dyme.dyme_merge` is the entry point; `streamv2v_trt.kernels.dyme.dyme_ref` the torch reference.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.float32)
MAX_PARTS = 3  # K, V, O
MAX_TOKENS = 46340  # the sort key destination * N + source is an int32: N * N < 2**31


@triton.jit
def _load_tokens(bank_ptr, cur_ptr, b, tok, offs_c, N, C, mask):
    """Rows `tok` ([R] indices into [bank ; current]) of batch element b, channels offs_c: [R, BLOCK_C]."""
    tok = tok.to(tl.int64)
    in_bank = (tok < N)[:, None]
    row = tl.where(tok < N, tok, tok - N) + b.to(tl.int64) * N  # row within its own [B*N, C] tensor
    offs = row[:, None] * C + offs_c[None, :]
    # Two predicated loads, not one through a selected pointer: the select hides the rows' alignment from the
    # compiler, which then loads one element at a time instead of 16 bytes (seen in the sm_90 PTX).
    x_bank = tl.load(bank_ptr + offs, mask=mask & in_bank, other=0.0)
    x_cur = tl.load(cur_ptr + offs, mask=mask & ~in_bank, other=0.0)
    return tl.where(in_bank, x_bank, x_cur)


@triton.jit
def _decode_dst(key):
    """Destination index from a packed (similarity, 0x7FFFFFFF - index) int64 key."""
    return (0x7FFFFFFF - (key & 0xFFFFFFFF)).to(tl.int32)


@triton.jit
def _dyme_prepare_kernel(
    bank_ptr,  # [B, N, C] bank keys
    cur_ptr,  # [B, N, C] current keys
    perm_ptr,  # [B, 2N] int64: sources perm[:, :N], destinations perm[:, N:]
    src_ptr,  # [B, N, C] out: source keys, in source order
    dst_ptr,  # [B, N, C] out: destination keys, in destination order
    inv_norm_ptr,  # [B, N] fp32 out: 1 / max(|dst key|, eps)
    key_ptr,  # [B, N] int64 out: the assignment's atomic_max target, set to the smallest int64
    N,
    C,
    eps,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid, b = tl.program_id(0), tl.program_id(1)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < N
    perm_row = perm_ptr + b.to(tl.int64) * 2 * N
    tok_s = tl.load(perm_row + offs_r, mask=mask_r, other=0)
    tok_d = tl.load(perm_row + N + offs_r, mask=mask_r, other=0)
    out_rows = b.to(tl.int64) * N * C + offs_r.to(tl.int64)[:, None] * C  # [BLOCK_R, 1]
    sq = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = mask_r[:, None] & (offs_c < C)[None, :]
        s = _load_tokens(bank_ptr, cur_ptr, b, tok_s, offs_c, N, C, mask)
        tl.store(src_ptr + out_rows + offs_c[None, :], s, mask=mask)
        d = _load_tokens(bank_ptr, cur_ptr, b, tok_d, offs_c, N, C, mask)
        tl.store(dst_ptr + out_rows + offs_c[None, :], d, mask=mask)
        d = d.to(tl.float32)
        sq += tl.sum(d * d, axis=1)
    row = b.to(tl.int64) * N + offs_r
    tl.store(inv_norm_ptr + row, 1.0 / tl.maximum(tl.sqrt(sq), eps), mask=mask_r)
    tl.store(key_ptr + row, tl.full([BLOCK_R], -(2**63), tl.int64), mask=mask_r)


@triton.jit
def _dyme_assign_kernel(
    src_ptr,  # [B, N, C] source keys from _dyme_prepare_kernel
    dst_ptr,  # [B, N, C] destination keys
    inv_norm_ptr,  # [B, N] fp32
    key_ptr,  # [B, N] int64 in/out: max over programs of (similarity, 0x7FFFFFFF - destination)
    N,
    C,
    D_PER_SPLIT,  # destinations per program along grid axis 1, a multiple of BLOCK_D
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32); fp16 always runs on tensor cores
):
    pid_s, pid_split, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < N
    d_lo = pid_split * D_PER_SPLIT
    d_hi = tl.minimum(d_lo + D_PER_SPLIT, N)
    src = src_ptr + b.to(tl.int64) * N * C
    dst = dst_ptr + b.to(tl.int64) * N * C
    inv_norm = inv_norm_ptr + b.to(tl.int64) * N
    k_chunks = tl.cdiv(C, BLOCK_C)

    acc = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    best = tl.full([BLOCK_S], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_S], tl.int32)
    # One flat loop over (destination block, channel chunk), not two nested ones, so the loads pipeline across
    # destination blocks too; the argmax epilogue runs after each block's last chunk.
    for it in range(0, tl.cdiv(d_hi - d_lo, BLOCK_D) * k_chunks):
        d_blk = it // k_chunks
        k = it - d_blk * k_chunks
        offs_c = k * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        offs_d = d_lo + d_blk * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < d_hi
        a = tl.load(src + offs_s[:, None] * C + offs_c[None, :], mask=mask_s[:, None] & mask_c[None, :], other=0.0)
        d = tl.load(dst + offs_d[:, None] * C + offs_c[None, :], mask=mask_d[:, None] & mask_c[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(d), acc, input_precision=PRECISION)  # [BLOCK_S, BLOCK_D] raw dots
        if k == k_chunks - 1:
            # Cosine up to the source's norm (a positive factor per row, which keeps the row's argmax).
            sim = acc * tl.load(inv_norm + offs_d, mask=mask_d, other=0.0)[None, :]
            sim = tl.where(mask_d[None, :], sim, float("-inf"))
            blk_best, blk_idx = tl.max(sim, axis=1, return_indices=True, return_indices_tie_break_left=True)
            better = blk_best > best  # strict: an equal value in a later block keeps the lower index
            best = tl.where(better, blk_best, best)
            best_idx = tl.where(better, blk_idx + d_lo + d_blk * BLOCK_D, best_idx)
            acc = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)

    # Pack (similarity, -index) so that int64 order is (higher similarity, then lower index) and splits combine
    # with one integer max. fp32 -> order-preserving int32: flip the magnitude bits of negatives; -0.0 -> +0.0.
    bits = tl.where(best == 0.0, 0.0, best).to(tl.int32, bitcast=True)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    packed = (bits.to(tl.int64) << 32) | (0x7FFFFFFF - best_idx).to(tl.int64)
    tl.atomic_max(key_ptr + b.to(tl.int64) * N + offs_s, packed, mask=mask_s)


@triton.jit
def _dyme_segments_kernel(
    key_ptr,  # [B, N] int64 from _dyme_assign_kernel
    perm_ptr,  # [B, 2N] int64
    sorted_tok_ptr,  # [B, N] int32 out: source tokens sorted by (destination, source)
    sorted_dst_ptr,  # [B, N] int32 out: their destinations
    start_ptr,  # [B, N + 1] int32 out: destination d's sources are sorted[start[d]:start[d + 1]]
    N,
    BLOCK_Q: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid, b = tl.program_id(0), tl.program_id(1)
    offs_q = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)  # this program's sources, and destinations 0..N
    mask_s = offs_q < N
    keys = key_ptr + b.to(tl.int64) * N
    dst_q = _decode_dst(tl.load(keys + offs_q, mask=mask_s, other=0))
    sort_q = tl.where(mask_s, dst_q * N + offs_q, 0)  # (destination, source) as one int32
    lim_q = offs_q * N  # sort keys below d * N are exactly the sources of destinations < d
    rank = tl.zeros([BLOCK_Q], tl.int32)
    start = tl.zeros([BLOCK_Q], tl.int32)
    for t0 in range(0, N, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < N
        sort_t = _decode_dst(tl.load(keys + offs_t, mask=mask_t, other=0)) * N + offs_t
        sort_t = tl.where(mask_t, sort_t, 0x7FFFFFFF)  # [BLOCK_T]
        rank += tl.sum((sort_t[None, :] < sort_q[:, None]).to(tl.int32), axis=1)
        start += tl.sum((sort_t[None, :] < lim_q[:, None]).to(tl.int32), axis=1)
    tok = tl.load(perm_ptr + b.to(tl.int64) * 2 * N + offs_q, mask=mask_s, other=0)
    tl.store(sorted_tok_ptr + b.to(tl.int64) * N + rank, tok.to(tl.int32), mask=mask_s)
    tl.store(sorted_dst_ptr + b.to(tl.int64) * N + rank, dst_q, mask=mask_s)
    tl.store(start_ptr + b.to(tl.int64) * (N + 1) + offs_q, start, mask=offs_q <= N)


@triton.jit
def _dyme_merge_kernel(
    perm_ptr,  # [B, 2N] int64
    sorted_tok_ptr,  # [B, N] int32 from _dyme_segments_kernel
    sorted_dst_ptr,  # [B, N] int32
    start_ptr,  # [B, N + 1] int32
    bank0,  # parts 0..2: [B, N, C_p] bank, current and merged output (unused parts repeat part 0, C_p = 0)
    cur0,
    out0,
    C0,
    bank1,
    cur1,
    out1,
    C1,
    bank2,
    cur2,
    out2,
    C2,
    N,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_d, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # Grid axis 1 enumerates the channel blocks of part 0, then part 1, then part 2.
    nc0, nc1 = tl.cdiv(C0, BLOCK_C), tl.cdiv(C1, BLOCK_C)
    if pid_c < nc0:
        bank_ptr, cur_ptr, out_ptr, C, cb = bank0, cur0, out0, C0, pid_c
    elif pid_c < nc0 + nc1:
        bank_ptr, cur_ptr, out_ptr, C, cb = bank1, cur1, out1, C1, pid_c - nc0
    else:
        bank_ptr, cur_ptr, out_ptr, C, cb = bank2, cur2, out2, C2, pid_c - nc0 - nc1
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    d0 = pid_d * BLOCK_D
    offs_r = tl.arange(0, BLOCK_D)  # destination rows of this block, relative to d0
    mask_d = d0 + offs_r < N
    start = start_ptr + b.to(tl.int64) * (N + 1)
    seg_lo = tl.load(start + d0 + offs_r, mask=mask_d, other=0)
    count = tl.load(start + d0 + offs_r + 1, mask=mask_d, other=0) - seg_lo  # sources per destination
    lo = tl.load(start + d0)
    hi = tl.load(start + tl.minimum(d0 + BLOCK_D, N))
    sorted_tok = sorted_tok_ptr + b.to(tl.int64) * N
    sorted_dst = sorted_dst_ptr + b.to(tl.int64) * N

    acc = tl.zeros([BLOCK_D, BLOCK_C], tl.float32)  # sum of each destination's sources
    for t0 in range(lo, hi, BLOCK_T):  # this block's sources, in (destination, source) order
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < hi
        tok = tl.load(sorted_tok + offs_t, mask=mask_t, other=0)
        row = tl.load(sorted_dst + offs_t, mask=mask_t, other=-1) - d0  # [BLOCK_T] in [0, BLOCK_D)
        src = _load_tokens(bank_ptr, cur_ptr, b, tok, offs_c, N, C, mask_t[:, None] & mask_c[None, :])
        one_hot = (offs_r[:, None] == row[None, :]).to(src.dtype)  # [BLOCK_D, BLOCK_T]
        acc = tl.dot(one_hot, src, acc, input_precision=PRECISION)  # [BLOCK_D, BLOCK_C]

    mask = mask_d[:, None] & mask_c[None, :]
    tok_d = tl.load(perm_ptr + b.to(tl.int64) * 2 * N + N + d0 + offs_r, mask=mask_d, other=0)
    dst = _load_tokens(bank_ptr, cur_ptr, b, tok_d, offs_c, N, C, mask).to(tl.float32)
    merged = (dst + acc) / (1.0 + count.to(tl.float32))[:, None]  # mean including the destination itself
    out_offs = b.to(tl.int64) * N * C + (d0 + offs_r).to(tl.int64)[:, None] * C + offs_c[None, :]
    tl.store(out_ptr + out_offs, merged.to(out_ptr.dtype.element_ty), mask=mask)


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(n)))  # tl.dot needs every block dim >= 16


def _interpreted() -> bool:
    return not isinstance(_dyme_assign_kernel, triton.runtime.JITFunction)


@functools.lru_cache
def _programs_per_wave(device: torch.device) -> int:
    """How many assignment programs fill the device: its SM count (a host-side property, no sync)."""
    if device.type != "cuda":
        return 8  # interpreter: enough to split the destinations of the tests' sizes, so the splits are tested
    return torch.cuda.get_device_properties(device).multi_processor_count


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp16 ignores it; fp32 must not round to TF32


def _check_part(name: str, t: torch.Tensor, like: torch.Tensor, k: torch.Tensor) -> None:
    """One part of bank or current: the shape of its bank part `like`, the dtype and device of bank K."""
    B, N = k.shape[:2]
    if t.dim() != 3 or tuple(t.shape[:2]) != (B, N) or t.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected [{B}, {N}, C] like the bank part")
    if t.dtype != k.dtype or t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} is {t.dtype}, expected {k.dtype} (one of {SUPPORTED_DTYPES}) like bank K")
    if not t.is_contiguous():
        raise ValueError(f"{name} is not contiguous: pass .contiguous() tensors")
    if t.device != k.device:
        raise ValueError(f"{name} is on {t.device}, expected {k.device} like bank K")


def _check_inputs(bank: Sequence[torch.Tensor], current: Sequence[torch.Tensor], perm: torch.Tensor) -> None:
    if len(bank) == 0 or len(bank) != len(current) or len(bank) > MAX_PARTS:
        raise ValueError(
            f"DyMe needs the same parts (K, V[, O]: 1 to {MAX_PARTS}) of bank and current, got {len(bank)} and "
            f"{len(current)}"
        )
    k = bank[0]
    if k.dim() != 3:
        raise ValueError(f"DyMe tensors are [B, N, C], got bank K of shape {tuple(k.shape)}")
    if k.device.type != "cuda" and not _interpreted():
        raise ValueError(
            f"the Triton DyMe kernels need CUDA tensors, got {k.device}; use dyme.dyme_merge (it falls back to "
            "dyme_ref), or set TRITON_INTERPRET=1 before importing triton to interpret them on the CPU"
        )
    B, N = k.shape[:2]
    if N > MAX_TOKENS or N * max(x.shape[-1] for x in bank) >= 2**31:
        raise ValueError(
            f"the DyMe kernels take at most {MAX_TOKENS} tokens and N * C < 2**31 per layer (int32 sort keys and "
            f"offsets), got N={N}, C={max(x.shape[-1] for x in bank)}"
        )
    for i, (x, y) in enumerate(zip(bank, current)):
        for name, t in ((f"bank[{i}]", x), (f"current[{i}]", y)):
            _check_part(name, t, x, k)
    if tuple(perm.shape) != (B, 2 * N) or perm.dtype != torch.int64 or perm.device != k.device:
        raise ValueError(
            f"perm must be an int64 [{B}, {2 * N}] permutation on {k.device}, got {perm.dtype} {tuple(perm.shape)} "
            f"on {perm.device}"
        )
    if not perm.is_contiguous():
        raise ValueError("perm is not contiguous: pass perm.contiguous()")


def _assign_keys(bank_k: torch.Tensor, cur_k: torch.Tensor, perm: torch.Tensor, eps: float) -> torch.Tensor:
    """Launches 1 and 2: [B, N] int64 packed (similarity, 0x7FFFFFFF - destination) of each source."""
    B, N, C = bank_k.shape
    small = _interpreted()  # interpreter: small blocks, so the tests' sizes span several of them
    src, dst = torch.empty_like(bank_k), torch.empty_like(bank_k)
    inv_norm = torch.empty(B, N, dtype=torch.float32, device=bank_k.device)
    keys = torch.empty(B, N, dtype=torch.int64, device=bank_k.device)
    # Rows per program: enough programs (about 64 per batch element) for the small layers too.
    block_r, block_c = (16, _block(C, 32)) if small else (min(32, max(4, triton.next_power_of_2(N // 64))), 128)
    _dyme_prepare_kernel[(triton.cdiv(N, block_r), B)](
        bank_k, cur_k, perm, src, dst, inv_norm, keys, N, C, eps, BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=min(4, max(1, block_r // 4)),  # 16-byte loads for the short tiles too
    )  # fmt: skip

    if small:
        block_s, block_d, block_c, warps, stages = _block(N, 32), _block(N, 32), _block(C, 32), 4, 1
    elif bank_k.dtype == torch.float16:  # at most 3 stages of two 128x64 fp16 tiles: 96 KiB of shared memory
        cap, warps = (128, 8) if N >= 2048 else (64, 4)  # smaller layers: smaller tiles, more programs
        block_s, block_d, block_c, stages = _block(N, cap), _block(N, cap), 64, 3
    else:  # fp32 (tests and references only): CUDA-core FMA dot
        block_s, block_d, block_c, warps, stages = _block(N, 64), _block(N, 64), 32, 4, 2
    # Split the destinations so that about one wave of programs covers the device; no split left empty.
    s_blocks, d_blocks = triton.cdiv(N, block_s), triton.cdiv(N, block_d)
    splits = max(1, min(d_blocks, _programs_per_wave(bank_k.device) // (s_blocks * B)))
    d_per_split = triton.cdiv(d_blocks, splits) * block_d
    grid = (s_blocks, triton.cdiv(N, d_per_split), B)
    _dyme_assign_kernel[grid](
        src, dst, inv_norm, keys, N, C, d_per_split, BLOCK_S=block_s, BLOCK_D=block_d, BLOCK_C=block_c,
        PRECISION=_precision(bank_k.dtype), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return keys


def _segments(keys: torch.Tensor, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch 3: (sorted source tokens [B, N], their destinations [B, N], segment starts [B, N + 1]), int32."""
    B, N = keys.shape
    sorted_tok = torch.empty(B, N, dtype=torch.int32, device=keys.device)
    sorted_dst = torch.empty(B, N, dtype=torch.int32, device=keys.device)
    start = torch.empty(B, N + 1, dtype=torch.int32, device=keys.device)
    block_q, block_t = (32, 32) if _interpreted() else (32, 256)
    _dyme_segments_kernel[(triton.cdiv(N + 1, block_q), B)](
        keys, perm, sorted_tok, sorted_dst, start, N, BLOCK_Q=block_q, BLOCK_T=block_t
    )
    return sorted_tok, sorted_dst, start


def dyme_assign_triton(bank_k: torch.Tensor, cur_k: torch.Tensor, perm: torch.Tensor, eps: float) -> torch.Tensor:
    """bank_k, cur_k: [B, N, C] keys; perm: [B, 2N] int64. Returns [B, N] int64: each source's destination."""
    _check_inputs([bank_k], [cur_k], perm)
    return 0x7FFFFFFF - (_assign_keys(bank_k, cur_k, perm, eps) & 0xFFFFFFFF)


def dyme_segments_triton(assign: torch.Tensor, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stable sort of launch 3 for a given assignment ([B, N] int64 destinations in [0, N)), for tests:
    (perm's source tokens sorted by (destination, source), their destinations, segment starts [B, N + 1])."""
    B, N = assign.shape
    for name, t, shape in (("assign", assign, (B, N)), ("perm", perm, (B, 2 * N))):
        if t.dtype != torch.int64 or tuple(t.shape) != shape or not t.is_contiguous() or t.device != assign.device:
            want = f"a contiguous int64 {list(shape)} tensor on {assign.device}"
            raise ValueError(f"{name} must be {want}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    return _segments(0x7FFFFFFF - assign, perm)  # the key of similarity 0: only the destination bits matter


def dyme_merge_triton(
    bank: Sequence[torch.Tensor], current: Sequence[torch.Tensor], perm: torch.Tensor, eps: float
) -> list[torch.Tensor]:
    """As `dyme.dyme_ref`: bank/current (K, V[, O]) each [B, N, C], perm [B, 2N] int64 -> merged parts."""
    _check_inputs(bank, current, perm)
    sorted_tok, sorted_dst, start = _segments(_assign_keys(bank[0], current[0], perm, eps), perm)
    B, N = bank[0].shape[:2]
    merged = [torch.empty_like(x) for x in bank]
    if _interpreted():
        block_d, block_t, block_c, warps = 32, 32, 64, 4
    else:
        block_d, block_t, block_c, warps = 64, 64, 64 if bank[0].dtype == torch.float16 else 32, 4
    parts = [(x, y, out, x.shape[2]) for x, y, out in zip(bank, current, merged)]
    parts += [(bank[0], current[0], merged[0], 0)] * (MAX_PARTS - len(parts))  # C = 0: no programs
    grid = (triton.cdiv(N, block_d), sum(triton.cdiv(c, block_c) for *_, c in parts), B)
    _dyme_merge_kernel[grid](
        perm, sorted_tok, sorted_dst, start, *(arg for part in parts for arg in part), N,
        BLOCK_D=block_d, BLOCK_T=block_t, BLOCK_C=block_c, PRECISION=_precision(bank[0].dtype), num_warps=warps,
    )  # fmt: skip
    return merged
