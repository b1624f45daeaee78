"""PyTorch eager backend: the reference the engines are traced from, optionally channels_last and compiled."""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING

import torch

from ..bank_unet import BankUNet
from ..config import StreamConfig
from ..control_net import INPUT_NAMES as CONTROL_INPUTS
from ..control_net import ControlNet
from ..flavours import BackendKind
from ..layout import bank_layout
from ..models.controlnets import load_controlnets
from ..models.loader import Models, load_models
from ..models.lora_weights import LoraWeights
from ..prompt import PromptEncoder
from ..spec import EngineSpec
from ..vae import VaeDecoder, VaeEncoder

if TYPE_CHECKING:
    from diffusers import ControlNetModel


def open_eager(
    cfg: StreamConfig, device: torch.device, *, compile: bool | str = False, channels_last: bool | None = None
) -> tuple[EagerBackend, PromptEncoder, object, StreamConfig]:
    """The eager networks of `cfg.spec`, its LoRAs fused: (backend, prompt encoder, scheduler, config) for
    `StreamV2V` and `MultiStream` (`source.open_networks` calls it). channels_last: default on for CUDA.
    The LoRAs go in through `backend.lora_weights`, so `set_loras` can swap them later (it keeps a copy of the
    base of each weight they touch)."""
    models = load_models(cfg.spec, device=device)
    controlnets = load_controlnets(cfg.spec, models.unet.config, device) if cfg.spec.controlnets else []
    channels_last = device.type == "cuda" if channels_last is None else channels_last
    backend = EagerBackend(models, cfg.spec, channels_last=channels_last, compile=compile, controlnets=controlnets)
    if cfg.spec.loras:
        backend.lora_weights.set(cfg.spec.loras)
    return backend, PromptEncoder(models.tokenizer, models.text_encoder), models.scheduler, cfg


class EagerBackend:
    name = BackendKind.EAGER
    builder = None  # runs the PyTorch weights, no build
    sizes = None  # any multiple of 8: the same modules run every size (`at_size`)

    def __init__(
        self,
        models: Models,
        spec: EngineSpec,
        *,
        channels_last: bool = False,
        compile: bool | str = False,
        controlnets: list[ControlNetModel] | None = None,
    ) -> None:
        """`controlnets`: `spec.controlnets` loaded (models/controlnets.py), in order."""
        controlnets = controlnets or []
        if len(controlnets) != len(spec.controlnets):
            raise ValueError(f"the spec names {len(spec.controlnets)} ControlNet(s), {len(controlnets)} were given")
        if channels_last:
            # cuDNN runs convolutions NHWC; with NCHW weights every conv pays a transpose each way (measured on
            # an H200: 4.3 ms of a 35 ms sd-turbo frame). Inputs stay NCHW buffers; conv outputs follow the weights.
            for m in (models.unet, models.vae, *controlnets):
                m.to(memory_format=torch.channels_last)
        self.bank_unet = BankUNet(models.unet, spec).eval()
        self.layout = self.bank_unet.layout
        self._spec = spec  # only its size and bank matter here (the layout); the LoRA set is `lora_weights`'
        self._by_size = {(spec.height, spec.width): self}  # every size of these modules, shared by all of them
        self.encoder = VaeEncoder(models.vae).eval()
        self.decoder = VaeDecoder(models.vae).eval()
        self.channels_last, self.compiled = channels_last, compile
        # torch.compile's own CUDA graphs ("reduce-overhead") would nest inside ours (CudaGraphStream): default mode.
        # A string names the torch.compile backend ("inductor" for True; tests trace with "aot_eager", no codegen).
        backend = "inductor" if compile is True else compile
        wrap = (lambda m: torch.compile(m, backend=backend, dynamic=False)) if compile else (lambda m: m)
        self._unet, self._encode, self._decode = wrap(self.bank_unet), wrap(self.encoder), wrap(self.decoder)
        self.controlnets = [ControlNet(c).eval() for c in controlnets]  # each its own network (control_net.py)
        self._controlnets = [wrap(c) for c in self.controlnets]
        self._names_in, self._names_out = self.layout.input_names(), self.layout.output_names()
        p = next(models.unet.parameters())
        self.device, self.dtype = p.device, p.dtype
        # The LoRA set is runtime state of the weights (StreamV2V.set_loras): written in place, graphs stay valid.
        self.lora_weights = LoraWeights(models.unet, models.text_encoder)

    def at_size(self, height: int, width: int) -> EagerBackend:
        """These modules and weights (the same `lora_weights`) at another size: only the bank layout differs.

        The bank processors are size-free (they read the token count from the hidden states and their bank from
        the call), so every size shares the one `BankUNet` and its installed processors, and a size made later
        leaves the earlier ones working. One backend per size, made once (`resize` back gets the same object)."""
        found = self._by_size.get((height, width))
        if found is None:
            spec = dataclasses.replace(self._spec, height=height, width=width)  # ValueError: not multiples of 8
            found = copy.copy(self)  # shallow: the modules, compiled wrappers, LoRA weights and this dict are shared
            found._spec, found.layout = spec, bank_layout(self.bank_unet.unet, spec)
            self._by_size[(height, width)] = found
        return found

    @torch.inference_mode()
    def unet(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(zip(self._names_out, self._unet(*[inputs[n] for n in self._names_in])))

    @torch.inference_mode()
    def controlnet(self, index: int, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """ControlNet `index` (the spec's order): `BankLayout.controlnet_specs` inputs -> its scaled residuals."""
        net = self.controlnets[index]
        return dict(zip(net.output_names, self._controlnets[index](*[inputs[n] for n in CONTROL_INPUTS])))

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._encode(images)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._decode(latents)
