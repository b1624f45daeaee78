"""Issue 7's features on the engine path (onnxruntime, CPU): a LoRA fused at build time, checked by the manifest,
with its text-encoder part fused at load; RCFG and prompt blending, which are buffers, on the same engines.

One tiny fp32 --onnx-only build (32x32, 2 steps) with a small random LoRA is shared by every test here (the
same spec without the LoRA is the shared build other modules use).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import tiny_spec
from safetensors.torch import save_file

from build_engines.__main__ import build_parser, config_from_args
from streamv2v_trt import CfgType, LoraSpec, StreamV2V
from streamv2v_trt.lora_set import lora_specs
from streamv2v_trt.manifest import EngineMismatch
from streamv2v_trt.models.loader import load_models

SPEC = tiny_spec(height=32, width=32, steps=2)  # the stream batch holds two frames in flight
SIZE = SPEC.height
PROMPT = "a watercolor cat"
# UNet layers (attention linear, 1x1 and 3x3 convs) and text-encoder layers: the engine carries the first,
# open_engines must fuse the second into the PyTorch text encoder.
UNET_TARGETS = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
    "mid_block.attentions.0.proj_in",
    "down_blocks.0.resnets.0.conv1",
)
TEXT_TARGETS = ("encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1")


def write_lora(path, seed: int = 0, rank: int = 4) -> LoraSpec:
    """A random PEFT-format LoRA touching both the UNet and the text encoder."""
    models = load_models(SPEC)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    # Files name text-encoder layers under `text_model.` (older transformers' CLIPTextModel); recent versions
    # drop that level, and the LoRA reader maps the names back.
    modules = [(f"unet.{n}", models.unet.get_submodule(n)) for n in UNET_TARGETS]
    modules += [(f"text_encoder.text_model.{n}", models.text_encoder.get_submodule(n)) for n in TEXT_TARGETS]
    for key, module in modules:
        w = module.weight
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, *w.shape[1:], generator=gen) * 0.3
        up_shape = (w.shape[0], rank, 1, 1) if w.ndim == 4 else (w.shape[0], rank)
        tensors[f"{key}.lora_B.weight"] = torch.randn(*up_shape, generator=gen) * 0.3
    save_file(tensors, str(path))
    return LoraSpec(path, 0.8)


def video(n: int, seed: int = 0) -> list[np.ndarray]:
    """A slowly drifting random scene (consecutive frames similar, as in a video)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.int16)
    return [np.clip(base + rng.integers(-6, 7, base.shape) + i, 0, 255).astype(np.uint8) for i in range(n)]


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b).max())


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> LoraSpec:
    return write_lora(tmp_path_factory.mktemp("lora") / "style.safetensors")


@pytest.fixture(scope="module")
def engines(tiny_build, lora):
    return tiny_build(replace(SPEC, loras=(lora,)))


@pytest.fixture(scope="module")
def ort_stream(engines, lora):
    return StreamV2V.from_engines(engines, "onnxruntime", prompt=PROMPT, threads=1, loras=[lora])


def refused(engines, **kwargs) -> str:
    with pytest.raises(EngineMismatch) as e:
        StreamV2V.from_engines(engines, "onnxruntime", verify_hashes=False, **kwargs)
    return str(e.value)


def rebuild_spec(message: str):
    """The spec the `Rebuild: python -m build_engines ...` command of a refusal builds."""
    command = message.split("Rebuild: ", 1)[1].split(" The folder was built with", 1)[0]  # before the LoRA hint
    command = re.sub(r" \(writes \S+; open that folder\)$", "", command)  # another spec: its own folder
    return config_from_args(build_parser().parse_args(shlex.split(command)[3:])).spec


def test_lora_engine_matches_eager_with_the_same_lora(ort_stream, lora):
    s = ort_stream
    s.reset()
    assert s.cfg.spec == replace(SPEC, loras=(lora,))
    eager = StreamV2V.from_pretrained(s.cfg, prompt=PROMPT)
    plain = StreamV2V.from_pretrained(s.cfg.with_spec(loras=()), prompt=PROMPT)
    # The text-encoder half of the LoRA was fused at load: the prompt embeddings are the LoRA'd ones.
    torch.testing.assert_close(s.prompt_embeds, eager.prompt_embeds, atol=1e-5, rtol=0)
    assert (s.prompt_embeds - plain.prompt_embeds).abs().max() > 1e-2
    worst_plain = 0
    for i, frame in enumerate(video(8)):
        a, b, c = eager(frame), s(frame), plain(frame)
        assert max_diff(a, b) <= 1, f"frame {i}"
        worst_plain = max(worst_plain, max_diff(c, b))
    assert worst_plain > 1  # the LoRA really changes the output: the engine is not the plain model


def test_set_loras_on_a_build_folder_is_refused_with_the_rebuild_command(ort_stream, lora, tmp_path):
    """The UNet's weights are compiled into the folder's files: set_loras names the build of the asked set."""
    s = ort_stream
    other = write_lora(tmp_path / "other.safetensors", seed=9)
    cfg, embeds = s.cfg, s.prompt_embeds.clone()
    for asked in ([], [(other.path, 0.5)], [(lora, 1.0), (other.path, 0.5)]):
        with pytest.raises(EngineMismatch, match="compiled into its files") as e:
            s.set_loras(asked, reset=True)
        command = str(e.value).split("needs a rebuild: ", 1)[1].split("; name the LoRAs", 1)[0]
        assert "--onnx-only" in command and command.endswith("open that folder)")
        spec = config_from_args(build_parser().parse_args(shlex.split(re.sub(r" \(writes .*$", "", command))[3:])).spec
        assert [(x.digest(), x.scale) for x in spec.loras] == [(x.digest(), x.scale) for x in lora_specs(asked)]
        assert s.cfg == cfg and torch.equal(s.prompt_embeds, embeds)  # nothing changed


def test_changed_or_missing_lora_is_refused_with_the_rebuild_command(engines, lora, tmp_path):
    hint = "The folder was built with LoRA(s); pass the same file(s) and scale(s) when opening it (--lora style"
    # Opened without naming the files: the manifest knows only their names and hashes, the text encoder needs them.
    with pytest.raises(EngineMismatch, match=f"the LoRA files to open {engines} with were not given") as missing:
        StreamV2V.from_engines(engines, "onnxruntime")
    assert hint + ".safetensors:0.8" in str(missing.value)
    gone = LoraSpec(tmp_path / "gone.safetensors", 0.8)
    with pytest.raises(EngineMismatch, match=r"LoRA file\(s\) \[.*gone.safetensors'\] not found") as missing:
        StreamV2V.from_engines(engines, "onnxruntime", loras=[gone])
    assert hint in str(missing.value)
    message = refused(engines, loras=[])  # asked explicitly without LoRA
    assert "loras: engines were built with style.safetensors:0.8, asked no LoRA" in message and hint in message
    assert rebuild_spec(message) == SPEC
    message = refused(engines, loras=[LoraSpec(lora.path, 0.5)])
    assert "asked " + LoraSpec(lora.path, 0.5).cli_arg() in message and hint in message
    assert f"--lora {lora.path}:0.5" in message
    assert rebuild_spec(message) == replace(SPEC, loras=(LoraSpec(lora.path, 0.5),))
    other = write_lora(tmp_path / "style.safetensors", seed=1)  # same name and scale, other contents
    message = refused(engines, loras=[other])
    assert "file contents or scales differ" in message and hint in message
    assert rebuild_spec(message) == replace(SPEC, loras=(other,))


def test_rcfg_self_and_prompt_blend_match_eager_without_a_rebuild(ort_stream, engines, lora):
    """Guidance `self` shares the UNet batch of `none`, and prompts are a buffer: the same engines serve them."""
    built = ort_stream.cfg
    cfg = dataclasses.replace(built.with_spec(cfg_type=CfgType.SELF), guidance_scale=1.6, delta=0.7)
    blend = [("a watercolor cat", 0.7), ("a pencil sketch of a dog", 0.3)]
    s = StreamV2V.from_engines(engines, "onnxruntime", cfg, threads=1, verify_hashes=False)
    s.update_prompt(blend)
    eager = StreamV2V.from_pretrained(cfg)
    eager.update_prompt(blend)
    unguided = StreamV2V.from_pretrained(built)
    unguided.update_prompt(blend)
    assert s.cfg.cfg_type is CfgType.SELF
    worst_unguided = 0
    for i, frame in enumerate(video(6, seed=3)):
        a, b, c = eager(frame), s(frame), unguided(frame)
        assert max_diff(a, b) <= 1, f"frame {i}"
        worst_unguided = max(worst_unguided, max_diff(c, b))
    assert worst_unguided > 1  # guidance took effect on the engine path
