"""Backends made of compiled networks with named I/O (onnxruntime, tensorrt, aoti): the UNet, the VAE encoder and
decoder, and one network per ControlNet of the spec.

Each network is a runner with `path`, `input_specs` and `output_specs` (name -> (shape, torch dtype), as the
compiled file itself reports them) and `run(inputs) -> outputs` by name. The build folder opener
(`build_folder.py`) checks those specs against the manifest and the layout before a runner is used.

The pipeline hands the same buffers every frame (latents, prompt, bank), so a runner that binds addresses
(onnxruntime, tensorrt) binds an input once and rebinds only when its pointer changes (`InputBinder`). A tensor
of another dtype or device (say fp32 latents into an fp16 engine) is copied into a staging buffer allocated
on the first call.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import torch

from ..frame_sizes import size_text
from ..layout import BankLayout, controlnet_network
from ..spec import EngineSpec, show_sizes

log = logging.getLogger(__name__)

Spec = tuple[tuple[int, ...], torch.dtype]  # (shape, dtype) of one network tensor


class NetworkRunner(Protocol):
    path: Path
    input_specs: dict[str, Spec]
    output_specs: dict[str, Spec]

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


def resolve_shape(where: str, name: str, shape, given: tuple[int, ...] | None) -> tuple[int, ...]:
    """A tensor's shape: the file's own, with its symbolic dimensions (str or None in ONNX Runtime's and TensorRT's
    reports, or -1) taken from `given` (a dynamic-shape build's shapes at one size)."""
    shape = [d if isinstance(d, int) and d >= 0 else None for d in shape]
    if given is None:
        if None in shape:
            raise ValueError(
                f"{where}: tensor {name} has dynamic shape {shape} and no size was given for it: open the build "
                "folder it is in (StreamV2V.from_engines), whose manifest (--shapes dynamic) lists every size's shapes"
            )
        return tuple(shape)
    if len(given) != len(shape) or any(d is not None and d != g for d, g in zip(shape, given)):
        raise ValueError(f"{where}: tensor {name} has shape {shape}, the size asks {list(given)}")
    return tuple(given)


class InputBinder:
    def __init__(
        self, where: str, specs: dict[str, Spec], device: torch.device, bind: Callable[[str, torch.Tensor], None]
    ) -> None:
        self.where, self.specs, self.device, self._bind = where, specs, device, bind
        self.bound: dict[str, int] = {}  # input name -> data_ptr bound last
        self.staging: dict[str, torch.Tensor] = {}

    def _resolve(self, name: str, t: torch.Tensor) -> torch.Tensor:
        shape, dtype = self.specs[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"{self.where}: input {name} has shape {tuple(t.shape)}, the network expects {shape}")
        if t.dtype == dtype and t.device == self.device and t.is_contiguous():
            return t
        staging = self.staging.get(name)
        if staging is None:
            log.debug("%s: staging %s (%s on %s -> %s)", self.where, name, t.dtype, t.device, dtype)
            staging = self.staging[name] = torch.empty(shape, dtype=dtype, device=self.device)
        return staging.copy_(t)

    def __call__(self, inputs: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.specs if n not in inputs]
        if missing:
            raise KeyError(f"{self.where}: inputs {missing} not given (got {sorted(inputs)})")
        for name in self.specs:
            t = self._resolve(name, inputs[name])
            if self.bound.get(name) != t.data_ptr():
                self._bind(name, t)
                self.bound[name] = t.data_ptr()


class NamedIOBackend:
    """The UNet, VAE encoder and VAE decoder runners of one build folder (and its ControlNets'), behind the `Backend`
    interface.

    Outputs are the runner's: engine runners return their own preallocated buffers (the same tensors every
    call, valid until the next call of that network), so the pipeline consumes a result before calling again.

    A folder built for several frame sizes has runners (and a bank layout) per size: a backend is at one of them
    (`size`), and `at_size` gives the same networks and weights at another (`sizes`: every built size).
    """

    def __init__(
        self, name: str, networks: dict[str, NetworkRunner], layout: BankLayout, device: torch.device,
        builder: str | None = None, *, spec: EngineSpec | None = None,
        sized: dict[tuple[int, int], tuple[dict[str, NetworkRunner], BankLayout]] | None = None,
    ) -> None:  # fmt: skip
        self.name, self.device = name, device
        # None: the UNet's weights are compiled into the files, another LoRA set is a rebuild; a folder with
        # swappable weights gets a PackageLoraWeights (AOTInductor) or an InitializerLoraWeights (ONNX, TensorRT;
        # build_folder.py), shared by every size
        self.lora_weights = None
        self.builder = builder  # what built its files (None: --onnx-only): a rebuild keeps the TensorRT flavour
        self.spec = spec  # what the folder serves (as asked of it): names the rebuild for a size it lacks
        # spec -> the command that builds it as this folder was built (build_folder.folder_rebuild: the TensorRT
        # flavour, --weights swappable, --shapes dynamic kept); None: EngineSpec.rebuild_command
        self.rebuild: Callable[[EngineSpec], str] | None = None
        self._sized = sized or {}
        self._use(networks, layout)
        self.dtype = self._unet.input_specs["sample"][1]

    def _use(self, networks: dict[str, NetworkRunner], layout: BankLayout) -> None:
        self.networks, self.layout = networks, layout
        self._unet, self._encoder, self._decoder = networks["unet"], networks["vae_encoder"], networks["vae_decoder"]
        self.size = tuple(networks["vae_encoder"].input_specs["images"][0][2:])  # (height, width) of [K, 3, H, W]

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        """Every (height, width) the folder was built for (this backend's own size alone for a single-size one)."""
        return tuple(self._sized) or (self.size,)

    def at_size(self, height: int, width: int) -> NamedIOBackend:
        """The same networks and weights (the same `lora_weights`) at another built size: that size's runners and
        bank layout. Self when already there; a size not built raises ValueError with the rebuild command."""
        if (height, width) == self.size:
            return self
        if (height, width) not in self._sized:
            raise ValueError(self._not_built(height, width))
        other = copy.copy(self)  # shares the runners of every size, the weights and the size table
        other._use(*self._sized[(height, width)])
        return other

    def _not_built(self, height: int, width: int) -> str:
        built = show_sizes(self.sizes)
        said = f"the build folder has frame sizes {built}, not {size_text((height, width))}"
        if self.spec is None:
            return f"{said}; rebuild with python -m build_engines --sizes {built},{size_text((height, width))}"
        try:
            wanted = replace(self.spec, sizes=(*self.sizes, (height, width)))
        except ValueError as e:  # e.g. not a multiple of 64, which a multi-size build needs
            return f"{said}, and no build can add it: {e}"
        command = self.rebuild(wanted) if self.rebuild else wanted.rebuild_command(self.name, built=self.builder)
        return f"{said}; rebuild: {command}"

    def unet(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._unet.run(inputs)

    def controlnet(self, index: int, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """ControlNet `index` (the spec's order; network `controlnet_<index>`): `BankLayout.controlnet_specs`
        inputs -> its scaled residuals (the runner's buffers: `run_controlnets` sums them before the next call)."""
        return self.networks[controlnet_network(index)].run(inputs)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._encoder.run({"images": images})["latents"]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._decoder.run({"latents": latents})["images"]
