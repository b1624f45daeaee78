"""TensorRT-RTX builds fp16 engines of the tiny model ahead of time on the CPU (no GPU needed to build)."""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import replace

import onnx
import pytest
import torch

from build_engines import BuildConfig, build
from build_engines.__main__ import main
from streamv2v_trt.engine import EngineRequest, load_checked, sha256_file
from streamv2v_trt.engine.trt import TensorRTUnavailable, engine_io, import_tensorrt, load_engine

trt_rtx = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed (pip install -e '.[trt-rtx]')")

HW = 64


def _cfg(out) -> BuildConfig:
    return BuildConfig(out=out, model="tiny", height=HW, width=HW, builder="tensorrt-rtx")  # fp16 by default


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build(_cfg(tmp_path_factory.mktemp("rtx")))


def test_import_point_finds_rtx():
    module, flavour = import_tensorrt("tensorrt-rtx")
    assert module is trt_rtx and flavour == "tensorrt-rtx"


def test_missing_tensorrt_names_the_extra(tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("full TensorRT is installed here")
    with pytest.raises(TensorRTUnavailable, match=re.escape('pip install -e ".[trt]"')):
        import_tensorrt("tensorrt")
    assert main(["--model", "tiny", "--builder", "tensorrt", "--out", str(tmp_path)]) == 1
    assert "cannot import tensorrt" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any export


def test_fp16_engines_build_on_cpu(built):
    m = built.manifest
    assert (m.builder, m.builder_version, m.precision) == ("tensorrt-rtx", trt_rtx.__version__, "fp16")
    for name, net in m.networks.items():
        engine = built.out / net.engine
        assert engine.stat().st_size > 0 and net.engine_sha256 == sha256_file(engine), name
        dtypes = {t.name: t.dtype for t in net.tensors}
        assert set(dtypes.values()) <= {"float16", "int64"}, dtypes  # strongly typed: the graph itself is fp16
    assert m.network("unet").tensor("timestep").dtype == "int64"
    req = EngineRequest("tiny", HW, HW, (32,), "dyme", precision="fp16", builder="tensorrt-rtx")
    load_checked(built.out, req)  # what the runtime will call


def test_fp16_onnx_has_fp16_weights(built):
    model = onnx.load(str(built.out / "unet.onnx"))
    floats = [t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    big = [t for t in floats if len(t.raw_data) > 1024]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big), [t.name for t in big][:5]


def test_missing_engine_is_rebuilt_alone(built, tmp_path):
    folder = shutil.copytree(built.out, tmp_path / "engines")
    (folder / "vae_decoder.engine").unlink()
    result = build(_cfg(folder))
    status = {(a.network, a.kind): a.reused for a in result.artifacts}
    assert not status.pop(("vae_decoder", "engine"))
    assert all(status.values()), status  # every ONNX and the other engines were reused
    assert result.manifest.network("vae_decoder").engine_sha256 == sha256_file(folder / "vae_decoder.engine")


@pytest.mark.gpu
def test_engine_deserialises_with_manifest_io(built, caplog):
    """On a GPU, the engine's own I/O equals the manifest's. Without one, TensorRT-RTX cannot deserialise at all."""
    net = built.manifest.network("unet")
    with caplog.at_level(logging.ERROR):
        try:
            _runtime, engine = load_engine(built.out / net.engine, "tensorrt-rtx")
        except RuntimeError as e:
            if torch.cuda.is_available():
                raise
            trt_errors = " | ".join(r.getMessage() for r in caplog.records)
            pytest.skip(f"no GPU: TensorRT-RTX deserialize_cuda_engine needs a CUDA driver ({e}; TRT: {trt_errors})")
    io = engine_io(engine)
    trt_dtypes = {"half": "float16", "float": "float32", "int64": "int64"}
    assert list(io) == [t.name for t in net.tensors]
    for t in net.tensors:
        shape, dtype, is_input = io[t.name]
        assert (shape, trt_dtypes[dtype], is_input) == (t.shape, t.dtype, t.is_input), t.name


def test_onnx_only_rerun_keeps_the_engines(built):
    result = build(replace(_cfg(built.out), onnx_only=True))
    assert result.reused and result.manifest == built.manifest
    assert all((built.out / n.engine).is_file() for n in result.manifest.networks.values())
