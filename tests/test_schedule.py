"""StreamSchedule against diffusers' LCMScheduler itself: `add_noise` and the `denoised` output of `step`.

Tolerance: float64 throughout. The reference scheduler's `alphas_cumprod` (float32 in diffusers) is upcast to
float64, so both sides start from the same float32 alpha_bar values and differ only by float64 rounding in another
order of operations: rtol = atol = 1e-12.
"""

import json

import pytest
import torch
from diffusers import LCMScheduler

from streamv2v_trt.presets import PRESETS
from streamv2v_trt.schedule import StreamSchedule

TOL = dict(rtol=1e-12, atol=1e-12)
LATENT = (2, 4, 5, 3)  # per slot: [1, 4, 5, 3], odd sizes so nothing lines up by accident


def lcm(preset: str) -> LCMScheduler:
    config = json.loads((PRESETS[preset].config_dir / "scheduler.json").read_text())
    scheduler = LCMScheduler.from_config(config)
    scheduler.set_timesteps(50)
    return scheduler


def reference(preset: str) -> LCMScheduler:
    scheduler = lcm(preset)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()  # the same values, float64 arithmetic
    return scheduler


def ref_denoised(scheduler: LCMScheduler, eps: torch.Tensor, t: int, x_t: torch.Tensor) -> torch.Tensor:
    scheduler.set_timesteps(50)  # resets the scheduler's step index, so `step` looks `t` up afresh
    return scheduler.step(eps, t, x_t, generator=torch.Generator().manual_seed(0)).denoised


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


T_INDEX_LISTS = [(30, 35, 40, 45), (32,), (0, 20, 49)]


@pytest.mark.parametrize("preset", ["tiny", "sd-turbo", "sd15"])
@pytest.mark.parametrize("t_index_list", T_INDEX_LISTS, ids=str)
def test_timesteps_and_add_noise_equal_lcm_scheduler(preset, t_index_list):
    B = len(t_index_list)
    sched = StreamSchedule(lcm(preset), t_index_list, 50, "cpu", torch.float64)
    ref = reference(preset)
    want_t = torch.stack([ref.timesteps[i] for i in t_index_list])
    assert torch.equal(sched.timesteps, want_t.long())
    x0, noise = randn(B, *LATENT[1:], seed=1), randn(B, *LATENT[1:], seed=2)
    torch.testing.assert_close(sched.add_noise(x0, noise), ref.add_noise(x0, noise, want_t), **TOL)
    for i, t in enumerate(want_t.tolist()):  # one slot at a time, as the stream re-noises slot 0 and slots 1..
        slot = slice(i, i + 1)
        want = ref.add_noise(x0[slot], noise[slot], torch.tensor([t]))
        torch.testing.assert_close(sched.add_noise(x0[slot], noise[slot], slot), want, **TOL)
    if B > 1:
        tail = slice(1, None)
        torch.testing.assert_close(
            sched.add_noise(x0[tail], noise[tail], tail), ref.add_noise(x0[tail], noise[tail], want_t[1:]), **TOL
        )


@pytest.mark.parametrize("preset", ["tiny", "sd-turbo", "sd15"])
@pytest.mark.parametrize("t_index_list", T_INDEX_LISTS, ids=str)
def test_step_equals_lcm_scheduler_denoised(preset, t_index_list):
    B = len(t_index_list)
    sched = StreamSchedule(lcm(preset), t_index_list, 50, "cpu", torch.float64)
    ref = reference(preset)
    x_t, eps = randn(B, *LATENT[1:], seed=3), randn(B, *LATENT[1:], seed=4)
    got = sched.step(x_t, eps)  # every slot at its own timestep, in one call
    assert got.shape == x_t.shape and got.dtype == torch.float64
    for i, t in enumerate(sched.timesteps.tolist()):
        want = ref_denoised(ref, eps[i : i + 1], t, x_t[i : i + 1])
        torch.testing.assert_close(got[i : i + 1], want, **TOL)


def test_step_inverts_add_noise_at_the_boundary():
    """With eps the true noise, x0_pred is x0 exactly; denoised = c_out * x0 + c_skip * x_t (what LCM defines)."""
    sched = StreamSchedule(lcm("sd15"), (30, 35, 40, 45), 50, "cpu", torch.float64)
    x0, noise = randn(4, 4, 6, 6, seed=5), randn(4, 4, 6, 6, seed=6)
    x_t = sched.add_noise(x0, noise)
    torch.testing.assert_close(sched.step(x_t, noise), sched.c_out * x0 + sched.c_skip * x_t, **TOL)
    # At these timesteps c_skip is tiny and c_out near 1, so the step all but recovers x0.
    assert float(sched.c_skip.max()) < 1e-5 and float((1 - sched.c_out).abs().max()) < 1e-5


def test_fp32_coefficients_round_the_float64_ones():
    exact = StreamSchedule(lcm("tiny"), (30, 35, 40, 45), 50, "cpu", torch.float64)
    fp32 = StreamSchedule(lcm("tiny"), (30, 35, 40, 45), 50, "cpu", torch.float32)
    for name in ("alpha", "beta", "c_skip", "c_out"):
        a, b = getattr(fp32, name), getattr(exact, name)
        assert a.dtype == torch.float32 and a.shape == (4, 1, 1, 1)
        assert torch.equal(a, b.float()), name


def test_only_epsilon_prediction_is_supported():
    config = json.loads((PRESETS["tiny"].config_dir / "scheduler.json").read_text())
    scheduler = LCMScheduler.from_config({**config, "prediction_type": "v_prediction"})
    with pytest.raises(NotImplementedError, match="epsilon"):
        StreamSchedule(scheduler, (32,), 50, "cpu", torch.float32)
