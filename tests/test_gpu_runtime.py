"""CUDA graphs and the engine backends on a GPU. The GPU tests are marked `gpu` and skip without CUDA; the host-side
logic that picks a graph per frame (the stream's `plan()`) and the CPU refusals are checked everywhere.

GPU builds come from the shared `tiny_build` (32x32, 2 steps): TensorRT where a flavour that runs on this GPU is
installed (TensorRT-RTX does not run on Hopper), AOTInductor packages compiled for this GPU otherwise too.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from conftest import tiny_spec

from streamv2v_trt import BankConfig, FrameError, StreamConfig, StreamV2V
from streamv2v_trt.bank import BankOp
from streamv2v_trt.cuda_graph import CudaGraphStream
from streamv2v_trt.pipeline import FramePlan

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SPEC = tiny_spec(height=32, width=32, steps=2)
T_INDEX = (20, 35)
PRECISIONS = {torch.float32: "fp32", torch.float16: "fp16"}


def video(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size, size, 3)).astype(np.int16)
    return [np.clip(base + rng.integers(-6, 7, base.shape) + i, 0, 255).astype(np.uint8) for i in range(n)]


def describe(plan: FramePlan) -> str:
    return (
        ("prime " if plan.prime else "") + plan.bank.kind + (f" {plan.bank.slot}" if plan.bank.kind == "store" else "")
    )


@pytest.mark.parametrize(
    "spec, expected",
    [
        (tiny_spec(height=32, width=32), ["store 0", "none", "merge", "none", "merge", "none"]),
        (
            tiny_spec(height=32, width=32, bank="fifo", bank_frames=2),
            ["store 0", "none", "store 1", "none", "store 0", "none"],
        ),
    ],
    ids=["dyme", "fifo"],
)
def test_plan_predicts_what_the_bank_does(one_thread, spec, expected):
    """The graph key is decided before the frame runs; it must agree with what the frame then does."""
    bank = BankConfig(interval=2)
    stream = StreamV2V.from_pretrained(StreamConfig(spec, bank=bank))
    seen = []
    for frame in video(6, 32):
        plan = stream.plan()
        stored, perm = stream.bank.stored, stream.bank.perm_index.item()
        valid = stream.bank.valid.clone()
        stream(frame)
        seen.append(describe(plan))
        assert stream.bank.stored == stored + (plan.bank.kind != "none")
        if plan.bank.kind == "store":
            assert (stream.bank.valid[:, plan.bank.slot] == 1).all()  # [B, S]: every batch element's slot
        else:
            assert torch.equal(stream.bank.valid, valid)
        assert stream.bank.perm_index.item() == (perm + (plan.bank.kind == "merge")) % bank.perm_pool
    assert seen == expected
    stream.reset()
    assert stream.plan() == FramePlan(False, BankOp("store", 0))  # reset needs no recapture: a plan already seen


def test_prime_is_planned_for_the_first_frame_after_a_reset(one_thread):
    stream = StreamV2V.from_pretrained(StreamConfig(SPEC, T_INDEX, prime=True))
    plans = []
    for frame in video(3, 32):
        plans.append(stream.plan())
        stream(frame)
    assert [describe(p) for p in plans] == ["prime store 0", "none", "none"]
    stream.reset()
    assert stream.plan() == plans[0]
    unprimed = StreamV2V.from_pretrained(StreamConfig(SPEC, T_INDEX))
    assert unprimed.plan() == FramePlan(False, BankOp("store", 0))


def test_graphs_refuse_a_cpu_stream(one_thread):
    stream = StreamV2V.from_pretrained(StreamConfig(SPEC, T_INDEX))
    with pytest.raises(ValueError, match="CUDA device"):
        CudaGraphStream(stream)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_tensorrt_backend_says_what_to_do_without_a_gpu():
    from streamv2v_trt.backends.tensorrt import check_device

    for flavour in ("tensorrt", "tensorrt-rtx"):
        with pytest.raises(RuntimeError, match=r"runs on a CUDA GPU .*backend='onnxruntime'"):
            check_device(torch.device("cuda"), flavour)
    with pytest.raises(RuntimeError, match="asked cpu"):
        check_device(torch.device("cpu"), "tensorrt")


def test_tensorrt_dtypes_cover_the_engine_io():
    trt = pytest.importorskip("tensorrt_rtx")
    from streamv2v_trt.backends.tensorrt import _TRT_TYPE_NAMES
    from streamv2v_trt.layout import DTYPES

    def torch_dtype(trt_dtype):
        return DTYPES[_TRT_TYPE_NAMES[trt_dtype.name]]

    assert torch_dtype(trt.float16) is torch.float16 and torch_dtype(trt.float32) is torch.float32
    assert torch_dtype(trt.int64) is torch.int64  # timestep
    assert set(_TRT_TYPE_NAMES.values()) <= set(DTYPES)


def tensorrt_builder() -> str:
    """The TensorRT flavour that builds engines that run on this GPU, or skip."""
    from streamv2v_trt.backends.tensorrt_import import rtx_runs_on

    if importlib.util.find_spec("tensorrt") is not None:
        return "tensorrt"
    capability = torch.cuda.get_device_capability()
    if importlib.util.find_spec("tensorrt_rtx") is not None and rtx_runs_on(capability):
        return "tensorrt-rtx"
    pytest.skip(f"no TensorRT flavour that runs on compute capability {capability} is installed")


def open_stream(backend: str, dtype: torch.dtype, tiny_build, prompt: str) -> StreamV2V:
    """A CUDA stream of the tiny 32x32 2-step model on `backend` ("eager", "tensorrt" or "aoti") in `dtype`."""
    spec = tiny_spec(height=32, width=32, steps=2, precision=PRECISIONS[dtype])
    if backend == "eager":
        return StreamV2V.from_pretrained(StreamConfig(spec, T_INDEX), device="cuda", prompt=prompt)
    options = {"builder": tensorrt_builder()} if backend == "tensorrt" else {"builder": "aoti", "device": "cuda"}
    folder = tiny_build(spec, **options)
    return StreamV2V.from_engines(folder, backend, device="cuda", prompt=prompt, t_index_list=T_INDEX)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["eager", "tensorrt", "aoti"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_graph_replay_equals_eager_on_gpu(tiny_build, backend, dtype):
    """Whole frames replayed from CUDA graphs equal the same backend's frames run call by call."""
    plain = open_stream(backend, dtype, tiny_build, "a cat")
    graphed = CudaGraphStream(open_stream(backend, dtype, tiny_build, "a cat"))
    assert plain.backend.name == backend and plain.dtype == dtype
    frames = video(30, 32)
    for i, frame in enumerate(frames):
        if i == 15:  # a prompt change writes into the captured buffers: no recapture
            plain.update_prompt("a dog")
            graphed.update_prompt("a dog")
        if i == 22:
            plain.reset()
            graphed.reset()
        a, b = plain(frame), graphed(frame)
        assert np.abs(a.astype(np.int16) - b).max() <= 1, f"frame {i}"
    # steady and merge frames replayed from graphs; the first frame (seen twice: start and reset) too.
    assert {p.bank.kind for p in graphed.graphs} == {"none", "merge", "store"}
    assert len(graphed.graphs) == 3 and graphed.prompt == "a dog"
    # Every frame ran once: eagerly (its plan's first sighting, the warm-up) or replayed from its plan's graph.
    assert graphed.graphs.replays + sum(graphed.graphs.seen.values()) == len(frames)
    # A frame the fixed input buffer cannot take raises through the stream's edge and changes nothing.
    frame_id = graphed.stream.frame_id
    for bad in (frames[0][:16], frames[0].astype(np.float32) / 255, [[0, 0, 0]]):
        with pytest.raises(FrameError, match="graphed frames must be uint8"):
            graphed(bad)
    assert graphed.stream.frame_id == frame_id
    # A device frame gives a device frame, without a host sync.
    out = graphed(torch.from_numpy(frames[0]).cuda())
    assert out.is_cuda and out.shape == (32, 32, 3) and out.dtype == torch.uint8


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["tensorrt", "aoti"])
def test_engine_backend_matches_eager_in_fp16(tiny_build, backend):
    engine = open_stream(backend, torch.float16, tiny_build, "a cat")
    assert engine.backend.name == backend and engine.dtype == torch.float16
    eager = open_stream("eager", torch.float16, tiny_build, "a cat")
    assert eager.cfg == engine.cfg
    scores = [psnr(eager(frame), engine(frame)) for frame in video(20, 32)]
    assert min(scores) >= 30.0, scores  # fp16 engine vs fp16 eager: different kernels, same maths
    if backend == "tensorrt":  # bank buffers are bound once: the engine reads the pipeline's own tensors
        bound = engine.backend._unet.bind_inputs.bound
        assert bound["bank_k.0"] == engine.bank.tensors["bank_k.0"].data_ptr()
