"""`python -m benchmarks.kernels`: the DyMe bank update, Triton kernels vs the torch reference, on sd-turbo layer sizes.

Checks, then times. Per layer size it checks `streamv2v_trt.kernels.dyme_triton` against
`streamv2v_trt.kernels.dyme.dyme_ref` on the same inputs (fp32 reference of the same values): the assignment
must be equal, except where the reference's two candidates are a near-tie (cosines within ASSIGN_TIE_TOL, where
fp32 summation order decides), and the merged K, V[, O] must match to TOL on every destination that no such
near-tie touches. Any other difference fails: it prints what differs and exits 1.

Then it times the Triton path and the torch reference with CUDA events (median after warm-up) and prints ms and
effective GB/s: the minimum bytes a merge must move (bank and current read once, the merged bank written once,
the permutation read) over the time. The rows: each sd-turbo layer size, then a whole 16-layer merge eagerly, as
one CUDA graph, and as the runtime runs it (the graph plus the copy of each merged part into the bank). Without
CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

from streamv2v_trt.kernels.dyme import COSINE_EPS, dyme_assign, dyme_ref

# sd-turbo's 16 self-attention layers at 512x512 (latent 64x64): (N tokens, C channels, merged parts). The four
# fusion layers (mid block, up_blocks.1) merge K, V and O; the others K and V.
DOWN = [(4096, 320, 2)] * 2 + [(1024, 640, 2)] * 2 + [(256, 1280, 2)] * 2
MID = [(256, 1280, 3)]
UP = [(256, 1280, 3)] * 3 + [(1024, 640, 2)] * 3 + [(4096, 320, 2)] * 3
SD_TURBO_LAYERS = tuple(DOWN + MID + UP)
LAYER_SIZES = tuple(dict.fromkeys(SD_TURBO_LAYERS))  # distinct, in order
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
# Merged outputs against the fp32 reference: fp16 outputs carry one fp16 rounding (|x| < 4: ulp 2**-9).
TOL = {torch.float16: dict(rtol=1e-3, atol=2e-3), torch.float32: dict(rtol=1e-5, atol=1e-5)}
ASSIGN_TIE_TOL = 1e-4  # cosine gap under which the Triton and torch argmax may differ (fp32 summation order)


def make_layer(n: int, c: int, parts: int, batch: int, dtype: torch.dtype, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    bank = [torch.randn(batch, n, c, device="cuda", dtype=dtype, generator=g) for _ in range(parts)]
    current = [torch.randn(batch, n, c, device="cuda", dtype=dtype, generator=g) for _ in range(parts)]
    perm = torch.rand(batch, 2 * n, device="cuda", generator=g).argsort(-1)  # [B, 2N] int64
    return bank, current, perm


def check_layer(bank, current, perm) -> tuple[list[str], str]:
    """(failures, summary): the Triton assignment and merge against the fp32 reference."""
    from streamv2v_trt.kernels.dyme_triton import dyme_assign_triton, dyme_merge_triton

    B, N, C = bank[0].shape
    keys = torch.cat([bank[0], current[0]], dim=1).float()  # [B, 2N, C]
    got = dyme_assign_triton(bank[0], current[0], perm, COSINE_EPS)
    want = dyme_assign(keys, perm)
    failures = []
    differ = got != want  # [B, N]
    if differ.any():  # allowed only at near-ties of the reference's own cosines
        m = keys / keys.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)
        a = m.gather(1, perm[:, :N, None].expand(-1, -1, C))  # sources [B, N, C]
        d = m.gather(1, perm[:, N:, None].expand(-1, -1, C))  # destinations
        cos = lambda idx: (a * d.gather(1, idx[..., None].expand(-1, -1, C))).sum(-1)
        gap = (cos(want) - cos(got))[differ].abs().max()
        if gap > ASSIGN_TIE_TOL:
            failures.append(f"assignment differs beyond a near-tie: cosine gap {gap:.1e} > {ASSIGN_TIE_TOL}")
    # Destinations that a near-tie source moved between are left out of the merge comparison.
    touched = torch.zeros(B, N, dtype=torch.bool, device=got.device)
    b_idx, s_idx = differ.nonzero(as_tuple=True)  # a host sync: fine in a check
    touched[b_idx, got[b_idx, s_idx]] = True
    touched[b_idx, want[b_idx, s_idx]] = True
    merged = dyme_merge_triton(bank, current, perm, COSINE_EPS)
    reference = dyme_ref([x.float() for x in bank], [x.float() for x in current], perm)
    worst = 0.0
    for i, (g_, w) in enumerate(zip(merged, reference)):
        g_, w = g_.float()[~touched], w[~touched]
        worst = max(worst, (g_ - w).abs().max().item())
        try:
            torch.testing.assert_close(g_, w, **TOL[bank[0].dtype])
        except AssertionError as e:
            failures.append(f"merged part {i} differs from dyme_ref: " + " ".join(str(e).split()[:40]))
    summary = (
        f"assign: {int(differ.sum())} source(s) differ; merge: max |err| {worst:.1e}, {int(touched.sum())} rows skipped"
    )
    return failures, summary


def time_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median time of one call, in ms, measured with CUDA events around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """fn captured in a CUDA graph (warmed up on a side stream first, which compiles the kernels)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def nbytes(n: int, c: int, parts: int, batch: int, dtype: torch.dtype) -> int:
    elt = torch.finfo(dtype).bits // 8
    return 3 * parts * batch * n * c * elt + batch * 2 * n * 8  # read bank + current, write merged; perm


HEADER = f"{'layer (N, C, parts)':<24} | {'triton ms':>9} {'GB/s':>7} | {'torch ms':>9} {'GB/s':>7} | speed-up | check"


def row(label: str, triton_ms: float, ref_ms: float | None, size: int, note: str = "") -> str:
    """One table row; GB/s = `size` bytes over the time."""
    gbs = lambda ms: size / ms / 1e6
    ref = f"{ref_ms:>9.3f} {gbs(ref_ms):>7.1f} | {ref_ms / triton_ms:>7.2f}x" if ref_ms else " " * 28
    return f"{label:<24} | {triton_ms:>9.3f} {gbs(triton_ms):>7.1f} | {ref} | {note}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1, help="UNet batch (denoising steps); sd-turbo uses 1")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("benchmarks.kernels: no CUDA device here; the Triton DyMe kernels are checked and timed on a GPU only.")
        return 0
    from streamv2v_trt.kernels.dyme_triton import dyme_merge_triton

    dtype = DTYPES[args.dtype]
    merge = lambda b, c, p: dyme_merge_triton(b, c, p, COSINE_EPS)
    print(f"DyMe merge on {torch.cuda.get_device_name()}: batch {args.batch}, {args.dtype}, checked in fp32")
    print(HEADER)
    failures = []
    for n, c, parts in LAYER_SIZES:
        bank, current, perm = make_layer(n, c, parts, args.batch, dtype, seed=0)
        bad, summary = check_layer(bank, current, perm)
        failures += [f"({n}, {c}, {parts}): {f}" for f in bad]
        triton_ms = time_ms(lambda: merge(bank, current, perm), args.warmup, args.iters)  # noqa: B023
        ref_ms = time_ms(lambda: dyme_ref(bank, current, perm), args.warmup, args.iters)  # noqa: B023
        size = nbytes(n, c, parts, args.batch, dtype)
        print(row(f"{n} x {c}, {parts} parts", triton_ms, ref_ms, size, ("FAIL: " if bad else "ok: ") + summary))

    layers = [make_layer(n, c, parts, args.batch, dtype, seed=i) for i, (n, c, parts) in enumerate(SD_TURBO_LAYERS)]
    size = sum(nbytes(n, c, parts, args.batch, dtype) for n, c, parts in SD_TURBO_LAYERS)

    def triton_all() -> None:
        for bank, current, perm in layers:
            merge(bank, current, perm)

    def runtime_all() -> None:  # as streamv2v_trt.bank applies a merge: copy each merged part into the bank
        for bank, current, perm in layers:
            for b, m in zip(bank, merge(bank, current, perm)):
                b.copy_(m)

    ref_ms = time_ms(lambda: [dyme_ref(*layer) for layer in layers], args.warmup, args.iters)
    timed = lambda fn: time_ms(fn, args.warmup, args.iters)
    print(row("16 layers, eager", timed(triton_all), ref_ms, size))
    print(row("16 layers, CUDA graph", timed(graphed(triton_all)), None, size))
    print(row("16 layers, graph + copy_", timed(graphed(runtime_all)), None, size, "as streamv2v_trt.bank applies it"))
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
