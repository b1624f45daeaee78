"""Which self-attention layers carry a bank, their token counts and channels, and every network's tensors.

`BankLayout` is the engine I/O contract (docs/DESIGN.md, "Engine I/O"): names, shapes and dtypes of the UNet's
inputs and outputs, of the VAE encoder's and decoder's, and of each ControlNet's when the spec has ControlNets (then
the UNet also takes their summed residuals as inputs). The export, the manifest check and every runner compare
against `network_specs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import BankKind, EngineSpec

NETWORKS = ("unet", "vae_encoder", "vae_decoder")  # every build; plus `controlnet_network(j)` per ControlNet


def controlnet_network(index: int) -> str:
    """The network name of the spec's `index`-th ControlNet: one network per ControlNet (docs/DESIGN.md)."""
    return f"controlnet_{index}"


def network_names(spec: EngineSpec) -> tuple[str, ...]:
    """Every network a build of `spec` holds: the three of `NETWORKS`, then one per ControlNet, in the spec's order."""
    return (*NETWORKS, *(controlnet_network(j) for j in range(len(spec.controlnets))))


def residual_names(count: int) -> list[str]:
    """The ControlNet residuals the UNet adds, in diffusers' order: `count - 1` down-block residuals, then the
    mid-block one. The UNet's inputs and every ControlNet's outputs carry these names."""
    return [*(f"down_residual.{i}" for i in range(count - 1)), "mid_residual"]


# The one table of tensor dtypes: layout and manifest name them ("float16"), runners report torch dtypes.
DTYPES = {
    "float16": torch.float16,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float16 -> "float16" (the names of `DTYPES`)."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class BankLayer:
    index: int
    name: str  # qualified module name of the attn1, e.g. "mid_block.attentions.0.transformer_blocks.0.attn1"
    tokens: int  # N = h*w of the layer's resolution level
    channels: int  # C = inner dim of k/v/o
    fuse: bool  # feature fusion applies (and the bank holds O)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "float16", "float32", "int64"
    role: str  # "input", "bank" (inputs); "output", "current" (outputs)
    layer: str | None = None  # qualified attn1 name of bank/current tensors

    @property
    def is_input(self) -> bool:
        return self.role in ("input", "bank")


@dataclass(frozen=True)
class BankLayout:
    """The fixed-size bank of one UNet at one latent resolution."""

    layers: tuple[BankLayer, ...]
    kind: BankKind
    slots: int  # frames of tokens held: 1 for DyMe, k for FIFO
    # (C, h, w) of each ControlNet residual the UNet takes (`residual_names`), () without ControlNets.
    residuals: tuple[tuple[int, int, int], ...] = ()

    def bank_shape(self, layer: BankLayer, batch: int) -> tuple[int, int, int]:
        return (batch, self.slots * layer.tokens, layer.channels)  # [B, S*N, C]

    @staticmethod
    def parts(layer: BankLayer) -> tuple[str, ...]:
        return ("k", "v", "o") if layer.fuse else ("k", "v")

    def bank_names(self) -> list[str]:
        return [f"bank_{p}.{layer.index}" for layer in self.layers for p in self.parts(layer)]

    def current_names(self) -> list[str]:
        return [f"cur_{p}.{layer.index}" for layer in self.layers for p in self.parts(layer)]

    def residual_names(self) -> list[str]:
        return residual_names(len(self.residuals)) if self.residuals else []

    def input_names(self) -> list[str]:
        return ["sample", "timestep", "encoder_hidden_states", "bank_valid", *self.bank_names(), *self.residual_names()]

    def output_names(self) -> list[str]:
        return ["noise_pred", *self.current_names()]

    def unet_specs(self, spec: EngineSpec, text: tuple[int, int]) -> list[TensorSpec]:
        """Every UNet tensor in I/O order; `text` = (tokens, dim) of the prompt embeddings."""
        B, (h, w), f = spec.unet_batch, spec.latent_hw, _float(spec)
        specs = [
            TensorSpec("sample", (B, 4, h, w), f, "input"),
            TensorSpec("timestep", (B,), "int64", "input"),
            TensorSpec("encoder_hidden_states", (B, *text), f, "input"),
            TensorSpec("bank_valid", (B, self.slots), f, "input"),
        ]
        for layer in self.layers:
            for p in self.parts(layer):
                specs.append(TensorSpec(f"bank_{p}.{layer.index}", self.bank_shape(layer, B), f, "bank", layer.name))
        specs += [TensorSpec(n, (B, *shape), f, "input") for n, shape in zip(self.residual_names(), self.residuals)]
        specs.append(TensorSpec("noise_pred", (B, 4, h, w), f, "output"))
        for layer in self.layers:
            for p in self.parts(layer):
                cur = (B, layer.tokens, layer.channels)  # [B, N, C]
                specs.append(TensorSpec(f"cur_{p}.{layer.index}", cur, f, "current", layer.name))
        return specs

    def controlnet_specs(self, spec: EngineSpec, text: tuple[int, int]) -> list[TensorSpec]:
        """One ControlNet's tensors (every ControlNet of a spec has these): the UNet's sample, timestep and prompt
        embeddings, the control image [B, 3, H, W] in [0, 1] and the scale [B] (one per UNet batch element, so
        each stream has its own; runtime state, 0 adds exactly nothing) -> the residuals, already scaled."""
        B, (h, w), f = spec.unet_batch, spec.latent_hw, _float(spec)
        return [
            TensorSpec("sample", (B, 4, h, w), f, "input"),
            TensorSpec("timestep", (B,), "int64", "input"),
            TensorSpec("encoder_hidden_states", (B, *text), f, "input"),
            TensorSpec("controlnet_cond", (B, 3, spec.height, spec.width), f, "input"),
            TensorSpec("conditioning_scale", (B,), f, "input"),
            *(TensorSpec(n, (B, *shape), f, "output") for n, shape in zip(self.residual_names(), self.residuals)),
        ]

    def network_specs(self, spec: EngineSpec, text: tuple[int, int]) -> dict[str, list[TensorSpec]]:
        """The I/O of the networks: UNet, VAEs, and one per ControlNet. The VAEs encode and decode one frame per
        stream: images [K, 3, H, W] in [-1, 1] <-> latents [K, 4, H/8, W/8], scaled for the UNet (K = max_streams)."""
        f, (h, w), K = _float(spec), spec.latent_hw, spec.max_streams
        images = TensorSpec("images", (K, 3, spec.height, spec.width), f, "input")
        latents = TensorSpec("latents", (K, 4, h, w), f, "input")
        controlnets = {controlnet_network(j): self.controlnet_specs(spec, text) for j in range(len(spec.controlnets))}
        return {
            "unet": self.unet_specs(spec, text),
            "vae_encoder": [images, _as_output(latents)],
            "vae_decoder": [latents, _as_output(images)],
            **controlnets,
        }


def _float(spec: EngineSpec) -> str:
    return "float16" if spec.precision.value == "fp16" else "float32"


def _as_output(t: TensorSpec) -> TensorSpec:
    return TensorSpec(t.name, t.shape, t.dtype, "output")


def _level_sizes(size: int, levels: int) -> list[int]:
    sizes = [size]
    for _ in range(levels - 1):
        sizes.append((sizes[-1] + 1) // 2)  # stride-2 conv with padding 1
    return sizes


def bank_layout(unet, spec: EngineSpec) -> BankLayout:
    """The bank layout of a diffusers UNet2DConditionModel at `spec`'s size: one layer per attn1, in module order.

    Reads only the module structure, so a UNet on the meta device (no weights) gives the same layout."""
    n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
    latent_h, latent_w = spec.latent_hw
    hs, ws = _level_sizes(latent_h, n_down), _level_sizes(latent_w, n_down)
    layers = []
    for name, module in unet.named_modules():
        if not name.endswith(".attn1"):
            continue
        block, idx = name.split(".")[0], name.split(".")[1]
        if block == "down_blocks":
            level = int(idx)
        elif block == "mid_block":
            level = n_down - 1
        elif block == "up_blocks":
            level = n_up - 1 - int(idx)
        else:
            raise ValueError(f"unexpected self-attention layer {name}: not in down_blocks, mid_block or up_blocks")
        layers.append(BankLayer(len(layers), name, hs[level] * ws[level], module.to_k.out_features, spec.fuses(name)))
    if not layers:
        raise ValueError("the UNet has no self-attention (attn1) layers: StreamV2V needs transformer blocks")
    residuals = tuple(_residual_shapes(unet, hs, ws)) if spec.controlnets else ()
    return BankLayout(tuple(layers), spec.bank, spec.bank_slots, residuals)


def _residual_shapes(unet, hs: list[int], ws: list[int]) -> list[tuple[int, int, int]]:
    """(C, h, w) of every residual a ControlNet adds, in the order of the UNet's skip connections: conv_in's output,
    each down block's resnet outputs and its downsampler's, then the mid block's output (what diffusers'
    `down_block_additional_residuals` / `mid_block_additional_residual` must match)."""
    shapes = [(unet.conv_in.out_channels, hs[0], ws[0])]
    for level, block in enumerate(unet.down_blocks):
        shapes += [(resnet.out_channels, hs[level], ws[level]) for resnet in block.resnets]
        for down in block.downsamplers or ():
            shapes.append((down.out_channels, hs[level + 1], ws[level + 1]))
    return [*shapes, (unet.mid_block.resnets[-1].out_channels, hs[-1], ws[-1])]
