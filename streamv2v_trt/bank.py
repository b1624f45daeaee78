"""FeatureBank: the fixed-size per-layer bank tensors, and their update (DyMe merge or FIFO store) between UNet calls.

The bank decides its own updates: `plan(frame_id)` says what the frame's update is (nothing, a store into a slot,
or a DyMe merge), `apply(op, current)` does the device work and nothing else, `advance(op)` moves the host
counter. A CUDA graph captures `apply` once per kind of op and replays it; the stream calls `advance` after
every frame, replayed or not, so no wrapper ever edits the bank's counters.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .config import BankConfig
from .kernels.dyme import dyme_merge
from .layout import BankLayout
from .spec import BankKind


class BankOp(NamedTuple):
    """One frame's bank update, decided on the host before any device work."""

    kind: str  # "none", "store" (copy the current frame into `slot`) or "merge" (DyMe)
    slot: int = 0


NO_UPDATE = BankOp("none")


class FeatureBank:
    """Preallocated [B, S*N, C] tensors per layer and part, named as the engine inputs (`bank_k.3`, ...).

    Every batch element (denoising step of the stream batch) has its own bank. Sizes never change; an
    update writes in place. The validity `bank_valid` [B, S] tells the UNet which slots hold a frame, per batch
    element, so streams batched together (each with its own rows) can be at different points.
    """

    def __init__(
        self,
        layout: BankLayout,
        cfg: BankConfig,
        batch: int,
        device: torch.device | str,
        dtype: torch.dtype,
        *,
        views: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """`views`: the bank tensors and `bank_valid` to use, e.g. this stream's rows of a batch shared with other
        streams (MultiStream); by default the bank allocates its own."""
        self.layout, self.cfg, self.batch = layout, cfg, batch
        shapes = {"bank_valid": (batch, layout.slots)} | {  # [B, S], and [B, S*N, C] per layer and part
            f"bank_{p}.{layer.index}": layout.bank_shape(layer, batch)
            for layer in layout.layers
            for p in layout.parts(layer)
        }
        if views is None:
            views = {name: torch.zeros(shape, device=device, dtype=dtype) for name, shape in shapes.items()}
        wrong = [n for n, shape in shapes.items() if n not in views or tuple(views[n].shape) != shape]
        if wrong:
            raise ValueError(f"bank views {wrong} are missing or not of the layout's shapes")
        self.tensors = {n: views[n] for n in shapes if n != "bank_valid"}
        self.valid = views["bank_valid"]
        self.stored = 0  # frames stored since reset (host counter, moved by `advance`)
        # DyMe randomness: seeded permutations drawn once, indexed on the device so a merge needs no host.
        gen = torch.Generator().manual_seed(cfg.seed)
        self.perms = (
            {
                layer.index: torch.rand(cfg.perm_pool, batch, 2 * layer.tokens, generator=gen).argsort(-1).to(device)
                for layer in layout.layers
            }
            if layout.kind is BankKind.DYME
            else {}
        )
        self.perm_index = torch.zeros(1, dtype=torch.long, device=device)

    def inputs(self) -> dict[str, torch.Tensor]:
        return {"bank_valid": self.valid, **self.tensors}

    def plan(self, frame_id: int) -> BankOp:
        """The update after UNet call `frame_id`: every `interval` calls a FIFO bank stores into its next ring
        slot (order does not matter to attention or fusion); a DyMe bank stores its first frame, then merges."""
        if frame_id % self.cfg.interval:
            return NO_UPDATE
        if self.layout.kind is BankKind.FIFO or self.stored == 0:
            return BankOp("store", self.stored % self.layout.slots)
        return BankOp("merge")

    def apply(self, op: BankOp, current: dict[str, torch.Tensor]) -> None:
        """Device work only: store or merge one frame's current k/v/o (`cur_k.3`, ...) into the bank.

        No host value is written into a device buffer (a plain `valid[:, slot] = 1` would copy a host scalar,
        which a CUDA graph cannot capture): everything here is a kernel with its arguments fixed at capture."""
        if op.kind == "store":
            s = op.slot
            for layer in self.layout.layers:
                n = layer.tokens
                for p in self.layout.parts(layer):
                    self.tensors[f"bank_{p}.{layer.index}"][:, s * n : (s + 1) * n].copy_(
                        current[f"cur_{p}.{layer.index}"]
                    )
            self.valid[:, s : s + 1].fill_(1)
        elif op.kind == "merge":
            for layer in self.layout.layers:
                names = [f"{{}}_{p}.{layer.index}" for p in self.layout.parts(layer)]
                bank = [self.tensors[n.format("bank")] for n in names]
                perm = self.perms[layer.index][self.perm_index][0]  # [B, 2N], picked on the device
                for b, m in zip(bank, dyme_merge(bank, [current[n.format("cur")] for n in names], perm)):
                    b.copy_(m)
            self.perm_index.add_(1).remainder_(self.cfg.perm_pool)

    def advance(self, op: BankOp) -> None:
        """Host bookkeeping after a frame ran `op` (eagerly or replayed)."""
        if op.kind != "none":
            self.stored += 1

    def update(self, frame_id: int, current: dict[str, torch.Tensor]) -> BankOp:
        """plan + apply + advance, for callers that run frames eagerly."""
        op = self.plan(frame_id)
        self.apply(op, current)
        self.advance(op)
        return op

    def reset(self) -> None:
        for t in self.tensors.values():
            t.zero_()  # masked slots must hold finite values: 0 * NaN would still be NaN in the softmax
        self.valid.zero_()
        self.perm_index.zero_()
        self.stored = 0
