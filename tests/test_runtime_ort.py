"""The engine path on the CPU: a tiny fp32 build run by onnxruntime against the eager pipeline, frame by frame.

One build (tiny, 32x32, 2 denoising steps so the stream batch is exercised, DyMe every 4 frames) is shared
by every test here.
"""

from __future__ import annotations

import gc
import shutil

import numpy as np
import pytest
import torch

from build_engines import BuildConfig, build
from streamv2v_trt import CfgType, StreamConfig, StreamV2V
from streamv2v_trt.async_stream import AsyncStream
from streamv2v_trt.engine import EngineMismatch
from streamv2v_trt.frames import FrameError, frame_to_tensor, tensor_to_frame

SIZE = 32
T_INDEX = (20, 35)  # steps=2: the UNet batch holds two frames in flight


def video(n: int, seed: int = 0) -> list[np.ndarray]:
    """A slowly drifting random scene: consecutive frames are similar, as in a video (so fusion can trigger)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.int16)
    return [np.clip(base + rng.integers(-6, 7, base.shape) + i, 0, 255).astype(np.uint8) for i in range(n)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "tiny32"
    build(
        BuildConfig(out, model="tiny", height=SIZE, width=SIZE, t_index_list=T_INDEX, precision="fp32", onnx_only=True)
    )
    return out


@pytest.fixture(scope="module")
def ort_stream(engines):
    return StreamV2V.from_engines(engines, "onnxruntime", prompt="a watercolor cat", threads=1)


def test_onnxruntime_matches_eager_for_50_frames(ort_stream):
    s = ort_stream
    s.reset()
    assert s.backend.name == "onnxruntime" and s.cfg.steps == 2 and s.cfg.bank.interval == 4
    eager = StreamV2V.from_pretrained("tiny", s.cfg, prompt="a watercolor cat")
    merges = 0
    for i, frame in enumerate(video(50)):
        stored = s.bank.stored
        a, b = eager(frame), s(frame)
        assert a.dtype == b.dtype == np.uint8 and a.shape == b.shape == (SIZE, SIZE, 3)
        assert np.abs(a.astype(np.int16) - b).max() <= 1, f"frame {i}"
        torch.testing.assert_close(s.latents, eager.latents, atol=1e-4, rtol=0, msg=f"latents after frame {i}")
        if i % 4 == 0:  # DyMe frames: frame 0 stores, 4, 8, ... merge; the banks must agree after each
            assert s.bank.stored == stored + 1
            merges += stored > 0
            for name, t in s.bank.tensors.items():
                torch.testing.assert_close(t, eager.bank.tensors[name], atol=1e-4, rtol=0, msg=f"{name}, frame {i}")
        else:
            assert s.bank.stored == stored
    assert merges == 12
    assert s.bank.valid.tolist() == [1.0]


def test_bank_and_io_buffers_stay_put_over_200_frames(ort_stream):
    s = ort_stream
    s.reset()
    frames = video(200, seed=1)
    for f in frames[:8]:  # warm-up: first store, first merge, staging buffers bound
        s(f)
    bank_ptrs = {n: t.data_ptr() for n, t in s.bank.tensors.items()}
    state_ptrs = [t.data_ptr() for t in (s.sample, s.encoder_hidden_states, s.noise, s.stock_noise, s.bank.valid)]
    out_ptrs = {n: t.data_ptr() for n, t in s.backend._unet.outputs.items()}
    gc.collect()
    live = sum(isinstance(o, torch.Tensor) for o in gc.get_objects())
    for f in frames[8:]:
        s(f)
    gc.collect()
    assert sum(isinstance(o, torch.Tensor) for o in gc.get_objects()) == live  # no tensor accumulates
    assert {n: t.data_ptr() for n, t in s.bank.tensors.items()} == bank_ptrs
    assert [t.data_ptr() for t in (s.sample, s.encoder_hidden_states, s.noise, s.stock_noise, s.bank.valid)] == (
        state_ptrs
    )
    assert {n: t.data_ptr() for n, t in s.backend._unet.outputs.items()} == out_ptrs
    # Bound once: the UNet's inputs were never rebound after warm-up (the pipeline hands the same buffers).
    assert s.backend._unet.bind_inputs.bound["bank_k.0"] == s.bank.tensors["bank_k.0"].data_ptr()
    assert s.bank.stored == 50 and s.frame_id == 200


def test_prompt_change_and_reset_without_rebuild(ort_stream):
    s = ort_stream
    s.reset()
    frames = video(6, seed=2)
    first = [s(f) for f in frames]
    s.update_prompt("a pencil sketch of a dog")
    changed = s(frames[0])
    s.reset()
    s.update_prompt("a watercolor cat")
    again = [s(f) for f in frames]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))  # reset really forgets the stream
    assert s.frame_id == 6 and s.bank.stored == 2
    assert not np.array_equal(changed, first[0])


def test_engine_mismatches_reach_the_user(engines, tmp_path):
    with pytest.raises(EngineMismatch, match=r"height: engines have 32, asked 64.*python -m build_engines"):
        StreamV2V.from_engines(engines, "onnxruntime", StreamConfig(height=64, width=SIZE, t_index_list=T_INDEX))
    with pytest.raises(EngineMismatch, match=r"UNet batch: engines have 2.*asked 1"):
        StreamV2V.from_engines(engines, "onnxruntime", StreamConfig(height=SIZE, width=SIZE, t_index_list=(32,)))
    with pytest.raises(EngineMismatch, match="onnx-only build, asked TensorRT engines"):
        StreamV2V.from_engines(engines, "tensorrt")
    with pytest.raises(EngineMismatch, match="precision: engines have fp32, asked fp16"):
        StreamV2V.from_engines(engines, "onnxruntime", precision="fp16")
    with pytest.raises(EngineMismatch, match="no manifest.json"):
        StreamV2V.from_engines(tmp_path, "onnxruntime")
    # UNet batch 3 (RCFG initialize) is not what the engines were built for, though the step count matches.
    with pytest.raises(EngineMismatch, match=r"UNet batch: engines have 2 .*asked 3 .*--cfg-type initialize"):
        cfg = StreamConfig(height=SIZE, width=SIZE, t_index_list=T_INDEX, cfg_type=CfgType.INITIALIZE)
        StreamV2V.from_engines(engines, "onnxruntime", cfg)
    altered = tmp_path / "altered"
    shutil.copytree(engines, altered)
    with open(altered / "vae_decoder.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01")
    with pytest.raises(EngineMismatch, match="vae_decoder.*altered or truncated"):
        StreamV2V.from_engines(altered, "onnxruntime")


def test_in_place_hot_path_equals_the_allocating_one():
    """The hot path writes into fixed buffers; it must compute exactly what the torch.cat version did."""
    cfg = StreamConfig(height=SIZE, width=SIZE, t_index_list=(20, 30, 40), cfg_type=CfgType.SELF, guidance_scale=1.6)
    new = StreamV2V.from_pretrained("tiny", cfg, prompt="x")
    old = StreamV2V.from_pretrained("tiny", cfg, prompt="x")
    for i, frame in enumerate(video(5, seed=3)):
        assert np.array_equal(new(frame), _allocating_frame(old, frame)), f"frame {i}"
        assert torch.equal(new.stock_noise, old.stock_noise) and torch.equal(new.latents, old.latents)


def _allocating_frame(s: StreamV2V, frame: np.ndarray) -> np.ndarray:
    """StreamV2V.__call__ for RCFG self before its state was written in place (torch.cat and rebinding)."""
    cfg, sch = s.cfg, s.schedule
    latent = s.backend.encode(frame_to_tensor(frame, cfg.height, cfg.width, resize=False, device="cpu", dtype=s.dtype))
    s.latents[0:1] = sch.add_noise(latent, s.noise[0:1], slice(0, 1))
    s.stock_noise = torch.cat([s.noise[0:1], s.stock_noise[:-1]])
    out = s.backend.unet(s.unet_inputs())
    uncond = s.stock_noise * cfg.delta
    eps = uncond + cfg.guidance_scale * (out["noise_pred"] - uncond)
    denoised = sch.step(s.latents, eps)
    ones = torch.ones_like(sch.alpha[0:1])
    delta_x = (
        torch.cat([sch.alpha[1:], ones]) * sch.step(sch.beta * s.stock_noise, eps) / torch.cat([sch.beta[1:], ones])
    )
    s.stock_noise = torch.cat([s.noise[1:], s.noise[0:1]]) + delta_x
    if s.frame_id % cfg.bank.interval == 0:
        s.bank.update(out)
    s.frame_id += 1
    s.latents[1:] = sch.add_noise(denoised[:-1], s.noise[1:], slice(1, None))
    return tensor_to_frame(s.backend.decode(denoised[-1:]), frame)


def test_async_stream_latest_frame_wins(ort_stream):
    s = ort_stream
    s.reset()
    frames = video(12, seed=4)
    results = []
    with AsyncStream(s, max_results=64) as live:
        for f in frames:
            live.push(f)  # faster than the stream: frames still waiting are replaced
        assert live.wait_idle(timeout=60)
        while True:
            try:
                results.append(live.get(timeout=0))
            except TimeoutError:
                break
        live.push(np.zeros((SIZE + 8, SIZE, 3), np.uint8))  # a bad frame: its error reaches the consumer
        with pytest.raises(FrameError):
            live.get(timeout=60)
        assert live.pushed == 13 and live.processed + live.dropped == 13
    seqs = [r.seq for r in results]
    assert seqs == sorted(seqs) and seqs[-1] == 11  # the newest frame is always processed
    # The processed frames, in order, through the same stream from a reset give the same outputs.
    s.reset()
    for r in results:
        assert np.array_equal(s(frames[r.seq]), r.frame)


def test_async_stream_from_asyncio(ort_stream):
    import asyncio

    s = ort_stream
    s.reset()
    frames = video(3, seed=5)

    async def session() -> list:
        out = []
        with AsyncStream(s) as live:
            live.update_prompt("a pencil sketch")  # runs on the worker, before the next frame
            for f in frames:
                live.push(f)
                out.append(await live.aget(timeout=60))  # one at a time: nothing is dropped
            live.update_prompt(42)  # a bad command: its error comes back through get
            with pytest.raises(TypeError):
                await live.aget(timeout=60)
        return out

    results = asyncio.run(session())
    assert [r.seq for r in results] == [0, 1, 2] and all(r.latency_s > 0 for r in results)
    s.reset()
    s.update_prompt("a pencil sketch")
    assert all(np.array_equal(s(f), r.frame) for f, r in zip(frames, results))
    s.update_prompt("a watercolor cat")
