"""StreamV2V attention processors: extended self-attention (EA) and feature fusion (FF), stateless.

Each `attn1` gets a `BankSelfAttnProcessor` that reads its layer's bank from the per-call `BankIO` and
records its current k, v (and o before fusion) there. Nothing persists between calls: the bank lives in
`FeatureBank` (eager) or in device buffers (engines), and this file is what the ONNX export traces.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from .kernels.dyme import COSINE_EPS  # one fp16-safe epsilon for every cosine similarity (FF here, DyMe there)
from .layout import BankLayer
from .spec import BankKind


def cosine_normalize(x: torch.Tensor) -> torch.Tensor:
    # F.normalize's default eps (1e-12) underflows to 0 in fp16 engines.
    return x / x.norm(dim=-1, keepdim=True).clamp_min(COSINE_EPS)


def feature_fusion(
    o: torch.Tensor, bank_o: torch.Tensor, bank_valid_tokens: torch.Tensor, threshold: float, strength: float
) -> torch.Tensor:
    """Blend each token of `o` with its most cosine-similar valid bank token, where similarity >= threshold.

    o: [B, N, C]; bank_o: [B, M, C]; bank_valid_tokens: [B, M] bool (empty FIFO slots and an empty bank are
    invalid).
    """
    sim = cosine_normalize(o) @ cosine_normalize(bank_o).transpose(1, 2)  # [B, N, M]
    sim = sim.masked_fill(~bank_valid_tokens.unsqueeze(1), -2.0)  # below any cosine: never chosen nor fused
    best, idx = sim.max(dim=-1)  # [B, N]
    nearest = torch.gather(bank_o, 1, idx.unsqueeze(-1).expand(-1, -1, o.shape[-1]))  # [B, N, C]
    fused = (1.0 - strength) * o + strength * nearest
    return torch.where((best >= threshold).unsqueeze(-1), fused, o)


class BankIO:
    """What one UNet call hands the processors: bank tensors per layer in, current k/v/o per layer out."""

    def __init__(self, kind: BankKind, bank_valid: torch.Tensor, banks: Sequence[tuple[torch.Tensor, ...]]) -> None:
        self.kind = kind
        self.bank_valid = bank_valid  # [B, S] slot validity (1/0) per batch element, S = bank frames
        self.banks = banks  # per layer: (K, V) or (K, V, O), each [B, S*N, C]
        self.current: dict[int, tuple[torch.Tensor, ...]] = {}

    def valid_tokens(self, tokens_per_slot: int) -> torch.Tensor:
        """[B, S*N] bool: which bank tokens hold a stored frame, per batch element."""
        return (self.bank_valid > 0).repeat_interleave(tokens_per_slot, dim=1)

    def record(self, layer: int, *tensors: torch.Tensor) -> None:
        self.current[layer] = tensors

    def outputs(self, n_layers: int) -> list[torch.Tensor]:
        missing = [i for i in range(n_layers) if i not in self.current]
        if missing:
            raise RuntimeError(f"bank layers {missing} did not run: the UNet's processors are not the installed ones")
        return [t for i in range(n_layers) for t in self.current[i]]


class BankSelfAttnProcessor:
    """attn1 with EA over [k ; K_bank] and, on fusion layers, FF of the projected output."""

    def __init__(self, layer: BankLayer, kind: BankKind, ff_threshold: float, ff_strength: float) -> None:
        self.layer = layer
        self.kind = kind
        self.ff_threshold = ff_threshold
        self.ff_strength = ff_strength

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,  # noqa: ARG002 (diffusers' processor signature)
        attention_mask: torch.Tensor | None = None,  # noqa: ARG002
        temb: torch.Tensor | None = None,  # noqa: ARG002
        bank_io: BankIO | None = None,
    ) -> torch.Tensor:
        if bank_io is None:
            raise ValueError(f"{self.layer.name}: call the UNet through BankUNet, which passes the layer banks")
        bank = bank_io.banks[self.layer.index]
        B, N, _ = hidden_states.shape  # [B, N, C]
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)

        valid_tokens = bank_io.valid_tokens(N)  # [B, S*N]
        if self.kind is BankKind.DYME:
            # An empty bank attends over [k ; k], which equals plain attention over k; no mask keeps the
            # flash-attention path for every steady frame.
            has_bank = (bank_io.bank_valid > 0).view(B, 1, 1)  # S = 1
            keys = torch.cat([k, torch.where(has_bank, bank[0], k)], dim=1)  # [B, 2N, C]
            values = torch.cat([v, torch.where(has_bank, bank[1], v)], dim=1)
            mask = None
        else:
            # FIFO slots not yet filled are masked out; copies in them would change the softmax weights.
            keys = torch.cat([k, bank[0]], dim=1)  # [B, N + S*N, C]
            values = torch.cat([v, bank[1]], dim=1)
            mask = torch.cat([valid_tokens.new_ones(B, N), valid_tokens], dim=1).view(B, 1, 1, -1)

        heads = attn.heads
        d = k.shape[-1] // heads
        qh = q.view(B, -1, heads, d).transpose(1, 2)  # [B, h, N, d]
        kh = keys.view(B, -1, heads, d).transpose(1, 2)  # [B, h, N + M, d]
        vh = values.view(B, -1, heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=attn.scale)
        out = out.transpose(1, 2).reshape(B, -1, heads * d)  # [B, N, C]
        out = attn.to_out[1](attn.to_out[0](out))

        if self.layer.fuse:
            bank_io.record(self.layer.index, k, v, out)  # o before fusion feeds the bank
            out = feature_fusion(out, bank[2], valid_tokens, self.ff_threshold, self.ff_strength)
        else:
            bank_io.record(self.layer.index, k, v)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class CrossAttnProcessor(AttnProcessor2_0):
    """attn2, unchanged; accepts (and ignores) the bank carrier that the UNet passes every attention."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        bank_io: BankIO | None = None,  # noqa: ARG002 (the bank carrier reaches every attention; attn2 ignores it)
    ) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
