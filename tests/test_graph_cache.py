"""GraphCache: the capture policy every CUDA-graph user shares, checked on the CPU with a stand-in capture.

The real capture (`cuda_capture`) is exercised by the GPU tests (tests/test_gpu_runtime.py, tests/test_multistream.py
and the last test here, marked `gpu`).
"""

from __future__ import annotations

import pytest
import torch

from streamv2v_trt.graph_cache import GraphCache, cuda_capture

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class Recorder:
    """A capture that records what it was asked to capture; its graphs count their replays."""

    class Graph:
        def __init__(self) -> None:
            self.replays = 0

        def replay(self) -> None:
            self.replays += 1

    def __init__(self) -> None:
        self.captured: list[tuple[object, Recorder.Graph]] = []  # (what fn returned, its graph)

    def __call__(self, fn):
        graph, outputs = Recorder.Graph(), fn()  # a real capture records fn's work without running it
        self.captured.append((outputs, graph))
        return graph, outputs


def test_eager_first_then_one_capture_then_replays():
    capture, runs = Recorder(), []

    def work(value):
        def fn():
            runs.append(value)
            return value

        return fn

    cache = GraphCache(capture)
    assert cache.run("steady", work("eager 1")) == "eager 1"  # first sighting: eager (the warm-up)
    assert (len(cache), cache.seen["steady"], cache.replays) == (0, 1, 0)
    # Second sighting: this run's fn is captured and the graph replayed: the replay is this run.
    assert cache.run("steady", work("captured")) == "captured"
    assert [o for o, _ in capture.captured] == ["captured"] and capture.captured[0][1].replays == 1
    # Every later sighting replays the graph and returns what fn returned at capture (the graph's outputs).
    assert cache.run("steady", work("not run")) == "captured"
    assert runs == ["eager 1", "captured"] and capture.captured[0][1].replays == 2
    assert (len(cache), cache.seen["steady"], cache.replays) == (1, 1, 2)
    # Keys are independent: another key starts eager.
    assert cache.run("merge", work("merge eager")) == "merge eager"
    assert list(cache) == ["steady"] and "steady" in cache and "merge" not in cache
    assert cache.run("merge", work("merge captured")) == "merge captured"
    assert list(cache) == ["steady", "merge"] and len(capture.captured) == 2 and cache.replays == 3


def test_capture_after_counts_eager_runs():
    capture = Recorder()
    cache = GraphCache(capture, capture_after=3)
    results = [cache.run(("phase", 1), lambda i=i: i) for i in range(6)]
    assert results == [0, 1, 2, 3, 3, 3]  # 3 eager runs, captured on the 4th, then replayed
    assert len(capture.captured) == 1 and cache.seen[("phase", 1)] == 3 and cache.replays == 3


def test_keys_compare_by_value():
    """Keys built afresh every frame (a FramePlan, a tuple with a range) find the same graph."""
    from streamv2v_trt.bank import BankOp
    from streamv2v_trt.pipeline import FramePlan

    cache = GraphCache(Recorder())
    for _ in range(3):
        cache.run(FramePlan(False, BankOp("merge")), lambda: None)
        cache.run(("begin", range(0, 3)), lambda: None)
    assert len(cache) == 2 and cache.replays == 4


def test_capture_after_must_leave_a_warm_up_run():
    with pytest.raises(ValueError, match="capture_after must be >= 1"):
        GraphCache(Recorder(), capture_after=0)


def test_cuda_capture_needs_a_cuda_device():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, this runs on cpu"):
        cuda_capture(torch.device("cpu"))


@pytest.mark.gpu
@needs_cuda
def test_cuda_capture_replays_into_its_outputs_and_shares_one_pool():
    """The real capture: a replay reads the current contents of its inputs and overwrites its outputs in place;
    two keys share the pool without overwriting each other's outputs."""
    x = torch.arange(4.0, device="cuda")
    cache = GraphCache(cuda_capture(torch.device("cuda")))
    assert torch.equal(cache.run("double", lambda: x * 2), x * 2)  # eager
    doubled = cache.run("double", lambda: x * 2)  # captured, replayed
    tripled = [cache.run("triple", lambda: x * 3) for _ in range(2)][-1]
    assert len(cache) == 2 and cache.replays == 2
    x.copy_(torch.tensor([1.0, 0.0, -1.0, 5.0], device="cuda"))  # graphs read the buffer, not its old values
    assert cache.run("double", lambda: x * 100) is doubled  # the captured work, into the same output
    assert cache.run("triple", lambda: x * 100) is tripled
    torch.cuda.synchronize()
    assert doubled.tolist() == [2.0, 0.0, -2.0, 10.0] and tripled.tolist() == [3.0, 0.0, -3.0, 15.0]
    assert cache.replays == 4
