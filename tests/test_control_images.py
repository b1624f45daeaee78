"""Control images: the device Canny against OpenCV's `cv2.Canny` (the annotator ControlNet's canny models were
trained with), the other kinds, and the no-host-traffic rule a captured frame needs."""

import cv2
import numpy as np
import pytest
import skimage.data
import torch
from test_graph_safety import HostTraffic

from streamv2v_trt import control_images
from streamv2v_trt.control_images import (
    ControlImages,
    ControlKind,
    _sobel,
    _strongest_channel,
    canny,
    canny_candidates,
    hysteresis,
)
from streamv2v_trt.frames import FrameError, uint8_to_image
from streamv2v_trt.images import fit_to_size

pytestmark = pytest.mark.usefixtures("one_thread")

PHOTOS = ["astronaut", "coffee", "chelsea"]
SIZE = 512  # what SD1.5 ControlNets run at; the photos' edge statistics at that size


@pytest.fixture(scope="module")
def photos():
    return {name: fit_to_size(getattr(skimage.data, name)(), SIZE, SIZE) for name in PHOTOS}


def torch_canny(image: np.ndarray, *args, **kwargs) -> np.ndarray:
    """`canny` on an HxWxC uint8 array, as a bool HxW map."""
    t = torch.from_numpy(np.ascontiguousarray(image)).reshape(*image.shape[:2], -1).permute(2, 0, 1)[None]
    out = canny(t, *args, **kwargs)
    assert out.shape == (1, 1, *image.shape[:2]) and out.dtype == torch.float32
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    return out[0, 0].numpy() > 0


def square(size: int = 48) -> np.ndarray:
    """A synthetic RGB image: a coloured square and a darker ramp-shaded disc on grey."""
    img = np.full((size, size, 3), 90, np.uint8)
    img[10:30, 8:26] = (230, 40, 120)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - 32) ** 2 + (xx - 33) ** 2 < 64
    img[disc] = np.stack([20 + 2 * xx[disc], 200 - yy[disc], 60 + 0 * xx[disc]], -1)
    return img


@pytest.mark.parametrize("l2", [False, True])
def test_canny_equals_opencv_on_a_synthetic_image(l2):
    """Integer gradients, OpenCV's direction quantisation and its `>` thresholds: every pixel agrees, in colour
    (each pixel's strongest channel), in gray, and at thresholds that keep weak-only edges. 128 hysteresis steps:
    at (30, 90) in gray the square's weak outline is reached from the disc only around its perimeter."""
    img = square()
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    for low, high in [(100, 200), (30, 90), (200, 100)]:  # swapped thresholds are reordered, as in OpenCV
        for im in (img, gray):
            ref = cv2.Canny(im, low, high, L2gradient=l2) > 0
            assert ref.sum() > 40, "the square and disc have edges"
            np.testing.assert_array_equal(torch_canny(im, low, high, l2=l2, steps=128), ref)


@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("name", PHOTOS)
def test_canny_matches_opencv_on_photos(photos, name, l2):
    """With enough hysteresis steps to follow every weak chain in these photos (128), the device Canny equals
    cv2.Canny pixel for pixel (NMS, thresholds and borders are OpenCV's). With the default steps it can only miss
    OpenCV edges at the far end of weak chains longer than HYSTERESIS_STEPS: it never adds one, and it misses at
    most 0.15% of all pixels (measured: 0.014% astronaut, 0.107% coffee, 0.021% chelsea at 512x512 in L1; the
    bound leaves room for rounding, not for a wrong NMS, which changes percents)."""
    img = photos[name]
    ref = cv2.Canny(img, 100, 200, L2gradient=l2) > 0
    np.testing.assert_array_equal(torch_canny(img, 100, 200, l2=l2, steps=128), ref)
    ours = torch_canny(img, 100, 200, l2=l2)
    assert not (ours & ~ref).any(), "an edge OpenCV does not have"
    assert (ref & ~ours).mean() <= 0.0015, (ref & ~ours).mean()
    assert ours.sum() > 0.9 * ref.sum()


@pytest.mark.parametrize("name", PHOTOS)
def test_canny_gray_and_blur_options_near_opencv(photos, name):
    """`gray` and `blur_sigma` against cv2.cvtColor / cv2.GaussianBlur then cv2.Canny. Not exact: OpenCV rounds
    its fixed-point gray weights and blur taps differently at .5, moving a few pixels one level, which moves a
    gradient across a threshold or flips an NMS tie (measured <= 0.13% of pixels differ; bound 0.3%)."""
    img = photos[name]
    ref = cv2.Canny(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), 100, 200) > 0
    assert (torch_canny(img, 100, 200, gray=True, steps=128) != ref).mean() <= 0.003
    ref = cv2.Canny(cv2.GaussianBlur(img, (0, 0), 1.4), 100, 200) > 0
    blurred = torch_canny(img, 100, 200, blur_sigma=1.4, steps=128)
    assert (blurred != ref).mean() <= 0.003
    assert blurred.sum() < 0.9 * (cv2.Canny(img, 100, 200) > 0).sum(), "blurring removes fine edges"


def test_hysteresis_reach_is_the_step_count():
    """A weak chain hanging off a strong pixel is followed exactly `steps` pixels (8-connected, diagonal too)."""
    weak = torch.zeros(1, 1, 40, 40, dtype=torch.bool)
    idx = torch.arange(30)
    weak[0, 0, 5 + idx, 5 + idx] = True  # a diagonal chain of 30 pixels
    strong = torch.zeros_like(weak)
    strong[0, 0, 5, 5] = True
    for pool in (False, True):  # bool ORs (the CPU default) and max_pool2d (the CUDA default)
        for steps in (0, 7, 29, 40):
            edges = hysteresis(weak, strong, steps, pool)[0, 0]
            assert edges.dtype == torch.float32 and edges.sum().item() == min(30, steps + 1), (pool, steps)
            assert edges[5 + idx[: steps + 1], 5 + idx[: steps + 1]].all()
        assert hysteresis(weak, torch.zeros_like(weak), 40, pool).sum() == 0, "no strong pixel, no edge"


def test_both_dilations_agree_on_random_maps():
    g = torch.Generator().manual_seed(0)
    weak = torch.rand(2, 1, 37, 53, generator=g) < 0.45  # near the percolation threshold: long branching paths
    strong = weak & (torch.rand(2, 1, 37, 53, generator=g) < 0.02)
    for steps in (1, 5, 20):
        np.testing.assert_array_equal(hysteresis(weak, strong, steps, True), hysteresis(weak, strong, steps, False))


def test_benchmark_command(capsys):
    """`python -m benchmarks.canny` checks before it times: no extra edges, a row per photo."""
    from benchmarks.canny import main

    threads = cv2.getNumThreads()
    try:
        assert main(["--size", "64", "--repeats", "1"]) == 0
    finally:
        cv2.setNumThreads(threads)  # main sets OpenCV's threads for its timing
    out = capsys.readouterr().out
    assert "64x64, cpu" in out and all(f"| {name} | " in out for name in PHOTOS)


def triton_kernel():
    """The Triton NMS module and the device it runs on here: compiled on CUDA, else under TRITON_INTERPRET=1
    (tests/conftest.py sets it without CUDA)."""
    triton = pytest.importorskip("triton")
    from streamv2v_trt.kernels import canny_triton

    compiled = isinstance(canny_triton._canny_nms_kernel, triton.runtime.JITFunction)
    if compiled and not torch.cuda.is_available():
        pytest.skip("Triton kernels compiled but no CUDA: TRITON_INTERPRET=1 was set too late")
    return canny_triton, "cuda" if compiled else "cpu"


def gradients(image: torch.Tensor, l2: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dy = _sobel(image.float())
    mag = dx * dx + dy * dy if l2 else dx.abs() + dy.abs()
    return _strongest_channel(dx, dy, mag) if image.shape[1] > 1 else (dx, dy, mag)


def test_triton_nms_equals_torch(photos):
    """The Triton kernel against `canny_candidates`: bit for bit (integer arithmetic both), on odd sizes that
    exercise the tile masks, on a flat synthetic image (ties everywhere) and on a photo crop, L1 and L2."""
    canny_triton, device = triton_kernel()
    g = torch.Generator().manual_seed(0)
    images = [
        (torch.rand(1, 3, 37, 53, generator=g) * 255).round(),
        (torch.rand(2, 1, 19, 130, generator=g) * 255).round(),
        torch.from_numpy(square(45)).permute(2, 0, 1)[None],
        torch.from_numpy(photos["coffee"][100:171, 200:297]).permute(2, 0, 1)[None],
    ]
    for image in images:
        for l2 in (False, True):
            dx, dy, mag = gradients(image, l2)
            strong = weak_only = False
            for low, high in [(30, 90), (100, 200), (400, 1000)]:
                low, high = (low * low, high * high) if l2 else (low, high)
                want = canny_candidates(dx, dy, mag, low, high)
                got = canny_triton.canny_candidates_triton(dx.to(device), dy.to(device), mag.to(device), low, high)
                for w, t in zip(want, got):
                    np.testing.assert_array_equal(t.cpu().numpy(), w.numpy())
                strong |= bool(want[1].any())
                weak_only |= bool((want[0] & ~want[1]).any())
            assert strong and weak_only, "strong and weak-only pixels were compared"
    assert (canny_triton.TG22, canny_triton.SHIFT) == (control_images._TG22, control_images._SHIFT)
    with pytest.raises(ValueError, match=r"dx: torch.float32 .*expected int32 \[N, 1, H, W\]"):
        canny_triton.canny_candidates_triton(dx.float(), dy, mag, 1, 2)


def frame(seed: int, size: tuple[int, int] = (32, 48)) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_control_kinds(dtype):
    """Every kind gives [1, 3, H, W] in [0, 1] in the stream's dtype, in the same buffer every call."""
    image, previous = uint8_to_image(frame(0), dtype), uint8_to_image(frame(1), dtype)

    control = ControlImages("frame", 32, 48, dtype=dtype)
    out = control(image, previous)
    torch.testing.assert_close(out, image * 0.5 + 0.5)
    assert out.dtype == dtype and out.shape == (1, 3, 32, 48)

    control = ControlImages(ControlKind.PREVIOUS, 32, 48, dtype=dtype)
    first = control(image, None)
    assert first.abs().sum() == 0, "zeros before the first output"
    assert control(image, previous) is first
    torch.testing.assert_close(first, previous * 0.5 + 0.5)

    control = ControlImages("canny", 32, 48, dtype=dtype, low=50, high=150)
    out = control(image)
    edges = cv2.Canny(frame(0).numpy(), 50, 150) > 0  # the frame's pixels are recovered exactly from [-1, 1]
    assert edges.any()
    for c in range(3):
        np.testing.assert_array_equal(out[0, c].float().numpy(), edges.astype(np.float32))


def test_video_kind_and_wrong_sizes():
    """A user frame lands in the fixed buffer; a wrong size or dtype is refused with the size to use, and the
    previous frame stays."""
    control = ControlImages("video", 32, 48)
    image = uint8_to_image(frame(0), torch.float32)
    control.set_frame(frame(5).numpy())
    out = control(image)
    torch.testing.assert_close(out, frame(5).permute(2, 0, 1)[None].float() / 255)
    with pytest.raises(FrameError, match=r"control frame is 32x48 \(WxH\); the stream expects 48x32.*Resize"):
        control.set_frame(frame(6, (48, 32)))
    with pytest.raises(FrameError, match="expected uint8"):
        control.set_frame(frame(6).float() / 255)
    with pytest.raises(FrameError, match="HxWx3"):
        control.set_frame(frame(6)[..., :2])
    torch.testing.assert_close(control(image), frame(5).permute(2, 0, 1)[None].float() / 255)
    assert control(image) is out
    with pytest.raises(ValueError, match="video kind; this control image is 'canny'"):
        ControlImages("canny", 32, 48).set_frame(frame(5))
    with pytest.raises(ValueError, match="'depth' is not a valid ControlKind"):
        ControlImages("depth", 32, 48)


@pytest.mark.parametrize("kind", list(ControlKind))
def test_every_kind_runs_without_host_traffic(kind):
    """What a captured frame runs: device arithmetic into the fixed buffer, no host data, no sync."""
    control = ControlImages(kind, 32, 48)
    if kind is ControlKind.VIDEO:
        control.set_frame(frame(3))  # the upload, outside the graph
    image, previous = uint8_to_image(frame(0), torch.float32), uint8_to_image(frame(1), torch.float32)
    with torch.inference_mode():
        for prev in (None, previous):
            with HostTraffic() as watch:
                out = control(image, prev)
            assert not watch.problems, sorted(set(watch.problems))
            assert watch.ops >= 1 and out is control.image


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
def test_canny_on_cuda_equals_opencv(photos):
    """On CUDA (max_pool2d dilation, CUDA integer ops) the edges are the CPU's, and OpenCV's with enough steps."""
    for name in PHOTOS:
        img = photos[name]
        pixels = torch.from_numpy(img).permute(2, 0, 1)[None]
        for l2 in (False, True):
            ref = cv2.Canny(img, 100, 200, L2gradient=l2) > 0
            on_cuda = canny(pixels.cuda(), 100, 200, l2=l2, steps=128)[0, 0].cpu().numpy() > 0
            np.testing.assert_array_equal(on_cuda, ref)
            torch.testing.assert_close(canny(pixels.cuda(), l2=l2).cpu(), canny(pixels, l2=l2), rtol=0, atol=0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kind", list(ControlKind))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_cuda_graph_replay_equals_eager(photos, kind, dtype):
    """`ControlImages` captured in a CUDA graph, replayed on new frames written into the captured inputs, gives
    what eager calls give: nothing host-side was baked in at capture."""
    frames = [torch.from_numpy(photos[n]).cuda() for n in PHOTOS]
    image = uint8_to_image(frames[0], dtype)  # the captured input buffers
    previous = uint8_to_image(frames[1], dtype)
    control = ControlImages(kind, SIZE, SIZE, "cuda", dtype)
    eager = ControlImages(kind, SIZE, SIZE, "cuda", dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        control(image, previous)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = control(image, previous)
    for i in range(3):
        image.copy_(uint8_to_image(frames[i], dtype))
        previous.copy_(uint8_to_image(frames[(i + 1) % 3], dtype))
        if kind is ControlKind.VIDEO:
            control.set_frame(photos[PHOTOS[(i + 2) % 3]])
            eager.set_frame(photos[PHOTOS[(i + 2) % 3]])
        graph.replay()
        torch.testing.assert_close(out, eager(image, previous), rtol=0, atol=0)
