"""LoRA: read LoRA safetensors files with diffusers' reader and fuse them into the weights before export.

A LoRA adds, to a Linear or Conv2d weight W of the UNet (or the text encoder),

    W <- W + scale * (alpha / rank) * up @ down        (conv: over the flattened kernel, 1x1 `up`)

with `down` [rank, in(, kh, kw)], `up` [out, rank(, 1, 1)], `alpha` from the file (rank when absent) and
`scale` chosen by the user. Fused weights cost nothing per frame and export like any other weights, so an
engine carries its LoRAs; the spec (`streamv2v_trt.spec.LoraSpec`: file hash and scale) goes into the engine
manifest, so a changed file or scale is refused instead of running stale weights. On the eager backend the set
can also change while a stream runs (`lora_weights.py`: the same plan and arithmetic, `plan_loras`/`add_deltas`).

Files are parsed by diffusers (`StableDiffusionLoraLoaderMixin.lora_state_dict`, then its renames to PEFT names):
PEFT, diffusers old and new, and kohya/A1111 files, original SD block names included. What is ours: every key is
matched to a module and shape-checked before the first weight changes, errors name the file and key, and the fuse.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils.state_dict_utils import DIFFUSERS_OLD_TO_PEFT, UNET_TO_DIFFUSERS, convert_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..spec import LoraSpec

log = logging.getLogger(__name__)

UNET, TEXT_ENCODER = "unet", "text_encoder"

_UNSUPPORTED = ("hada_", "lokr_", "dora_scale", "lora_magnitude_vector", ".diff", "oft_", "boft_")
# diffusers' renames to PEFT names, per target: an attention processor's `to_q_lora` is the UNet's `to_q` and the
# text encoder's `q_proj`. The two extra spellings are ones diffusers' own loader accepts by other paths.
_TO_PEFT = {
    UNET: {**UNET_TO_DIFFUSERS, ".lora_linear_layer.down": ".lora_A", ".lora_linear_layer.up": ".lora_B"},
    TEXT_ENCODER: {**DIFFUSERS_OLD_TO_PEFT, ".lora.down": ".lora_A", ".lora.up": ".lora_B"},
}
_PREFIXES = (("unet.", UNET), ("text_encoder.", TEXT_ENCODER), ("base_model.model.", UNET))  # else: a bare UNet
_SD_BLOCKS = ("input_blocks", "middle_block", "output_blocks")
_LDM_HINT = (  # diffusers places SD block names by the UNet's layers_per_block, and misplaces one kind of layer
    " It uses original SD block names: if the base model is right, convert the file to diffusers names (diffusers "
    "cannot place the upsampler of an output block without attention)."
)


class LoraError(ValueError):
    """A LoRA file that cannot be fused into this model; nothing was changed."""


@dataclass(frozen=True)
class LoraLayer:
    """The LoRA of one layer: W += scale * alpha / rank * up @ down."""

    target: str  # UNET or TEXT_ENCODER
    module: str  # module name inside the target, e.g. "mid_block.attentions.0.proj_in"
    key: str  # one of its keys as written in the file, for messages
    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float | None

    def delta(self, scale: float, weight_shape: torch.Size, device: torch.device | None = None) -> torch.Tensor:
        """scale * alpha / rank * up @ down, shaped like the weight (float32, computed on `device`)."""
        rank = self.down.shape[0]
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)  # [out, r]
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)  # [r, in*kh*kw]
        return (scale * (rank if self.alpha is None else self.alpha) / rank) * (up @ down).view(weight_shape)


def _diffusers_form(raw: dict[str, torch.Tensor], path: Path, unet_config) -> dict[str, torch.Tensor | float]:
    """diffusers' reading of the file: `unet.` / `text_encoder.` keys, kohya alphas (floats) beside them."""
    for key in raw:
        if any(u in key for u in _UNSUPPORTED):
            raise LoraError(f"LoRA file {path}: key {key!r} is LyCORIS/DoRA/OFT; merge or convert it to a plain LoRA")
    try:
        state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(raw), unet_config=unet_config)
    except KeyError as e:  # kohya: a lora_down.weight without its lora_up.weight
        raise LoraError(f"LoRA file {path}: a kohya layer has no up factor ({e.args[0]!r} is missing)") from e
    except (ValueError, IndexError) as e:  # keys its kohya conversion left, or SD blocks it cannot place
        raise LoraError(
            f"LoRA file {path}: diffusers cannot read it as kohya/A1111 ({' '.join(str(e).split())}): a key that is "
            "not a LoRA factor (.lora_down/.lora_up.weight, .alpha), a .lora_up.weight without its .lora_down.weight "
            "or an original SD block this UNet does not have"
        ) from e
    if sum(not k.endswith(".alpha") for k in state) != sum(not k.endswith(".alpha") for k in raw):
        raise LoraError(  # diffusers drops the SD block names of a file that has both namings
            f"LoRA file {path} mixes original SD block names (input_blocks/middle_block/output_blocks) with "
            "diffusers names (down_blocks/mid_block/up_blocks); save it with one naming"
        )
    return {**state, **(alphas or {})}


def read_lora(path: str | Path, unet_config=None) -> list[LoraLayer]:
    """Parse one safetensors LoRA into per-layer factors (module names not yet checked against a model).

    unet_config: the UNet's config, needed to map original SD block names (`input_blocks_4_1_...`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    if path.suffix != ".safetensors":
        raise LoraError(f"LoRA file {path}: only .safetensors is loaded (pickled .bin/.ckpt files can run code)")
    try:
        raw = load_file(str(path))
    except SafetensorError as e:  # truncated, or not safetensors at all: the file's fault, said as a LoraError
        raise LoraError(f"LoRA file {path} is not a readable .safetensors file ({e}): re-download or re-save it") from e
    written = {id(t): k for k, t in raw.items()}  # diffusers renames keys, keeping the tensors
    parts: dict[tuple[str, str], dict[str, object]] = {}
    for key, value in _diffusers_form(raw, path, unet_config).items():
        target, name = next(((t, key[len(p) :]) for p, t in _PREFIXES if key.startswith(p)), (UNET, key))
        written_key = written.get(id(value), key)  # as written (kohya alphas: diffusers' name)
        if name.startswith(("lora_", "text_encoder_2.")):
            raise LoraError(
                f"LoRA file {path}: key {written_key!r} not read: kohya keys start with lora_unet_ or lora_te_ "
                "(SD1.x/2.x: one text encoder) and one file cannot mix formats"
            )
        # one key at a time: two spellings of one factor would otherwise overwrite each other unseen
        name = convert_state_dict({name: value}, _TO_PEFT[target]).popitem()[0]  # <module>.lora_A.weight
        if name.endswith(".alpha"):
            module, role = name[: -len(".alpha")].split(".lora_")[0], "alpha"
        elif name.endswith((".lora_A.weight", ".lora_B.weight")):
            module, role = name[: -len(".lora_A.weight")], "down" if name.endswith("A.weight") else "up"
        else:
            raise LoraError(
                f"LoRA file {path}: key {written_key!r} is not a LoRA factor: expected .lora_A/.lora_B.weight "
                "(PEFT), .lora.down/.lora.up.weight (diffusers), .lora_down/.lora_up.weight (kohya) or .alpha"
            )
        group = parts.setdefault((target, module), {})
        if role in group:
            raise LoraError(f"LoRA file {path}: two {role} tensors for layer {module!r} (one is {written_key!r})")
        group[role] = value
        group.setdefault("key", written_key)
    layers = []
    for (target, module), group in parts.items():
        missing = [r for r in ("down", "up") if r not in group]
        if missing:
            raise LoraError(f"LoRA file {path}: layer {module!r} ({target}) has no {' and no '.join(missing)} factor")
        alpha = float(group["alpha"]) if "alpha" in group else None
        layers.append(LoraLayer(target, module, group["key"], group["down"], group["up"], alpha))
    return layers


def _lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Linear/Conv2d modules by name."""
    modules = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    if not hasattr(model, "text_model") and any(n.startswith("encoder.layers.") for n in modules):
        # Recent transformers' CLIPTextModel has no `text_model.` level; LoRA files still name it.
        modules.update({f"text_model.{n}": m for n, m in list(modules.items())})
    return modules


def _resolve(layer: LoraLayer, modules: dict[str, nn.Module], path: Path) -> nn.Module:
    module = modules.get(layer.module)
    if module is None:
        ldm = layer.target == UNET and any(b in layer.key for b in _SD_BLOCKS)
        raise LoraError(
            f"LoRA file {path}: layer {layer.module!r} (key {layer.key!r}) matches no Linear/Conv2d of the "
            f"{layer.target}. Is this LoRA for another base model (SD1.5 vs SD2.1)?{_LDM_HINT if ldm else ''}"
        )
    w = module.weight
    out_f, in_f = w.shape[0], w[0].numel()
    up, down = layer.up, layer.down
    ok = (
        up.ndim in (2, 4)
        and down.ndim in (2, 4)
        and up.shape[1] == down.shape[0]
        and up.shape[0] == out_f
        and all(s == 1 for s in up.shape[2:])
        and down[0].numel() == in_f
        and (down.ndim == 2 or down.shape[1:] == w.shape[1:])
    )
    if not ok:
        want_down = ", ".join(map(str, w.shape[1:]))
        raise LoraError(
            f"LoRA file {path}: layer {layer.module!r} (key {layer.key!r}) has up {tuple(up.shape)} and down "
            f"{tuple(down.shape)}, which do not fit its weight {tuple(w.shape)} (expected up [{out_f}, r] and down "
            f"[r, {want_down}]). Is this LoRA for another base model?"
        )
    return module


class LoraFuse(NamedTuple):
    """One layer of one LoRA, matched and shape-checked: `module.weight += scale * layer's delta`."""

    target: str  # UNET or TEXT_ENCODER
    module: nn.Module
    layer: LoraLayer
    scale: float


def plan_loras(
    unet: nn.Module | None, loras: Sequence[LoraSpec], text_encoder: nn.Module | None = None
) -> list[LoraFuse]:
    """Read every file and match and check every key against the models, changing nothing: what `fuse_loras`
    (and `LoraWeights.set`) then apply, in order. unet=None: its layers are compiled into an engine, skipped."""
    targets = {UNET: unet, TEXT_ENCODER: text_encoder}
    unet_config = unet.config if unet is not None else None  # a diffusers UNet2DConditionModel
    indexes: dict[str, dict[str, nn.Module]] = {}
    plan: list[LoraFuse] = []
    for spec in loras:
        for layer in read_lora(spec.path, unet_config):
            model = targets[layer.target]
            if model is None and layer.target == UNET:
                continue  # compiled into the engine
            if model is None:
                raise LoraError(
                    f"LoRA file {spec.path} has text-encoder layers ({layer.module!r}); "
                    "pass the text encoder too so the prompt embeddings match the LoRA."
                )
            if layer.target not in indexes:
                indexes[layer.target] = _lora_modules(model)
            plan.append(LoraFuse(layer.target, _resolve(layer, indexes[layer.target], spec.path), layer, spec.scale))
    return plan


def add_deltas(weight: torch.Tensor, fuses: Sequence[LoraFuse]) -> None:
    """weight += each LoRA's delta, in order, in the weight's dtype, computed on its device: the one fuse
    arithmetic, so a runtime swap (`lora_weights.py`) writes the very weights a fuse at load does."""
    for fuse in fuses:
        weight.add_(fuse.layer.delta(fuse.scale, weight.shape, weight.device).to(weight.dtype))


def fuse_loras(unet: nn.Module | None, loras: Sequence[LoraSpec], text_encoder: nn.Module | None = None) -> int:
    """Fuse every LoRA into the weights in place; returns the number of layers changed.

    Everything is read and checked before the first weight changes (`plan_loras`), so an error leaves the model
    untouched. Fuse after hashing the base weights (the manifest records that hash and the LoRA specs separately)
    and before `BankUNet` is built and exported: the engine then carries the LoRA. On the engine path the
    runtime calls `fuse_loras(None, loras, text_encoder)`: the UNet layers are already in the engine (the
    manifest check compares fingerprints), the text-encoder layers still run in PyTorch and must be fused.
    """
    plan = plan_loras(unet, loras, text_encoder)
    with torch.no_grad():
        for fuse in plan:
            add_deltas(fuse.module.weight, [fuse])
    for spec in loras:
        log.info("fused LoRA %s (scale %g)", spec.path, spec.scale)
    return len(plan)
