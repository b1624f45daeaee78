"""Binding named torch tensors to an engine's inputs, shared by the onnxruntime and tensorrt backends.

The pipeline hands the same buffers every frame (latents, prompt, bank), so an input is bound once and
rebound only when its pointer changes. A tensor of another dtype or device (say fp32 latents into an fp16
engine) is copied into a staging buffer that is allocated once, on the first call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..layout import BankLayout

log = logging.getLogger(__name__)

Spec = tuple[tuple[int, ...], torch.dtype]  # (shape, dtype) of one engine tensor


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
            raise ValueError(f"{self.where}: input {name} has shape {tuple(t.shape)}, the engine expects {shape}")
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


def check_unet_io(where: str, inputs: set[str], outputs: set[str], layout: BankLayout) -> None:
    """The UNet engine must have exactly the bank layout's tensors (DESIGN.md §4)."""
    expected_in, expected_out = set(layout.input_names()), set(layout.output_names())
    if inputs == expected_in and outputs == expected_out:
        return
    raise ValueError(
        f"{where} does not have the bank layout's tensors: missing inputs {sorted(expected_in - inputs)}, "
        f"extra inputs {sorted(inputs - expected_in)}, missing outputs {sorted(expected_out - outputs)}, "
        f"extra outputs {sorted(outputs - expected_out)}; rebuild it with python -m build_engines for this model "
        "and bank config"
    )


class NamedIOBackend:
    """UNet, VAE encoder and VAE decoder runners with named I/O (`input_specs`, `output_specs`, `run`, `path`),
    checked against the bank layout; what the onnxruntime and tensorrt backends share."""

    def _set_networks(self, unet, encoder, decoder, layout: BankLayout) -> None:
        self._unet, self._encoder, self._decoder, self.layout = unet, encoder, decoder, layout
        check_unet_io(unet.path.name, set(unet.input_specs), set(unet.output_specs), layout)
        for net in (encoder, decoder):
            if len(net.input_specs) != 1 or len(net.output_specs) != 1:
                raise ValueError(
                    f"{net.path.name}: a VAE network has one input and one output, got inputs "
                    f"{list(net.input_specs)} and outputs {list(net.output_specs)}"
                )
        self.dtype = unet.input_specs["sample"][1]
        self._enc_in, self._enc_out = next(iter(encoder.input_specs)), next(iter(encoder.output_specs))
        self._dec_in, self._dec_out = next(iter(decoder.input_specs)), next(iter(decoder.output_specs))

    def unet(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._unet.run(inputs)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._encoder.run({self._enc_in: images})[self._enc_out]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._decoder.run({self._dec_in: latents})[self._dec_out]
