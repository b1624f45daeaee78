"""LoRAs swapped at runtime on an ONNX Runtime build folder with swappable weights (tiny model, fp32, CPU): a new
session with the touched initializers overridden, swapped in between two frames.

Bounds: the overridden initializers hold base + deltas computed by the eager path's own code (`LoraWeights`,
`add_deltas`) on the same CPU weights, transposed as the exporter stored them, so a swapped session holds the very
bits a folder built with that LoRA fused holds (checked), and ORT-vs-ORT frames are held to the ORT backend's own
bound for ORT against eager (tests/test_runtime_ort.py: uint8 frames within 1, latents within 1e-4). Against eager
streams (the swap every few frames), the same bound. Two ORT sessions holding the same base weights are compared
exactly.
"""

from __future__ import annotations

import shlex
import shutil

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_spec
from onnx import numpy_helper
from safetensors.torch import load_file
from test_lora import TARGETS, save, write_lora
from test_lora_swap import PROMPT, SETS, files, video  # noqa: F401  (files: the module's LoRA fixture)

from build_engines import BuildConfig, build
from streamv2v_trt import StreamV2V
from streamv2v_trt.backends.onnx_weights import read_initializers, weight_map
from streamv2v_trt.backends.onnxruntime import OnnxRunner
from streamv2v_trt.lora_set import lora_specs
from streamv2v_trt.manifest import EngineMismatch, load_manifest, sha256_file
from streamv2v_trt.models.loader import find_weights, load_unet
from streamv2v_trt.models.lora import LoraError

pytestmark = pytest.mark.usefixtures("one_thread")
SPEC = tiny_spec()


@pytest.fixture(scope="module")
def folder(tiny_build):
    """The session's tiny --onnx-only build: swappable weights by default (no --lora)."""
    return tiny_build(SPEC)


@pytest.fixture(scope="module")
def base_unet():
    return load_unet(SPEC, find_weights(SPEC), "cpu")


def ort(folder, loras=None, **kwargs) -> StreamV2V:
    loras = lora_specs(loras) if loras is not None else None
    return StreamV2V.from_engines(folder, "onnxruntime", prompt=PROMPT, threads=1, loras=loras, **kwargs)


def eager(loras=()) -> StreamV2V:
    return StreamV2V.from_pretrained(tiny_spec(loras=lora_specs(loras)), prompt=PROMPT)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b).max())


def assert_close_frames(a: StreamV2V, b: StreamV2V, frames) -> None:
    for i, frame in enumerate(frames):
        assert max_diff(a(frame), b(frame)) <= 1, f"frame {i}"
        torch.testing.assert_close(a.sample, b.sample, atol=1e-4, rtol=0, msg=lambda m, i=i: f"frame {i}: {m}")


def test_the_default_onnx_build_is_swappable_and_every_weight_maps(folder, base_unet):
    manifest = load_manifest(folder)
    assert manifest.weights == "swappable" and manifest.builder is None and manifest.spec.loras == ()
    wmap = weight_map(folder / "unet.onnx", base_unet)
    modules = {n for n, m in base_unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert wmap.problems == {} and set(wmap.initializers) == modules
    refs = [i for refs in wmap.initializers.values() for i in refs]
    assert any(i.transposed for i in refs) and any(not i.transposed for i in refs)  # MatMul's W.T, Conv's W
    stored = read_initializers(folder / "unet.onnx", [i.name for i in refs])
    for name in modules:  # every initializer the map names holds that module's weight, as the map says
        for i in wmap.initializers[name]:
            assert torch.equal(stored[i.name], i.value(base_unet.get_submodule(name).weight)), (name, i)


def test_the_swapped_initializers_are_the_bits_of_a_fused_build(folder, tiny_build, files):  # noqa: F811
    """What a swap gives the new session, initializer by initializer: the file a build with the LoRA fused writes."""
    asked = lora_specs([(files["a"], 0.8)])
    fused = tiny_build(tiny_spec(loras=asked))  # --lora given: frozen, the LoRA fused at build
    assert load_manifest(fused).weights == "frozen"
    lora_weights = ort(folder).backend.lora_weights
    values = {}
    real = lora_weights.runners[0].prepare_weights
    lora_weights.runners[0].prepare_weights = lambda v, base: values.update(v) or real(v, base)
    lora_weights.set(asked)
    wmap = lora_weights.maps[0]
    assert {i.name for t in TARGETS for i in wmap.initializers[t]} == values.keys()  # the LoRA's layers, no others
    stored = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(fused / "unet.onnx")).graph.initializer}
    for name, value in values.items():  # the exporter's names are deterministic: the same graph, the same names
        assert np.array_equal(value.numpy(), stored[name]), name


def test_hot_swap_equals_a_folder_built_with_the_lora_fused(folder, tiny_build, files):  # noqa: F811
    asked = [(files["a"], 0.8)]
    s, plain = ort(folder), ort(folder)
    frames = video(10)
    for frame in frames[:3]:
        assert np.array_equal(s(frame), plain(frame))
    outputs = dict(s.backend._unet.outputs)
    s.set_loras(asked, reset=True)
    assert s.cfg.spec.loras == lora_specs(asked)
    assert s.backend._unet.outputs == outputs  # the same output tensors: what the pipeline holds stays valid
    fused = ort(tiny_build(tiny_spec(loras=lora_specs(asked))), asked)
    assert_close_frames(s, fused, frames[3:])
    plain.reset()
    s.reset()
    assert max(max_diff(s(f), plain(f)) for f in frames[:4]) > 1  # the LoRA really changed the frames
    assert_close_frames(ort(folder, asked), eager(asked), frames[:4])  # opened with it: the same as eager fused


def test_scale_zero_and_an_empty_set_are_the_base(folder, files):  # noqa: F811
    s, base = ort(folder), ort(folder)
    frames = video(9)
    s.set_loras([(files["a"], 0.0)])
    for frame in frames[:3]:
        assert np.array_equal(s(frame), base(frame))
    s.set_loras([(files["b"], 1.0)])
    s.set_loras([])
    for frame in frames[3:]:
        assert np.array_equal(s(frame), base(frame))


def test_a_malformed_file_changes_nothing(folder, files, tmp_path):  # noqa: F811
    s, twin = ort(folder, [(files["a"], 1.0)]), ort(folder, [(files["a"], 1.0)])
    frames = video(6)
    for frame in frames[:2]:
        s(frame), twin(frame)
    cfg, session = s.cfg, s.backend._unet.session
    bad = tmp_path / "bad.safetensors"
    tensors = load_file(str(files["b"]))
    factor = next(iter(tensors.values()))
    save(bad, tensors | {f"lora_unet_no_such_layer.lora_{r}.weight": factor for r in ("down", "up")})
    with pytest.raises(LoraError, match="matches no Linear/Conv2d"):
        s.set_loras([(files["b"], 1.0), (bad, 1.0)])
    with pytest.raises(FileNotFoundError):
        s.set_loras([(tmp_path / "missing.safetensors", 1.0)])
    assert s.cfg == cfg and s.backend._unet.session is session
    for i, frame in enumerate(frames[2:]):
        assert np.array_equal(s(frame), twin(frame)), f"frame {i}"


def test_a_swap_every_few_frames_matches_one_weight_set(folder, files):  # noqa: F811
    """A swap (reset=True) every 3 frames over 30: every frame is within the ORT bound of the eager stream of the set
    it runs (reset on the same frames) and farther than that from every other set's: no frame mixes two sets."""
    sets = [[(files[n], scale) for n, scale in named] for named in SETS]
    refs = [eager(loras) for loras in sets]
    s = ort(folder)
    for i, frame in enumerate(video(30)):
        if i % 3 == 0 and i:
            s.set_loras(sets[(i // 3) % len(sets)], reset=True)
            for r in refs:
                r.reset()
        active = (i // 3) % len(sets)
        outs = [r(frame) for r in refs]
        out = s(frame)
        assert max_diff(out, outs[active]) <= 1, f"frame {i}: not the output of the set it runs"
        assert all(max_diff(out, o) > 1 for j, o in enumerate(outs) if j != active), f"frame {i}"


def test_a_weight_the_file_does_not_hold_is_refused_and_changes_nothing(folder, files, tmp_path, base_unet):  # noqa: F811
    """A file whose initializer for a LoRA'd layer holds other values (as if the exporter had folded it into
    something else): that layer has no initializer, and a LoRA touching it is refused with the fused build's
    command, the session unchanged."""
    copy = tmp_path / "folder"
    shutil.copytree(folder, copy)
    layer = TARGETS[0]
    name = weight_map(copy / "unet.onnx", base_unet).initializers[layer][0].name
    model = onnx.load(str(copy / "unet.onnx"))
    init = next(i for i in model.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 2, name))
    onnx.save(model, str(copy / "unet.onnx"))
    s = ort(copy, verify_hashes=False)
    session = s.backend._unet.session
    with pytest.raises(EngineMismatch, match=f"{layer}: no initializer of unet.onnx holds its weight") as e:
        s.set_loras([(files["a"], 1.0)])
    assert "python -m build_engines" in str(e.value) and "--lora" in str(e.value) and "--onnx-only" in str(e.value)
    assert s.backend._unet.session is session and s.cfg.spec.loras == ()
    assert s.backend.lora_weights.loras == ()
    others = tmp_path / "others.safetensors"  # the other layers of the same LoRA: they map, the swap goes through
    write_lora(others, base_unet, "kohya", alpha=2.0, seed=1, targets=TARGETS[1:])
    s.set_loras([(others, 1.0)])
    assert s.backend._unet.session is not session and s.cfg.spec.loras == lora_specs([(others, 1.0)])


def test_a_rebuild_with_other_weights_rewrites_the_manifest_and_keeps_the_onnx(folder, tmp_path):
    """The ONNX of a swappable build and of a frozen one without LoRA are the same file: only the manifest changes."""
    copy = shutil.copytree(folder, tmp_path / "folder")
    onnx_hash = sha256_file(copy / "unet.onnx")
    for weights, want in (("frozen", "frozen"), (None, "swappable")):
        result = build(BuildConfig(SPEC, onnx_only=True, weights=weights, out=copy))
        assert result.manifest.weights == want == load_manifest(copy).weights
        assert result.reused and sha256_file(copy / "unet.onnx") == onnx_hash
    build(BuildConfig(SPEC, onnx_only=True, weights="frozen", out=copy))
    s = ort(copy)
    assert s.backend.lora_weights is None
    with pytest.raises(EngineMismatch, match="compiled into its files") as e:
        s.set_loras([])
    assert "--weights swappable and no --lora" in str(e.value)


def test_a_file_with_external_weights_swaps_too(folder, tmp_path, monkeypatch):
    """Weights past 2 GB live in unet.onnx.data: the new session is made from bytes, and finds the file's other
    weights beside it (not in the working directory); it equals a session of the file with that value written."""
    external = tmp_path / "external"
    external.mkdir()
    onnx.save_model(onnx.load(str(folder / "unet.onnx")), str(external / "unet.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="unet.onnx.data")  # fmt: skip
    monkeypatch.chdir(tmp_path)
    runner = OnnxRunner(external / "unet.onnx", torch.device("cpu"), threads=1)
    model = onnx.load(str(folder / "unet.onnx"))
    init = next(i for i in model.graph.initializer if i.name == "unet.conv_in.weight")
    weight = torch.from_numpy(numpy_helper.to_array(init) * 1.5)
    gen = torch.Generator().manual_seed(0)
    inputs = {n: torch.randn(shape, generator=gen) for n, (shape, _) in runner.input_specs.items() if n != "timestep"}
    inputs["timestep"] = torch.tensor([500] * runner.input_specs["timestep"][0][0])
    before = {n: t.clone() for n, t in runner.run(inputs).items()}
    runner.prepare_weights({"unet.conv_in.weight": weight})()
    init.CopyFrom(numpy_helper.from_array(weight.numpy(), init.name))
    onnx.save(model, str(tmp_path / "written.onnx"))
    want = OnnxRunner(tmp_path / "written.onnx", torch.device("cpu"), threads=1).run(inputs)
    got = runner.run(inputs)
    assert all(torch.equal(got[n], want[n]) for n in want)  # the same file and values: the same session, bit for bit
    assert not torch.equal(got["noise_pred"], before["noise_pred"])


def test_a_damaged_swappable_folder_is_rebuilt_swappable_without_the_loras(folder, files, tmp_path):  # noqa: F811
    """The rebuild command of a swappable folder keeps it swappable and names no LoRA (they are applied at open)."""
    from build_engines.__main__ import build_parser, config_from_args

    copy = shutil.copytree(folder, tmp_path / "folder")
    with open(copy / "unet.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(EngineMismatch, match="unet.onnx") as e:
        ort(copy, [(files["a"], 1.0)])
    command = str(e.value).split("Rebuild: ", 1)[1]
    assert command.startswith("python -m build_engines --weights swappable ")
    cfg = config_from_args(build_parser().parse_args(shlex.split(command)[3:]))
    assert (cfg.weights, cfg.spec, cfg.out, cfg.onnx_only) == ("swappable", SPEC, copy, True)
