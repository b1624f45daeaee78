"""Which self-attention layers carry a bank, their token counts and channels, and the engine tensor names."""

from __future__ import annotations

from dataclasses import dataclass

from .config import BankConfig, BankKind


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
    role: str  # "input", "bank", "output", "current"
    layer: str | None = None


@dataclass(frozen=True)
class BankLayout:
    """The fixed-size bank of one UNet at one latent resolution (DESIGN.md §4)."""

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

    def tensor_specs(self, batch: int, latent_hw: tuple[int, int], text_len: int, text_dim: int) -> list[TensorSpec]:
        h, w = latent_hw
        specs = [
            TensorSpec("sample", (batch, 4, h, w), "input"),
            TensorSpec("timestep", (batch,), "input"),
            TensorSpec("encoder_hidden_states", (batch, text_len, text_dim), "input"),
            TensorSpec("bank_valid", (self.slots,), "input"),
        ]
        for layer in self.layers:
            for p in self.parts(layer):
                specs.append(TensorSpec(f"bank_{p}.{layer.index}", self.bank_shape(layer, batch), "bank", layer.name))
        specs.append(TensorSpec("noise_pred", (batch, 4, h, w), "output"))
        for layer in self.layers:
            for p in self.parts(layer):
                cur = (batch, layer.tokens, layer.channels)
                specs.append(TensorSpec(f"cur_{p}.{layer.index}", cur, "current", layer.name))
        return specs


def _level_sizes(size: int, levels: int) -> list[int]:
    sizes = [size]
    for _ in range(levels - 1):
        sizes.append((sizes[-1] + 1) // 2)  # stride-2 conv with padding 1
    return sizes


def bank_layout(unet, cfg: BankConfig, latent_hw: tuple[int, int]) -> BankLayout:
    """The bank layout of a diffusers UNet2DConditionModel: one layer per attn1, in module order."""
    n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
    hs, ws = _level_sizes(latent_hw[0], n_down), _level_sizes(latent_hw[1], n_down)
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
        layers.append(BankLayer(len(layers), name, hs[level] * ws[level], module.to_k.out_features, cfg.fuses(name)))
    if not layers:
        raise ValueError("the UNet has no self-attention (attn1) layers: StreamV2V needs transformer blocks")
    return BankLayout(tuple(layers), cfg.kind, cfg.slots)
