"""The exported ONNX (run by ONNX Runtime through `OnnxRunner`) equals the eager modules it was traced from
(tiny model, fp32, CPU), on the shared tiny builds: DyMe and FIFO x2, 32x32, 2 steps (UNet batch 2)."""

from __future__ import annotations

import copy
from dataclasses import replace

import onnx
import pytest
import torch
from conftest import tiny_spec

from build_engines.cleanup import cleanup, save_onnx
from build_engines.export import example_inputs, export_network, network_modules, tensor_entries
from streamv2v_trt.attention import cosine_normalize
from streamv2v_trt.backends.onnxruntime import OnnxRunner
from streamv2v_trt.bank_unet import BankUNet
from streamv2v_trt.layout import DTYPES, NETWORKS
from streamv2v_trt.manifest import load_manifest
from streamv2v_trt.models.loader import load_models
from streamv2v_trt.prompt import text_shape
from streamv2v_trt.vae import VaeDecoder, VaeEncoder

SPEC = tiny_spec(height=32, width=32, steps=2)  # latent 4x4: levels of 16, 4 and 1 tokens
FIFO = replace(SPEC, bank="fifo", bank_frames=2)
ATOL = 1e-4
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models():
    return load_models(SPEC)


def bank_unet(models, spec) -> BankUNet:
    """The eager module the export traced: its own UNet copy (installing processors changes the module)."""
    return BankUNet(copy.deepcopy(models.unet), spec).eval()


@pytest.fixture(scope="module")
def dyme(tiny_build, models):
    return tiny_build(SPEC), bank_unet(models, SPEC)


@pytest.fixture(scope="module")
def fifo(tiny_build, models):
    return tiny_build(FIFO), bank_unet(models, FIFO)


def run_both(path, unet: BankUNet, inputs: dict[str, torch.Tensor]) -> None:
    """ONNX Runtime vs eager on `inputs`, for noise_pred and every cur_* output."""
    with torch.no_grad():
        ref = unet.run(inputs)
    got = OnnxRunner(path, CPU, threads=1).run(inputs)
    assert list(got) == unet.layout.output_names()
    for name, t in got.items():
        torch.testing.assert_close(t, ref[name], atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def unet_inputs(unet: BankUNet, models, spec, bank_valid: float, seed: int) -> dict[str, torch.Tensor]:
    specs = unet.layout.unet_specs(spec, text_shape(models.tokenizer, models.text_encoder))
    return example_inputs(specs, bank_valid=bank_valid, seed=seed)


def stream_bank(unet: BankUNet, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A real previous frame's k/v/o in slot 0 (so fusion fires on similar tokens), random garbage in other slots."""
    noise = torch.randn(inputs["sample"].shape, generator=torch.Generator().manual_seed(9))
    prev = dict(inputs, sample=inputs["sample"] + 0.5 * noise, bank_valid=torch.zeros_like(inputs["bank_valid"]))
    with torch.no_grad():
        cur = unet.run(prev)
    out = dict(inputs)
    for layer in unet.layout.layers:
        n = layer.tokens
        for p in unet.layout.parts(layer):
            bank = out[f"bank_{p}.{layer.index}"].clone()  # [B, S*N, C]
            bank[:, :n] = cur[f"cur_{p}.{layer.index}"]
            out[f"bank_{p}.{layer.index}"] = bank
    valid = torch.zeros_like(inputs["bank_valid"])  # [B, S]
    valid[:, 0] = 1
    out["bank_valid"] = valid
    return out


def fused_tokens(unet: BankUNet, spec, inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(tokens whose fusion fires, tokens on fusion layers): the stream case must exercise both branches."""
    with torch.no_grad():
        out = unet.run(inputs)
    fired = total = 0
    for layer in unet.layout.layers:
        if layer.fuse:
            o, bank_o = out[f"cur_o.{layer.index}"], inputs[f"bank_o.{layer.index}"][:, : layer.tokens]
            best = (cosine_normalize(o) @ cosine_normalize(bank_o).transpose(1, 2)).amax(-1)
            fired += int((best >= spec.ff_threshold).sum())
            total += best.numel()
    return fired, total


def test_dyme_frame0_matches_eager(dyme, models):
    # bank_valid=0 with random (not zero) bank tensors: the graph must ignore the bank entirely
    path, unet = dyme
    run_both(path / "unet.onnx", unet, unet_inputs(unet, models, SPEC, 0.0, seed=1))


def test_dyme_full_random_bank_matches_eager(dyme, models):
    path, unet = dyme
    run_both(path / "unet.onnx", unet, unet_inputs(unet, models, SPEC, 1.0, seed=2))


def test_dyme_stream_bank_with_fusion_matches_eager(dyme, models):
    path, unet = dyme
    inputs = stream_bank(unet, unet_inputs(unet, models, SPEC, 1.0, seed=3))
    fired, total = fused_tokens(unet, SPEC, inputs)
    assert 0 < fired < total, f"fusion fired on {fired}/{total} tokens: both branches must be exercised"
    run_both(path / "unet.onnx", unet, inputs)


def test_fifo_frame0_matches_eager(fifo, models):
    path, unet = fifo
    run_both(path / "unet.onnx", unet, unet_inputs(unet, models, FIFO, 0.0, seed=4))


def test_fifo_one_slot_valid_matches_eager(fifo, models):
    path, unet = fifo
    inputs = stream_bank(unet, unet_inputs(unet, models, FIFO, 1.0, seed=5))  # slot 1 random, invalid
    assert inputs["bank_valid"].tolist() == [[1.0, 0.0]] * FIFO.unet_batch
    fired, total = fused_tokens(unet, FIFO, inputs)
    assert 0 < fired < total, f"fusion fired on {fired}/{total} tokens"
    run_both(path / "unet.onnx", unet, inputs)


@pytest.mark.parametrize("spec", [SPEC, FIFO], ids=["dyme", "fifo"])
def test_io_matches_manifest_and_layout(tiny_build, models, spec):
    path = tiny_build(spec)
    manifest = load_manifest(path)
    layout = bank_unet(models, spec).layout
    expected = layout.network_specs(spec, text_shape(models.tokenizer, models.text_encoder))
    for name in NETWORKS:
        net = manifest.network(name)
        assert net.tensors == tuple(expected[name]), name  # names, order, shapes, dtypes, roles, layers
        runner = OnnxRunner(path / net.files["onnx"].name, CPU, threads=1)
        assert runner.input_specs == {t.name: (t.shape, DTYPES[t.dtype]) for t in net.inputs()}, name
        assert runner.output_specs == {t.name: (t.shape, DTYPES[t.dtype]) for t in net.outputs()}, name
    unet = manifest.network("unet")
    assert [t.name for t in unet.inputs()] == layout.input_names()
    assert [t.name for t in unet.outputs()] == layout.output_names()
    assert {t.dtype for t in unet.tensors} == {"float32", "int64"}
    assert manifest.ff_layers == tuple(layer.name for layer in layout.layers if layer.fuse)
    assert manifest.weights_hash == models.weights.hash(spec.vae)
    assert manifest.builder is None and all(set(net.files) == {"onnx"} for net in manifest.networks.values())


@pytest.mark.parametrize("which", ["vae_encoder", "vae_decoder"])
def test_taesd_matches_eager(dyme, models, which):
    path, _ = dyme
    net = load_manifest(path).network(which)
    (inp,), (out,) = net.inputs(), net.outputs()
    x = torch.rand(inp.shape, generator=torch.Generator().manual_seed(6)) * 2 - 1
    module = (VaeEncoder if which == "vae_encoder" else VaeDecoder)(models.vae).eval()
    with torch.no_grad():
        ref = module(x)
    assert tuple(ref.shape) == out.shape
    got = OnnxRunner(path / net.files["onnx"].name, CPU, threads=1).run({inp.name: x})
    torch.testing.assert_close(got[out.name], ref, atol=ATOL, rtol=0)


def test_full_kl_vae_matches_eager(tmp_path):
    spec = replace(SPEC, vae="full")
    kl = load_models(spec)
    modules, specs = network_modules(kl, spec)
    for which in ("vae_encoder", "vae_decoder"):
        model, _ = cleanup(export_network(modules[which], specs[which]), which)
        assert tensor_entries(model, specs[which]) == tuple(specs[which])
        save_onnx(model, tmp_path / f"{which}.onnx")
        x = torch.rand(specs[which][0].shape, generator=torch.Generator().manual_seed(7)) * 2 - 1
        with torch.no_grad():
            ref = modules[which](x)
        got = OnnxRunner(tmp_path / f"{which}.onnx", CPU, threads=1).run({specs[which][0].name: x})
        torch.testing.assert_close(
            got[specs[which][1].name], ref, atol=ATOL, rtol=0, msg=lambda m, w=which: f"{w}: {m}"
        )


def test_weights_over_the_limit_go_to_external_data(dyme, models, tmp_path, monkeypatch):
    import build_engines.cleanup as cleanup_module

    path, unet = dyme
    monkeypatch.setattr(cleanup_module, "PROTO_LIMIT", 64 << 20)  # tiny weights count as "over 2 GB"
    monkeypatch.setattr(cleanup_module, "weights_bytes", lambda _model: 65 << 20)
    data = save_onnx(onnx.load(str(path / "unet.onnx")), tmp_path / "unet.onnx")
    assert data == tmp_path / "unet.onnx.data" and data.stat().st_size > (tmp_path / "unet.onnx").stat().st_size
    run_both(tmp_path / "unet.onnx", unet, unet_inputs(unet, models, SPEC, 1.0, seed=8))
