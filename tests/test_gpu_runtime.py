"""CUDA graphs and the TensorRT backend. The GPU tests are marked `gpu` and skip without CUDA; the host-side
logic that picks a graph per frame is checked on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamv2v_trt import BankConfig, BankKind, StreamConfig, StreamV2V
from streamv2v_trt.cuda_graph import CudaGraphStream, FramePlan, frame_plan

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def video(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size, size, 3)).astype(np.int16)
    return [np.clip(base + rng.integers(-6, 7, base.shape) + i, 0, 255).astype(np.uint8) for i in range(n)]


@pytest.mark.parametrize(
    "bank, expected",
    [
        (
            BankConfig(interval=2),
            ["first store 0", "none", "merge", "none", "merge", "none"],
        ),
        (
            BankConfig(kind=BankKind.FIFO, frames=2, interval=2),
            ["first store 0", "none", "store 1", "none", "store 0", "none"],
        ),
    ],
)
def test_frame_plan_predicts_what_the_bank_does(one_thread, bank, expected):
    """The graph key is decided before the frame runs; it must agree with what the frame then does."""
    stream = StreamV2V.from_pretrained("tiny", StreamConfig(height=32, width=32, bank=bank))
    seen = []
    for frame in video(6, 32):
        plan = frame_plan(stream)
        stored, perm = stream.bank.stored, stream.bank.perm_index.item()
        stream(frame)
        seen.append(("first " if plan.first else "") + plan.bank + (f" {plan.slot}" if plan.bank == "store" else ""))
        assert stream.bank.stored == stored + (plan.bank != "none")
        if plan.bank == "store":
            assert stream.bank.valid[plan.slot] == 1
        assert stream.bank.perm_index.item() == (perm + (plan.bank == "merge")) % bank.perm_pool
    assert seen == expected
    stream.reset()
    assert frame_plan(stream) == FramePlan(True, "store", 0)  # reset needs no recapture: a plan already seen


def test_graphs_refuse_a_cpu_stream(one_thread):
    stream = StreamV2V.from_pretrained("tiny", StreamConfig(height=32, width=32))
    with pytest.raises(ValueError, match="CUDA device"):
        CudaGraphStream(stream)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_tensorrt_backend_says_what_to_do_without_a_gpu(one_thread):
    from streamv2v_trt.backends.tensorrt import TensorRTBackend

    stream = StreamV2V.from_pretrained("tiny", StreamConfig(height=32, width=32))
    with pytest.raises(RuntimeError, match="runs on a CUDA GPU.*backend='onnxruntime'"):
        TensorRTBackend("unet.engine", "vae_encoder.engine", "vae_decoder.engine", stream.backend.layout)


def test_tensorrt_dtypes_cover_the_engine_io():
    trt = pytest.importorskip("tensorrt_rtx")
    from streamv2v_trt.backends.tensorrt import _torch_dtypes

    dtypes = _torch_dtypes(trt)
    assert dtypes[trt.float16] is torch.float16 and dtypes[trt.float32] is torch.float32
    assert dtypes[trt.int64] is torch.int64  # timestep


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_graph_replay_equals_eager_on_gpu(dtype):
    cfg = StreamConfig(height=64, width=64, t_index_list=(20, 35))
    plain = StreamV2V.from_pretrained("tiny", cfg, prompt="a cat", device="cuda", dtype=dtype)
    graphed = CudaGraphStream(StreamV2V.from_pretrained("tiny", cfg, prompt="a cat", device="cuda", dtype=dtype))
    frames = video(30, 64)
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
    assert {p.bank for p in graphed.graphs} == {"none", "merge", "store"}
    assert len(graphed.graphs) == 3
    # A device frame gives a device frame, without a host sync.
    out = graphed(torch.from_numpy(frames[0]).cuda())
    assert out.is_cuda and out.shape == (64, 64, 3)


@pytest.fixture(scope="module")
def trt_engines(tmp_path_factory):
    pytest.importorskip("tensorrt_rtx")
    from build_engines import BuildConfig, build

    out = tmp_path_factory.mktemp("trt") / "tiny64"
    build(BuildConfig(out, model="tiny", height=64, width=64, t_index_list=(20, 35), precision="fp16"))
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.gpu
@needs_cuda
def test_tensorrt_backend_matches_eager_in_fp16(trt_engines):
    trt_stream = StreamV2V.from_engines(trt_engines, "tensorrt", prompt="a cat")
    assert trt_stream.backend.name == "tensorrt" and trt_stream.dtype == torch.float16
    eager = StreamV2V.from_pretrained("tiny", trt_stream.cfg, prompt="a cat", device="cuda", dtype=torch.float16)
    graphed = CudaGraphStream(StreamV2V.from_engines(trt_engines, "tensorrt", prompt="a cat"))
    scores = []
    for i, frame in enumerate(video(20, 64)):
        a, b, c = eager(frame), trt_stream(frame), graphed(frame)
        scores.append(psnr(a, b))
        assert np.abs(b.astype(np.int16) - c).max() <= 1, f"graphed tensorrt differs at frame {i}"
    assert min(scores) >= 30.0, scores  # fp16 engine vs fp16 eager: different kernels, same maths
    # Bank buffers are bound once: the engine reads the pipeline's own tensors.
    bound = trt_stream.backend._unet.bind_inputs.bound
    assert bound["bank_k.0"] == trt_stream.bank.tensors["bank_k.0"].data_ptr()
