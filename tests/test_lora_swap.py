"""LoRAs as runtime state on the eager backend: `set_loras` between frames gives what a fused stream gives.

Bounds: a swap writes base + the LoRAs' deltas with the fuse's own arithmetic (`lora.add_deltas`: the same
float32 delta on the same device, added in the weights' dtype in the same order), so the parameters are
bit-identical to a stream opened with the LoRAs fused, and on the CPU the same ops on the same weights and inputs
give the same frames: the comparisons are exact (0, not 1/255).
"""

import copy

import numpy as np
import pytest
import torch
from conftest import tiny_spec
from safetensors.torch import load_file, save_file
from test_lora import factors, save, write_lora

from streamv2v_trt import MultiStream, StreamV2V
from streamv2v_trt.lora_set import lora_specs
from streamv2v_trt.models.loader import load_models
from streamv2v_trt.models.lora import LoraError, fuse_loras
from streamv2v_trt.spec import LoraSpec

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a cat"
TE_LAYERS = ("encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two LoRA files with UNet and text-encoder layers: {name: path}."""
    root, models = tmp_path_factory.mktemp("loras"), load_models(tiny_spec())
    paths = {}
    for seed, name in ((1, "a"), (2, "b")):
        path = root / f"{name}.safetensors"
        write_lora(path, models.unet, "kohya", alpha=2.0, seed=seed)
        tensors, gen = load_file(str(path)), torch.Generator().manual_seed(seed + 10)
        for module in TE_LAYERS:
            down, up = factors(models.text_encoder.get_submodule(module), 2, gen)
            stem = "lora_te_text_model_" + module.replace(".", "_")
            tensors |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
        save_file(tensors, str(path))
        paths[name] = path
    return paths


def video(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (64, 64, 3)).astype(np.int16)
    return [np.clip(base + rng.integers(-6, 7, base.shape) + i, 0, 255).astype(np.uint8) for i in range(n)]


def stream(loras=(), **fields) -> StreamV2V:
    return StreamV2V.from_pretrained(tiny_spec(loras=lora_specs(loras), **fields), prompt=PROMPT)


def weights(s) -> dict[str, torch.Tensor]:
    """Every UNet and text-encoder parameter of a stream, cloned."""
    te = s.prompt_encoder.text_encoder.state_dict()
    unet = s.backend.bank_unet.state_dict()
    return {f"te.{k}": v.clone() for k, v in te.items()} | {f"unet.{k}": v.clone() for k, v in unet.items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_hot_swap_equals_a_stream_opened_with_the_loras(files):
    asked = [(files["a"], 0.8), (files["b"], -0.5)]
    s, fused = stream(), stream(asked)
    frames = video(8)
    for frame in frames[:3]:
        s(frame)
    s.set_loras(asked, reset=True)
    assert s.cfg == fused.cfg and s.cfg.spec.loras == lora_specs(asked)
    assert_same_weights(weights(s), weights(fused))  # the text encoder's LoRA layers too
    assert torch.equal(s.prompt_embeds, fused.prompt_embeds)  # re-encoded with the new text encoder
    for i, frame in enumerate(frames):
        assert np.array_equal(s(frame), fused(frame)), f"frame {i}"
        assert torch.equal(s.latents, fused.latents)


def test_scale_zero_is_the_base_and_an_empty_set_restores_it_bit_for_bit(files):
    s, plain = stream([(files["a"], 1.0)]), stream()
    base = weights(plain)
    s.set_loras([(files["b"], 0.0)])
    assert_same_weights(weights(s), base)
    assert s.backend.lora_weights.base_bytes > 0  # only the touched weights are copied: far below the model's
    assert s.backend.lora_weights.base_bytes < sum(v.numel() * v.element_size() for v in base.values()) / 2
    s.set_loras([(files["a"], 1.0), (files["b"], 2.0)])
    s.set_loras([])
    assert_same_weights(weights(s), base)
    assert s.cfg.spec.loras == () and torch.equal(s.prompt_embeds, plain.prompt_embeds)
    s.reset()
    for frame in video(4):
        assert np.array_equal(s(frame), plain(frame))


SETS = [[], [("a", 1.0)], [("a", 0.5), ("b", 1.0)], [("b", -1.0)]]


def test_a_swap_every_few_frames_matches_one_weight_set_in_lockstep(files):
    """Swaps with reset=True: every output equals the lockstep reference of the set it runs (each reference a
    stream opened with that set, reset on the same frames) and differs from the others'."""
    sets = [[(files[n], scale) for n, scale in named] for named in SETS]
    refs = [stream(loras) for loras in sets]
    s = stream()
    for i, frame in enumerate(video(50)):
        if i % 5 == 0 and i:
            s.set_loras(sets[(i // 5) % len(sets)], reset=True)
            for r in refs:
                r.reset()
        active = (i // 5) % len(sets)
        outs = [r(frame) for r in refs]
        out = s(frame)
        assert np.array_equal(out, outs[active]), f"frame {i}: not the output of the set it runs"
        assert not any(np.array_equal(out, o) for j, o in enumerate(outs) if j != active), f"frame {i}"


def test_swaps_keeping_the_bank_equal_a_refuse_at_the_same_frames(files):
    """Swaps with the bank kept (the default): the same frames as a stream whose weights are reloaded and fused
    by `fuse_loras` at the same frame boundaries, so no frame mixes old and new weights."""
    sets = [[(files[n], scale) for n, scale in named] for named in SETS]
    s, ref = stream(steps=2), stream(steps=2)
    unet, te = ref.backend.bank_unet.unet, ref.prompt_encoder.text_encoder
    base_unet, base_te = copy.deepcopy(unet.state_dict()), copy.deepcopy(te.state_dict())
    for i, frame in enumerate(video(50)):
        if i % 5 == 0 and i:
            loras = lora_specs(sets[(i // 5) % len(sets)])
            s.set_loras(loras)
            with torch.no_grad():
                unet.load_state_dict(base_unet), te.load_state_dict(base_te)
            fuse_loras(unet, loras, text_encoder=te)
            ref.update_prompt(PROMPT)
        assert np.array_equal(s(frame), ref(frame)), f"frame {i}"
        assert all(torch.equal(t, ref.bank.inputs()[n]) for n, t in s.bank.inputs().items()), f"frame {i}"


def test_a_malformed_file_changes_nothing_and_the_stream_continues(files, tmp_path):
    s, twin = stream([(files["a"], 1.0)]), stream([(files["a"], 1.0)])
    frames = video(8)
    for frame in frames[:3]:
        s(frame), twin(frame)
    before, cfg = weights(s), s.cfg
    bad = tmp_path / "bad.safetensors"
    tensors = load_file(str(files["b"]))
    factor = next(iter(tensors.values()))  # a layer the UNet does not have: refused before its shapes are read
    save(bad, tensors | {f"lora_unet_no_such_layer.lora_{r}.weight": factor for r in ("down", "up")})
    with pytest.raises(LoraError, match="matches no Linear/Conv2d"):
        s.set_loras([(files["b"], 1.0), (bad, 1.0)])  # a good file first: it must not be half-applied
    with pytest.raises(FileNotFoundError):
        s.set_loras([(tmp_path / "missing.safetensors", 1.0)])
    assert_same_weights(weights(s), before)
    assert s.cfg == cfg
    for i, frame in enumerate(frames[3:]):
        assert np.array_equal(s(frame), twin(frame)), f"frame {i}"


def test_a_failure_while_computing_the_new_weights_changes_nothing(files, monkeypatch):
    """The new weights are prepared beside the running ones: an error half-way (say, out of memory) writes none."""
    from streamv2v_trt.models import lora_weights

    s = stream([(files["a"], 1.0)])
    before, calls, add_deltas = weights(s), [], lora_weights.add_deltas

    def failing(weight, fuses):  # the third layer fails
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        add_deltas(weight, fuses)

    monkeypatch.setattr(lora_weights, "add_deltas", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        s.set_loras([(files["b"], 1.0)])
    assert_same_weights(weights(s), before)
    assert s.backend.lora_weights.loras == s.cfg.spec.loras == lora_specs([(files["a"], 1.0)])


def test_multistream_sets_one_lora_set_for_every_slot(files):
    asked = [(files["a"], 0.7)]
    multi = MultiStream.from_pretrained(tiny_spec(), streams=2, prompt=PROMPT)
    multi.slots[1].update_prompt("a dog")
    frames = video(6)
    multi({0: frames[0], 1: frames[0]})
    multi.set_loras(asked, reset=True)
    assert multi.cfg.spec.loras == lora_specs(asked) and all(slot.cfg == multi.cfg for slot in multi.slots)
    alone = [stream(asked), stream(asked)]
    alone[1].update_prompt("a dog")
    assert_same_weights(weights(multi.slots[0]), weights(alone[0]))
    for k in (0, 1):
        assert torch.equal(multi.slots[k].prompt_embeds, alone[k].prompt_embeds)  # each slot re-encoded its prompt
    for i, frame in enumerate(frames):
        outs = multi({0: frame, 1: frame})
        for k in (0, 1):  # a batch of two rounds differently from a batch of one: 1/255, as tests/test_multistream.py
            assert int(np.abs(outs[k].astype(np.int16) - alone[k](frame)).max()) <= 1, f"frame {i}, slot {k}"


@pytest.mark.slow
def test_a_compiled_forward_runs_the_swapped_weights(files):
    """torch.compile (aot_eager: the tracing, no code generation) lifts the parameters as inputs of the compiled
    graph, so the in-place swap is what it reads next frame, without recompiling."""
    from torch._dynamo.utils import counters

    asked = [(files["a"], 0.8)]
    compiled = StreamV2V.from_pretrained(tiny_spec(), prompt=PROMPT, compile="aot_eager")
    frames = video(6)
    for frame in frames[:2]:  # compiles the UNet and VAE forwards
        compiled(frame)
    graphs = dict(counters["stats"])
    compiled.set_loras(asked, reset=True)
    fused, plain = stream(asked), stream()
    for i, frame in enumerate(frames):
        out, want = compiled(frame), fused(frame)
        # aot_eager's decomposed ops may round differently from eager's: 1/255 on uint8 frames
        assert int(np.abs(out.astype(np.int16) - want).max()) <= 1, f"frame {i}"
        assert int(np.abs(out.astype(np.int16) - plain(frame)).max()) > 1, f"frame {i}: the base weights"
    assert dict(counters["stats"]) == graphs  # nothing was traced again


def test_lora_specs_takes_pairs_and_specs(files):
    spec = LoraSpec(files["a"], 0.3)
    assert lora_specs([(files["a"], 0.5), (spec, 2), spec]) == (
        LoraSpec(files["a"], 0.5),
        LoraSpec(files["a"], 2.0),
        spec,
    )
    assert lora_specs([]) == ()
    with pytest.raises(TypeError, match="pairs"):
        lora_specs(str(files["a"]))
    with pytest.raises(TypeError, match="pair"):
        lora_specs([(files["a"],)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_stream_after_set_loras_equals_an_eager_stream_with_the_lora_fused(files):
    """The swap writes the weights in place, so graphs captured before it replay the new weights (no recapture)."""
    from streamv2v_trt.cuda_graph import CudaGraphStream

    asked = [(files["a"], 0.8)]
    fp32 = dict(device="cuda", prompt=PROMPT)
    graphed = CudaGraphStream(StreamV2V.from_pretrained(tiny_spec(), **fp32))
    frames = video(12)
    for frame in frames[:9]:  # DyMe every 4 frames: the steady and the store graphs are captured (frames 2, 4)
        graphed(frame)
    captured = len(graphed.graphs)
    graphed.set_loras(asked, reset=True)
    fused = StreamV2V.from_pretrained(tiny_spec(loras=lora_specs(asked)), **fp32)
    for i, frame in enumerate(frames):
        a, b = graphed(frame), fused(frame)
        assert int(np.abs(a.astype(np.int16) - b).max()) <= 1, f"frame {i}"  # graph vs eager kernels: 1/255
    assert len(graphed.graphs) == captured  # replayed, not recaptured
