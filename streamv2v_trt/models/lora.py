"""LoRA: read diffusers/PEFT or kohya safetensors files and fuse them into the weights before export.

A LoRA adds, to a Linear or Conv2d weight W of the UNet (or the text encoder),

    W <- W + scale * (alpha / rank) * up @ down        (conv: over the flattened kernel, 1x1 `up`)

with `down` [rank, in(, kh, kw)], `up` [out, rank(, 1, 1)], `alpha` from the file (rank when absent) and
`scale` chosen by the user. Fused weights cost nothing per frame and export like any other weights, so an
engine carries its LoRAs; the spec (`streamv2v_trt.spec.LoraSpec`: file hash and scale) goes into the engine
manifest, so a changed file or scale is refused instead of running stale weights.

Key formats understood (one file may mix them):
  PEFT / diffusers   `unet.<module>.lora_A.weight`, `unet.<module>.lora_B.weight`, optional `<module>.alpha`
  diffusers (old)    `unet.<module>.lora.down.weight` / `.lora.up.weight`,
                     `unet.<attn>.processor.to_q_lora.down.weight` (attention-processor LoRAs)
  kohya              `lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`
Text-encoder keys (`text_encoder.` / `lora_te_`) are fused into the text encoder when one is given.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..spec import LoraSpec

log = logging.getLogger(__name__)

UNET, TEXT_ENCODER = "unet", "text_encoder"

# (suffix, role): how a key names the two factors and the alpha of one layer's LoRA.
_ROLE_SUFFIXES = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"),  # attention-processor format: `processor.to_q_lora.down.weight`
    ("_lora.up.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".alpha", "alpha"),
)
# (prefix, target, dotted): dotted names are module paths; kohya names replace every "." with "_".
_PREFIXES = (
    ("lora_unet_", UNET, False),
    ("lora_te_", TEXT_ENCODER, False),
    ("lora_te1_", TEXT_ENCODER, False),
    ("unet.", UNET, True),
    ("text_encoder.", TEXT_ENCODER, True),
    ("base_model.model.", UNET, True),  # a PEFT model saved on its own
)
_UNSUPPORTED = ("hada_", "lokr_", "dora_scale", ".diff", "oft_", "boft_")


class LoraError(ValueError):
    """A LoRA file that cannot be fused into this model; nothing was changed."""


@dataclass(frozen=True)
class LoraLayer:
    """The LoRA of one layer: W += scale * alpha / rank * up @ down."""

    target: str  # UNET or TEXT_ENCODER
    module: str  # module name inside the target: dotted ("mid_block.attentions.0.proj_in") or kohya's "_" form
    kohya: bool  # `module` has every "." replaced by "_" (resolved against the model's module names)
    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float | None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, scale: float, weight_shape: torch.Size) -> torch.Tensor:
        """scale * alpha / rank * up @ down, shaped like the weight (float32)."""
        alpha = self.rank if self.alpha is None else self.alpha
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)  # [out, r], [r, in*kh*kw]
        return (scale * alpha / self.rank) * (up @ down).view(weight_shape)


def _split_key(key: str) -> tuple[str, str, bool, str]:
    """key -> (target, module name as written, dotted?, role)."""
    if any(u in key for u in _UNSUPPORTED):
        raise LoraError(
            f"LoRA key {key!r} is a LyCORIS/DoRA/OFT variant; only plain low-rank LoRA (down/up or lora_A/lora_B) "
            "is supported. Convert or merge it to a plain LoRA first."
        )
    role = next(((s, r) for s, r in _ROLE_SUFFIXES if key.endswith(s)), None)
    if role is None:
        raise LoraError(
            f"LoRA key {key!r} is not a LoRA factor: expected names ending in .lora_A.weight/.lora_B.weight (PEFT), "
            ".lora.down.weight/.lora.up.weight (diffusers), .lora_down.weight/.lora_up.weight (kohya) or .alpha."
        )
    suffix, role_name = role
    stem = key[: -len(suffix)]
    match = next(((p, t, d) for p, t, d in _PREFIXES if stem.startswith(p)), None)
    if match is not None:
        prefix, target, dotted = match
        stem = stem[len(prefix) :]
    elif stem.startswith("lora_"):
        raise LoraError(f"LoRA key {key!r}: unknown kohya prefix; expected lora_unet_ or lora_te_ (SD1.x/2.x)")
    else:
        target, dotted = UNET, True  # an un-prefixed PEFT save of a UNet
    if dotted:
        stem = stem.replace(".processor.", ".")
        if suffix.startswith("_lora."):  # attention-processor format names the projection `to_out_lora`
            stem = stem + (".0" if stem.endswith("to_out") else "")
    return target, stem, dotted, role_name


def _lora_modules(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Linear/Conv2d modules by name, and kohya's underscore names -> module names."""
    modules = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    if not hasattr(model, "text_model") and any(n.startswith("encoder.layers.") for n in modules):
        # Recent transformers' CLIPTextModel has no `text_model.` level; LoRA files still name it.
        modules.update({f"text_model.{n}": m for n, m in list(modules.items())})
    return modules, {n.replace(".", "_"): n for n in modules}


def read_lora(path: str | Path) -> list[LoraLayer]:
    """Parse one safetensors LoRA into per-layer factors (module names not yet checked against a model)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    if path.suffix != ".safetensors":
        raise LoraError(f"LoRA file {path}: only .safetensors is loaded (pickled .bin/.ckpt files can run code)")
    parts: dict[tuple[str, str, bool], dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(path)).items():
        target, stem, dotted, role = _split_key(key)
        group = parts.setdefault((target, stem, dotted), {})
        if role in group:
            raise LoraError(f"LoRA file {path}: two {role} tensors for layer {stem!r} (second one: {key!r})")
        group[role] = tensor
    layers = []
    for (target, stem, dotted), group in parts.items():
        missing = [r for r in ("down", "up") if r not in group]
        if missing:
            raise LoraError(f"LoRA file {path}: layer {stem!r} ({target}) has no {' and no '.join(missing)} factor")
        alpha = float(group["alpha"]) if "alpha" in group else None
        layers.append(LoraLayer(target, stem, not dotted, group["down"], group["up"], alpha))
    return layers


def _resolve(layer: LoraLayer, index: tuple[dict, dict], path: Path) -> tuple[str, nn.Module]:
    modules, kohya = index
    name = layer.module
    if layer.kohya:
        name = kohya.get(layer.module)
        if name is None:
            ldm = layer.module.startswith(("input_blocks", "middle_block", "output_blocks"))
            hint = " (it uses the original SD block names: convert it to diffusers names)" if ldm else ""
            raise LoraError(
                f"LoRA file {path}: kohya layer {layer.module!r} matches no Linear/Conv2d of the {layer.target}{hint}. "
                "Is this LoRA for another base model (SD1.5 vs SD2.1)?"
            )
    module = modules.get(name)
    if module is None:
        raise LoraError(
            f"LoRA file {path}: layer {name!r} is not a Linear/Conv2d of the {layer.target}. "
            "Is this LoRA for another base model (SD1.5 vs SD2.1)?"
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
            f"LoRA file {path}: layer {name!r} has up {tuple(up.shape)} and down {tuple(down.shape)}, which do not "
            f"fit its weight {tuple(w.shape)} (expected up [{out_f}, r] and down [r, {want_down}]). "
            "Is this LoRA for another base model?"
        )
    return name, module


def fuse_loras(unet: nn.Module | None, loras: Sequence[LoraSpec], text_encoder: nn.Module | None = None) -> int:
    """Fuse every LoRA into the weights in place; returns the number of layers changed.

    Everything is read and checked before the first weight changes, so an error leaves the model untouched.
    Fuse after hashing the base weights (the manifest records that hash and the LoRA specs separately)
    and before `BankUNet` is built and exported: the engine then carries the LoRA. On the engine path the
    runtime calls `fuse_loras(None, loras, text_encoder)`: the UNet layers are already in the engine (the
    manifest check compares fingerprints), the text-encoder layers still run in PyTorch and must be fused.
    """
    targets = {UNET: unet, TEXT_ENCODER: text_encoder}
    indexes: dict[str, tuple[dict, dict]] = {}
    plan: list[tuple[nn.Module, LoraLayer, float]] = []
    for spec in loras:
        for layer in read_lora(spec.path):
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
            _, module = _resolve(layer, indexes[layer.target], spec.path)
            plan.append((module, layer, spec.scale))
    with torch.no_grad():
        for module, layer, scale in plan:
            w = module.weight
            w.add_(layer.delta(scale, w.shape).to(device=w.device, dtype=w.dtype))
    for spec in loras:
        log.info("fused LoRA %s (scale %g)", spec.path, spec.scale)
    return len(plan)
