"""ControlNets from a preset, a local diffusers ControlNet folder, or a hub id (as `loader.py` loads the UNet).

A preset (`presets.CONTROLNET_PRESETS`) builds its architecture from the `controlnet.json` beside its model's UNet
config, with the preset's real weights when they are already in the Hugging Face cache, else seeded random weights.
A ControlNet's residuals must fit the UNet they are added to: `load_controlnets` checks the structure first.
diffusers is imported only when a ControlNet is built, so reading a spec that names ControlNets stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..presets import CONTROLNET_PRESETS, ModelUnavailable
from ..spec import EngineSpec

if TYPE_CHECKING:
    from diffusers import ControlNetModel

log = logging.getLogger(__name__)

# What must agree between a ControlNet and the UNet for its residuals to fit (shapes at every level).
FIT_KEYS = ("in_channels", "block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim")
SEED_OFFSET = 3  # random weights: the UNet has weights_seed, the VAE +1, the text encoder +2; ControlNet j +3+j


@dataclass(frozen=True)
class ControlNetWeights:
    """Where one ControlNet's weights come from: a diffusers ControlNet folder (real) or a preset's seeded recipe."""

    name: str  # as the spec names it
    folder: Path | None  # config.json + *.safetensors; None: seeded random weights
    recipe: str | None = None  # random weights: what determines them (config, seed)

    @property
    def random(self) -> bool:
        return self.folder is None

    def hash(self) -> str:
        """Identifies the weights (the build identity beside the UNet's weights hash), as `loader.Weights.hash`
        does: random weights by their recipe, real ones by each file's safetensors header and 64 strided blocks."""
        h = hashlib.sha256()
        if self.recipe is not None:
            h.update(self.recipe.encode())
            return h.hexdigest()[:16]
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"ControlNet {self.name!r}: no .safetensors weights in {self.folder}")
        from .loader import hash_safetensors  # diffusers loads with the loader: only for real weights

        hash_safetensors(h, files, lambda path: path.name)
        return h.hexdigest()[:16]


def find_controlnet(name: str, seed: int, index: int) -> ControlNetWeights:
    """Where ControlNet `name` (the spec's `index`-th) is: a preset (its hub id when cached, else seeded random
    weights: `seed` + 3 + index, so two random ControlNets of one preset differ), a local folder, or a hub id
    (downloaded). Nothing is loaded yet; a name that is none of these raises `ModelUnavailable` (one line)."""
    from .loader import _cached_snapshot, _download

    preset = CONTROLNET_PRESETS.get(name)
    if preset is not None:
        folder = _cached_snapshot(preset.hub_id) if preset.hub_id else None
        if folder is None:
            config = json.loads(preset.config.read_text())
            recipe = {"preset": name, "seed": seed + SEED_OFFSET + index, "config": config, "zero_convs": ZERO_CONVS}
            return ControlNetWeights(name, None, json.dumps(recipe, sort_keys=True))
        log.info("using ControlNet %s weights from the local cache: %s", name, folder)
        return ControlNetWeights(name, folder)
    folder = Path(name)
    if not folder.exists():
        if "/" not in name or name.startswith((".", "/")):
            raise ModelUnavailable(
                f"ControlNet {name!r} is neither a preset ({', '.join(CONTROLNET_PRESETS)}), a local folder, nor a hub "
                "id (owner/name)."
            )
        instead = (
            "Pass a local diffusers ControlNet folder instead (--controlnet PATH, with config.json and "
            f"*.safetensors; where there is network, `hf download {name} --local-dir PATH` makes one)"
        )
        folder = _download(name, what="ControlNet", instead=instead)
    if not (folder / "config.json").is_file():
        raise ModelUnavailable(
            f"{folder} is not a diffusers ControlNet folder: no config.json. Expected the layout of e.g. "
            f"{CONTROLNET_PRESETS['sd15-canny'].hub_id} (config.json, diffusion_pytorch_model.safetensors)."
        )
    return ControlNetWeights(name, folder)


ZERO_CONVS = "reset-v1"  # how random ControlNets fill their zero convolutions (in the recipe: bump on change)


def _random_controlnet(config: dict) -> ControlNetModel:
    """A ControlNet with random weights whose residuals are not zero.

    diffusers initialises the convolutions that produce the residuals (and the last one of the conditioning
    embedding) to zero, as training starts; random weights that kept them would add exactly nothing, and every test
    of the residual path would pass vacuously. They get PyTorch's default initialisation instead."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_config(config)
    for conv in (*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out):
        conv.reset_parameters()
    return net


def _config(weights: ControlNetWeights) -> dict:
    if weights.random:
        return json.loads(weights.recipe)["config"]
    return json.loads((weights.folder / "config.json").read_text())


def check_fits(name: str, config: dict, unet_config: dict, model: str) -> None:
    """Raise `ValueError` unless the ControlNet's residuals have the UNet's shapes (same family)."""
    diffs = [
        f"{key}: ControlNet {_show(config.get(key))}, UNet {_show(unet_config.get(key))}"
        for key in FIT_KEYS
        if _show(config.get(key)) != _show(unet_config.get(key))
    ]
    if diffs:
        fits = [p.name for p in CONTROLNET_PRESETS.values() if p.model == model]
        raise ValueError(
            f"ControlNet {name!r} does not fit the UNet of model {model!r} ({'; '.join(diffs)}): use a ControlNet "
            f"trained for that model's family" + (f" (preset {', '.join(fits)})" if fits else "")
        )


def _show(value) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def load_controlnets(spec: EngineSpec, unet_config: dict, device: torch.device | str) -> list[ControlNetModel]:
    """`spec.controlnets` in order, in `spec.precision` on `device` (eval, no grad), each checked against the
    UNet's config (`unet.config`) before its weights load."""
    from diffusers import ControlNetModel

    from .loader import _prepare, _random_init

    nets = []
    for index, name in enumerate(spec.controlnets):
        weights = find_controlnet(name, spec.weights_seed, index)
        config = _config(weights)
        check_fits(name, config, dict(unet_config), spec.model)
        if weights.random:
            log.warning("ControlNet %r: no local weights; seeded RANDOM weights (outputs are noise-like)", name)
            seed = json.loads(weights.recipe)["seed"]
            net = _random_init(lambda config=config: _random_controlnet(config), seed)
        else:
            net = ControlNetModel.from_pretrained(weights.folder, use_safetensors=True)
        _prepare(net, device, spec.precision.torch_dtype)
        nets.append(net)
    return nets


def controlnet_hashes(spec: EngineSpec) -> list[str]:
    """The weights hash of each of `spec.controlnets` (what a manifest records beside the UNet's)."""
    return [find_controlnet(name, spec.weights_seed, i).hash() for i, name in enumerate(spec.controlnets)]


def controlnet_identities(spec: EngineSpec) -> list[tuple[str, str, str]]:
    """(name, architecture, weights hash) of each of `spec.controlnets`, what a build's manifest records. The
    architecture is what makes its residuals fit a UNet (`FIT_KEYS`), in words; reading it loads no weights."""
    out = []
    for i, name in enumerate(spec.controlnets):
        weights = find_controlnet(name, spec.weights_seed, i)
        config = _config(weights)
        arch = ", ".join(f"{key} {_show(config.get(key))}" for key in FIT_KEYS)
        out.append((name, f"{config.get('_class_name', 'ControlNetModel')}: {arch}", weights.hash()))
    return out
