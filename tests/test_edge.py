"""FrameEdge: one stream's frames in and out (admit / remember / emit), on the CPU without networks.

The streams that use it (StreamV2V, MultiStream slots, CudaGraphStream) are tested end to end in test_pipeline.py,
test_features.py, test_multistream.py and, with CUDA, test_gpu_runtime.py (pinned staging and `upload`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_spec

from streamv2v_trt import FrameError, SimilarFilterConfig, StreamConfig
from streamv2v_trt.edge import FrameEdge
from streamv2v_trt.frames import image_to_uint8, uint8_to_image

SIZE = 64


def edge(**runtime) -> FrameEdge:
    return FrameEdge(StreamConfig(tiny_spec(), **runtime), torch.device("cpu"), torch.float32)


def frame(value: int) -> np.ndarray:
    return np.full((SIZE, SIZE, 3), value, np.uint8)


def test_admit_stages_a_frame_and_refuses_a_bad_one():
    e = edge()
    admitted = e.admit(frame(255))
    assert not admitted.skip and admitted.image.shape == (1, 3, SIZE, SIZE)
    assert torch.equal(admitted.image, uint8_to_image(torch.from_numpy(frame(255)), torch.float32))
    for bad in (frame(0)[:, :8], np.zeros((SIZE, SIZE), np.uint8), [[0, 0, 0]]):
        with pytest.raises(FrameError):
            e.admit(bad)


def test_the_filter_skips_repeats_and_emit_gives_the_remembered_output():
    e = edge(similar_filter=SimilarFilterConfig(enabled=True, threshold=0.9, max_skip=2))
    with pytest.raises(FrameError):
        e.admit(np.full((SIZE, SIZE, 3), np.nan, np.float32))
    assert e.similar_filter.skipped_total == 0  # a bad frame never reaches the filter
    first = e.admit(frame(200))
    assert not first.skip
    out = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    e.remember(out)
    want = image_to_uint8(out).numpy()
    assert np.array_equal(e.emit(out, frame(200)), want)
    out.zero_()  # the networks overwrite their output: the edge kept a copy
    skipped = [e.admit(frame(200)) for _ in range(3)]
    assert [a.skip for a in skipped] == [True, True, False]  # max_skip in a row
    assert np.array_equal(e.emit(None, frame(200)), want)
    e.reset()
    assert not e.admit(frame(200)).skip  # after a reset the next frame is processed


def test_emit_answers_in_the_frame_type():
    e = edge()
    out = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    as_numpy, as_torch = e.emit(out, frame(0)), e.emit(out, torch.from_numpy(frame(0)))
    assert isinstance(as_numpy, np.ndarray) and isinstance(as_torch, torch.Tensor)
    assert as_numpy.dtype == np.uint8 and as_numpy.shape == (SIZE, SIZE, 3)
    assert np.array_equal(as_numpy, as_torch.numpy())


def test_a_fixed_frame_buffer_needs_cuda():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        edge().upload(frame(0))
