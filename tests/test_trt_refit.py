"""Refittable TensorRT / TensorRT-RTX engines: `--weights swappable` sets the builder's REFIT flag, and `set_loras` on
the tensorrt backend refits the UNet's weights by their ONNX initializer names (backends/onnx_loras.py).

On the CPU (TensorRT-RTX builds here): the flag in the builder config, a swappable fp16 build's manifest, and the
name map from its ONNX covering every UNet weight a LoRA can touch. The refit itself runs only on a GPU (marked
`gpu`, as tests/test_gpu_runtime.py).
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import tiny_spec
from test_gpu_runtime import needs_cuda, psnr, tensorrt_builder
from test_gpu_runtime import video as gpu_video
from test_lora_swap import files  # noqa: F401  (the module's LoRA fixture)

from build_engines import BuildConfig, build
from streamv2v_trt import StreamV2V
from streamv2v_trt.backends.onnx_weights import weight_map
from streamv2v_trt.lora_set import lora_specs
from streamv2v_trt.manifest import load_manifest
from streamv2v_trt.models.loader import find_weights, load_unet

SPEC = tiny_spec(height=32, width=32, steps=2, precision="fp16")  # engines are strongly typed: the fp16 graph


def test_the_builder_config_has_the_refit_flag_only_when_swappable():
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed")
    from build_engines.compile import builder_config
    from streamv2v_trt.backends.tensorrt_import import trt_logger

    builder = trt.Builder(trt_logger(trt))
    assert builder_config(trt, builder, refit=True).get_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
    assert not builder_config(trt, builder).get_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)


def test_every_weight_a_lora_can_touch_maps_and_is_marked_refittable_in_the_network(tiny_build):
    """The ONNX an engine is built from (the fp16 --onnx-only build of the same spec): the name map covers every
    UNet Linear / Conv2d, and the parsed TensorRT network has a weight of each initializer name the map gives (the
    names a `Refitter` sets), marked refittable by the build."""
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed")
    from build_engines.compile import mark_refittable
    from streamv2v_trt.backends.tensorrt_import import trt_logger

    path = tiny_build(SPEC) / "unet.onnx"
    unet = load_unet(SPEC, find_weights(SPEC), "cpu")
    wmap = weight_map(path, unet)
    layers = {n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert wmap.problems == {} and set(wmap.initializers) == layers
    values = wmap.values({n: unet.get_submodule(n).weight for n in layers})
    assert all(v.dtype == torch.float16 for v in values.values())  # the engine's weights: the fp16 initializers
    logger = trt_logger(trt)
    network = trt.Builder(logger).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    assert trt.OnnxParser(network, logger).parse_from_file(str(path))
    marked = mark_refittable(network, path)
    assert values.keys() <= set(marked) and all(network.are_weights_marked_refittable(n) for n in values)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only behaviour")
def test_a_refittable_rtx_build_without_a_gpu_says_what_to_do(tiny_build, tmp_path):
    """Measured: tensorrt-rtx 1.7.1 builds frozen engines on the CPU (tests/test_build_trt_rtx.py) but not refittable
    ones (its JIT needs CUDA). The build says so (the ONNX reused from the --onnx-only build: no export)."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed")
    folder = shutil.copytree(tiny_build(SPEC), tmp_path / "engines")
    with pytest.raises(RuntimeError, match=r"refittable engine \(--weights swappable\) needs a GPU to build"):
        build(BuildConfig(SPEC, builder="tensorrt-rtx", weights="swappable", out=folder))


@pytest.mark.gpu
@needs_cuda
def test_refit_equals_an_engine_built_with_the_lora_fused(tiny_build, files):  # noqa: F811
    """A refit LoRA against an engine with the LoRA fused, an eager fp16 stream, and the base; then a CUDA-graph
    stream refit between replays gives the frames of the plain stream refit the same way."""
    from streamv2v_trt.cuda_graph import CudaGraphStream

    flavour = tensorrt_builder()
    asked = [(files["a"], 0.8)]
    swappable = tiny_build(SPEC, builder=flavour, weights="swappable")
    manifest = load_manifest(swappable)
    assert manifest.weights == "swappable" and manifest.build_options["refit"] is True
    fused = tiny_build(replace(SPEC, loras=lora_specs(asked)), builder=flavour)
    opened = dict(device="cuda", prompt="a cat")
    s, plain = (StreamV2V.from_engines(swappable, "tensorrt", **opened) for _ in range(2))
    s.set_loras(asked, reset=True)
    ref = StreamV2V.from_engines(fused, "tensorrt", loras=lora_specs(asked), **opened)
    eager = StreamV2V.from_pretrained(ref.cfg, **opened)
    frames = gpu_video(12, 32)
    for i, frame in enumerate(frames):
        out, want, base = s(frame), ref(frame), plain(frame)
        # two fp16 engines of the same weights may pick other kernels: the fp16 engine-vs-eager bound (30 dB)
        assert psnr(out, want) >= 30.0 and psnr(out, eager(frame)) >= 30.0, f"frame {i}"
        assert np.abs(out.astype(np.int16) - base).max() > 1, f"frame {i}: the base weights"
    s.set_loras([], reset=True)  # the base's own bits back: the same engine gives the same frames
    plain.reset()
    for i, frame in enumerate(frames[:4]):
        assert np.array_equal(s(frame), plain(frame)), f"frame {i}"

    graphed = CudaGraphStream(StreamV2V.from_engines(swappable, "tensorrt", **opened))
    for frame in frames[:6]:  # graphs captured with the base weights
        graphed(frame)
    graphed.set_loras(asked, reset=True)
    s.set_loras(asked, reset=True)
    for i, frame in enumerate(frames):  # a graph replays the refit weights (or this fails: recapture needed)
        assert np.abs(graphed(frame).astype(np.int16) - s(frame)).max() <= 1, f"frame {i}"
