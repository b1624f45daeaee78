"""EA and FF: the bank-I/O processors against the plain UNet and hand-written references."""

import copy

import pytest
import torch
from conftest import tiny_spec

from streamv2v_trt.attention import BankIO, feature_fusion
from streamv2v_trt.bank_unet import BankUNet
from streamv2v_trt.models.loader import load_models
from streamv2v_trt.spec import FF_LAYER_PREFIXES, BankKind

LATENT = (8, 8)  # tiny_spec(): 64x64 frames

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    return load_models(tiny_spec())


def unet_inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, *LATENT, generator=g),
        torch.tensor([799.0, 399.0][:batch]),
        torch.randn(batch, 77, 32, generator=g),
    )


def random_banks(layout, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(layout.bank_shape(layer, batch), generator=g)
        for layer in layout.layers
        for _ in layout.parts(layer)
    ]


@pytest.mark.parametrize("kind,frames", [(BankKind.DYME, 1), (BankKind.FIFO, 3)])
def test_frame0_equals_plain_unet(models, kind, frames):
    plain = models.unet
    bank_unet = BankUNet(copy.deepcopy(models.unet), tiny_spec(bank=kind, bank_frames=frames))
    sample, t, text = unet_inputs()
    expected = plain(sample, t, text).sample
    # An empty bank holding garbage: it must be ignored entirely.
    banks = [b * 100 for b in random_banks(bank_unet.layout, 2)]
    got = bank_unet(sample, t, text, torch.zeros(2, frames), *banks)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind,frames", [(BankKind.DYME, 1), (BankKind.FIFO, 2)])
def test_bank_validity_is_per_batch_element(models, kind, frames):
    """Batch elements of different streams can be at different points: element 0 with an empty bank is the plain
    UNet, element 1 with a full one is not, in the same call."""
    bank_unet = BankUNet(copy.deepcopy(models.unet), tiny_spec(bank=kind, bank_frames=frames))
    sample, t, text = unet_inputs()
    expected = models.unet(sample, t, text).sample
    valid = torch.zeros(2, frames)
    valid[1] = 1
    got = bank_unet(sample, t, text, valid, *random_banks(bank_unet.layout, 2))[0]
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=0)
    assert (got[1] - expected[1]).abs().max() > 1e-3


def test_layout_covers_every_self_attention_and_fuses_low_resolution(models):
    layout = BankUNet(copy.deepcopy(models.unet), tiny_spec()).layout
    attn1 = [n for n, _ in models.unet.named_modules() if n.endswith(".attn1")]
    assert [layer.name for layer in layout.layers] == attn1
    for layer in layout.layers:
        assert layer.fuse == layer.name.startswith(("mid_block.", "up_blocks.0.", "up_blocks.1."))
    assert any(layer.fuse for layer in layout.layers) and not all(layer.fuse for layer in layout.layers)
    # Token counts are those the layer really sees: 8x8 latent -> 64 / 16 / 4 tokens per level.
    tokens = {layer.name.split(".attentions")[0]: layer.tokens for layer in layout.layers}
    assert tokens == {"down_blocks.0": 64, "down_blocks.1": 16, "mid_block": 4, "up_blocks.1": 16, "up_blocks.2": 64}


def reference_extended_attention(attn, h, bank_k, bank_v):
    """softmax(q [k;K]^T / sqrt(d)) [v;V], per head, then the output projection."""
    q, k, v = attn.to_q(h), attn.to_k(h), attn.to_v(h)
    keys, values = torch.cat([k, bank_k], 1), torch.cat([v, bank_v], 1)
    heads, d = attn.heads, k.shape[-1] // attn.heads
    out = []
    for i in range(heads):
        s = slice(i * d, (i + 1) * d)
        w = torch.softmax(q[..., s] @ keys[..., s].transpose(1, 2) / d**0.5, dim=-1)
        out.append(w @ values[..., s])
    return attn.to_out[0](torch.cat(out, -1))


@pytest.mark.parametrize("kind,frames", [(BankKind.DYME, 1), (BankKind.FIFO, 2)])
def test_extended_attention_equals_hand_written(models, kind, frames):
    unet = copy.deepcopy(models.unet)
    layout = BankUNet(unet, tiny_spec(bank=kind, bank_frames=frames)).layout
    layer = next(layer for layer in layout.layers if not layer.fuse)
    attn = unet.get_submodule(layer.name)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, layer.tokens, attn.to_q.in_features, generator=g)
    bank_k, bank_v = (torch.randn(layout.bank_shape(layer, 2), generator=g) for _ in range(2))
    banks = [(bank_k, bank_v) if other is layer else () for other in layout.layers]
    io = BankIO(kind, torch.ones(2, frames), banks)
    got = attn(h, bank_io=io)
    torch.testing.assert_close(got, reference_extended_attention(attn, h, bank_k, bank_v), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(io.current[layer.index][0], attn.to_k(h))
    if kind is BankKind.FIFO:  # one of two slots filled: only that slot's tokens are attended
        n = layer.tokens
        io = BankIO(kind, torch.tensor([[1.0, 0.0], [1.0, 0.0]]), banks)
        got = attn(h, bank_io=io)
        expected = reference_extended_attention(attn, h, bank_k[:, :n], bank_v[:, :n])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def unit(v):
    return v / v.norm(dim=-1, keepdim=True)


def test_feature_fusion_threshold_and_strength():
    # Three orthogonal tokens; bank token j lies at a chosen angle to token j (orthogonal to the others).
    eye = torch.eye(6)
    o = torch.stack([2 * eye[0], 3 * eye[1], eye[2]])[None]  # [1, 3, 6]
    angles = torch.tensor([0.1, 0.5, 0.3])
    bank = 5 * (torch.cos(angles)[:, None] * eye[:3] + torch.sin(angles)[:, None] * eye[3:])[None]  # [1, 3, 6]
    sims = (unit(o) @ unit(bank).transpose(1, 2))[0]
    best = sims.max(-1)
    assert best.indices.tolist() == [0, 1, 2]
    threshold = float(best.values[2])  # token 2 sits exactly at the threshold, token 0 above, token 1 below
    valid = torch.ones(1, 3, dtype=torch.bool)  # [B, M]
    out = feature_fusion(o, bank, valid, threshold, strength=0.8)
    torch.testing.assert_close(out[0, 0], 0.2 * o[0, 0] + 0.8 * bank[0, 0])  # above: fused
    torch.testing.assert_close(out[0, 1], o[0, 1])  # below: untouched
    torch.testing.assert_close(out[0, 2], 0.2 * o[0, 2] + 0.8 * bank[0, 2])  # at: fused (>=)
    torch.testing.assert_close(feature_fusion(o, bank, valid, threshold, strength=0.0), o)
    full = feature_fusion(o, bank, valid, threshold, strength=1.0)
    torch.testing.assert_close(full[0, 0], bank[0, 0])
    torch.testing.assert_close(full[0, 1], o[0, 1])
    # Invalid bank tokens are never chosen: with every token invalid nothing is fused.
    torch.testing.assert_close(feature_fusion(o, bank, torch.zeros(1, 3, dtype=torch.bool), -1.0, 1.0), o)


def run_with_bank_o(bank_unet, banks, scale):
    layout = bank_unet.layout
    out, i = [], 0
    for layer in layout.layers:
        for p in layout.parts(layer):
            out.append(banks[i] * scale if p == "o" else banks[i])
            i += 1
    sample, t, text = unet_inputs()
    return bank_unet(sample, t, text, torch.ones(2, 1), *out)[0]


def test_fusion_only_in_configured_layers(models):
    sample, t, text = unet_inputs()
    # The bank's O holds the current frame's own outputs, so every token finds a perfect match (cosine 1).
    bank_unet = BankUNet(copy.deepcopy(models.unet), tiny_spec(ff_threshold=0.98, ff_strength=1.0))
    current = bank_unet(sample, t, text, torch.zeros(2, 1), *random_banks(bank_unet.layout, 2))[1:]
    layout = bank_unet.layout
    assert sum(len(layout.parts(layer)) == 3 for layer in layout.layers) == sum(layer.fuse for layer in layout.layers)
    # Scaling O keeps the cosine at 1, so a fusing layer output changes with the scale; with strength 0 it does not.
    a = run_with_bank_o(bank_unet, list(current), 1.0)
    b = run_with_bank_o(bank_unet, list(current), 3.0)
    assert (a - b).abs().max() > 1e-3
    no_ff = BankUNet(copy.deepcopy(models.unet), tiny_spec(ff_strength=0.0))
    torch.testing.assert_close(run_with_bank_o(no_ff, list(current), 1.0), run_with_bank_o(no_ff, list(current), 3.0))
    # Only the low-resolution layers fuse: restricting fusion to the mid block changes the output vs the default.
    mid_only = BankUNet(copy.deepcopy(models.unet), tiny_spec(ff_strength=1.0, ff_layer_prefixes=("mid_block.",)))
    assert [layer.name for layer in mid_only.layout.layers if layer.fuse] == [
        layer.name for layer in layout.layers if layer.name.startswith("mid_block.")
    ]


def fused_output(models, prefixes):
    """The UNet output when each fusion layer's bank holds its own K/V and 3x its own O (cosine 1: every token
    fuses at strength 1, and the fused O is 3x the layer's output); `prefixes` picks the fusion layers."""
    bank_unet = BankUNet(copy.deepcopy(models.unet), tiny_spec(ff_strength=1.0, ff_layer_prefixes=prefixes))
    sample, t, text = unet_inputs()
    current = bank_unet(sample, t, text, torch.zeros(2, 1), *random_banks(bank_unet.layout, 2))[1:]
    return run_with_bank_o(bank_unet, list(current), 3.0)


def test_mid_block_fusion_changes_the_output(models):
    sample, t, text = unet_inputs()
    plain = models.unet(sample, t, text).sample
    none = fused_output(models, ())
    mid = fused_output(models, ("mid_block.",))
    default = fused_output(models, FF_LAYER_PREFIXES)
    # Without fusion a bank holding the frame's own K/V is attention over [k ; k]: the plain UNet.
    torch.testing.assert_close(none, plain, atol=1e-5, rtol=0)
    # Fusing only the mid block changes the output, and fusing the up blocks too changes it further.
    assert (mid - none).abs().max() > 1e-3
    assert (default - mid).abs().max() > 1e-3
