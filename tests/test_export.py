"""The exported ONNX (run by ONNX Runtime) equals the eager modules it was traced from (tiny model, fp32, CPU)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from build_engines import BuildConfig, build
from build_engines.cleanup import cleanup, save_onnx
from build_engines.export import export_unet, export_vae, unet_example_inputs
from streamv2v_trt.attention import cosine_normalize
from streamv2v_trt.bank_unet import BankUNet
from streamv2v_trt.config import BankConfig, BankKind
from streamv2v_trt.engine import load_manifest
from streamv2v_trt.models import load_models
from streamv2v_trt.vae import VaeDecoder, VaeEncoder

HW = 64  # latent 8x8: levels of 64, 16 and 4 tokens
ATOL = 1e-4


def _session(path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # the CI machine is shared
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def models():
    return load_models("tiny", seed=0)


@pytest.fixture(scope="module")
def dyme_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("dyme")
    return build(BuildConfig(out=out, model="tiny", height=HW, width=HW, precision="fp32", onnx_only=True))


@pytest.fixture(scope="module")
def fifo_unet(tmp_path_factory, models):
    """FIFO x2 UNet exported directly (no VAE): returns (onnx path, BankUNet on the same weights)."""
    cfg = BuildConfig(
        out=tmp_path_factory.mktemp("fifo"),
        model="tiny",
        height=HW,
        width=HW,
        precision="fp32",
        bank=BankConfig(kind=BankKind.FIFO, frames=2),
    )
    model, _, _ = export_unet(models, cfg)
    model, _ = cleanup(model, "unet")
    save_onnx(model, cfg.out / "unet.onnx")
    return cfg.out / "unet.onnx", BankUNet(models.unet, cfg.bank, cfg.latent_hw).eval(), cfg


def _run_both(path, bank_unet: BankUNet, inputs: dict[str, torch.Tensor]) -> None:
    """ONNX Runtime vs eager on `inputs`, for noise_pred and every cur_* output."""
    with torch.no_grad():
        ref = bank_unet.run(inputs)
    sess = _session(path)
    out = sess.run(None, {n: inputs[n].numpy() for n in bank_unet.layout.input_names()})
    names = [o.name for o in sess.get_outputs()]
    assert names == bank_unet.layout.output_names()
    for name, got in zip(names, out):
        np.testing.assert_allclose(got, ref[name].numpy(), atol=ATOL, rtol=0, err_msg=name)


def _stream_bank(bank_unet: BankUNet, inputs: dict[str, torch.Tensor], slots: int) -> dict[str, torch.Tensor]:
    """A real previous frame's k/v/o in slot 0 (so fusion fires on similar tokens), random garbage in other slots."""
    noise = torch.randn(inputs["sample"].shape, generator=torch.Generator().manual_seed(9))
    prev = dict(inputs, sample=inputs["sample"] + noise)  # about 60% of the fusion tokens stay above 0.98
    prev["bank_valid"] = torch.zeros_like(inputs["bank_valid"])
    with torch.no_grad():
        cur = bank_unet.run(prev)
    out = dict(inputs)
    for layer in bank_unet.layout.layers:
        n = layer.tokens
        for p in bank_unet.layout.parts(layer):
            bank = out[f"bank_{p}.{layer.index}"].clone()
            bank[:, :n] = cur[f"cur_{p}.{layer.index}"]
            out[f"bank_{p}.{layer.index}"] = bank
    valid = torch.zeros(slots)
    valid[0] = 1
    out["bank_valid"] = valid
    return out


def _fused_tokens(bank_unet: BankUNet, inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(tokens whose fusion fires, tokens on fusion layers): the stream case must exercise both branches."""
    with torch.no_grad():
        out = bank_unet.run(inputs)
    fired = total = 0
    for layer in bank_unet.layout.layers:
        if layer.fuse:
            o, bank_o = out[f"cur_o.{layer.index}"], inputs[f"bank_o.{layer.index}"][:, : layer.tokens]
            best = (cosine_normalize(o) @ cosine_normalize(bank_o).transpose(1, 2)).amax(-1)
            fired += int((best >= bank_unet.cfg.ff_threshold).sum())
            total += best.numel()
    return fired, total


@pytest.fixture(scope="module")
def dyme_unet(models):
    return BankUNet(models.unet, BankConfig(), (HW // 8, HW // 8)).eval()


def _inputs(bank_unet: BankUNet, models, bank_valid: float, seed: int = 1) -> dict[str, torch.Tensor]:
    specs = bank_unet.layout.tensor_specs(1, (HW // 8, HW // 8), 77, models.unet.config.cross_attention_dim)
    return unet_example_inputs(specs, torch.float32, bank_valid=bank_valid, seed=seed)


def test_dyme_frame0_matches_eager(dyme_build, dyme_unet, models):
    # bank_valid=0 with random (not zero) bank tensors: the graph must ignore the bank entirely
    _run_both(dyme_build.out / "unet.onnx", dyme_unet, _inputs(dyme_unet, models, 0.0))


def test_dyme_full_random_bank_matches_eager(dyme_build, dyme_unet, models):
    _run_both(dyme_build.out / "unet.onnx", dyme_unet, _inputs(dyme_unet, models, 1.0, seed=2))


def test_dyme_stream_bank_with_fusion_matches_eager(dyme_build, dyme_unet, models):
    inputs = _stream_bank(dyme_unet, _inputs(dyme_unet, models, 1.0, seed=3), slots=1)
    fired, total = _fused_tokens(dyme_unet, inputs)
    assert 0 < fired < total, f"fusion fired on {fired}/{total} tokens: both branches must be exercised"
    _run_both(dyme_build.out / "unet.onnx", dyme_unet, inputs)


def test_fifo_frame0_matches_eager(fifo_unet, models):
    path, bank_unet, _ = fifo_unet
    _run_both(path, bank_unet, _inputs(bank_unet, models, 0.0, seed=4))


def test_fifo_one_slot_valid_matches_eager(fifo_unet, models):
    path, bank_unet, _ = fifo_unet
    inputs = _stream_bank(bank_unet, _inputs(bank_unet, models, 1.0, seed=5), slots=2)  # slot 1 random, invalid
    assert inputs["bank_valid"].tolist() == [1.0, 0.0]
    fired, total = _fused_tokens(bank_unet, inputs)
    assert 0 < fired < total
    _run_both(path, bank_unet, inputs)


def test_unet_io_matches_manifest_and_layout(dyme_build, dyme_unet, models):
    manifest = load_manifest(dyme_build.out)
    unet = manifest.network("unet")
    expected = dyme_unet.layout.tensor_specs(1, (HW // 8, HW // 8), 77, models.unet.config.cross_attention_dim)
    assert [t.name for t in unet.tensors] == [s.name for s in expected]
    assert [t.shape for t in unet.tensors] == [s.shape for s in expected]
    assert [t.role for t in unet.tensors] == [s.role for s in expected]
    assert [t.name for t in unet.inputs()] == dyme_unet.layout.input_names()
    assert [t.name for t in unet.outputs()] == dyme_unet.layout.output_names()
    sess = _session(dyme_build.out / unet.onnx)
    onnx_io = [*sess.get_inputs(), *sess.get_outputs()]
    assert [(v.name, tuple(v.shape)) for v in onnx_io] == [(t.name, t.shape) for t in unet.tensors]
    dtypes = {"tensor(float)": "float32", "tensor(int64)": "int64"}
    assert [dtypes[v.type] for v in onnx_io] == [t.dtype for t in unet.tensors]
    assert manifest.ff_layers == tuple(layer.name for layer in dyme_unet.layout.layers if layer.fuse)
    assert manifest.weights_hash == models.weights_hash()
    assert manifest.builder is None and all(n.engine is None for n in manifest.networks.values())


@pytest.mark.parametrize("which", ["vae_encoder", "vae_decoder"])
def test_taesd_matches_eager(dyme_build, models, which):
    net = load_manifest(dyme_build.out).network(which)
    (inp,), (out,) = net.inputs(), net.outputs()
    x = torch.rand(inp.shape, generator=torch.Generator().manual_seed(6)) * 2 - 1
    module = (VaeEncoder if which == "vae_encoder" else VaeDecoder)(models.vae).eval()
    with torch.no_grad():
        ref = module(x)
    assert tuple(ref.shape) == out.shape
    (got,) = _session(dyme_build.out / net.onnx).run(None, {inp.name: x.numpy()})
    np.testing.assert_allclose(got, ref.numpy(), atol=ATOL, rtol=0)


def test_full_kl_vae_matches_eager(tmp_path):
    kl = load_models("tiny", vae="full", seed=0)
    cfg = BuildConfig(out=tmp_path, model="tiny", height=HW, width=HW, vae="full", precision="fp32")
    for which, module in (("vae_encoder", VaeEncoder(kl.vae)), ("vae_decoder", VaeDecoder(kl.vae))):
        model, specs = export_vae(kl, cfg, which)
        save_onnx(cleanup(model, which)[0], tmp_path / f"{which}.onnx")
        x = torch.rand(specs[0].shape, generator=torch.Generator().manual_seed(7)) * 2 - 1
        with torch.no_grad():
            ref = module.eval()(x)
        (got,) = _session(tmp_path / f"{which}.onnx").run(None, {specs[0].name: x.numpy()})
        np.testing.assert_allclose(got, ref.numpy(), atol=ATOL, rtol=0, err_msg=which)


def test_weights_over_the_limit_go_to_external_data(dyme_build, dyme_unet, models, tmp_path, monkeypatch):
    import build_engines.cleanup as cleanup_module

    monkeypatch.setattr(cleanup_module, "PROTO_LIMIT", 64 << 20)  # tiny weights count as "over 2 GB"
    monkeypatch.setattr(cleanup_module, "weights_bytes", lambda model: 65 << 20)
    data = save_onnx(onnx.load(str(dyme_build.out / "unet.onnx")), tmp_path / "unet.onnx")
    assert data == tmp_path / "unet.onnx.data" and data.stat().st_size > (tmp_path / "unet.onnx").stat().st_size
    _run_both(tmp_path / "unet.onnx", dyme_unet, _inputs(dyme_unet, models, 1.0, seed=8))
