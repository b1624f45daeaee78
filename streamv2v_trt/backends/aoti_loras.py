"""LoRAs as runtime state of an AOTInductor build folder with swappable weights (docs/FEATURES.md, "LoRA").

The package keeps the UNet's weights as constants named like the exported `BankUNet`'s parameters
(`unet.<diffusers name>.weight`). The base weights come from the model on the CPU, in the folder's precision, as the
eager loader reads them; `LoraWeights` (models/lora_weights.py) keeps the base of each touched layer and computes
base + deltas in that CPU model, with the eager path's checks and arithmetic; then the touched UNet weights are
written into the package in one call between two frames (`AotiRunner.load_weights`, every name checked first). A
folder built for several frame sizes has a UNet package per size: one CPU base copy, written into every one of
them, so a swap reaches every size at once.
The text encoder runs in PyTorch and is swapped in place, as on the eager backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from ..manifest import EngineMismatch
from ..models.lora_weights import LoraWeights
from ..spec import LoraSpec
from .aoti import REBUILD, AotiRunner

PREFIX = "unet."  # BankUNet.unet: the diffusers UNet inside the exported module


def _weight_names(unet: nn.Module) -> dict[nn.Module, str]:
    """Each Linear / Conv2d of the UNet -> the package constant that holds its weight."""
    return {m: f"{PREFIX}{n}.weight" for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


class PackageLoraWeights(LoraWeights):
    """`LoraWeights` over a CPU copy of the UNet whose touched weights are then written into the packages.

    `unet` names the weights (its structure is enough: the meta-device skeleton the folder's layout comes from);
    `load` gives the UNet with its real weights, the base of every swap, and is called on the first `set`, so a
    folder that never gets a LoRA never holds a CPU copy of the UNet. Without `load`, `unet` is that copy.
    `runners`: the UNet package of every frame size the folder was built for (one for a single-size folder)."""

    def __init__(
        self, unet: nn.Module, text_encoder: nn.Module, runners: Sequence[AotiRunner],
        load: Callable[[], nn.Module] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(unet, text_encoder)
        self.runners, self._load = tuple(runners), load
        if not self.runners:
            raise ValueError("PackageLoraWeights needs the UNet package of at least one frame size")
        for runner in self.runners:
            names = runner.constant_names
            missing = sorted(n for n in _weight_names(unet).values() if n not in names)
            if missing:
                raise EngineMismatch(
                    f"{runner.path.name}: the UNet's weights are not replaceable in this package (no constants "
                    f"{missing[:3]}{' ...' if len(missing) > 3 else ''}: compiled with freezing?); rebuild it with "
                    f"{REBUILD} --weights swappable"
                )
        self._names = _weight_names(unet) if load is None else {}

    def set(self, loras: Sequence[LoraSpec]) -> int:
        """Base + `loras` in the CPU UNet (checked and computed as on eager), then into every size's package."""
        if self._load is not None:  # the first LoRA set: the base weights, on the CPU
            self.unet, self._load = self._load(), None
            self._names = _weight_names(self.unet)
        previous = self.loras
        layers = super().set(loras)
        written = []
        try:
            for runner in self.runners:
                runner.load_weights(self._touched())
                written.append(runner)
        except BaseException:
            super().set(previous)  # the CPU copy back to what the packages held before
            for runner in written:  # and the packages already written, so every size holds one weight set
                runner.load_weights(self._touched())
            raise
        return layers

    def _touched(self) -> dict[str, object]:
        """Package constant name -> the CPU UNet's current value, for every weight a LoRA set has touched."""
        return {self._names[m]: m.weight for m in self._base if m in self._names}
