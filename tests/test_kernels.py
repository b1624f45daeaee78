"""Triton DyMe kernels against the torch reference `dyme_ref`, on odd sizes so every mask is exercised.

Without CUDA the kernels run under Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1
before anything imports triton); with CUDA they are compiled and run on the GPU.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

from kernels import dyme_triton  # noqa: E402
from kernels.dyme import COSINE_EPS, dyme_assign, dyme_merge, dyme_ref  # noqa: E402

COMPILED = isinstance(dyme_triton._dyme_assign_kernel, triton.runtime.JITFunction)
if COMPILED and not torch.cuda.is_available():
    pytest.skip("Triton kernels compiled but no CUDA: TRITON_INTERPRET=1 was set too late", allow_module_level=True)
DEVICE = "cuda" if COMPILED else "cpu"

# B, N, C: N=1, N below / above one block (16, 32 and 64-token blocks), C below 16 and not a power of two,
# C over one 64-channel block.
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


def test_ties_go_to_the_lowest_destination_across_blocks():
    B, N, C = 1, 70, 8  # 70 destinations span two 64-token blocks
    bank, current, perm = make_inputs(B, N, C, torch.float32, parts=1)
    both = torch.cat([bank[0], current[0]], dim=1)
    both[0, perm[0, N:]] = torch.randn(C, generator=torch.Generator().manual_seed(3)).to(DEVICE)  # all dsts equal
    bank, current = [both[:, :N].contiguous()], [both[:, N:].contiguous()]
    got = dyme_triton.dyme_assign_triton(bank[0], current[0], perm, COSINE_EPS)
    assert torch.equal(got, torch.zeros_like(got))
    assert torch.equal(got, dyme_assign(both, perm))


def test_merge_is_deterministic():
    bank, current, perm = make_inputs(2, 70, 24, torch.float32)
    first = dyme_triton.dyme_merge_triton(bank, current, perm, COSINE_EPS)
    second = dyme_triton.dyme_merge_triton(bank, current, perm, COSINE_EPS)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


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
        (lambda b, c, p: (b, [], p), "same parts"),
    ],
)
def test_launcher_rejects_bad_inputs(breakage, message):
    bank, current, perm = make_inputs(1, 5, 16, torch.float32, parts=1)
    with pytest.raises(ValueError, match=message):
        dyme_triton.dyme_merge_triton(*breakage(bank, current, perm), COSINE_EPS)


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
