"""Triton DyMe kernels against the torch reference `dyme_ref`, on odd sizes so every mask is exercised.

Without CUDA the kernels run under Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1
before anything imports triton); with CUDA they are compiled and run on the GPU.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

from streamv2v_trt.kernels import dyme_triton  # noqa: E402
from streamv2v_trt.kernels.dyme import COSINE_EPS, dyme_assign, dyme_merge, dyme_ref  # noqa: E402

COMPILED = isinstance(dyme_triton._dyme_assign_kernel, triton.runtime.JITFunction)
if COMPILED and not torch.cuda.is_available():
    pytest.skip("Triton kernels compiled but no CUDA: TRITON_INTERPRET=1 was set too late", allow_module_level=True)
DEVICE = "cuda" if COMPILED else "cpu"

# B, N, C: N=1, N below / above one block (the interpreter runs 32-token blocks, so 37 and 70 tokens span several,
# and the destinations split over two programs), C below 16 and not a power of two, C over one 64-channel block.
SIZES = [(2, 37, 24), (1, 1, 24), (3, 5, 3), (1, 70, 72)]
# fp32: the kernels accumulate in fp32 in another order than torch; fp16: one fp16 rounding of the output
# (values |x| < 4, ulp 2**-9) against the fp32 reference of the same inputs.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=2e-3)}


def make_inputs(B, N, C, dtype, parts=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    bank = [torch.randn(B, N, C, generator=g).to(DEVICE, dtype) for _ in range(parts)]
    current = [torch.randn(B, N, C, generator=g).to(DEVICE, dtype) for _ in range(parts)]
    perm = torch.rand(B, 2 * N, generator=g).argsort(-1).to(DEVICE)  # [B, 2N] int64
    return bank, current, perm


def fp32_ref(bank, current, perm):
    return dyme_ref([x.float() for x in bank], [x.float() for x in current], perm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,N,C", SIZES)
def test_assign_equals_reference(B, N, C, dtype):
    bank, current, perm = make_inputs(B, N, C, dtype, parts=1)
    got = dyme_triton.dyme_assign_triton(bank[0], current[0], perm, COSINE_EPS)
    # fp16 inputs are exact in fp32 and the kernel accumulates their products in fp32: same argmax as fp32.
    want = dyme_assign(torch.cat([bank[0], current[0]], dim=1).float(), perm)
    assert got.dtype == torch.int64 and got.shape == (B, N)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,N,C", SIZES)
def test_merge_equals_reference(B, N, C, dtype):
    bank, current, perm = make_inputs(B, N, C, dtype)
    got = dyme_triton.dyme_merge_triton(bank, current, perm, COSINE_EPS)
    for g, w in zip(got, fp32_ref(bank, current, perm)):
        assert g.dtype == dtype and g.shape == (B, N, C)
        torch.testing.assert_close(g.float(), w, **TOL[dtype])


def test_merge_matches_reference_in_its_own_dtype():
    bank, current, perm = make_inputs(2, 37, 24, torch.float16)
    got = dyme_triton.dyme_merge_triton(bank, current, perm, COSINE_EPS)
    for g, w in zip(got, dyme_ref(bank, current, perm)):  # the reference sums in fp16: a few ulps apart
        torch.testing.assert_close(g, w, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("programs", [1, 8, 1000], ids=["one-split", "two-splits", "split-per-block"])
def test_ties_go_to_the_lowest_destination_across_blocks(programs, monkeypatch):
    # The destinations' split over programs follows the device size: 1, 2 or 3 splits of 32-token blocks.
    monkeypatch.setattr(dyme_triton, "_programs_per_wave", lambda _device: programs)
    B, N, C = 1, 70, 8  # 70 destinations span three 32-token blocks
    bank, current, perm = make_inputs(B, N, C, torch.float32, parts=1)
    both = torch.cat([bank[0], current[0]], dim=1)
    # Every destination is 2 * e_0, normalised to exactly e_0, so each source's similarity to it is its first
    # normalised channel plus exact zeros: the same value whatever order a blocked dot product sums in (random
    # destinations tie only up to the rounding of each column's sum, which differs between CPUs).
    both[0, perm[0, N:]] = 0.0
    both[0, perm[0, N:], 0] = 2.0
    bank, current = [both[:, :N].contiguous()], [both[:, N:].contiguous()]
    got = dyme_triton.dyme_assign_triton(bank[0], current[0], perm, COSINE_EPS)
    assert torch.equal(got, torch.zeros_like(got))
    assert torch.equal(got, dyme_assign(both, perm))


def make_skewed_inputs(B, N, C, dtype, parts=3, seed=1):
    """Every source's key is near a direction u and one destination's key is 3u, while the other destinations
    point away from u: that destination draws all N sources (many chunks of the merge loop) and the
    other N - 1 draw none. The margin is wide, so the assignment has no near-tie."""
    bank, current, perm = make_inputs(B, N, C, torch.float32, parts, seed)
    g = torch.Generator().manual_seed(seed + 1)
    both = torch.cat([bank[0], current[0]], dim=1)  # [B, 2N, C]
    u = torch.randn(B, 1, C, generator=g)
    u = (u / u.norm(dim=-1, keepdim=True)).to(DEVICE)
    src, dst = perm[:, :N], perm[:, N:]
    noise = lambda: torch.randn(B, N, C, generator=g).to(DEVICE)
    both.scatter_(1, src.unsqueeze(-1).expand(-1, -1, C), 4 * u + 0.2 * noise())
    both.scatter_(1, dst.unsqueeze(-1).expand(-1, -1, C), noise() - 2 * u)  # pointing away from u
    both.scatter_(1, dst[:, N // 2 :][:, :1, None].expand(-1, -1, C), 3 * u.expand(-1, 1, -1))
    bank[0], current[0] = both[:, :N].contiguous(), both[:, N:].contiguous()
    return [x.to(dtype) for x in bank], [x.to(dtype) for x in current], perm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_one_destination_draws_every_source(dtype):
    B, N, C = 1, 80, 40  # 80 sources: several 32-source chunks of the merge loop in one program
    bank, current, perm = make_skewed_inputs(B, N, C, dtype)
    assign = dyme_triton.dyme_assign_triton(bank[0], current[0], perm, COSINE_EPS)
    assert torch.equal(assign, dyme_assign(torch.cat([bank[0], current[0]], dim=1).float(), perm))
    assert torch.equal(assign, torch.full_like(assign, N // 2))  # one destination takes all, N - 1 take none
    got = dyme_triton.dyme_merge_triton(bank, current, perm, COSINE_EPS)
    for g, w in zip(got, fp32_ref(bank, current, perm)):
        torch.testing.assert_close(g.float(), w, **TOL[dtype])


@pytest.mark.parametrize("skewed", [False, True])
def test_merge_is_deterministic(skewed):
    make = make_skewed_inputs if skewed else make_inputs
    bank, current, perm = make(1, 70, 24, torch.float16 if skewed else torch.float32, parts=2)
    first = dyme_triton.dyme_merge_triton(bank, current, perm, COSINE_EPS)
    second = dyme_triton.dyme_merge_triton(bank, current, perm, COSINE_EPS)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def segments_ref(assign, perm):
    """Plain torch: sources stably sorted by destination, and where each destination's run starts."""
    B, N = assign.shape
    order = torch.sort(assign, dim=1, stable=True).indices  # [B, N] source positions
    sorted_dst = assign.gather(1, order)
    start = torch.searchsorted(sorted_dst, torch.arange(N + 1, device=assign.device).expand(B, -1).contiguous())
    return perm[:, :N].gather(1, order), sorted_dst, start


@pytest.mark.parametrize(
    "case", ["random", "all_to_one", "identity", "one_token", "two_blocks"], ids=lambda c: c.replace("_", "-")
)
def test_segments_equal_torch_sort(case):
    g = torch.Generator().manual_seed(5)
    B, N = {"one_token": (1, 1), "two_blocks": (1, 70)}.get(case, (2, 37))
    perm = torch.rand(B, 2 * N, generator=g).argsort(-1).to(DEVICE)
    assign = {
        "random": lambda: torch.randint(0, 5, (B, N), generator=g) * 7,  # repeats, gaps, destinations above N/2
        "all_to_one": lambda: torch.full((B, N), N - 1),
        "identity": lambda: torch.arange(N).flip(0).expand(B, -1),
        "one_token": lambda: torch.zeros(B, N, dtype=torch.int64),
        "two_blocks": lambda: torch.randint(0, N, (B, N), generator=g),
    }[case]().to(DEVICE)
    got = dyme_triton.dyme_segments_triton(assign.contiguous(), perm)
    for g_, w in zip(got, segments_ref(assign, perm)):
        assert g_.dtype == torch.int32
        assert torch.equal(g_.long(), w)


def test_merge_reads_two_parts_and_unequal_channels():
    bank, current, perm = make_inputs(2, 37, 24, torch.float32, parts=2)
    bank[1], current[1] = bank[1][..., :20].contiguous(), current[1][..., :20].contiguous()  # V narrower than K
    got = dyme_triton.dyme_merge_triton(bank, current, perm, COSINE_EPS)
    assert len(got) == 2 and got[1].shape == (2, 37, 20)
    for g, w in zip(got, fp32_ref(bank, current, perm)):
        torch.testing.assert_close(g, w, **TOL[torch.float32])


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda b, c, p: (b, c, p.int()), "int64"),
        (lambda b, c, p: (b, c, p[:, :-1].contiguous()), "perm must be"),
        (lambda b, c, p: ([b[0].double()], [c[0].double()], p), "expected"),
        (lambda b, c, p: ([b[0].transpose(1, 2).contiguous().transpose(1, 2)], c, p), "not contiguous"),
        (lambda b, c, p: (b, [c[0][:, :-1]], p), "shape"),
        (lambda b, _c, p: (b, [], p), "same parts"),
        (lambda b, c, p: (b * 4, c * 4, p), "1 to 3"),
    ],
)
def test_launcher_rejects_bad_inputs(breakage, message):
    bank, current, perm = make_inputs(1, 5, 16, torch.float32, parts=1)
    with pytest.raises(ValueError, match=message):
        dyme_triton.dyme_merge_triton(*breakage(bank, current, perm), COSINE_EPS)


def test_launcher_rejects_too_many_tokens():
    n = dyme_triton.MAX_TOKENS + 1
    x, perm = torch.zeros(1, n, 1, device=DEVICE), torch.zeros(1, 2 * n, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="at most"):
        dyme_triton.dyme_merge_triton([x], [x], perm, COSINE_EPS)


def test_dyme_merge_uses_the_reference_on_cpu():
    bank, current, perm = make_inputs(2, 37, 24, torch.float32)
    bank, current, perm = [x.cpu() for x in bank], [x.cpu() for x in current], perm.cpu()
    assert all(torch.equal(a, b) for a, b in zip(dyme_merge(bank, current, perm), dyme_ref(bank, current, perm)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dyme_merge_cuda_graph_replay():
    """The Triton path is graph-capturable: no host sync, the permutation read on the device."""
    bank, current, perm = make_inputs(2, 256, 320, torch.float16)
    want = fp32_ref(bank, current, perm)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up compiles the kernels outside the capture
        dyme_merge(bank, current, perm)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dyme_merge(bank, current, perm)
    graph.replay()
    torch.cuda.synchronize()
    for g, w in zip(out, want):
        torch.testing.assert_close(g.float(), w, **TOL[torch.float16])
