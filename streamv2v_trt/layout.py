"""Which self-attention layers carry a bank, their token counts and channels, and every network's tensors.

`BankLayout` is the engine I/O contract (docs/DESIGN.md, "Engine I/O"): names, shapes and dtypes of the UNet's
inputs and outputs, and of the VAE encoder's and decoder's. The export, the manifest check and every runner
compare against `network_specs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import BankKind, EngineSpec

NETWORKS = ("unet", "vae_encoder", "vae_decoder")

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

    def bank_shape(self, layer: BankLayer, batch: int) -> tuple[int, int, int]:
        return (batch, self.slots * layer.tokens, layer.channels)  # [B, S*N, C]

    @staticmethod
    def parts(layer: BankLayer) -> tuple[str, ...]:
        return ("k", "v", "o") if layer.fuse else ("k", "v")

    def bank_names(self) -> list[str]:
        return [f"bank_{p}.{layer.index}" for layer in self.layers for p in self.parts(layer)]

    def current_names(self) -> list[str]:
        return [f"cur_{p}.{layer.index}" for layer in self.layers for p in self.parts(layer)]

    def input_names(self) -> list[str]:
        return ["sample", "timestep", "encoder_hidden_states", "bank_valid", *self.bank_names()]

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
        specs.append(TensorSpec("noise_pred", (B, 4, h, w), f, "output"))
        for layer in self.layers:
            for p in self.parts(layer):
                cur = (B, layer.tokens, layer.channels)  # [B, N, C]
                specs.append(TensorSpec(f"cur_{p}.{layer.index}", cur, f, "current", layer.name))
        return specs

    def network_specs(self, spec: EngineSpec, text: tuple[int, int]) -> dict[str, list[TensorSpec]]:
        """The I/O of the three networks. The VAEs encode and decode one frame per stream: images [K, 3, H, W] in
        [-1, 1] <-> latents [K, 4, H/8, W/8], scaled for the UNet (K = max_streams)."""
        f, (h, w), K = _float(spec), spec.latent_hw, spec.max_streams
        images = TensorSpec("images", (K, 3, spec.height, spec.width), f, "input")
        latents = TensorSpec("latents", (K, 4, h, w), f, "input")
        return {
            "unet": self.unet_specs(spec, text),
            "vae_encoder": [images, _as_output(latents)],
            "vae_decoder": [latents, _as_output(images)],
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
    return BankLayout(tuple(layers), spec.bank, spec.bank_slots)
