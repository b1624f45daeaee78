"""LoRAs as runtime state of an ONNX Runtime or TensorRT build folder with swappable weights (docs/FEATURES.md,
"LoRA"): the UNet's ONNX initializers get new values.

As on AOTInductor (backends/aoti_loras.py), the base weights come from the model loaded on the CPU with the first
LoRA set, in the folder's precision, and `LoraWeights` computes base + deltas in that CPU model with the eager
path's checks and arithmetic. The touched weights then go to every UNet runner of the folder (one per frame size),
each through the map of its own ONNX file (`onnx_weights.weight_map`: which initializers hold a module's weight, and
transposed or not):
  - ONNX Runtime: a new session with those initializers overridden, made beside the running one, swapped in
    between two frames (`OnnxRunner.prepare_weights`);
  - TensorRT / TensorRT-RTX: a refitter's named weights, then `refit_cuda_engine` between two frames
    (`TrtRunner.prepare_weights`; engines built with the REFIT flag).
Every runner is prepared before any is swapped, so an error leaves all of them, and the CPU copy, as they were.
The text encoder runs in PyTorch and is swapped in place, as on the eager backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..manifest import EngineMismatch
from ..models.lora_weights import LoraWeights
from ..spec import LoraSpec
from .onnx_weights import WeightMap, read_initializers, weight_map


class WeightRunner(Protocol):
    path: Path

    def prepare_weights(
        self, values: dict[str, torch.Tensor], base: Callable[[list[str]], dict[str, torch.Tensor]] | None = None
    ) -> Callable[[], None]: ...


class InitializerLoraWeights(LoraWeights):
    """`LoraWeights` over a CPU copy of the UNet, whose touched weights are then written into every UNet runner.

    runners: the folder's UNet runners, one per frame size; onnx: the ONNX file each was made from (the ORT runner's
    own file, the TensorRT engine's source). `unet` names the weights (the meta-device skeleton is enough); `load`
    gives the UNet with its real weights and is called with the first `set`. `rebuild(loras)`: the command that builds
    the folder with those LoRAs fused (`EngineSpec.rebuild_command`), for a refusal."""

    def __init__(
        self, unet: nn.Module, text_encoder: nn.Module, runners: Sequence[WeightRunner], onnx: Sequence[Path],
        load: Callable[[], nn.Module], rebuild: Callable[[tuple[LoraSpec, ...]], str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(unet, text_encoder)
        if len(runners) != len(onnx) or not runners:
            raise ValueError(f"one ONNX file per UNet runner: {len(runners)} runners, {len(onnx)} files")
        # A dynamic-shape folder's sizes share one session or engine (the runner's `owner`): written once.
        targets: dict[int, tuple[WeightRunner, Path]] = {}
        for runner, path in zip(runners, onnx):
            targets.setdefault(id(getattr(runner, "owner", runner)), (runner, path))
        self.runners, self.onnx = [r for r, _ in targets.values()], [path for _, path in targets.values()]
        self._load, self.rebuild = load, rebuild
        self.maps: list[WeightMap] = []  # per runner, built with the first set (it needs the base weights)
        self._names: dict[nn.Module, str] = {}

    def set(self, loras: Sequence[LoraSpec]) -> int:
        """Base + `loras` in the CPU UNet (checked and computed as on eager), then into every runner at once."""
        if self._load is not None:  # the first LoRA set: the base weights, on the CPU, and the name maps
            unet = self._load()
            self.maps = [weight_map(path, unet) for path in self.onnx]
            self.unet, self._load = unet, None
            self._names = {m: n for n, m in unet.named_modules()}
        previous, known = self.loras, set(self._base)
        layers = super().set(loras)
        try:
            weights = {self._names[m]: m.weight for m in self._base if m in self._names}  # the text encoder's: not
            swaps = [self._prepare(runner, path, wmap, weights, loras) for runner, path, wmap in self._targets()]
        except BaseException:
            super().set(previous)  # the CPU copy back to what the runners still hold
            for module in set(self._base) - known:  # never written: a later set need not write (nor map) it
                del self._base[module]
            raise
        for swap in swaps:  # nothing left to fail but a refit (TensorRT), which says so
            swap()
        return layers

    def _targets(self):
        return zip(self.runners, self.onnx, self.maps)

    def _prepare(
        self, runner: WeightRunner, path: Path, wmap: WeightMap, weights: dict[str, torch.Tensor], loras: Sequence
    ) -> Callable[[], None]:
        unmapped = wmap.unmapped(weights)
        if unmapped:
            shown = "; ".join(f"{m}: {why}" for m, why in list(unmapped.items())[:3])
            more = f" (and {len(unmapped) - 3} more)" if len(unmapped) > 3 else ""
            raise EngineMismatch(
                f"{path.name}: the LoRAs change UNet weights this file cannot take new values for ({shown}{more}); "
                "build a folder with these LoRAs fused: "
                f"{self.rebuild(tuple(loras)) if self.rebuild else 'python -m build_engines --lora FILE:SCALE'}, or "
                "run the eager backend"
            )
        return runner.prepare_weights(wmap.values(weights), partial(read_initializers, path))
