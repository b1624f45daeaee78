"""The engine path on the CPU: the shared tiny fp32 build run by ONNX Runtime against the eager pipeline, frame by
frame (32x32, 2 denoising steps so the stream batch is exercised, DyMe every 4 frames)."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from conftest import tiny_spec

from streamv2v_trt import CfgType, StreamConfig, StreamV2V
from streamv2v_trt.frames import frame_to_tensor, tensor_to_frame
from streamv2v_trt.stream import Stream

SPEC = tiny_spec(height=32, width=32, steps=2)  # the UNet batch holds two frames in flight
SIZE = SPEC.height
PROMPT = "a watercolor cat"


def video(n: int, seed: int = 0) -> list[np.ndarray]:
    """A slowly drifting random scene: consecutive frames are similar, as in a video (so fusion can trigger)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.int16)
    return [np.clip(base + rng.integers(-6, 7, base.shape) + i, 0, 255).astype(np.uint8) for i in range(n)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ort_stream(tiny_build):
    return StreamV2V.from_engines(tiny_build(SPEC), "onnxruntime", prompt=PROMPT, threads=1)


def test_onnxruntime_matches_eager_for_50_frames(ort_stream):
    s = ort_stream
    s.reset()
    assert isinstance(s, Stream) and s.backend.name == "onnxruntime" and s.cfg.steps == 2 and s.cfg.bank.interval == 4
    assert s.cfg.t_index_list == SPEC.default_t_index_list() and s.dtype == torch.float32
    eager = StreamV2V.from_pretrained(s.cfg, prompt=PROMPT)
    assert eager.backend.name == "eager"
    merges = 0
    for i, frame in enumerate(video(50)):
        stored = s.bank.stored
        plan = s.plan()
        assert plan == eager.plan()
        a, b = eager(frame), s(frame)
        assert a.dtype == b.dtype == np.uint8 and a.shape == b.shape == (SIZE, SIZE, 3)
        assert np.abs(a.astype(np.int16) - b).max() <= 1, f"frame {i}"
        torch.testing.assert_close(s.latents, eager.latents, atol=1e-4, rtol=0, msg=f"latents after frame {i}")
        if i % 4 == 0:  # DyMe frames: frame 0 stores, 4, 8, ... merge; the banks must agree after each
            assert plan.bank.kind == ("merge" if i else "store") and s.bank.stored == stored + 1
            merges += plan.bank.kind == "merge"
            for name, t in s.bank.tensors.items():
                torch.testing.assert_close(t, eager.bank.tensors[name], atol=1e-4, rtol=0, msg=f"{name}, frame {i}")
        else:
            assert plan.bank.kind == "none" and s.bank.stored == stored
    assert merges == 12
    assert s.bank.valid.tolist() == [[1.0]] * SPEC.unet_batch  # [B, S]


def test_bank_and_io_buffers_stay_put_over_200_frames(ort_stream):
    s = ort_stream
    s.reset()
    frames = video(200, seed=1)
    for f in frames[:8]:  # warm-up: first store, first merge, inputs bound
        s(f)
    unet = s.backend._unet  # the UNet's OnnxRunner
    bank_ptrs = {n: t.data_ptr() for n, t in s.bank.tensors.items()}
    state_ptrs = [t.data_ptr() for t in (s.sample, s.encoder_hidden_states, s.noise, s.stock_noise, s.bank.valid)]
    out_ptrs = {n: t.data_ptr() for n, t in unet.outputs.items()}
    bound = dict(unet.bind_inputs.bound)
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
    assert {n: t.data_ptr() for n, t in unet.outputs.items()} == out_ptrs
    # Bound once: the UNet's inputs are the pipeline's own buffers, never rebound nor staged after warm-up.
    assert unet.bind_inputs.bound == bound and unet.bind_inputs.staging == {}
    assert bound["bank_k.0"] == s.bank.tensors["bank_k.0"].data_ptr() and bound["sample"] == s.sample.data_ptr()
    assert s.bank.stored == 50 and s.frame_id == 200


def test_prompt_change_and_reset_without_rebuild(ort_stream):
    s = ort_stream
    s.reset()
    frames = video(6, seed=2)
    first = [s(f) for f in frames]
    s.update_prompt("a pencil sketch of a dog")
    changed = s(frames[0])
    s.reset()
    s.update_prompt(PROMPT)
    again = [s(f) for f in frames]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))  # reset really forgets the stream
    assert s.frame_id == 6 and s.bank.stored == 2
    assert not np.array_equal(changed, first[0])


def test_sibling_streams_share_the_runners_not_the_state(ort_stream):
    """Two streams on one backend (own banks, noise and counters), interleaved frame by frame, give what each
    gives alone: the runners rebind their inputs to whichever stream's buffers they are handed."""
    s = ort_stream
    s.reset()
    other = s.sibling()
    assert other.backend is s.backend and other.bank is not s.bank and other.prompt == PROMPT
    other.update_prompt("a pencil sketch of a dog")
    a, b = video(9, seed=3), video(9, seed=4)
    together = [(s(x), other(y)) for x, y in zip(a, b)]
    s.reset()
    alone_s = [s(x) for x in a]
    alone_other = s.sibling()
    alone_other.update_prompt("a pencil sketch of a dog")
    alone_o = [alone_other(y) for y in b]
    assert all(np.array_equal(t[0], x) for t, x in zip(together, alone_s))
    assert all(np.array_equal(t[1], y) for t, y in zip(together, alone_o))
    assert not np.array_equal(together[-1][0], together[-1][1])


def test_in_place_hot_path_equals_the_allocating_one():
    """The hot path writes into fixed buffers; it must compute exactly what the torch.cat version did."""
    cfg = StreamConfig(
        tiny_spec(height=SIZE, width=SIZE, steps=3, cfg_type=CfgType.SELF), (20, 30, 40), guidance_scale=1.6
    )
    new = StreamV2V.from_pretrained(cfg, prompt="x")
    old = StreamV2V.from_pretrained(cfg, prompt="x")
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
    s.bank.update(s.frame_id, out)
    s.frame_id += 1
    s.latents[1:] = sch.add_noise(denoised[:-1], s.noise[1:], slice(1, None))
    return tensor_to_frame(s.backend.decode(denoised[-1:]), frame)
