"""`set_loras`: a stream's LoRA set as runtime state (docs/FEATURES.md, "LoRA"), shared by `StreamV2V` and
`MultiStream`.

On the eager backend the weights are swapped in place (`models/lora_weights.py`); on a build folder built with
swappable weights, the AOTInductor package's constants are rewritten (`backends/aoti_loras.py`), and the ONNX
initializers get new values: a new ONNX Runtime session or a TensorRT refit (`backends/onnx_loras.py`); on a folder
built with frozen weights the UNet's weights are compiled into its files, so another set is refused with the
command that builds it.
"""

from __future__ import annotations

from collections.abc import Iterable
from os import PathLike
from typing import TYPE_CHECKING

from .manifest import EngineMismatch
from .spec import LoraSpec

if TYPE_CHECKING:
    from .backends import Backend
    from .config import StreamConfig

# An AOTInductor folder with frozen weights: the two builds that serve another LoRA set (docs/BUILD.md).
AOTI_HINT = (
    ". AOTInductor: add --weights frozen to that command to compile the LoRAs in, or build with --weights swappable "
    "and no --lora: that folder swaps LoRAs at runtime"
)
# Any other folder with frozen weights: the build that swaps LoRAs.
SWAPPABLE_HINT = (
    ". Or build with --weights swappable and no --lora: that folder swaps LoRAs at runtime (ONNX Runtime: a new "
    "session; TensorRT: a refit)"
)
LoraSet = Iterable[LoraSpec | tuple[str | PathLike | LoraSpec, float]]


def lora_specs(loras: LoraSet) -> tuple[LoraSpec, ...]:
    """[(file or LoraSpec, scale), ...] (or LoraSpecs) -> LoraSpecs, in order."""
    if isinstance(loras, (str, PathLike, LoraSpec)):
        raise TypeError("loras is a list of (file, scale) pairs: set_loras([(path, 0.8)]), or [] for none")
    specs = []
    for item in loras:
        if isinstance(item, LoraSpec):
            specs.append(item)
            continue
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError(f"a LoRA is a (file, scale) pair or a LoraSpec, got {item!r}")
        path, scale = item
        specs.append(LoraSpec(path.path if isinstance(path, LoraSpec) else path, scale))
    return tuple(specs)


def swap_loras(backend: Backend, cfg: StreamConfig, loras: tuple[LoraSpec, ...]) -> StreamConfig:
    """Write base + `loras` into `backend`'s weights; returns `cfg` with that LoRA set. Nothing changes when a file
    is missing or malformed (`LoraError`, `FileNotFoundError`) or the backend runs compiled files (`EngineMismatch`).
    """
    if backend.lora_weights is None:
        asked = cfg.with_spec(loras=loras).spec
        rebuild = asked.rebuild_command(backend.name, built=backend.builder)
        built = ", ".join(lora.cli_arg() for lora in cfg.spec.loras) or "no LoRA"
        raise EngineMismatch(
            f"the {backend.name.value} backend runs a build folder whose UNet weights are compiled into its files "
            f"(built with {built}): another LoRA set needs a rebuild: {rebuild}; name the LoRAs when opening it "
            "(Source(engines=..., loras=[LoraSpec(path, scale), ...])), or run the eager backend, which swaps LoRAs "
            f"at runtime{AOTI_HINT if backend.name == 'aoti' else SWAPPABLE_HINT}"
        )
    if backend.lora_weights.loras != loras:  # the same set already held (another stream on these networks set it)
        backend.lora_weights.set(loras)
    return cfg.with_spec(loras=loras)
