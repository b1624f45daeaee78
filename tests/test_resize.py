"""A running stream changes its frame size: `resize` gives the frames of a fresh stream built for the new size.

Eager fp32 on the CPU: the resized stream and its fresh twin run the same ops on the same networks (the backend at
that size, `EagerBackend.at_size`) with buffers of the same shapes, so frames and states are compared bit for bit.
The CUDA-graph wrappers keep one set of graphs per size: checked on the CPU for `MultiStream` with a capture
stand-in that refuses to replay a graph on another size's buffers, and for `CudaGraphStream` on a GPU (marked).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_spec

from streamv2v_trt import BankConfig, StreamConfig, StreamV2V
from streamv2v_trt.graph_cache import GraphCache
from streamv2v_trt.multistream import MultiStream

pytestmark = pytest.mark.usefixtures("one_thread")

A, B = (64, 64), (48, 80)  # (height, width): the size streams open at, and another (a different aspect)
CFG = StreamConfig(tiny_spec(steps=2), t_index_list=(20, 32), bank=BankConfig(interval=2))  # merges every 4 frames
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def stream():
    """The eager networks, loaded once; tests make their streams on `stream.backend` (and its other sizes)."""
    return StreamV2V.from_pretrained(CFG, prompt="a painting of a cat")


def clip(n: int, size: tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """A smooth pan over a random texture (the bank matters: consecutive frames share content)."""
    h, w = size
    texture = np.random.default_rng(seed).integers(0, 256, (h, w + 4 * n, 3), dtype=np.uint8)
    return [np.ascontiguousarray(texture[:, 4 * i : 4 * i + w]) for i in range(n)]


def state(s: StreamV2V) -> dict[str, torch.Tensor]:
    return {"sample": s.sample, "stock_noise": s.stock_noise, "noise": s.noise, **s.bank.inputs()}


def fresh(like: StreamV2V, size: tuple[int, int]) -> StreamV2V:
    """A new stream built for `size` on `like`'s networks, with its prompt, negative prompt and seed."""
    twin = StreamV2V(like.backend.at_size(*size), like.prompt_encoder, like.scheduler, CFG.with_spec(height=size[0],
                     width=size[1]))  # fmt: skip
    twin.update_prompt(like.prompt, negative_prompt=like.negative_prompt)
    twin.update_seed(like.seed)
    return twin


def assert_same_frames(resized, twin, frames, states) -> None:
    for i, frame in enumerate(frames):
        assert np.array_equal(resized(frame), twin(frame)), f"frame {i}"
        for a, b in zip(states(resized), states(twin)):
            assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), f"frame {i}"


def test_resized_stream_equals_a_fresh_stream_and_resizes_back(stream):
    s = stream.sibling()
    s.update_prompt("a watercolour harbour", negative_prompt="blurry")
    s.update_seed(7)  # a seed other than the config's: the new size's noise is drawn from it
    for frame in clip(5, A):
        s(frame)
    buffers = {n: t.data_ptr() for n, t in state(s).items()}
    s.resize(*B)
    assert (s.cfg.height, s.cfg.width) == B and s.frame_id == 0 and s.bank.stored == 0
    assert s.prompt == "a watercolour harbour" and s.seed == 7
    assert_same_frames(s, fresh(s, B), clip(9, B, seed=1), lambda x: [state(x)])
    s.update_seed(3)  # changed while at B: A's parked noise must follow it
    s.resize(*A)
    # Back at A: A's own buffers (what a CUDA graph captured at A reads), reset, and the frames of a fresh stream.
    assert {n: t.data_ptr() for n, t in state(s).items()} == buffers
    assert_same_frames(s, fresh(s, A), clip(9, A, seed=2), lambda x: [state(x)])


def test_same_size_is_a_no_op_and_a_bad_size_changes_nothing(stream):
    s, twin = stream.sibling(), stream.sibling()
    frames = clip(6, A)
    for frame in frames[:3]:
        s(frame), twin(frame)
    s.resize(*A)  # the current size: no reset (a client repeating its size loses nothing)
    assert s.frame_id == 3
    for bad in [(50, 64), (0, 64)]:
        with pytest.raises(ValueError, match="multiples of 8"):
            s.resize(*bad)
    assert (s.cfg.height, s.cfg.width) == A and s.backend is stream.backend
    assert_same_frames(s, twin, frames[3:], lambda x: [state(x)])  # kept running as if nothing was asked


def test_eager_backend_sizes_share_the_modules_and_the_lora_weights(stream):
    backend = stream.backend
    assert backend.sizes is None and backend.at_size(*A) is backend
    other = backend.at_size(*B)
    assert other is backend.at_size(*B) and other.at_size(*A) is backend  # one backend per size, made once
    assert other.bank_unet is backend.bank_unet and other.lora_weights is backend.lora_weights
    tokens = [layer.tokens for layer in other.layout.layers]
    assert tokens != [layer.tokens for layer in backend.layout.layers] and tokens[0] == (B[0] // 8) * (B[1] // 8)


def multi_twin(multi: MultiStream, size: tuple[int, int]) -> MultiStream:
    """A fresh MultiStream built for `size` on `multi`'s networks, its slots with `multi`'s slots' prompts/seeds."""
    s0 = multi.slots[0]
    cfg = CFG.with_spec(height=size[0], width=size[1])
    twin = MultiStream(multi.backend.at_size(*size), s0.prompt_encoder, s0.scheduler, cfg, streams=multi.streams)
    for mine, theirs in zip(twin.slots, multi.slots):
        mine.update_prompt(theirs.prompt, negative_prompt=theirs.negative_prompt)
        mine.update_seed(theirs.seed)
    return twin


def run_ticks(multi, twin, n: int, size: tuple[int, int]) -> None:
    clips = [clip(n, size, seed=10 + i) for i in range(multi.streams)]
    for t in range(n):
        frames = {i: clips[i][t] for i in range(multi.streams) if not (i == 1 and t < 2)}  # slot 1 joins late
        out, want = multi(frames), twin(frames)
        assert out.keys() == want.keys() and all(np.array_equal(out[i], want[i]) for i in out), f"tick {t}"
        for a, b in zip(multi.slots, twin.slots):
            sa, sb = state(a), state(b)
            assert all(torch.equal(sa[n], sb[n]) for n in sb), f"tick {t}"


def new_multi(stream) -> MultiStream:
    multi = MultiStream(stream.backend, stream.prompt_encoder, stream.scheduler, CFG, streams=2)
    for i, slot in enumerate(multi.slots):
        slot.update_prompt(f"a painting of a cat, style {i}", negative_prompt="blurry")
        slot.update_seed(5 + i)
    return multi


def test_multistream_resize_equals_a_fresh_multistream(stream):
    multi = new_multi(stream)
    run_ticks(multi, multi_twin(multi, A), 4, A)
    with pytest.raises(ValueError, match=r"MultiStream\.resize"):
        multi.slots[0].resize(*B)  # a slot's rows are one batch of one size
    multi.resize(*B)
    assert all((s.cfg.height, s.cfg.width) == B and s.frame_id == 0 for s in multi.slots)
    assert multi.slots[1].prompt == "a painting of a cat, style 1" and multi.slots[1].seed == 6
    run_ticks(multi, multi_twin(multi, B), 6, B)
    with pytest.raises(ValueError, match="multiples of 8"):
        multi.resize(60, 60)
    multi.resize(*A)
    run_ticks(multi, multi_twin(multi, A), 6, A)


class SizedGraph:
    """A CPU stand-in for a CUDA graph that knows the size it was captured at: its replay reruns the captured
    work into the captured outputs (as a graph overwrites its output buffers), and refuses to run at another size,
    which is what replaying a graph of the old size on the new buffers would be."""

    def __init__(self, multi: MultiStream, fn, outputs) -> None:
        self.multi, self.fn, self.outputs, self.size, self.ran = multi, fn, outputs, size_of(multi), True
        self.replays = 0

    def replay(self) -> None:
        assert size_of(self.multi) == self.size, f"a graph captured at {self.size} replayed at {size_of(self.multi)}"
        self.replays += 1
        if self.ran:  # the capture ran fn: this replay is that run
            self.ran = False
            return
        fresh_out = self.fn()
        if isinstance(self.outputs, torch.Tensor):
            self.outputs.copy_(fresh_out)
        elif isinstance(self.outputs, dict):
            for name, t in self.outputs.items():
                t.copy_(fresh_out[name])


def size_of(multi: MultiStream) -> tuple[int, int]:
    return multi.cfg.height, multi.cfg.width


def test_multistream_graphs_per_size(stream):
    """One set of graphs per size, through the same capture: a new size captures its own, resizing back replays the
    old size's, and no graph ever replays at a size it was not captured at; frames stay equal to the eager
    MultiStream's."""
    graphed, captured = new_multi(stream), []

    def capture(fn):
        outputs = fn()
        captured.append(SizedGraph(graphed, fn, outputs))
        return captured[-1], outputs

    graphed.graphs = GraphCache(capture)
    at_a = graphed.graphs
    run_ticks(graphed, multi_twin(graphed, A), 4, A)
    n_a = len(captured)
    assert n_a and len(at_a) == n_a
    graphed.resize(*B)
    assert graphed.graphs is not at_a and len(graphed.graphs) == 0
    run_ticks(graphed, multi_twin(graphed, B), 4, B)
    assert {g.size for g in captured[n_a:]} == {B} and len(captured) > n_a
    n_b = len(captured)
    graphed.resize(*A)
    assert graphed.graphs is at_a
    before = [g.replays for g in captured[:n_a]]
    run_ticks(graphed, multi_twin(graphed, A), 4, A)
    assert all(g.replays > n for g, n in zip(captured[:n_a], before))  # every graph captured at A replayed again
    assert {g.size for g in captured[n_b:]} <= {A}  # (keys seen once at A are captured now, at A)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_stream_resize_replays_each_sizes_graphs():
    from streamv2v_trt.cuda_graph import CudaGraphStream

    eager = StreamV2V.from_pretrained(CFG, device="cuda", prompt="a cat")
    graphed = CudaGraphStream(eager.sibling())
    graphs_a = graphed.graphs
    for size in (A, B, A):
        graphed.resize(*size)
        eager.resize(*size)
        for i, frame in enumerate(clip(6, size)):
            out, want = graphed(frame), eager(frame)
            # fp32, the same kernels replayed: only the captured-vs-eager launch order may differ in the last bit
            assert np.abs(out.astype(np.int16) - want).max() <= 1, f"{size} frame {i}"
        assert (graphed.graphs is graphs_a) == (size == A) and len(graphed.graphs) > 0
    assert set(graphed.graphs_by_size) == {A, B}
