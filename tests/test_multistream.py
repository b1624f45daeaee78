"""MultiStream: K stream slots batched into one encode / UNet / decode per tick.

Each slot's frames must equal that stream run alone (a `StreamV2V` with the same config on the same networks),
whatever the other slots do: join late, sit idle, merge their banks on other ticks, prime after a reset, change
prompt or seed. Eager networks are loaded once per bank kind; "alone" twins share them. The engine tests open a
`max_streams=2` ONNX build with ONNX Runtime. CUDA-graph equality is a GPU test (skips on the CPU).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_spec

from streamv2v_trt import BankConfig, FrameError, SimilarFilterConfig, StreamConfig, StreamV2V
from streamv2v_trt.bank import NO_UPDATE, BankOp
from streamv2v_trt.graph_cache import GraphCache
from streamv2v_trt.manifest import MANIFEST_FILE, EngineMismatch, load_manifest
from streamv2v_trt.multistream import MultiStream, runs

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64
EXACT = 1e-5  # fp32, batched vs alone on the same backend: latents and bank
# ... plus 1e-5 of the value: a batch of K and a batch of 1 run different GEMM blockings, so every matmul sums in
# another order (a few fp32 ulps, 1.2e-7 relative, per layer, tens of layers deep). Latents and stock noise reach ~5
# (ulp 4.8e-7), where an absolute 1e-5 alone is ~20 ulps: measured up to 5.7e-6 here and 1.07e-5 on another CPU.
# With the relative part the bound is ~6e-5 at |x| = 5. A wrong slot (another slot's latents, a missed bank
# update) is off by 1e-2 or more.
EXACT_RTOL = 1e-5
ORT = 1e-4  # ONNX Runtime vs eager (tests/test_runtime_ort.py)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def networks():
    """`networks(spec) -> (backend, prompt encoder, scheduler)`: eager networks, loaded once per bank kind and
    size (what the UNet's processors are installed for). Steps, guidance and max_streams do not matter to them."""
    from streamv2v_trt.backends.eager import EagerBackend
    from streamv2v_trt.models.loader import load_models
    from streamv2v_trt.prompt import PromptEncoder

    cache = {}

    def get(spec):
        key = (spec.bank, spec.bank_frames)
        if key not in cache:
            models = load_models(spec)
            encoder = PromptEncoder(models.tokenizer, models.text_encoder)
            cache[key] = (EagerBackend(models, spec), encoder, models.scheduler)
        return cache[key]

    return get


def multi_and_alone(networks, cfg: StreamConfig, streams: int, prompt: str = "a painting of a cat"):
    """A MultiStream of `streams` slots and one alone twin per slot, all with the same config and prompt."""
    backend, encoder, scheduler = networks(cfg.spec)
    multi = MultiStream(backend, encoder, scheduler, cfg, streams=streams)
    alone = [StreamV2V(backend, encoder, scheduler, cfg.with_spec(max_streams=1)) for _ in range(streams)]
    for s in [*multi.slots, *alone]:
        s.update_prompt(prompt, negative_prompt="blurry, low quality")
    return multi, alone


def clip(n: int, seed: int) -> list[np.ndarray]:
    """A smooth pan over a random texture: consecutive frames share most content (the bank matters)."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (SIZE, SIZE + 4 * n, 3), dtype=np.uint8)
    return [np.ascontiguousarray(texture[:, 4 * i : 4 * i + SIZE]) for i in range(n)]


def max_diff(a, b) -> int:
    a, b = (np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x) for x in (a, b))
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def state(stream: StreamV2V) -> dict:
    """Everything a stream carries from frame to frame: device buffers (copied) and host counters."""
    tensors = {**stream.unet_inputs(), "noise": stream.noise, "stock_noise": stream.stock_noise}
    return {
        **{name: t.clone() for name, t in tensors.items()},
        "perm_index": stream.bank.perm_index.clone(),
        "counters": (stream.frame_id, stream.bank.stored),
        "prompt": stream.prompt,
    }


def assert_same(slot: StreamV2V, alone: StreamV2V, atol: float, what: str) -> None:
    """The slot's stream state equals its alone twin's: latents (uncond rows too), stock noise, bank, counters."""
    a, b = state(slot), state(alone)
    assert a.pop("counters") == b.pop("counters"), what
    assert a.pop("prompt") == b.pop("prompt"), what
    for name in b:
        torch.testing.assert_close(
            a[name], b[name], atol=atol, rtol=EXACT_RTOL, msg=lambda m, n=name: f"{what}, {n}: {m}"
        )


# --- 1. every slot equals its stream run alone ---------------------------------------------------------------

# tick -> active slots; slot 1 joins at tick 1 and idles on 4 and 9, slot 2 joins at 3, slot 0 idles on 6.
ACTIVE = [{0}, {0, 1}, {0, 1}, {0, 1, 2}, {0, 2}, {0, 1, 2}, {1, 2}, {0, 1, 2}, {0, 1, 2}, {0, 2}, {0, 1, 2}]
# Before tick t, on one slot only (and its twin).
EVENTS = {
    5: (1, lambda s: s.update_prompt("a dog in the snow, oil painting")),
    7: (0, lambda s: s.reset()),  # with `prime`: slot 0 primes at tick 7, the others do not
    8: (2, lambda s: s.update_seed([(3, 0.6), (7, 0.4)])),
}
CASES = {
    "dyme-rcfg-self": (dict(steps=2, cfg_type="self"), {}),
    "fifo2-rcfg-initialize": (dict(steps=2, cfg_type="initialize", bank="fifo", bank_frames=2), {}),
    "dyme-full-cfg": (dict(steps=2, cfg_type="full"), {}),
}


@pytest.mark.parametrize("case", CASES)
def test_each_slot_equals_its_stream_alone(networks, case):
    spec_fields, runtime = CASES[case]
    cfg = StreamConfig(
        tiny_spec(**spec_fields), guidance_scale=1.6, delta=0.9, prime=True, bank=BankConfig(interval=2), **runtime
    )
    multi, alone = multi_and_alone(networks, cfg, streams=3)
    clips = [clip(len(ACTIVE), seed) for seed in range(3)]
    updates: dict[int, set[int]] = {i: set() for i in range(3)}  # slot -> ticks with a bank update
    primed: dict[int, set[int]] = {i: set() for i in range(3)}
    mixed = 0  # ticks on which active slots run different bank updates
    for t, active in enumerate(ACTIVE):
        if t in EVENTS:
            i, event = EVENTS[t]
            event(multi.slots[i])
            event(alone[i])
        # Slot 2 sends torch frames (and gets torch frames back); the others numpy.
        frames = {i: torch.from_numpy(clips[i][t]) if i == 2 else clips[i][t] for i in active}
        plans = {i: multi.slots[i].plan() for i in active}
        assert plans == {i: alone[i].plan() for i in active}
        mixed += len({p.bank for p in plans.values()}) > 1
        out = multi(frames)
        assert set(out) == active
        for i in active:
            want = alone[i](frames[i])
            assert type(out[i]) is type(want) and out[i].shape == (SIZE, SIZE, 3)
            assert max_diff(out[i], want) <= 1, f"tick {t}, slot {i}"
            updates[i] |= {t} if plans[i].bank != NO_UPDATE else set()
            primed[i] |= {t} if plans[i].prime else set()
        for i in range(3):
            assert_same(multi.slots[i], alone[i], EXACT, f"tick {t}, slot {i}")
    # The scenario did what it claims: bank updates (DyMe merges, FIFO stores) on different ticks per slot,
    # priming of one slot while the others run steady frames.
    assert len({frozenset(ticks) for ticks in updates.values()}) == 3 and mixed >= 5, (updates, mixed)
    assert primed == {0: {0, 7}, 1: {1}, 2: {3}}
    assert multi.slots[1].prompt == "a dog in the snow, oil painting" and multi.slots[0].prompt != multi.slots[1].prompt


def test_merges_fall_on_different_ticks(networks):
    """The DyMe case above, checked explicitly: on some tick one slot merges while another runs a plain frame."""
    cfg = StreamConfig(tiny_spec(), bank=BankConfig(interval=2))
    multi, _ = multi_and_alone(networks, cfg, streams=2)
    frames = clip(4, seed=0)
    kinds = []
    for t, f in enumerate(frames):
        active = {0, 1} if t else {0}
        kinds.append({i: multi.slots[i].plan().bank.kind for i in active})
        multi({i: f for i in active})
    assert kinds == [{0: "store"}, {0: "none", 1: "store"}, {0: "merge", 1: "none"}, {0: "none", 1: "merge"}]


def test_similar_frame_skip_per_slot_equals_alone(networks):
    """The similar-frame filter sees every submitted frame, as a stream alone does (the first one included)."""
    filt = SimilarFilterConfig(enabled=True, threshold=0.9, max_skip=2)
    cfg = StreamConfig(tiny_spec(), similar_filter=filt)
    multi, alone = multi_and_alone(networks, cfg, streams=2)
    a, b = clip(3, seed=0), clip(3, seed=1)
    sequences = [[a[0], a[0], a[0], a[0], a[1], a[2]], [b[0], b[1], b[1], b[2], b[2], b[2]]]
    for t in range(6):
        frames = {i: seq[t] for i, seq in enumerate(sequences)}
        out = multi(frames)
        for i, f in frames.items():
            assert max_diff(out[i], alone[i](f)) <= 1, f"tick {t}, slot {i}"
            assert multi.slots[i].similar_filter.skipped_total == alone[i].similar_filter.skipped_total
        for i in range(2):
            assert_same(multi.slots[i], alone[i], EXACT, f"tick {t}, slot {i}")
    assert [s.similar_filter.skipped_total for s in alone] == [2, 3]  # identical frames skip, max_skip in a row


# --- 2. idle slots ---------------------------------------------------------------------------------------------


def test_idle_slot_keeps_its_state_exactly(networks):
    cfg = StreamConfig(tiny_spec(steps=2, cfg_type="self"), guidance_scale=1.5, prime=True, bank=BankConfig(interval=2))
    multi, alone = multi_and_alone(networks, cfg, streams=3)
    frames = clip(9, seed=0)
    for f in frames[:2]:
        multi({0: f, 1: f, 2: f})
        alone[2](f)
    idle = state(multi.slots[2])
    # Slots 0 and 1 run on: merges, a prompt change, a reset and its priming, an empty tick.
    for t, f in enumerate(frames[2:8]):
        if t == 2:
            multi.slots[1].update_prompt("a dog")
        if t == 3:
            multi.slots[0].reset()
        assert set(multi({0: f, 1: f})) == {0, 1}
    assert multi.tick() == {}
    now = state(multi.slots[2])
    assert now.pop("counters") == idle.pop("counters") and now.pop("prompt") == idle.pop("prompt")
    for name, t in idle.items():
        assert torch.equal(now[name], t), name
    # And it resumes as if nothing had happened in between.
    assert max_diff(multi({2: frames[8]})[2], alone[2](frames[8])) <= 1
    assert_same(multi.slots[2], alone[2], EXACT, "after resuming")


# --- 3. engines: a max_streams=2 build -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k2_folder(tiny_build):
    return tiny_build(tiny_spec(max_streams=2))


def test_engines_k2_equal_eager_multistream_and_streams_alone(networks, k2_folder):
    bank = BankConfig(interval=2)
    engines = MultiStream.from_engines(k2_folder, "onnxruntime", prompt="a cat", threads=1, bank=bank)
    cfg = engines.cfg
    assert engines.streams == 2 and cfg.spec == tiny_spec(max_streams=2) and cfg.bank == bank
    backend, encoder, scheduler = networks(cfg.spec)
    eager = MultiStream(backend, encoder, scheduler, cfg)  # K from the spec
    alone = [StreamV2V(backend, encoder, scheduler, cfg.with_spec(max_streams=1)) for _ in range(2)]
    for s in [*eager.slots, *alone]:
        s.update_prompt("a cat")
    clips = [clip(7, seed) for seed in range(2)]
    kinds = set()
    for t, active in enumerate([{0}, {0, 1}, {0, 1}, {1}, {0, 1}, {0, 1}, {0, 1}]):
        frames = {i: clips[i][t] for i in active}
        kinds.add(tuple(engines.slots[i].plan().bank.kind for i in sorted(active)))
        out, want = engines(frames), eager(frames)
        for i in active:
            assert max_diff(out[i], want[i]) <= 1 and max_diff(out[i], alone[i](frames[i])) <= 1, f"tick {t} slot {i}"
        for i in range(2):
            assert_same(engines.slots[i], eager.slots[i], ORT, f"tick {t}, slot {i} vs eager MultiStream")
            assert_same(engines.slots[i], alone[i], ORT, f"tick {t}, slot {i} vs alone")
    assert ("merge", "none") in kinds  # merges of the two slots fall on different ticks
    with pytest.raises(ValueError, match="cannot be captured"):
        MultiStream(engines.backend, encoder, scheduler, cfg, cuda_graphs=True)


def test_k2_folder_refuses_a_single_stream_and_another_k(k2_folder):
    with pytest.raises(ValueError, match="MultiStream"):
        StreamV2V.from_engines(k2_folder, "onnxruntime", threads=1)
    with pytest.raises(ValueError, match="built for 2 stream.*--max-streams 3") as e:
        MultiStream.from_engines(k2_folder, "onnxruntime", streams=3, threads=1)
    assert "python -m build_engines --model tiny" in str(e.value) and "-s3-" in str(e.value)
    with pytest.raises(EngineMismatch, match="max_streams: engines have 2, asked 3") as e:
        MultiStream.from_engines(k2_folder, "onnxruntime", StreamConfig(tiny_spec(max_streams=3)), threads=1)
    assert "--max-streams 3" in str(e.value)
    with pytest.raises(EngineMismatch, match="max_streams: engines have 2, asked 1"):
        StreamV2V.from_engines(k2_folder, "onnxruntime", StreamConfig(tiny_spec()), threads=1)


def test_k2_manifest_and_folder_name_record_max_streams(k2_folder):
    spec = tiny_spec(max_streams=2)
    assert k2_folder.name == spec.folder_name() == "tiny-64x64-b1-s2-dyme1-taesd-fp32"
    assert json.loads((k2_folder / MANIFEST_FILE).read_text())["spec"]["max_streams"] == 2
    manifest = load_manifest(k2_folder)
    assert manifest.spec == spec and "--max-streams 2" in manifest.build_command
    shapes = {n: {t.name: t.shape for t in manifest.network(n).tensors} for n in ("unet", "vae_encoder")}
    assert shapes["vae_encoder"] == {"images": (2, 3, SIZE, SIZE), "latents": (2, 4, 8, 8)}
    assert shapes["unet"]["sample"] == (2, 4, 8, 8) and shapes["unet"]["bank_valid"] == (2, 1)


def test_spec_max_streams():
    one, two = tiny_spec(), tiny_spec(max_streams=2)
    assert two.differences(one) == ["max_streams: engines have 2, asked 1"]
    assert one.differences(two) == ["max_streams: engines have 1, asked 2"]
    three = tiny_spec(steps=2, cfg_type="initialize", max_streams=3)
    assert (three.stream_batch, three.unet_batch) == (3, 9)
    assert StreamConfig(three).stream_batch == 3  # a stream's part of the batch
    assert "-b3-s3-" in three.folder_name() and "-s" not in one.folder_name().removeprefix("tiny")
    with pytest.raises(ValueError, match="max_streams must be >= 1"):
        tiny_spec(max_streams=0)


# --- 4. errors -------------------------------------------------------------------------------------------------

BAD_FRAMES = {
    "wrong size": np.zeros((SIZE, SIZE + 8, 3), np.uint8),
    "grayscale": np.zeros((SIZE, SIZE), np.uint8),
    "nan": np.full((SIZE, SIZE, 3), np.nan, np.float32),
    "not an array": [[0, 0, 0]],
}


def test_bad_slot_and_bad_frames_leave_every_slot_unchanged(networks):
    multi, alone = multi_and_alone(networks, StreamConfig(tiny_spec(), bank=BankConfig(interval=2)), streams=2)
    a, b = clip(3, seed=0), clip(3, seed=1)
    multi({0: a[0], 1: b[0]})
    for s, f in zip(alone, (a[0], b[0])):
        s(f)
    for i in range(2):
        assert_same(multi.slots[i], alone[i], EXACT, f"slot {i} after the first tick")
    for slot in (2, -1):
        with pytest.raises(IndexError, match=f"slot {slot} does not exist"):
            multi.submit(slot, a[1])
    with pytest.raises(IndexError):
        multi({0: a[1], 5: a[1]})
    before = [state(s) for s in multi.slots]
    multi.submit(0, a[1])  # staged: must survive the bad frames below and run at tick()
    for bad in BAD_FRAMES.values():
        for slot in (0, 1):
            with pytest.raises(FrameError):
                multi.submit(slot, bad)
        with pytest.raises(FrameError):
            multi({1: b[1], 0: bad})  # nothing of this call is staged
    for s, was in zip(multi.slots, before):
        now = state(s)
        assert now.pop("counters") == was.pop("counters")
        assert all(torch.equal(now.pop(n), t) for n, t in was.items() if n != "prompt")
    out = multi.tick()
    assert set(out) == {0} and max_diff(out[0], alone[0](a[1])) <= 1
    assert multi.slots[1].frame_id == 1
    out = multi({0: a[2], 1: b[1]})
    assert max_diff(out[0], alone[0](a[2])) <= 1 and max_diff(out[1], alone[1](b[1])) <= 1
    for i in range(2):
        assert_same(multi.slots[i], alone[i], EXACT, f"slot {i} at the end")


# --- 5. CUDA graphs --------------------------------------------------------------------------------------------


def test_cuda_graphs_refused_on_the_cpu(networks):
    backend, encoder, scheduler = networks(tiny_spec())
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        MultiStream(backend, encoder, scheduler, StreamConfig(tiny_spec()), streams=2, cuda_graphs=True)


class Replayed:
    """A stand-in for a CUDA graph on the CPU: capture runs `fn` (that run is the capture's replay), each later
    replay runs the captured `fn` again and writes what it returns into the captured outputs, as a graph
    overwrites its output buffers. So a phase that reads another's outputs through the tensors it captured (not
    fresh ones) goes wrong here as it would on a GPU."""

    def __init__(self, fn, outputs) -> None:
        self.fn, self.outputs, self.ran = fn, outputs, True

    def replay(self) -> None:
        if self.ran:  # the capture ran it: this replay is that run
            self.ran = False
            return
        fresh = self.fn()
        if isinstance(self.outputs, torch.Tensor):
            self.outputs.copy_(fresh)
        elif isinstance(self.outputs, dict):
            for name, t in self.outputs.items():
                t.copy_(fresh[name])
        else:
            assert self.outputs is None and fresh is None


def replayed_capture(fn):
    outputs = fn()
    return Replayed(fn, outputs), outputs


GRAPH_TICKS = 20
# Slot 1 joins at 2 and leaves for 8..10, slot 2 joins at 5 and leaves for 13..14; slot 0 resets at 12.
GRAPH_ACTIVE = [
    {0, 1, 2} - ({1} if t < 2 or 8 <= t <= 10 else set()) - ({2} if t < 5 or 13 <= t <= 14 else set())
    for t in range(GRAPH_TICKS)
]


def graphs_equal_eager(graphed: MultiStream, eager: MultiStream, atol: float, pixels: int) -> None:
    """`graphed` (phases through its GraphCache) gives `eager`'s frames and states while slots join, leave, reset
    and merge on different ticks; its graphs are keyed by runs of slots (a bounded set), a steady tick launches
    5 of them, and from the tick where every key has come twice nothing new is captured."""
    K = graphed.streams
    clips = [clip(GRAPH_TICKS, seed) for seed in range(K)]
    counts, kinds, launches = [], [], []
    for t, active in enumerate(GRAPH_ACTIVE):
        if t == 12:
            graphed.slots[0].reset()
            eager.slots[0].reset()
        frames = {i: clips[i][t] for i in active}
        kinds.append({i: graphed.slots[i].plan().bank.kind for i in active})
        replays = graphed.graphs.replays
        out, want = graphed(frames), eager(frames)
        launches.append(graphed.graphs.replays - replays)
        for i in active:
            assert max_diff(out[i], want[i]) <= pixels, f"tick {t}, slot {i}"
        for i in range(K):
            if atol:
                assert_same(graphed.slots[i], eager.slots[i], atol, f"tick {t}, slot {i}")
            else:  # the same ops in the same order: bit for bit
                a, b = state(graphed.slots[i]), state(eager.slots[i])
                assert all(torch.equal(a[n], b[n]) if isinstance(b[n], torch.Tensor) else a[n] == b[n] for n in b)
        counts.append(len(graphed.graphs))
    assert any(set(k.values()) == {"merge", "none"} for k in kinds)  # merges of different slots on different ticks
    ops = (BankOp("store", 0), BankOp("merge"))
    runs = [range(a, b) for a in range(K) for b in range(a + 1, K + 1)]  # K(K+1)/2 runs of consecutive slots
    allowed = {("encode",), ("unet",), ("decode",)} | {(p, r) for p in ("begin", "finish") for r in runs}
    allowed |= {("bank", op, r) for op in ops for r in runs}
    assert set(graphed.graphs) <= allowed and len(allowed) == 3 + (2 + len(ops)) * K * (K + 1) // 2
    # From tick 15 every key has come twice (slot 2 rejoins with runs seen before, slot 0's second store was at 12,
    # the merges that follow fall on runs seen before): nothing new is captured.
    assert counts[15:] == [counts[15]] * (GRAPH_TICKS - 15) and counts[15] == 16, counts
    # Once captured, a tick launches encode, UNet and decode, begin and finish per run of active slots, and one graph
    # per run of slots with the same bank update: 5 for one run without an update (tick 3), 6 with one (from 15 on:
    # slot 0 merges, or slots 1 and 2 together), 8 for two runs and an update (tick 10). Per-slot graphs launched
    # 2K + 3 for K active slots (9 from tick 15 on).
    assert launches[3] == 5 and launches[15:] == [6] * (GRAPH_TICKS - 15) and launches[10] == 8, launches


def test_runs_of_consecutive_slots():
    assert runs([3, 0, 1, 5]) == [range(0, 2), range(3, 4), range(5, 6)]
    assert runs({2: None, 1: None}) == [range(1, 3)] and runs([]) == []


def test_graph_keys_and_replays_on_the_cpu(networks):
    """The phase keying and capture policy of a graphed MultiStream, with a CPU stand-in for the capture: the
    frames and states equal the eager MultiStream's bit for bit (the test above, with CUDA, runs the real capture)."""
    cfg = StreamConfig(tiny_spec(steps=2), bank=BankConfig(interval=2), prime=True)
    backend, encoder, scheduler = networks(cfg.spec)
    graphed, eager = (MultiStream(backend, encoder, scheduler, cfg, streams=3) for _ in range(2))
    graphed.graphs = GraphCache(replayed_capture)
    for slot in [*graphed.slots, *eager.slots]:
        slot.update_prompt("a cat")
    graphs_equal_eager(graphed, eager, atol=0.0, pixels=0)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graphs_equal_eager_with_a_bounded_set_of_graphs():
    cfg = StreamConfig(tiny_spec(steps=2), bank=BankConfig(interval=2), prime=True)  # fp32: a tight comparison
    graphed = MultiStream.from_pretrained(cfg, streams=3, device="cuda", prompt="a cat", cuda_graphs=True)
    s = graphed.slots[0]
    eager = MultiStream(graphed.backend, s.prompt_encoder, s.scheduler, cfg, streams=3)
    for slot in eager.slots:
        slot.update_prompt("a cat")
    graphs_equal_eager(graphed, eager, atol=1e-4, pixels=1)
