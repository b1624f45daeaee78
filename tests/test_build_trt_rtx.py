"""TensorRT-RTX builds fp16 engines of the tiny model ahead of time on the CPU (no GPU needed to build), and the
builder and runtime refuse GPUs it does not run on (faked here) before doing any work.

One shared build (32x32, 2 steps, fp16, --builder tensorrt-rtx); tests that change files copy it first.
"""

from __future__ import annotations

import json
import re
import shutil
import sys

import onnx
import pytest
import torch
from conftest import tiny_spec

from build_engines import BuildConfig, build
from build_engines.__main__ import main
from streamv2v_trt import StreamV2V
from streamv2v_trt.backends.tensorrt_import import TensorRTUnavailable, import_tensorrt, rtx_runs_on
from streamv2v_trt.layout import DTYPES
from streamv2v_trt.manifest import EngineMismatch, load_manifest, sha256_file

trt_rtx = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed (pip install -e '.[trt-rtx]')")

RTX = tiny_spec(height=32, width=32, steps=2, precision="fp16")  # the strongly typed network is the fp16 graph


@pytest.fixture(scope="module")
def built(tiny_build):
    return tiny_build(RTX, builder="tensorrt-rtx")


def fake_gpu(monkeypatch, capability: tuple[int, int], name: str = "NVIDIA H200") -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _device=None: name)


def test_import_point_finds_rtx():
    module, flavour = import_tensorrt("tensorrt-rtx")
    assert module is trt_rtx and flavour == "tensorrt-rtx"


def test_missing_tensorrt_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # full TensorRT not importable, wherever this runs
    with pytest.raises(TensorRTUnavailable, match=r'pip install -e "\.\[trt\]"'):
        import_tensorrt("tensorrt")
    assert main(["--model", "tiny", "--builder", "tensorrt", "--out", str(tmp_path)]) == 1
    assert "cannot import tensorrt" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any export


def test_fp16_engines_build_on_cpu(built, monkeypatch):
    m = load_manifest(built)
    assert (m.builder, m.builder_version, m.spec, m.target) == ("tensorrt-rtx", trt_rtx.__version__, RTX, {})
    assert m.differences(RTX) == [] and m.file_problems(built, ("onnx", "engine")) == []
    assert m.build_command == RTX.build_command(built, builder="tensorrt-rtx")
    for name, net in m.networks.items():
        engine = built / net.files["engine"].name
        assert engine.name == f"{name}.engine" and engine.stat().st_size > 0
        assert net.files["engine"].sha256 == sha256_file(engine), name
        dtypes = {t.name: t.dtype for t in net.tensors}
        assert set(dtypes.values()) <= {"float16", "int64"}, dtypes  # strongly typed: the graph itself is fp16
    assert next(t for t in m.network("unet").tensors if t.name == "timestep").dtype == "int64"
    # What the runtime does with it here: every manifest and file check passes; the device is what stops it.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"runs on a CUDA GPU .*backend='onnxruntime'"):
        StreamV2V.from_engines(built, "tensorrt")


def test_fp16_onnx_has_fp16_weights(built):
    model = onnx.load(str(built / "unet.onnx"))
    floats = [t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    big = [t for t in floats if len(t.raw_data) > 1024]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big), [t.name for t in big][:5]


def test_missing_engine_is_rebuilt_alone(built, tmp_path):
    folder = shutil.copytree(built, tmp_path / "engines")
    (folder / "vae_decoder.engine").unlink()
    result = build(BuildConfig(RTX, out=folder, builder="tensorrt-rtx"))
    status = {(a.network, a.kind): a.reused for a in result.artifacts}
    assert not status.pop(("vae_decoder", "engine"))
    assert len(status) == 5 and all(status.values()), status  # every ONNX and the other engines were reused
    assert "built" in result.summary() and "reused" in result.summary()
    assert result.manifest.network("vae_decoder").files["engine"].sha256 == sha256_file(folder / "vae_decoder.engine")
    assert load_manifest(folder) == result.manifest


def test_onnx_only_rerun_keeps_the_engines(built, tmp_path):
    folder = shutil.copytree(built, tmp_path / "engines")
    before = {p.name: sha256_file(p) for p in folder.iterdir()}
    result = build(BuildConfig(RTX, out=folder, onnx_only=True))
    assert result.reused and result.why == "--onnx-only"
    assert result.manifest == load_manifest(built) and result.manifest.builder == "tensorrt-rtx"
    assert {p.name: sha256_file(p) for p in folder.iterdir()} == before  # engines kept, nothing rewritten
    assert {a.kind for a in result.artifacts} == {"onnx", "engine"}


def test_rtx_builder_on_hopper_is_refused_before_any_export(tmp_path, capsys, monkeypatch):
    fake_gpu(monkeypatch, (9, 0))

    def export_network(*args, **kwargs):
        raise AssertionError("exported before the builder was checked")

    monkeypatch.setattr("build_engines.export.export_network", export_network)
    out = tmp_path / "engines"
    reason = "TensorRT-RTX does not run on NVIDIA H200 (compute capability 9.0; it supports 8.0, 8.6, 8.9 and 12.0"
    with pytest.raises(TensorRTUnavailable, match=r"\(--builder aoti\)") as e:
        build(BuildConfig(RTX, out=out, builder="tensorrt-rtx"))
    assert reason in str(e.value) and not out.exists()
    argv = ["--model", "tiny", "--height", "32", "--width", "32", "--builder", "tensorrt-rtx", "--out", str(out)]
    assert main(argv) == 1
    assert reason in capsys.readouterr().err and not out.exists()


def test_tensorrt_backend_on_hopper_is_refused_with_the_reason(built, monkeypatch):
    """An RTX engine would fail to deserialise on 9.0 with a cryptic error: the runtime says why first."""
    fake_gpu(monkeypatch, (9, 0))
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)  # nothing may try to load an engine
    with pytest.raises(RuntimeError, match=r"TensorRT-RTX does not run on NVIDIA H200 \(compute capability 9\.0"):
        StreamV2V.from_engines(built, "tensorrt")


def test_fp16_onnx_against_an_fp32_manifest_is_refused_by_the_runner_dtypes(built, tmp_path):
    """A manifest that claims fp32 for fp16 files: the layout and the manifest agree, the ONNX itself does not."""
    folder = shutil.copytree(built, tmp_path / "engines")
    path = folder / "manifest.json"
    d = json.loads(path.read_text())
    d["spec"]["precision"] = "fp32"
    for net in d["networks"].values():
        for t in net["tensors"]:
            t["dtype"] = t["dtype"].replace("float16", "float32")
    path.write_text(json.dumps(d))
    with pytest.raises(EngineMismatch) as e:
        StreamV2V.from_engines(folder, "onnxruntime", threads=1)
    message = str(e.value)
    # Every float tensor differs (the first 8 are named, sorted by network and name); timestep (int64) agrees.
    assert "unet bank_k.0: unet.onnx has input [2, 16, 32] float16, expected input [2, 16, 32] float32" in message
    assert re.search(r"\(and \d+ more\)", message) and "manifest has" not in message and "timestep" not in message


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT-RTX deserialises engines only on a GPU")
def test_engine_deserialises_with_manifest_io(built):
    """On a GPU it runs on, every engine's own I/O (names, shapes, dtypes, direction) equals the manifest's."""
    from streamv2v_trt.backends.tensorrt import TrtRunner

    capability = torch.cuda.get_device_capability()
    if not rtx_runs_on(capability):
        pytest.skip(f"TensorRT-RTX does not run on compute capability {capability}")
    m = load_manifest(built)
    for name, net in m.networks.items():
        runner = TrtRunner(built / net.files["engine"].name, torch.device("cuda", 0), "tensorrt-rtx")
        assert runner.input_specs == {t.name: (t.shape, DTYPES[t.dtype]) for t in net.inputs()}, name
        assert runner.output_specs == {t.name: (t.shape, DTYPES[t.dtype]) for t in net.outputs()}, name
