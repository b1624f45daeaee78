"""Frames in and out: the values that reach the model (uint8, float, resized) and the frames that are refused."""

import numpy as np
import pytest
import torch
from conftest import tiny_spec

from streamv2v_trt import FrameError, StreamConfig, StreamV2V
from streamv2v_trt.frames import as_tensor, frame_to_tensor, image_to_uint8, tensor_to_frame, uint8_to_image

SIZE = 64
BIG = (96, 80)  # H, W: another size and aspect ratio than the stream's, so a swapped H/W shows

pytestmark = pytest.mark.usefixtures("one_thread")


def to_model(frame, resize=False, size=SIZE):
    return frame_to_tensor(frame, size, size, resize=resize, device="cpu", dtype=torch.float32)


def texture(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def pil_resize(frame: np.ndarray, h: int, w: int) -> torch.Tensor:
    """An independent reference: PIL's bilinear resize (antialiased when shrinking) of each channel in float
    mode, mapped to [-1, 1] as [1, 3, h, w]. torch's antialiased bilinear is defined to match it."""
    from PIL import Image

    channels = [
        np.asarray(Image.fromarray(frame[..., c].astype(np.float32)).resize((w, h), Image.BILINEAR)) for c in range(3)
    ]
    x = torch.from_numpy(np.stack(channels)).double()[None] / 255  # [1, 3, h, w] in [0, 1]
    return x * 2 - 1


# --- values reaching the model --------------------------------------------------------------------------------


def test_uint8_frames_map_to_minus_one_one():
    frame = texture(SIZE, SIZE)
    frame[0, 0] = (0, 128, 255)
    x = to_model(frame)
    assert x.shape == (1, 3, SIZE, SIZE) and x.dtype == torch.float32
    want = torch.from_numpy(frame).permute(2, 0, 1)[None].double() / 255 * 2 - 1  # [1, 3, H, W]
    torch.testing.assert_close(x.double(), want, rtol=0, atol=1e-6)
    assert x[0, :, 0, 0].tolist() == pytest.approx([-1.0, 128 / 255 * 2 - 1, 1.0], abs=1e-6)
    assert torch.equal(to_model(torch.from_numpy(frame)), x)  # a torch frame takes the same arithmetic
    assert np.array_equal(image_to_uint8(x).numpy(), frame)  # and the way out inverts it exactly
    assert torch.equal(uint8_to_image(torch.from_numpy(frame), torch.float32), x)


def test_float_frames_equal_the_uint8_frame():
    frame = texture(SIZE, SIZE, seed=1)
    x = to_model(frame)
    assert torch.equal(to_model(frame.astype(np.float32) / 255), x)
    assert torch.equal(to_model(torch.from_numpy(frame).float() / 255), x)
    torch.testing.assert_close(to_model(frame.astype(np.float64) / 255), x, rtol=0, atol=1e-6)
    edges = np.zeros((SIZE, SIZE, 3), np.float32)
    edges[0, 0] = 1.0  # both ends of [0, 1] are valid
    y = to_model(edges)
    assert float(y.min()) == -1.0 and float(y.max()) == 1.0


@pytest.mark.parametrize("kind", ["uint8", "float"])
def test_resized_frame_values(kind):
    pytest.importorskip("PIL")
    frame = texture(*BIG, seed=2)
    given = frame if kind == "uint8" else frame.astype(np.float32) / 255
    x = to_model(given, resize=True)
    assert x.shape == (1, 3, SIZE, SIZE) and x.dtype == torch.float32
    # PIL float resize and torch agree to ~1e-5 of a uint8 level; 1e-5 in [-1, 1] is far below one level (7.8e-3).
    torch.testing.assert_close(x.double(), pil_resize(frame, SIZE, SIZE), rtol=0, atol=1e-5)
    # Antialiasing matters at this ratio: a plain bilinear resize is far off.
    plain = torch.nn.functional.interpolate(
        torch.from_numpy(frame).permute(2, 0, 1)[None].double() / 255, size=(SIZE, SIZE), mode="bilinear"
    )
    assert float((x.double() - (plain * 2 - 1)).abs().max()) > 0.1
    if kind == "float":
        torch.testing.assert_close(x, to_model(frame, resize=True), rtol=0, atol=1e-6)


def test_other_sizes_are_refused_without_resize():
    with pytest.raises(FrameError, match="96x80"):
        to_model(texture(*BIG))
    with pytest.raises(FrameError, match="resize=True"):
        to_model(texture(*BIG).astype(np.float32) / 255)


def test_tensor_to_frame_keeps_the_input_type():
    frame = texture(SIZE, SIZE, seed=3)
    x = to_model(frame)
    out = tensor_to_frame(x, frame)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and np.array_equal(out, frame)
    out = tensor_to_frame(x, torch.from_numpy(frame))
    assert isinstance(out, torch.Tensor) and torch.equal(out, torch.from_numpy(frame))
    clipped = tensor_to_frame(torch.full((1, 3, 2, 2), 5.0), frame)  # out of range saturates
    assert (clipped == 255).all()


# --- refused frames -------------------------------------------------------------------------------------------


def one_pixel(value, dtype=np.float32):
    """A valid float frame except for one pixel channel."""
    frame = texture(SIZE, SIZE, seed=4).astype(dtype) / 255
    frame[SIZE // 2, SIZE // 3, 1] = value
    return frame


BAD_FLOAT = {
    "one NaN": one_pixel(np.nan),
    "one +inf": one_pixel(np.inf),
    "one -inf": one_pixel(-np.inf),
    "one below 0": one_pixel(-0.01),
    "one above 1": one_pixel(1.01),
    "float64, one below 0": one_pixel(-1e-3, np.float64),
    "float16, one NaN": one_pixel(np.nan, np.float16),
}


@pytest.mark.parametrize("name", BAD_FLOAT)
def test_bad_float_pixels_raise(name):
    frame = BAD_FLOAT[name]
    with pytest.raises(FrameError):
        to_model(frame)
    with pytest.raises(FrameError):
        to_model(torch.from_numpy(frame))
    with pytest.raises(FrameError):  # checked before resizing too: a resize would smear the pixel away
        to_model(np.ascontiguousarray(np.pad(frame, ((0, 32), (0, 16), (0, 0)), mode="edge")), resize=True)


def test_as_tensor_refuses_what_is_not_an_rgb_frame():
    for bad in (np.zeros((SIZE, SIZE), np.uint8), np.zeros((SIZE, SIZE, 4), np.uint8), [[0, 0, 0]]):
        with pytest.raises(FrameError):
            as_tensor(bad)
    with pytest.raises(FrameError, match="dtype"):
        as_tensor(np.zeros((SIZE, SIZE, 3), np.int32))
    with pytest.raises(FrameError, match="object"):
        as_tensor(np.empty((SIZE, SIZE, 3), dtype=object))
    frame = texture(SIZE, SIZE)
    assert as_tensor(frame).data_ptr() == frame.__array_interface__["data"][0]  # no copy


# --- the stream: values reaching the model, and a bad frame changes nothing ------------------------------------


@pytest.fixture(scope="module")
def stream():
    """A resizing tiny stream; tests take `stream.sibling()` (same networks, own bank and counters)."""
    return StreamV2V.from_pretrained(StreamConfig(tiny_spec(), resize=True), prompt="a painting of a cat")


def clip(n, seed=0):
    rng = np.random.default_rng(seed)
    strip = rng.integers(0, 256, (SIZE, SIZE + 8 * n, 3), dtype=np.uint8)
    return [np.ascontiguousarray(strip[:, 8 * i : 8 * i + SIZE]) for i in range(n)]


def render(stream, image):
    """One frame through the stream from an image tensor [1, 3, H, W] in [-1, 1], as uint8 HxWx3."""
    with torch.inference_mode():
        plan = stream.plan()
        out = stream.render(plan, image)
        stream.advance(plan)
    return image_to_uint8(out).numpy()


def test_stream_resizes_and_takes_floats_with_the_values_of_the_reference(stream):
    pytest.importorskip("PIL")
    frames = [texture(*BIG, seed=10 + i) for i in range(3)]
    resizing, reference = stream.sibling(), stream.sibling()
    for i, f in enumerate(frames):
        given = f if i % 2 == 0 else f.astype(np.float32) / 255  # uint8 and float frames, in one stream
        out = resizing(given)
        want = render(reference, pil_resize(f, SIZE, SIZE).float())
        assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
        assert np.abs(out.astype(int) - want.astype(int)).max() <= 1, i  # 1e-5 input difference: a rounding


def test_float_frames_stream_like_uint8_frames(stream):
    a, b = stream.sibling(), stream.sibling()
    for f in clip(3, seed=5):
        np.testing.assert_array_equal(a(f.astype(np.float32) / 255), b(f))


@pytest.mark.parametrize("name", ["one NaN", "one +inf", "one -inf", "one below 0", "one above 1"])
def test_bad_frame_leaves_the_stream_unchanged(stream, name):
    frames = clip(3, seed=6)
    s, reference = stream.sibling(), stream.sibling()
    np.testing.assert_array_equal(s(frames[0]), reference(frames[0]))
    state = {"frame_id": s.frame_id, "stored": s.bank.stored, "sample": s.sample.clone()}
    with pytest.raises(FrameError):
        s(BAD_FLOAT[name])
    assert (s.frame_id, s.bank.stored) == (state["frame_id"], state["stored"])
    assert torch.equal(s.sample, state["sample"])
    for f in frames[1:]:
        np.testing.assert_array_equal(s(f), reference(f))
