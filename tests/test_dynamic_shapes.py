"""`build_engines --shapes dynamic`: one file per network serves every frame size of the folder (an ONNX with
symbolic height and width; a TensorRT engine with one optimisation profile spanning the sizes), so the weights are
held once; each size still opens as its own runner, with its shapes, checked three ways.

One tiny fp32 --onnx-only build for three sizes of two aspects (64x64, 128x64, 64x128: the profile's corners,
64x64 and 128x128, are no built size), made over a copy of test_sizes.py's static two-size folder; ONNX Runtime
runs it on the CPU against the single-size folders. TensorRT-RTX builds its engines on the CPU; running them needs
a GPU (marked).
"""

from __future__ import annotations

import logging
import shlex
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_spec
from test_build_cli import parse
from test_gpu_runtime import needs_cuda, psnr, tensorrt_builder
from test_lora_swap import files  # noqa: F401  (the module's LoRA fixture)
from test_manifest import rebuild_config, refused
from test_sizes import PROMPT, SPEC, WIDE, video

from build_engines import BuildConfig, build, stages
from build_engines.build import _Plan, _Run, profiles
from build_engines.export import tensor_entries
from streamv2v_trt import StreamV2V
from streamv2v_trt.backends.onnxruntime import OnnxRunner
from streamv2v_trt.build_folder import open_build_folder
from streamv2v_trt.layout import NETWORKS
from streamv2v_trt.manifest import FileEntry, NetworkEntry, load_manifest
from streamv2v_trt.models.loader import find_weights

TALL = (128, 64)  # (height, width)
SIZES = ((64, 64), WIDE, TALL)
DYNAMIC = tiny_spec(sizes=SIZES)
# ONNX Runtime on a graph with symbolic shapes against one with static ones: the same operators and weights, but
# the CPU provider may pick other kernels (or fold other constants) when shapes are symbolic, so fp32 results may
# differ by rounding (measured identical on this project's 2-core AMD EPYC VM, 20 frames at 128x64; another CPU's
# kernels may not be). 1e-4 is the rounding of a few fp32 ops on latents of unit scale; frames: one uint8 step.
LATENT_ATOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dynamic(tiny_build, tmp_path_factory) -> Path:
    """The dynamic-shape build, made over a copy of the static two-size folder (its per-size files must go)."""
    folder = shutil.copytree(tiny_build(SPEC), tmp_path_factory.mktemp("dynamic") / "engines")
    build(BuildConfig(DYNAMIC, out=folder, onnx_only=True, shapes="dynamic"))
    return folder


def test_the_flag_and_its_refusals():
    cfg = parse("--model", "tiny", "--sizes", "64x64,128x64", "--shapes", "dynamic", "--onnx-only")
    assert cfg.dynamic and cfg.stage_sizes == () and parse("--model", "tiny").shapes == "static"
    assert stages(None, cfg.stage_sizes) == stages(None)  # one export per network, not per size
    with pytest.raises(ValueError, match="--shapes dynamic makes one network serve several frame sizes: name them"):
        BuildConfig(tiny_spec(), shapes="dynamic")
    with pytest.raises(ValueError, match="AOTInductor compiles one package per size.*--builder tensorrt-rtx"):
        BuildConfig(SPEC, builder="aoti", shapes="dynamic")


def test_one_file_per_network_serves_every_size(dynamic):
    manifest = load_manifest(dynamic)
    assert manifest.dynamic and manifest.spec == DYNAMIC and "--shapes dynamic" in manifest.build_command
    assert parse(*shlex.split(manifest.build_command)[3:]).dynamic
    assert sorted(p.name for p in dynamic.glob("*.onnx")) == sorted(f"{n}.onnx" for n in NETWORKS)  # static ones gone
    sized = manifest.sized_networks()
    assert list(sized) == list(SIZES)
    for (h, w), networks in sized.items():
        assert {networks[n].files["onnx"].name for n in NETWORKS} == {f"{n}.onnx" for n in NETWORKS}
        assert next(t for t in networks["vae_encoder"].tensors if t.name == "images").shape == (1, 3, h, w)
    # Height and width are symbolic in the file; the channels are not.
    sample = next(i for i in onnx.load(str(dynamic / "unet.onnx")).graph.input if i.name == "sample")
    dims = sample.type.tensor_type.shape.dim
    assert [d.HasField("dim_param") for d in dims] == [False, False, True, True]
    assert manifest.file_problems(dynamic, ("onnx",)) == []
    # The check that made those entries: a file symbolic where the sizes need a fixed length is refused.
    model = onnx.load(str(dynamic / "vae_encoder.onnx"))
    specs = list(manifest.network("vae_encoder").tensors)
    assert tensor_entries(model, specs, {"images": (2, 3), "latents": (2, 3)}) == tuple(specs)
    with pytest.raises(RuntimeError, match=r"images is symbolic in dimensions \[2, 3\], the frame sizes need \[3\]"):
        tensor_entries(model, specs, {"images": (3,), "latents": (3,)})


def test_every_size_opens_on_one_session(dynamic):
    backend = open_build_folder(dynamic, "onnxruntime", threads=1).backend
    assert backend.sizes == SIZES
    for size in SIZES[1:]:
        other = backend.at_size(*size)
        for name in NETWORKS:
            runner, first = other.networks[name], backend.networks[name]
            assert runner is not first and runner.session is first.session and runner.owner is first
            assert runner.input_specs != first.input_specs  # its size's shapes
    with pytest.raises(ValueError, match=r"latents has dynamic shape \[1, 4, None, None\] and no size was given"):
        OnnxRunner(dynamic / "vae_decoder.onnx", torch.device("cpu"))  # a file alone: its shapes are the folder's


def test_refusals_rebuild_with_dynamic_shapes(dynamic, tmp_path):
    """A damaged file, and a size the folder lacks: the rebuild command keeps --shapes dynamic."""
    backend = open_build_folder(dynamic, "onnxruntime", threads=1).backend
    with pytest.raises(ValueError, match="not 128x128; rebuild: ") as e:
        backend.at_size(128, 128)
    argv = shlex.split(str(e.value).split("rebuild: ", 1)[1].split(" (writes ", 1)[0])
    cfg = parse(*argv[3:])
    assert cfg.dynamic and cfg.spec.sizes == tuple(sorted((*SIZES, (128, 128))))
    folder = shutil.copytree(dynamic, tmp_path / "engines")
    with open(folder / "vae_decoder.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01")
    message = refused(folder)
    assert message.count("vae_decoder: file") == 1  # one file for three sizes: one problem
    cfg = rebuild_config(message)
    assert cfg.dynamic and (cfg.spec, cfg.out) == (DYNAMIC, folder)


@pytest.mark.parametrize("size", [WIDE, TALL])
def test_each_size_streams_as_a_single_size_folder_does(dynamic, tiny_build, size):
    """Switched to `size` by `resize`, the stream on the dynamic folder gives the frames of a folder built for that
    size alone (the same module exported at static shapes)."""
    h, w = size
    alone = StreamV2V.from_engines(tiny_build(tiny_spec(height=h, width=w)), "onnxruntime", prompt=PROMPT, threads=1)
    stream = StreamV2V.from_engines(dynamic, "onnxruntime", prompt=PROMPT, threads=1)
    stream(video(1, 64, 64)[0])
    stream.resize(h, w)
    for i, frame in enumerate(video(9, h, w)):  # frames 0, 4, 8 store and merge the bank
        got, want = stream(frame), alone(frame)
        assert got.shape == want.shape == (h, w, 3)
        assert np.abs(got.astype(int) - want).max() <= 1, f"frame {i}"
        torch.testing.assert_close(stream.latents, alone.latents, atol=LATENT_ATOL, rtol=0)


def test_a_lora_swap_writes_the_shared_session_once_for_every_size(dynamic, tiny_build, files, monkeypatch):  # noqa: F811
    """A swappable dynamic folder swaps a LoRA as a static one does: one new session, used by every size."""
    prepared = []
    real = OnnxRunner.prepare_weights
    monkeypatch.setattr(OnnxRunner, "prepare_weights", lambda self, *a: prepared.append(self) or real(self, *a))
    stream = StreamV2V.from_engines(dynamic, "onnxruntime", prompt=PROMPT, threads=1)
    backend = stream.backend
    stream.set_loras([(files["a"], 0.8)])
    assert prepared == [backend.networks["unet"]]  # the owner, once
    wide = backend.at_size(*WIDE)
    assert wide.networks["unet"].session is backend.networks["unet"].session  # the new one, for every size
    alone = StreamV2V.from_engines(tiny_build(tiny_spec(height=64, width=128)), "onnxruntime", prompt=PROMPT,
                                   threads=1)  # fmt: skip
    alone.set_loras([(files["a"], 0.8)])
    stream.resize(*WIDE)
    for frame in video(5, *WIDE):
        assert np.abs(stream(frame).astype(int) - alone(frame)).max() <= 1
        torch.testing.assert_close(stream.latents, alone.latents, atol=LATENT_ATOL, rtol=0)


def test_the_profile_spans_the_corners_of_the_sizes(dynamic):
    """min at the smallest height and width, opt at the start size, max at the largest height and width (128x128,
    no built size): every input's shapes there, so the bank's token counts follow the latent size."""
    manifest = load_manifest(dynamic)
    got = profiles(DYNAMIC, find_weights(DYNAMIC), manifest.sized_networks())
    assert set(got) == set(NETWORKS)
    corner = open_build_folder(dynamic, "onnxruntime", threads=1).backend.layout  # 64x64, the start and min
    low, opt, high = got["unet"]["sample"]
    assert low == opt == (1, 4, 8, 8) and high == (1, 4, 16, 16)
    assert got["vae_encoder"]["images"] == ((1, 3, 64, 64), (1, 3, 64, 64), (1, 3, 128, 128))
    for layer in corner.layers:
        low, opt, high = got["unet"][f"bank_k.{layer.index}"]
        assert low == opt and high[1] == low[1] * 4  # twice the height and the width: four times the tokens
    assert got["unet"]["timestep"] == ((1,), (1,), (1,))


@pytest.mark.slow
def test_tensorrt_rtx_builds_one_engine_per_network_with_a_profile(dynamic, tmp_path, caplog):
    """TensorRT-RTX builds on the CPU: over the dynamic ONNX (reused, no model loaded), one engine per network,
    listed under every size, and no complaint that the profile is not self-consistent."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed (pip install -e '.[trt-rtx]')")
    folder = shutil.copytree(dynamic, tmp_path / "engines")
    descs = []
    with caplog.at_level(logging.WARNING):
        result = build(BuildConfig(DYNAMIC, out=folder, builder="tensorrt-rtx", shapes="dynamic"), descs.append)
    assert "self-consistent" not in caplog.text
    assert descs == [d if d.startswith("build") else f"{d} (reused)" for d in stages("tensorrt-rtx")]
    manifest = load_manifest(folder)
    assert manifest.dynamic and manifest.has("engine") and manifest.file_problems(folder, ("onnx", "engine")) == []
    for networks in manifest.sized_networks().values():
        assert {networks[n].files["engine"].name for n in NETWORKS} == {f"{n}.engine" for n in NETWORKS}
    assert sorted(a.path.name for a in result.artifacts) == sorted(
        f"{n}.{k}" for n in NETWORKS for k in ("onnx", "engine")
    )


def test_a_static_build_removes_the_dynamic_files_it_does_not_list(tmp_path):
    """Static again in a dynamic folder: the build lists per-size files, so `unet.onnx` and `unet.engine` (and a
    ControlNet the spec no longer names) go; files that are not a network's stay."""
    names = ["unet.onnx", "unet.engine", "controlnet_0.onnx", "unet-64x64.onnx", "unet-128x64.onnx", "notes.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    run = _Run(BuildConfig(SPEC, out=tmp_path, onnx_only=True), tmp_path, _Plan(None), lambda _desc: None)
    for size, text in (((64, 64), "64x64"), (WIDE, "128x64")):
        run.entries[size]["unet"] = NetworkEntry((), {"onnx": FileEntry.of(tmp_path / f"unet-{text}.onnx")})
    run.remove_stale()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "unet-128x64.onnx", "unet-64x64.onnx"]


@pytest.mark.gpu
@needs_cuda
def test_tensorrt_every_size_runs_on_one_engine(dynamic, tmp_path):
    """On a GPU with TensorRT (or TensorRT-RTX where it runs): each size's context on the one engine gives ONNX
    Runtime's frames (fp32)."""
    folder = shutil.copytree(dynamic, tmp_path / "engines")
    build(BuildConfig(DYNAMIC, out=folder, builder=tensorrt_builder(), shapes="dynamic"))
    gpu = StreamV2V.from_engines(folder, "tensorrt", prompt=PROMPT)
    cpu = StreamV2V.from_engines(folder, "onnxruntime", prompt=PROMPT, threads=1)
    assert gpu.backend.at_size(*WIDE).networks["unet"].engine is gpu.backend.networks["unet"].engine
    for size in SIZES[1:]:
        gpu.resize(*size)
        cpu.resize(*size)
        scores = [psnr(gpu(frame), cpu(frame)) for frame in video(5, *size)]
        # fp32 graphs, but TensorRT may run them with TF32 kernels: test_gpu_runtime's bound for different kernels
        assert min(scores) >= 30.0, (size, scores)
