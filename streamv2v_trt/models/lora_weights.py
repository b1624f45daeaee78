"""LoRAs as runtime state of the PyTorch weights: `LoraWeights.set(loras)` swaps the LoRA set between two frames.

The base value of every weight a LoRA has touched is kept once (a copy taken the first time it is touched, on the
weights' device); a set writes base + the LoRAs' deltas (`lora.add_deltas`, the arithmetic of a fuse at load, so
a swap gives the very weights a stream opened with those LoRAs has), and a weight no LoRA of the set touches gets
its base back, bit for bit. The files are read and checked, then the new weights computed beside the running
ones, then written: an error at any of those steps leaves the weights as they were.

Weights are written in place (`param.copy_`), never rebound: a CUDA graph captured over the networks and a
torch.compile'd forward read the parameters' storage at the addresses they had at capture / compile time, so
in-place writes are seen by the next replay, while a new tensor (`param.data = ...`, `load_state_dict(assign=)`)
would leave them reading the old weights. The copies run on the caller's CUDA stream between two frames;
`CudaGraphStream` orders its frames after the work queued there, so no frame reads half-written weights.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from ..spec import LoraSpec
from .lora import LoraFuse, add_deltas, plan_loras

log = logging.getLogger(__name__)


class LoraWeights:
    """The LoRA set of one UNet and its text encoder, swappable at runtime (eager backend)."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module) -> None:
        self.unet, self.text_encoder = unet, text_encoder
        self.loras: tuple[LoraSpec, ...] = ()  # the set the weights hold now
        self._base: dict[nn.Module, torch.Tensor] = {}  # module -> its weight before any LoRA (only those touched)

    @property
    def base_bytes(self) -> int:
        """Memory held by the base copies."""
        return sum(t.numel() * t.element_size() for t in self._base.values())

    def set(self, loras: Sequence[LoraSpec]) -> int:
        """Make the weights base + `loras` (in order; () restores the base). Returns the layers with a LoRA.

        Every file is read and every key matched and shape-checked first (`plan_loras`): a bad file raises
        `LoraError` or `FileNotFoundError` with the weights unchanged.
        """
        loras = tuple(loras)
        plan = plan_loras(self.unet, loras, self.text_encoder)
        by_module: dict[nn.Module, list[LoraFuse]] = {}
        for fuse in plan:  # per module, in the plan's order: the order a fuse adds them in
            by_module.setdefault(fuse.module, []).append(fuse)
        with torch.no_grad():
            for module in by_module:
                if module not in self._base:  # first touch: keep the base (contiguous, on the weights' device)
                    self._base[module] = module.weight.detach().clone(memory_format=torch.contiguous_format)
            # Prepared beside the running weights, then written: a failure while computing (out of memory) leaves
            # them as they were. Costs, during the swap, one more copy of the weights the set touches.
            new = {}
            for module, fuses in by_module.items():
                new[module] = self._base[module].clone()
                add_deltas(new[module], fuses)
            for module, base in self._base.items():  # a weight no LoRA of this set touches: its base, bit for bit
                module.weight.copy_(new.get(module, base))  # in place: graphs and compiled forwards keep this storage
        self.loras = loras
        log.info("LoRA set: %s (%d layers)", ", ".join(s.cli_arg() for s in loras) or "none", len(plan))
        return len(plan)
