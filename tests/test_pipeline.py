"""The eager streaming pipeline: bank bookkeeping, prompts, reset, bad input."""

import gc

import numpy as np
import pytest
import torch

from streamv2v_trt import BankConfig, FrameError, StreamConfig, StreamV2V

SIZE = 64


def make_stream(prompt="a painting of a cat", **kw):
    cfg = StreamConfig(height=SIZE, width=SIZE, t_index_list=kw.pop("t_index_list", (32,)), **kw)
    return StreamV2V.from_pretrained("tiny", cfg, prompt=prompt)


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
    stream = make_stream(bank=BankConfig(kind="fifo", frames=2, interval=2))
    for f in clip(7):
        stream(f)
    assert stream.bank.stored == 4  # frames 0, 2, 4, 6
    assert stream.bank.valid.tolist() == [1.0, 1.0]


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
        StreamConfig(height=60, width=64)
    with pytest.raises(ValueError, match="t_index_list"):
        StreamConfig(t_index_list=(50,))
    with pytest.raises(ValueError, match="DyMe bank holds exactly 1 frame"):
        BankConfig(kind="dyme", frames=2)
