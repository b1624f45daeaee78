"""The UNet with every layer's bank as explicit inputs and outputs: what eager runs and ONNX exports."""

from __future__ import annotations

import torch
from torch import nn

from .attention import BankIO, BankSelfAttnProcessor, CrossAttnProcessor
from .layout import BankLayout, bank_layout
from .spec import EngineSpec


def install_bank_processors(unet: nn.Module, spec: EngineSpec) -> BankLayout:
    """Swap every attention processor: attn1 -> EA/FF with bank I/O, attn2 -> plain (bank-aware signature)."""
    layout = bank_layout(unet, spec)
    by_name = {layer.name: layer for layer in layout.layers}
    processors = {}
    for key in unet.attn_processors:  # "<module name>.processor"
        module_name = key.rsplit(".processor", 1)[0]
        layer = by_name.get(module_name)
        if layer is None:
            processors[key] = CrossAttnProcessor()
            continue
        attn = unet.get_submodule(module_name)
        if attn.group_norm is not None or attn.spatial_norm is not None or attn.norm_q is not None:
            raise NotImplementedError(f"{module_name}: attention with group/spatial/qk norm is not supported")
        processors[key] = BankSelfAttnProcessor(layer, spec.bank, spec.ff_threshold, spec.ff_strength)
    unet.set_attn_processor(processors)
    return layout


class BankUNet(nn.Module):
    """forward(sample, timestep, encoder_hidden_states, bank_valid, *banks, *residuals) -> (noise_pred, *current).

    `banks` and `current` are flat, in `layout.bank_names()` / `layout.current_names()` order. `residuals`: with
    ControlNets (`layout.residuals`), their summed down-block residuals then the mid-block one
    (`layout.residual_names()`), added as diffusers adds a ControlNet's; none without.
    """

    def __init__(self, unet: nn.Module, spec: EngineSpec) -> None:
        super().__init__()
        self.unet = unet
        self.layout = install_bank_processors(unet, spec)
        self._n_parts = [len(BankLayout.parts(layer)) for layer in self.layout.layers]

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        bank_valid: torch.Tensor,
        *tensors: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        grouped, i = [], 0
        for n in self._n_parts:
            grouped.append(tensors[i : i + n])
            i += n
        residuals = tensors[i:]
        if len(residuals) != len(self.layout.residuals):
            raise ValueError(
                f"expected {i} bank tensors for {len(self._n_parts)} layers and {len(self.layout.residuals)} "
                f"ControlNet residuals, got {len(tensors)} tensors"
            )
        io = BankIO(self.layout.kind, bank_valid, grouped)
        control = {}
        if residuals:  # summed ControlNet residuals, added where diffusers adds a ControlNet's
            control = dict(down_block_additional_residuals=residuals[:-1], mid_block_additional_residual=residuals[-1])
        noise_pred = self.unet(
            sample, timestep, encoder_hidden_states, cross_attention_kwargs={"bank_io": io}, return_dict=False,
            **control,
        )[0]  # fmt: skip
        return (noise_pred, *io.outputs(len(self._n_parts)))

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named I/O, the same contract as an engine: inputs by `layout.input_names()`."""
        args = [inputs[name] for name in self.layout.input_names()]
        return dict(zip(self.layout.output_names(), self(*args)))
