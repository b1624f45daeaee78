"""FeatureBank: the fixed-size per-layer bank tensors, and their update (DyMe merge or FIFO) between UNet calls."""

from __future__ import annotations

import torch

from kernels.dyme import dyme_merge

from .config import BankConfig, BankKind
from .layout import BankLayout


class FeatureBank:
    """Preallocated [B, S*N, C] tensors per layer and part, named as the engine inputs (`bank_k.3`, ...).

    Every batch element (denoising step of the stream batch) has its own bank. Sizes never change; an
    update writes in place. The validity vector `bank_valid` [S] tells the UNet which slots hold a frame.
    """

    def __init__(
        self, layout: BankLayout, cfg: BankConfig, batch: int, device: torch.device | str, dtype: torch.dtype
    ) -> None:
        if layout.kind is not cfg.kind or layout.slots != cfg.slots:
            raise ValueError(
                f"bank layout is {layout.kind.value} x{layout.slots}, config asks {cfg.kind.value} x{cfg.slots}"
            )
        self.layout, self.cfg, self.batch = layout, cfg, batch
        self.tensors = {
            f"bank_{p}.{layer.index}": torch.zeros(layout.bank_shape(layer, batch), device=device, dtype=dtype)
            for layer in layout.layers
            for p in layout.parts(layer)
        }
        self.valid = torch.zeros(cfg.slots, device=device, dtype=dtype)  # [S]
        self.stored = 0  # frames stored since reset (host counter; the pipeline decides when to store)
        # DyMe randomness: seeded permutations drawn once, indexed on the device so a merge needs no host.
        gen = torch.Generator().manual_seed(cfg.seed)
        self.perms = (
            {
                layer.index: torch.rand(cfg.perm_pool, batch, 2 * layer.tokens, generator=gen).argsort(-1).to(device)
                for layer in layout.layers
            }
            if cfg.kind is BankKind.DYME
            else {}
        )
        self.perm_index = torch.zeros(1, dtype=torch.long, device=device)

    def inputs(self) -> dict[str, torch.Tensor]:
        return {"bank_valid": self.valid, **self.tensors}

    def update(self, current: dict[str, torch.Tensor]) -> None:
        """Store one frame's current k/v/o (`cur_k.3`, ...) into the bank."""
        if self.cfg.kind is BankKind.FIFO or self.stored == 0:
            slot = self.stored % self.cfg.slots  # a ring: attention and fusion do not depend on slot order
            for layer in self.layout.layers:
                n = layer.tokens
                for p in self.layout.parts(layer):
                    self.tensors[f"bank_{p}.{layer.index}"][:, slot * n : (slot + 1) * n].copy_(
                        current[f"cur_{p}.{layer.index}"]
                    )
            self.valid[slot] = 1
        else:
            for layer in self.layout.layers:
                names = [f"{{}}_{p}.{layer.index}" for p in self.layout.parts(layer)]
                bank = [self.tensors[n.format("bank")] for n in names]
                merged = dyme_merge(
                    bank, [current[n.format("cur")] for n in names], self.perms[layer.index][self.perm_index][0]
                )
                for b, m in zip(bank, merged):
                    b.copy_(m)
            self.perm_index.add_(1).remainder_(self.cfg.perm_pool)
        self.stored += 1

    def reset(self) -> None:
        for t in self.tensors.values():
            t.zero_()  # masked slots must hold finite values: 0 * NaN would still be NaN in the softmax
        self.valid.zero_()
        self.perm_index.zero_()
        self.stored = 0
