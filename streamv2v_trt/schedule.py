"""The LCM schedule of a stream batch as per-slot coefficient tensors, so a denoising step is arithmetic."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import LCMScheduler


class StreamSchedule:
    """Slot i of the stream batch denoises at timestep t_i = schedule[t_index_list[i]].

    Shapes: every coefficient is [B, 1, 1, 1] (B = steps) so it broadcasts over latents [B, 4, h, w].
    """

    def __init__(
        self,
        scheduler: LCMScheduler,
        t_index_list: tuple[int, ...],
        num_inference_steps: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        if scheduler.config.prediction_type != "epsilon":
            raise NotImplementedError(
                f"prediction_type {scheduler.config.prediction_type!r}: only epsilon is supported"
            )
        scheduler.set_timesteps(num_inference_steps)
        all_t = scheduler.timesteps
        self.timesteps = torch.stack([all_t[i] for i in t_index_list]).to(device=device, dtype=torch.long)  # [B]
        t = self.timesteps.cpu()
        alphas = scheduler.alphas_cumprod[t].double()
        skip, out = zip(*(scheduler.get_scalings_for_boundary_condition_discrete(int(ti)) for ti in t))
        as_coef = lambda x: torch.as_tensor(x, dtype=torch.float64).view(-1, 1, 1, 1).to(device=device, dtype=dtype)
        self.alpha = as_coef(alphas.sqrt())  # sqrt(alpha_bar_t)
        self.beta = as_coef((1 - alphas).sqrt())  # sqrt(1 - alpha_bar_t)
        self.c_skip = as_coef([float(s) for s in skip])
        self.c_out = as_coef([float(o) for o in out])

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, slot: slice | int = slice(None)) -> torch.Tensor:
        return self.alpha[slot] * x0 + self.beta[slot] * noise

    def step(self, x_t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """LCM boundary-condition step: denoised = c_out * x0_pred + c_skip * x_t."""
        x0_pred = (x_t - self.beta * eps) / self.alpha
        return self.c_out * x0_pred + self.c_skip * x_t
