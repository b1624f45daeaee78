"""ControlNet in build folders: `build_engines --controlnet` compiles each ControlNet as its own network
(`controlnet_<j>`), the UNet takes their summed residuals, the manifest records them, and every flavour that runs
here equals eager: ONNX Runtime frame by frame, an AOTInductor package network by network; TensorRT-RTX builds the
engines on the CPU.

The tiny model, fp32 (fp16 for TensorRT-RTX), 32x32, 2 denoising steps so the stream batch is exercised. Random
ControlNets get non-zero residual convolutions (models/controlnets.py): a dropped or mis-scaled residual fails here.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_spec

from build_engines.__main__ import build_parser, config_from_args
from build_engines.build import stages
from build_engines.export import example_inputs, network_modules
from streamv2v_trt import StreamConfig, StreamV2V
from streamv2v_trt.layout import DTYPES, NETWORKS, controlnet_network, network_names
from streamv2v_trt.manifest import EngineMismatch, load_manifest, sha256_file
from streamv2v_trt.models.controlnets import controlnet_identities, load_controlnets
from streamv2v_trt.models.loader import load_models

pytestmark = pytest.mark.usefixtures("one_thread")

PLAIN = tiny_spec(height=32, width=32, steps=2)
SPEC = dataclasses.replace(PLAIN, controlnets=("tiny",))
PROMPT = "a watercolor cat"
# The same bounds as the UNet's engine-vs-eager tests (tests/test_runtime_ort.py, tests/test_aoti.py): fp32 graphs
# whose kernels sum in another order than PyTorch's, a few ulps per layer; one uint8 step after the decoder.
LATENT_ATOL = 1e-4


def video(n: int, seed: int = 0) -> list[np.ndarray]:
    """A slowly drifting random scene (fusion and DyMe merges fire, as in tests/test_runtime_ort.py)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (32, 32, 3)).astype(np.int16)
    return [np.clip(base + rng.integers(-6, 7, base.shape) + i, 0, 255).astype(np.uint8) for i in range(n)]


def cfg(spec, **runtime) -> StreamConfig:
    return StreamConfig(spec, t_index_list=(30, 40), **runtime)


@pytest.fixture(scope="module")
def folder(tiny_build):
    return tiny_build(SPEC)


def test_the_build_writes_a_network_per_controlnet_and_records_them(folder):
    m = load_manifest(folder)
    assert m.spec == SPEC and set(m.networks) == {*NETWORKS, "controlnet_0"} == set(network_names(SPEC))
    assert [(c.name, c.architecture, c.weights_hash) for c in m.controlnets] == controlnet_identities(SPEC)
    assert m.controlnets[0].architecture.startswith("ControlNetModel: in_channels 4, block_out_channels [")
    net = m.network("controlnet_0")
    assert net.files["onnx"].name == "controlnet_0.onnx"
    assert net.files["onnx"].sha256 == sha256_file(folder / "controlnet_0.onnx")
    inputs = [t.name for t in net.inputs()]
    assert inputs == ["sample", "timestep", "encoder_hidden_states", "controlnet_cond", "conditioning_scale"]
    residuals = [t.name for t in m.network("unet").inputs()][-len(net.outputs()) :]
    assert residuals == [t.name for t in net.outputs()] and residuals[-1] == "mid_residual"
    assert next(t for t in net.tensors if t.name == "conditioning_scale").shape == (SPEC.unet_batch,)  # per element
    assert stages(None, SPEC.served_sizes, network_names(SPEC))[-2:] == ["export controlnet_0", "cleanup controlnet_0"]
    # The rebuild round trip: the manifest's command, parsed as the CLI parses it, builds this spec.
    argv = shlex.split(m.build_command)
    assert "--controlnet" in argv and config_from_args(build_parser().parse_args(argv[3:])).spec == SPEC


def test_a_folder_without_controlnets_is_as_before(tiny_build):
    m = load_manifest(tiny_build(PLAIN))
    assert m.controlnets == () and set(m.networks) == set(NETWORKS)
    assert "controlnets" not in json.dumps(m.to_json()["networks"])
    assert not [t for t in m.network("unet").tensors if "residual" in t.name]  # the UNet's I/O unchanged
    assert "-cn-" not in PLAIN.folder_name() and SPEC.folder_name().endswith("-cn-tiny")  # never the same folder


def test_onnxruntime_with_controlnet_matches_eager_frame_by_frame(folder, tiny_build):
    ort = StreamV2V.from_engines(folder, "onnxruntime", cfg(SPEC, controlnet_scales=(0.8,)), prompt=PROMPT, threads=1)
    assert ort.backend.name == "onnxruntime" and ort.cfg.controlnet_scales == (0.8,)
    eager = StreamV2V.from_pretrained(ort.cfg, prompt=PROMPT)
    plain = StreamV2V.from_engines(tiny_build(PLAIN), "onnxruntime", cfg(PLAIN), prompt=PROMPT, threads=1)
    differs = 0
    for i, frame in enumerate(video(12)):
        a, b, c = eager(frame), ort(frame), plain(frame)
        assert np.abs(a.astype(np.int16) - b).max() <= 1, f"frame {i}"
        torch.testing.assert_close(ort.latents, eager.latents, atol=LATENT_ATOL, rtol=0, msg=f"latents, frame {i}")
        for name, t in eager.residuals.items():  # what the ControlNet network fed the UNet
            torch.testing.assert_close(ort.residuals[name], t, atol=LATENT_ATOL, rtol=0, msg=f"{name}, frame {i}")
        differs += not np.array_equal(b, c)
    assert differs >= 10  # the ControlNet changes the output: the comparison above is not of two plain streams


def test_scale_zero_equals_the_build_without_controlnet_frame_by_frame(folder, tiny_build):
    """On ONNX Runtime, exactly: a scale of 0 gives residuals of 0 and the UNet adds them (x + 0 = x)."""
    zero = StreamV2V.from_engines(folder, "onnxruntime", cfg(SPEC, controlnet_scales=(0.0,)), prompt=PROMPT, threads=1)
    plain = StreamV2V.from_engines(tiny_build(PLAIN), "onnxruntime", cfg(PLAIN), prompt=PROMPT, threads=1)
    for i, frame in enumerate(video(9, seed=1)):  # frames 0, 4, 8 update the bank
        np.testing.assert_array_equal(zero(frame), plain(frame), err_msg=f"frame {i}")
        assert torch.equal(zero.latents, plain.latents), f"latents, frame {i}"
    assert all(not t.any() for t in zero.residuals.values())
    zero.update_control(scales=(0.8,))  # live, no reopen: the next frame differs
    frame = video(1, seed=2)[0]
    assert not np.array_equal(zero(frame), plain(frame))


def test_other_controlnets_are_refused_with_the_rebuild_command(folder):
    asked = dataclasses.replace(SPEC, controlnets=("tiny", "tiny"))
    with pytest.raises(EngineMismatch) as e:
        StreamV2V.from_engines(folder, "onnxruntime", StreamConfig(asked))
    message = str(e.value)
    assert "controlnets: engines have ('tiny',), asked ('tiny', 'tiny')" in message
    command = message.split("Rebuild: ", 1)[1].split(" (writes ", 1)[0]
    assert config_from_args(build_parser().parse_args(shlex.split(command)[3:])).spec == asked


def test_other_controlnet_weights_are_refused_with_the_rebuild_command(folder, tmp_path):
    """The same ControlNet names with other weights (here: the manifest's record changed) are another build."""
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["controlnets"][0]["weights_hash"] = "0123456789abcdef"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineMismatch) as e:
        StreamV2V.from_engines(copy, "onnxruntime")
    own = controlnet_identities(SPEC)[0][2]
    assert f"ControlNet 0 (tiny) weights hash: engines have 0123456789abcdef, asked {own}" in str(e.value)
    command = str(e.value).split("Rebuild: ", 1)[1]  # the same spec, rebuilt in place
    rebuild = config_from_args(build_parser().parse_args(shlex.split(command)[3:]))
    assert (rebuild.spec, rebuild.out) == (SPEC, copy)
    assert StreamV2V.from_engines(copy, "onnxruntime", verify_hashes=False).backend.name == "onnxruntime"


def test_the_io_check_covers_the_controlnet_tensors(folder, tmp_path):
    """A ControlNet tensor recorded otherwise than the layout says is refused, named, with the rebuild command."""
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    cond = next(t for t in manifest["networks"]["controlnet_0"]["tensors"] if t["name"] == "controlnet_cond")
    cond["shape"] = [2, 3, 16, 16]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineMismatch, match=r"controlnet_0 controlnet_cond: manifest has input \[2, 3, 16, 16\]"):
        StreamV2V.from_engines(copy, "onnxruntime")
    (copy / "controlnet_0.onnx").unlink()
    (copy / "manifest.json").write_text((folder / "manifest.json").read_text())
    with pytest.raises(EngineMismatch, match=r"controlnet_0: file .*controlnet_0.onnx is missing.*Rebuild: python -m"):
        StreamV2V.from_engines(copy, "onnxruntime")


def test_a_rerun_reuses_the_controlnet_files_and_rebuilds_a_missing_one_alone(folder, tmp_path):
    from build_engines import BuildConfig, build

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    again = build(BuildConfig(SPEC, onnx_only=True, out=copy))
    assert again.reused and {a.network for a in again.artifacts} == set(network_names(SPEC))
    (copy / "controlnet_0.onnx").unlink()
    third = build(BuildConfig(SPEC, onnx_only=True, out=copy))
    assert [(a.network, a.reused) for a in third.artifacts if not a.reused] == [("controlnet_0", False)]
    assert load_manifest(copy).network("controlnet_0").tensors == load_manifest(folder).network("controlnet_0").tensors
    assert "ControlNets tiny " in third.summary().splitlines()[0]


@pytest.mark.slow
def test_aoti_folder_with_controlnet_matches_eager(tiny_build):
    """One AOTInductor build (the module's one compile: four packages, about a minute on 2 cores): the stream on it
    equals eager frame by frame, and its ControlNet package alone equals the eager network at scales 0 (exactly
    zero residuals) and 0.8 (within the UNet's bound)."""
    folder = tiny_build(SPEC, builder="aoti")
    assert load_manifest(folder).network("controlnet_0").files["package"].name == "controlnet_0.pt2"
    aoti = StreamV2V.from_engines(folder, "aoti", cfg(SPEC, controlnet_scales=(0.8,)), prompt=PROMPT)
    eager = StreamV2V.from_pretrained(aoti.cfg, prompt=PROMPT)
    for i, frame in enumerate(video(10)):
        a, b = eager(frame), aoti(frame)
        assert np.abs(a.astype(np.int16) - b).max() <= 1, f"frame {i}"
        torch.testing.assert_close(aoti.latents, eager.latents, atol=LATENT_ATOL, rtol=0, msg=f"latents, frame {i}")

    models = load_models(SPEC)
    modules, specs = network_modules(models, SPEC, load_controlnets(SPEC, models.unet.config, "cpu"))
    name = controlnet_network(0)
    runner, module, inputs = aoti.backend.networks[name], modules[name], example_inputs(specs[name], seed=1)
    assert runner.input_specs == {s.name: (s.shape, DTYPES[s.dtype]) for s in specs[name] if s.is_input}
    for scale in (0.0, 0.8):
        run = dict(inputs, conditioning_scale=torch.full_like(inputs["conditioning_scale"], scale))
        with torch.no_grad():
            ref = module.run(run)
        got = aoti.backend.controlnet(0, run)
        assert list(got) == module.output_names
        for out, t in got.items():
            if scale:
                assert ref[out].abs().max() > 0.1, out  # real residuals, not zero convolutions
                torch.testing.assert_close(t, ref[out], atol=LATENT_ATOL, rtol=0, msg=lambda m, n=out: f"{n}: {m}")
            else:
                assert not t.any(), out


def test_tensorrt_rtx_builds_the_controlnet_engines_on_the_cpu(tiny_build, monkeypatch):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed (pip install -e '.[trt-rtx]')")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the ahead-of-time build, wherever this runs
    rtx = dataclasses.replace(SPEC, precision="fp16")
    built = tiny_build(rtx, builder="tensorrt-rtx")
    m = load_manifest(built)
    assert m.builder == "tensorrt-rtx" and m.differences(rtx) == [] and len(m.controlnets) == 1
    assert m.file_problems(built, ("onnx", "engine")) == []
    net = m.network("controlnet_0")
    assert net.files["engine"].name == "controlnet_0.engine" and (built / "controlnet_0.engine").stat().st_size > 0
    assert {t.dtype for t in net.tensors} <= {"float16", "int64"}  # strongly typed: the fp16 graph


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["tensorrt", "aoti"])
def test_gpu_engines_with_controlnet_match_eager_in_fp16(tiny_build, backend):
    """The ControlNet engines / packages on the GPU against fp16 eager, by the bound of the UNet's fp16 test
    (tests/test_gpu_runtime.py: different kernels, same maths), and a CUDA graph replays them as run call by call."""
    from test_gpu_runtime import psnr, tensorrt_builder

    from streamv2v_trt.cuda_graph import CudaGraphStream

    spec = dataclasses.replace(SPEC, precision="fp16")
    options = {"builder": tensorrt_builder()} if backend == "tensorrt" else {"builder": "aoti", "device": "cuda"}
    folder = tiny_build(spec, **options)
    run = cfg(spec, controlnet_scales=(0.8,))
    engine = StreamV2V.from_engines(folder, backend, run, device="cuda", prompt=PROMPT)
    graphed = CudaGraphStream(StreamV2V.from_engines(folder, backend, run, device="cuda", prompt=PROMPT))
    eager = StreamV2V.from_pretrained(run, device="cuda", prompt=PROMPT)
    scores = []
    for i, frame in enumerate(video(12)):
        a, b, c = eager(frame), engine(frame), graphed(frame)
        scores.append(psnr(a, b))
        assert np.abs(b.astype(np.int16) - c).max() <= 1, f"frame {i}"  # the bound of the UNet's graph test
    assert min(scores) >= 30.0, scores


@pytest.mark.parametrize("shapes", ["static", "dynamic"])
def test_a_multi_size_build_from_the_command_line_has_every_sizes_controlnet(tmp_path, capsys, shapes):
    """`--sizes` with `--controlnet`: a ControlNet file per size (or, `--shapes dynamic`, one for both), and a
    stream resized on the folder runs that size's ControlNet as eager does."""
    from build_engines.__main__ import main

    out = tmp_path / "sized"
    argv = ["--model", "tiny", "--sizes", "64x64,128x64", "--controlnet", "tiny", "--steps", "1", "--shapes", shapes]
    assert main([*argv, "--precision", "fp32", "--onnx-only", "--out", str(out)]) == 0
    summary = capsys.readouterr().out
    if shapes == "static":
        assert "controlnet_0 128x64" in summary  # the summary's row for the second size
        assert {"controlnet_0-64x64.onnx", "controlnet_0-128x64.onnx"} <= {p.name for p in out.iterdir()}
    else:
        assert "controlnet_0  controlnet_0.onnx" in summary and "128x64 " not in summary.split("network", 1)[1]
        assert {p.name for p in out.glob("controlnet_0*")} == {"controlnet_0.onnx"}
    m = load_manifest(out)
    assert set(m.networks_at(64, 128)) == set(network_names(m.spec))
    run = StreamConfig(m.spec, t_index_list=(32,), controlnet_scales=(0.8,))
    ort = StreamV2V.from_engines(out, "onnxruntime", run, prompt=PROMPT, threads=1)
    eager = StreamV2V.from_pretrained(ort.cfg, prompt=PROMPT)
    for stream in (ort, eager):
        stream.resize(64, 128)
    assert ort.backend.networks["controlnet_0"].input_specs["controlnet_cond"][0] == (1, 3, 64, 128)
    rng = np.random.default_rng(3)
    for i in range(3):
        frame = rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)
        a, b = eager(frame), ort(frame)
        assert np.abs(a.astype(np.int16) - b).max() <= 1, f"frame {i}"
        torch.testing.assert_close(ort.latents, eager.latents, atol=LATENT_ATOL, rtol=0, msg=f"latents, frame {i}")
