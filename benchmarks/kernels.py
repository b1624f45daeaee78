"""`python -m benchmarks.kernels`: the DyMe bank update, Triton kernels vs the torch reference, on sd-turbo layer sizes.

Times `kernels.dyme_triton.dyme_merge_triton` and `kernels.dyme.dyme_ref` on the same CUDA tensors with CUDA events
(after warm-up) and prints ms and effective GB/s: the minimum bytes a merge must move (bank and current read once,
the merged bank written once, the permutation read) over the time. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from kernels.dyme import COSINE_EPS, dyme_assign, dyme_ref

# (N tokens, C channels) of sd-turbo's self-attention layers at 512x512 (latent 64x64).
SD_TURBO_LAYERS = ((4096, 320), (1024, 640), (256, 1280))
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def time_ms(fn, warmup: int, iters: int) -> float:
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


def bench_layer(n: int, c: int, batch: int, parts: int, dtype: torch.dtype, warmup: int, iters: int) -> dict:
    from kernels.dyme_triton import dyme_assign_triton, dyme_merge_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    bank = [torch.randn(batch, n, c, device="cuda", dtype=dtype, generator=g) for _ in range(parts)]
    current = [torch.randn(batch, n, c, device="cuda", dtype=dtype, generator=g) for _ in range(parts)]
    perm = torch.rand(batch, 2 * n, device="cuda", generator=g).argsort(-1)  # [B, 2N] int64

    # Correctness beside speed: the kernel's assignment against the fp32 reference (fp16 near-ties may differ).
    assign = dyme_assign_triton(bank[0], current[0], perm, COSINE_EPS)
    want = dyme_assign(torch.cat([bank[0], current[0]], dim=1).float(), perm)
    match = (assign == want).float().mean().item()

    triton_ms = time_ms(lambda: dyme_merge_triton(bank, current, perm, COSINE_EPS), warmup, iters)
    ref_ms = time_ms(lambda: dyme_ref(bank, current, perm), warmup, iters)
    elt = torch.finfo(dtype).bits // 8
    nbytes = 3 * parts * batch * n * c * elt + perm.numel() * 8  # read bank + current, write merged; perm
    return dict(n=n, c=c, triton_ms=triton_ms, ref_ms=ref_ms, nbytes=nbytes, match=match)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1, help="UNet batch (denoising steps); sd-turbo uses 1")
    parser.add_argument("--parts", type=int, default=3, choices=(2, 3), help="merged tensors: K, V (2) or K, V, O (3)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("benchmarks.kernels: no CUDA device here; the Triton DyMe kernels are timed on a GPU only.")
        return 0
    print(f"DyMe merge on {torch.cuda.get_device_name()}: batch {args.batch}, {args.parts} parts, {args.dtype}")
    print(f"{'N':>6} {'C':>5} | {'triton ms':>9} {'GB/s':>7} | {'torch ms':>9} {'GB/s':>7} | speed-up | assign==ref")
    for n, c in SD_TURBO_LAYERS:
        r = bench_layer(n, c, args.batch, args.parts, DTYPES[args.dtype], args.warmup, args.iters)
        gbs = lambda ms: r["nbytes"] / ms / 1e6  # noqa: B023 (used at once)
        print(
            f"{n:>6} {c:>5} | {r['triton_ms']:>9.3f} {gbs(r['triton_ms']):>7.1f} | {r['ref_ms']:>9.3f} "
            f"{gbs(r['ref_ms']):>7.1f} | {r['ref_ms'] / r['triton_ms']:>7.2f}x | {100 * r['match']:.2f}%"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
