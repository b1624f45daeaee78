"""LoRA fusion: small random LoRAs written here, fused into the tiny UNet, checked against a hand-written forward."""

import copy
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_spec
from safetensors.torch import save_file
from torch import nn

from streamv2v_trt import StreamV2V
from streamv2v_trt.manifest import Manifest
from streamv2v_trt.models.loader import load_models
from streamv2v_trt.models.lora import LoraError, fuse_loras, read_lora
from streamv2v_trt.spec import LoraSpec

# Linear (self/cross attention, FF) and conv (1x1 proj_in, 3x3 resnet conv) layers, as LCM-LoRA targets them.
TARGETS = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
    "mid_block.attentions.0.proj_in",
    "down_blocks.0.resnets.0.conv1",
)


@pytest.fixture(scope="module")
def base():
    return load_models(tiny_spec())


def factors(module: nn.Module, rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w = module.weight
    if w.ndim == 4:  # conv: down keeps the kernel, up is 1x1
        down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=gen) * 0.3
        up = torch.randn(w.shape[0], rank, 1, 1, generator=gen) * 0.3
    else:
        down = torch.randn(rank, w.shape[1], generator=gen) * 0.3
        up = torch.randn(w.shape[0], rank, generator=gen) * 0.3
    return down, up


def key_names(fmt: str, module: str) -> tuple[str, str, str]:
    """(down key, up key, alpha key) of one layer in the file format `fmt`."""
    if fmt == "kohya":
        stem = "lora_unet_" + module.replace(".", "_")
        return f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"
    if fmt == "peft":
        return f"unet.{module}.lora_A.weight", f"unet.{module}.lora_B.weight", f"unet.{module}.alpha"
    if fmt == "diffusers":
        return f"unet.{module}.lora.down.weight", f"unet.{module}.lora.up.weight", f"unet.{module}.alpha"
    raise AssertionError(fmt)


def write_lora(path, unet, fmt, *, rank=4, alpha=None, seed=0, targets=TARGETS):
    """A random LoRA file; returns {module: (down, up, alpha/rank)} for the hand-written forward."""
    gen = torch.Generator().manual_seed(seed)
    tensors, truth = {}, {}
    for name in targets:
        down, up = factors(unet.get_submodule(name), rank, gen)
        k_down, k_up, k_alpha = key_names(fmt, name)
        tensors[k_down], tensors[k_up] = down, up
        if alpha is not None:
            tensors[k_alpha] = torch.tensor(float(alpha))
        truth[name] = (down, up, (rank if alpha is None else alpha) / rank)
    save_file(tensors, str(path))
    return truth


def unet_out(unet, seed=3):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    ehs = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor([799, 399]), ehs, return_dict=False)[0]


def hooked_out(unet, loras):
    """The unfused LoRA forward: each targeted layer adds scale * alpha/r * up(down(x)) to its output."""
    handles = []

    def hook(down, up, factor):
        def add(module, args, out):
            x = args[0]
            if isinstance(module, nn.Conv2d):
                h = F.conv2d(x, down, None, module.stride, module.padding, module.dilation)
                return out + factor * F.conv2d(h, up)
            return out + factor * F.linear(F.linear(x, down), up)

        return add

    for truth, scale in loras:
        for name, (down, up, a_over_r) in truth.items():
            handles.append(unet.get_submodule(name).register_forward_hook(hook(down, up, scale * a_over_r)))
    try:
        return unet_out(unet)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("fmt,alpha", [("kohya", 2.0), ("peft", None), ("diffusers", 8.0)])
def test_fused_unet_equals_the_unfused_lora_forward(base, tmp_path, fmt, alpha):
    unet = copy.deepcopy(base.unet)
    plain = unet_out(unet)
    truth = write_lora(tmp_path / "a.safetensors", unet, fmt, alpha=alpha)
    expected = hooked_out(unet, [(truth, 0.7)])
    n = fuse_loras(unet, [LoraSpec(tmp_path / "a.safetensors", 0.7)])
    assert n == len(TARGETS)
    fused = unet_out(unet)
    assert (fused - plain).abs().max() > 1e-2  # the LoRA does change the output
    torch.testing.assert_close(fused, expected, atol=1e-4, rtol=1e-4)


def test_two_loras_kohya_and_peft_fuse_together(base, tmp_path):
    unet = copy.deepcopy(base.unet)
    a = write_lora(tmp_path / "a.safetensors", unet, "kohya", alpha=1.0, seed=1)
    b = write_lora(tmp_path / "b.safetensors", unet, "peft", rank=2, seed=2, targets=TARGETS[:3])
    expected = hooked_out(unet, [(a, 1.0), (b, -0.5)])
    fuse_loras(unet, [LoraSpec(tmp_path / "a.safetensors", 1.0), LoraSpec(tmp_path / "b.safetensors", -0.5)])
    torch.testing.assert_close(unet_out(unet), expected, atol=1e-4, rtol=1e-4)


def test_attention_processor_format_names_to_out(base, tmp_path):
    unet = copy.deepcopy(base.unet)
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    gen = torch.Generator().manual_seed(0)
    down, up = factors(unet.get_submodule(f"{attn}.to_out.0"), 2, gen)
    save_file(
        {f"unet.{attn}.processor.to_out_lora.down.weight": down, f"unet.{attn}.processor.to_out_lora.up.weight": up},
        str(tmp_path / "p.safetensors"),
    )
    expected = hooked_out(unet, [({f"{attn}.to_out.0": (down, up, 1.0)}, 1.0)])
    fuse_loras(unet, [LoraSpec(tmp_path / "p.safetensors")])
    torch.testing.assert_close(unet_out(unet), expected, atol=1e-4, rtol=1e-4)


def test_text_encoder_layers_need_the_text_encoder(base, tmp_path):
    te = copy.deepcopy(base.text_encoder)
    q = te.get_submodule("encoder.layers.0.self_attn.q_proj")
    gen = torch.Generator().manual_seed(0)
    down, up = factors(q, 2, gen)
    stem = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}, str(tmp_path / "te.safetensors"))
    spec = LoraSpec(tmp_path / "te.safetensors")
    with pytest.raises(LoraError, match="pass the text encoder"):
        fuse_loras(copy.deepcopy(base.unet), [spec])
    before = q.weight.clone()
    fuse_loras(copy.deepcopy(base.unet), [spec], text_encoder=te)
    torch.testing.assert_close(q.weight, before + up @ down)
    # The engine path: the UNet part is compiled in, only the text encoder is fused (unet=None).
    write_lora(tmp_path / "u.safetensors", base.unet, "kohya", seed=4)
    fuse_loras(None, [LoraSpec(tmp_path / "u.safetensors"), spec], text_encoder=te)
    torch.testing.assert_close(q.weight, before + 2 * (up @ down))


def save(path, tensors):
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path))
    return LoraSpec(path)


# kohya/A1111 names in the original SD (LDM) UNet layout -> the tiny UNet's modules (layers_per_block=1: input
# blocks 1-2 are down block 0, 3-4 down block 1, 5 down block 2; output blocks 0-1 up block 0, 2-3 up block 1, ...).
SD_BLOCK_NAMES = {
    "input_blocks_0_0": "conv_in",
    "time_embed_0": "time_embedding.linear_1",
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_1_1_transformer_blocks_0_attn1_to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks_2_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_3_1_proj_in": "down_blocks.1.attentions.0.proj_in",
    "input_blocks_5_0_emb_layers_1": "down_blocks.2.resnets.0.time_emb_proj",
    "middle_block_1_transformer_blocks_0_attn2_to_k": "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
    "middle_block_2_out_layers_3": "mid_block.resnets.1.conv2",
    "output_blocks_3_1_transformer_blocks_0_attn1_to_out_0": (
        "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0"
    ),
    "output_blocks_3_1_transformer_blocks_0_ff_net_2": "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2",
    "output_blocks_3_2_conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks_4_0_skip_connection": "up_blocks.2.resnets.0.conv_shortcut",
    "out_2": "conv_out",
}
TE_NAMES = {
    "text_model_encoder_layers_0_self_attn_q_proj": "encoder.layers.0.self_attn.q_proj",
    "text_model_encoder_layers_0_self_attn_out_proj": "encoder.layers.0.self_attn.out_proj",
    "text_model_encoder_layers_1_mlp_fc1": "encoder.layers.1.mlp.fc1",
}


def test_kohya_file_with_original_sd_block_names_fuses_into_the_right_modules(base, tmp_path):
    unet, te = copy.deepcopy(base.unet), copy.deepcopy(base.text_encoder)
    gen = torch.Generator().manual_seed(7)
    tensors, expected = {}, {}
    for prefix, names, model, key in [("lora_unet_", SD_BLOCK_NAMES, unet, "unet"), ("lora_te_", TE_NAMES, te, "te")]:
        for j, (kohya, module) in enumerate(names.items()):
            w = model.get_submodule(module).weight
            down, up = factors(model.get_submodule(module), 2, gen)
            alpha = 1.0 + j % 3  # 1, 2 or 3 over rank 2
            tensors |= {f"{prefix}{kohya}.lora_down.weight": down, f"{prefix}{kohya}.lora_up.weight": up}
            tensors[f"{prefix}{kohya}.alpha"] = torch.tensor(alpha)
            delta = 0.6 * alpha / 2 * (up.flatten(1) @ down.flatten(1)).view(w.shape)  # W += s * a/r * up @ down
            expected[f"{key}.{module}.weight"] = w.detach().clone() + delta
    before = {f"unet.{k}": v.clone() for k, v in unet.state_dict().items()}
    before |= {f"te.{k}": v.clone() for k, v in te.state_dict().items()}
    save(tmp_path / "ldm.safetensors", tensors)
    n = fuse_loras(unet, [LoraSpec(tmp_path / "ldm.safetensors", 0.6)], text_encoder=te)
    assert n == len(SD_BLOCK_NAMES) + len(TE_NAMES)
    after = {f"unet.{k}": v for k, v in unet.state_dict().items()} | {f"te.{k}": v for k, v in te.state_dict().items()}
    for name, value in after.items():
        if name in expected:
            torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=1e-5, msg=name)
        else:
            assert torch.equal(value, before[name]), f"{name} changed"
    # The engine path (no UNet, so no layers_per_block to place SD blocks with): the text encoder alone is fused.
    te = copy.deepcopy(base.text_encoder)
    assert fuse_loras(None, [LoraSpec(tmp_path / "ldm.safetensors", 0.6)], text_encoder=te) == len(TE_NAMES)
    for module in TE_NAMES.values():
        torch.testing.assert_close(
            te.get_submodule(module).weight, expected[f"te.{module}.weight"], atol=1e-6, rtol=1e-5
        )


def test_bad_files_raise_clear_errors_and_change_nothing(base, tmp_path):
    unet = copy.deepcopy(base.unet)
    target = unet.get_submodule(TARGETS[0])
    down, up = factors(target, 4, torch.Generator().manual_seed(0))
    k_down, k_up, _ = key_names("kohya", TARGETS[0])
    good = {k_down: down, k_up: up}
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    cases = {
        "not a LoRA factor": {**good, "lora_unet_foo.weight": down},
        "matches no Linear/Conv2d": {
            **good,
            "lora_unet_no_such_layer.lora_down.weight": down,
            "lora_unet_no_such_layer.lora_up.weight": up,
        },
        "original SD block names": {  # block 3 of a UNet with 3 down blocks
            "lora_unet_input_blocks_7_1_proj_in.lora_down.weight": down,
            "lora_unet_input_blocks_7_1_proj_in.lora_up.weight": up,
        },
        "do not fit its weight": {**good, k_up: up[:, :2]},
        "has no up factor": {k_down: down},
        "LyCORIS": {"lora_unet_x.hada_w1_a": down},
        "has no down factor": {"unet.mid_block.attentions.0.proj_in.lora_B.weight": up},
        "lora_up.weight without its": {k_up.replace("to_q", "to_k"): up, **good},
        "mixes original SD block names": {
            **good,
            "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": down,
            "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": up,
        },
        "one file cannot mix formats": {**good, "unet.mid_block.attentions.0.proj_in.lora_A.weight": down},
        "one text encoder": {
            **good,
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": down,
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": up,
        },
        "two down tensors": {
            "unet.mid_block.attentions.0.proj_in.lora_A.weight": down,
            "unet.mid_block.attentions.0.proj_in.lora.down.weight": down,
            "unet.mid_block.attentions.0.proj_in.lora_B.weight": up,
        },
    }
    for i, (message, tensors) in enumerate(cases.items()):
        # the good LoRA first: a failing second file must not leave the first one half-fused
        specs = [save(tmp_path / "good.safetensors", good), save(tmp_path / f"bad{i}.safetensors", tensors)]
        with pytest.raises(LoraError, match=message):
            fuse_loras(unet, specs)
    for k, v in unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(FileNotFoundError):
        read_lora(tmp_path / "missing.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((tmp_path / "good.safetensors").read_bytes()[:100])
    with pytest.raises(LoraError, match="not a readable .safetensors file"):
        fuse_loras(unet, [LoraSpec(tmp_path / "good.safetensors"), LoraSpec(truncated)])
    for k, v in unet.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_spec_compares_loras_by_contents_and_scale(base, tmp_path):
    write_lora(tmp_path / "a.safetensors", base.unet, "kohya", seed=1)
    write_lora(tmp_path / "b.safetensors", base.unet, "kohya", seed=2)
    shutil.copy(tmp_path / "a.safetensors", tmp_path / "renamed.safetensors")
    a, b = LoraSpec(tmp_path / "a.safetensors"), LoraSpec(tmp_path / "b.safetensors")
    renamed = LoraSpec(tmp_path / "renamed.safetensors")
    digest = a.digest()
    assert len(digest) == 64 and renamed.digest() == digest and b.digest() != digest  # names do not count
    assert a.record() == {"name": "a.safetensors", "sha256": digest, "scale": 1.0}

    def diffs(built, asked) -> list[str]:
        return tiny_spec(loras=built).differences(tiny_spec(loras=asked))

    assert diffs((a,), (renamed,)) == [] and diffs((), ()) == []
    assert diffs((a,), (LoraSpec(a.path, 0.5),)) == [
        f"loras: engines were built with a.safetensors:1, asked {a.path}:0.5 (file contents or scales differ)"
    ]
    assert diffs((a, b), (b, a)) and diffs((a, b), (a,)) and diffs((a,), (b,))  # order and contents count
    assert "loras: engines were built with no LoRA" in diffs((), (a,))[0]
    assert "asked no LoRA" in diffs((a,), ())[0]
    # The same file changed on disk: refused, and the message names what was built and what is asked.
    built = tiny_spec(loras=(LoraSpec(a.path),))
    built.loras[0].digest()  # hashed at build time
    write_lora(tmp_path / "a.safetensors", base.unet, "kohya", seed=3)
    assert "a.safetensors:1, asked" in built.differences(tiny_spec(loras=(LoraSpec(a.path),)))[0]


def test_lora_spec_parse():
    assert LoraSpec.parse("x/lcm.safetensors:0.8") == LoraSpec("x/lcm.safetensors", 0.8)
    assert LoraSpec.parse("lcm.safetensors") == LoraSpec("lcm.safetensors", 1.0)
    assert LoraSpec.parse("C:/loras/lcm.safetensors") == LoraSpec("C:/loras/lcm.safetensors", 1.0)
    assert LoraSpec.parse("a.safetensors:-1e-1").scale == -0.1
    assert LoraSpec("a.safetensors", 0.5).cli_arg() == "a.safetensors:0.5"


def test_stream_from_pretrained_fuses_loras(base, tmp_path):
    write_lora(tmp_path / "a.safetensors", base.unet, "kohya", alpha=4.0, seed=5)
    frame = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    plain = StreamV2V.from_pretrained(tiny_spec(), prompt="a cat")(frame)
    spec = tiny_spec(loras=(LoraSpec(tmp_path / "a.safetensors", 2.0),))
    fused = StreamV2V.from_pretrained(spec, prompt="a cat")
    assert fused.cfg.spec.loras == spec.loras
    assert not np.array_equal(fused(frame), plain)


def test_manifest_refuses_a_changed_lora(base, tmp_path):
    write_lora(tmp_path / "a.safetensors", base.unet, "kohya", seed=1)
    lora = LoraSpec(tmp_path / "a.safetensors", 0.8)
    spec = tiny_spec(height=32, width=32, loras=(lora,))
    manifest = Manifest(
        spec=spec, weights_hash="w", random_weights=True, ff_layers=(), builder=None, builder_version=None,
        target={}, build_options={}, exporter="x", created="now", build_command="", networks={},
    )  # fmt: skip
    # What the manifest records and reads back: the file's name, hash and scale (not the path it was built from).
    stored = Manifest.from_json(manifest.to_json())
    assert stored.spec.loras == (LoraSpec("a.safetensors", 0.8),) and stored.spec.loras[0].digest() == lora.digest()
    assert not any(d.startswith("loras") for d in stored.differences(spec))
    assert f"--lora {lora.path}:0.8" in spec.build_command("out")
    write_lora(tmp_path / "a.safetensors", base.unet, "kohya", seed=2)  # the file changed after the build
    asked = replace(spec, loras=(LoraSpec(lora.path, 0.8),))
    assert any(d.startswith("loras: engines were built with a.safetensors:0.8") for d in stored.differences(asked))
    # A spec written without LoRAs (none fused) refuses a LoRA and accepts none.
    d = manifest.to_json()
    del d["spec"]["loras"]
    plain = Manifest.from_json(d)
    assert plain.spec.loras == () and any("no LoRA" in d for d in plain.differences(asked))
    assert not any(d.startswith("loras") for d in plain.differences(replace(spec, loras=())))
