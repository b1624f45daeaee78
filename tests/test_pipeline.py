"""The eager streaming pipeline: bank bookkeeping, prompts, reset, bad input."""

import gc

import numpy as np
import pytest
import torch
from conftest import tiny_spec

from streamv2v_trt import BankConfig, EngineSpec, FrameError, StreamConfig, StreamV2V
from streamv2v_trt.bank import NO_UPDATE, BankOp
from streamv2v_trt.frames import image_to_uint8, uint8_to_image
from streamv2v_trt.pipeline import FramePlan

SIZE = 64

pytestmark = pytest.mark.usefixtures("one_thread")


def make_stream(prompt="a painting of a cat", t_index_list=(32,), spec=None, **runtime):
    """A tiny 64x64 fp32 stream; `spec`: EngineSpec fields besides the steps (which follow `t_index_list`)."""
    cfg = StreamConfig(tiny_spec(steps=len(t_index_list), **(spec or {})), t_index_list=t_index_list, **runtime)
    return StreamV2V.from_pretrained(cfg, prompt=prompt)


def clip(n, seed=0):
    """A smooth pan over a random texture: consecutive frames share most content."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (SIZE, SIZE + 4 * n, 3), dtype=np.uint8)
    return [np.ascontiguousarray(texture[:, 4 * i : 4 * i + SIZE]) for i in range(n)]


def live_tensors():
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_stream_30_frames_constant_bank_and_no_tensor_growth():
    stream = make_stream()
    frames = clip(30)
    shapes = {k: (tuple(v.shape), v.data_ptr()) for k, v in stream.bank.inputs().items()}
    seen = set()

    def step(f):
        out = stream(f)
        assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
        seen.add(out.tobytes())

    for f in frames[:5]:
        step(f)
    gc.collect()
    before = live_tensors()
    for f in frames[5:]:
        step(f)
    gc.collect()
    assert live_tensors() <= before
    assert {k: (tuple(v.shape), v.data_ptr()) for k, v in stream.bank.inputs().items()} == shapes
    assert stream.frame_id == 30
    assert stream.bank.stored == len(range(0, 30, 4))  # frames 0, 4, ..., 28 update the bank
    assert len(seen) > 1


def test_bank_changes_the_output_after_frame_0():
    with_bank, frames = make_stream(), clip(6)
    outs = [with_bank(f) for f in frames]
    # Frame 5 through a stream whose bank was emptied just before it differs: the bank is used.
    fresh = make_stream()
    fresh(frames[0])
    fresh.reset()
    assert not np.array_equal(fresh(frames[5]), outs[5])


def test_prompt_change_takes_effect_and_matches_a_fresh_stream():
    a, b = make_stream("a cat"), make_stream("a cat")
    frames = clip(6)
    for f in frames[:3]:
        np.testing.assert_array_equal(a(f), b(f))
    b.update_prompt("a dog in the snow, oil painting")
    assert b.prompt == "a dog in the snow, oil painting"
    assert any(not np.array_equal(a(f), b(f)) for f in frames[3:])
    b.reset()
    fresh = make_stream("a dog in the snow, oil painting")
    np.testing.assert_array_equal(b(frames[0]), fresh(frames[0]))


@pytest.mark.parametrize("t_index_list", [(32,), (20, 30, 40)])
def test_reset_restores_frame0_behaviour(t_index_list):
    stream = make_stream(t_index_list=t_index_list)
    frames = clip(9)
    first = [stream(f) for f in frames[:3]]
    for f in frames[3:]:
        stream(f)
    stream.reset()
    assert stream.frame_id == 0 and stream.bank.stored == 0
    assert float(stream.bank.valid.sum()) == 0
    for f, expected in zip(frames[:3], first):
        np.testing.assert_array_equal(stream(f), expected)


def test_fifo_bank_streams():
    stream = make_stream(spec=dict(bank="fifo", bank_frames=2), bank=BankConfig(interval=2))
    for f in clip(7):
        stream(f)
    assert stream.bank.stored == 4  # frames 0, 2, 4, 6
    assert stream.bank.valid.unique(dim=0).squeeze(0).tolist() == [1.0, 1.0]


def test_torch_frames_in_torch_frames_out():
    stream = make_stream()
    out = stream(torch.from_numpy(clip(1)[0]))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.uint8 and out.shape == (SIZE, SIZE, 3)


BAD_FRAMES = {
    "wrong size": np.zeros((SIZE, SIZE + 8, 3), np.uint8),
    "grayscale": np.zeros((SIZE, SIZE), np.uint8),
    "rgba": np.zeros((SIZE, SIZE, 4), np.uint8),
    "int32": np.zeros((SIZE, SIZE, 3), np.int32),
    "nan": np.full((SIZE, SIZE, 3), np.nan, np.float32),
    "float out of range": np.full((SIZE, SIZE, 3), 3.0, np.float32),
    "not an array": [[0, 0, 0]],
}


@pytest.mark.parametrize("name", BAD_FRAMES)
def test_bad_frames_raise_and_leave_the_stream_usable(name):
    stream, reference = make_stream(), make_stream()
    frames = clip(3)
    np.testing.assert_array_equal(stream(frames[0]), reference(frames[0]))
    with pytest.raises(FrameError):
        stream(BAD_FRAMES[name])
    assert stream.frame_id == 1
    for f in frames[1:]:
        np.testing.assert_array_equal(stream(f), reference(f))


def test_resize_option_accepts_other_sizes_and_float_frames():
    stream = make_stream(resize=True)
    big = np.random.default_rng(0).integers(0, 256, (2 * SIZE, 3 * SIZE, 3), dtype=np.uint8)
    assert stream(big).shape == (SIZE, SIZE, 3)
    assert stream(big.astype(np.float32) / 255).shape == (SIZE, SIZE, 3)


def test_bad_prompt_and_config_errors():
    stream = make_stream()
    with pytest.raises(TypeError, match="prompt must be a str"):
        stream.update_prompt(None)
    with pytest.raises(ValueError, match="multiples of 8"):
        StreamConfig(tiny_spec(height=60, width=64))
    with pytest.raises(ValueError, match="t_index_list"):
        StreamConfig(tiny_spec(), t_index_list=(50,))
    with pytest.raises(ValueError, match="DyMe bank holds exactly 1 frame"):
        EngineSpec("tiny", bank="dyme", bank_frames=2)
    with pytest.raises(ValueError, match="has 2 step"):  # the step count is the spec's
        StreamConfig(tiny_spec(), t_index_list=(20, 30))
    with pytest.raises(TypeError, match="build-time"):
        StreamConfig.from_spec(tiny_spec(), bank_frames=2)


# --- a frame is plan (host) -> render (device) -> advance (host counters) -----------------------------------


def test_plans_follow_the_bank_interval_and_priming():
    stream = make_stream(t_index_list=(20, 30), prime=True)
    frames = clip(9)
    plans = []
    for f in frames:
        plans.append(stream.plan())
        stream(f)
    store, merge = BankOp("store", 0), BankOp("merge")
    banks = [store, NO_UPDATE, NO_UPDATE, NO_UPDATE, merge, NO_UPDATE, NO_UPDATE, NO_UPDATE, merge]
    assert plans == [FramePlan(i == 0, op) for i, op in enumerate(banks)]  # only the first frame primes
    stream.reset()
    assert stream.plan() == FramePlan(True, store)
    assert make_stream().plan() == FramePlan(False, store)  # one step: nothing to prime


def test_call_is_plan_render_advance():
    a, b = make_stream(t_index_list=(20, 30, 40), prime=True), make_stream(t_index_list=(20, 30, 40), prime=True)
    for f in clip(6):
        want = a(f)
        with torch.inference_mode():
            plan = b.plan()
            image = uint8_to_image(torch.from_numpy(f), torch.float32)  # [1, 3, H, W] in [-1, 1]
            counters = (b.frame_id, b.bank.stored)
            out = b.render(plan, image)
            assert (b.frame_id, b.bank.stored) == counters  # render moves no host counter
            b.advance(plan)
        np.testing.assert_array_equal(image_to_uint8(out).numpy(), want)
    assert (a.frame_id, a.bank.stored) == (b.frame_id, b.bank.stored) == (6, 2)
