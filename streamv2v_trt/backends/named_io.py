"""Backends made of three compiled networks with named I/O (onnxruntime, tensorrt, aoti).

Each network is a runner with `path`, `input_specs` and `output_specs` (name -> (shape, torch dtype), as the
compiled file itself reports them) and `run(inputs) -> outputs` by name. The build folder opener
(`build_folder.py`) checks those specs against the manifest and the layout before a runner is used.

The pipeline hands the same buffers every frame (latents, prompt, bank), so a runner that binds addresses
(onnxruntime, tensorrt) binds an input once and rebinds only when its pointer changes (`InputBinder`). A tensor
of another dtype or device (say fp32 latents into an fp16 engine) is copied into a staging buffer allocated
on the first call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from ..layout import BankLayout

log = logging.getLogger(__name__)

Spec = tuple[tuple[int, ...], torch.dtype]  # (shape, dtype) of one network tensor


class NetworkRunner(Protocol):
    path: Path
    input_specs: dict[str, Spec]
    output_specs: dict[str, Spec]

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


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
    """The UNet, VAE encoder and VAE decoder runners of one build folder, behind the `Backend` interface.

    Outputs are the runner's: engine runners return their own preallocated buffers (the same tensors every
    call, valid until the next call of that network), so the pipeline consumes a result before calling again.
    """

    def __init__(
        self, name: str, networks: dict[str, NetworkRunner], layout: BankLayout, device: torch.device,
        builder: str | None = None,
    ) -> None:  # fmt: skip
        self.name, self.networks, self.layout, self.device = name, networks, layout, device
        # None: the UNet's weights are compiled into the files, another LoRA set is a rebuild; a folder with swappable
        # weights gets a PackageLoraWeights (AOTInductor) or an InitializerLoraWeights (ONNX, TensorRT; build_folder.py)
        self.lora_weights = None
        self.builder = builder  # what built its files (None: --onnx-only): a rebuild keeps the TensorRT flavour
        self._unet, self._encoder, self._decoder = networks["unet"], networks["vae_encoder"], networks["vae_decoder"]
        self.dtype = self._unet.input_specs["sample"][1]

    def unet(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._unet.run(inputs)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._encoder.run({"images": images})["latents"]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._decoder.run({"latents": latents})["images"]
