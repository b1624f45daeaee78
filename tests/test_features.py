"""Pipeline features on the eager path: similar-frame skip, prompt/seed blending, RCFG modes, priming."""

import math

import numpy as np
import pytest
import torch
from conftest import tiny_spec

from streamv2v_trt import CfgType, StreamConfig, StreamV2V
from streamv2v_trt.backends.eager import EagerBackend
from streamv2v_trt.blending import blend_prompts, blend_seeds, seed_noise
from streamv2v_trt.config import SimilarFilterConfig
from streamv2v_trt.frames import frame_to_tensor, tensor_to_frame
from streamv2v_trt.models.loader import load_models
from streamv2v_trt.presets import PRESETS
from streamv2v_trt.prompt import PromptEncoder
from streamv2v_trt.similar_filter import SimilarFrameFilter, skip_probability

SIZE = 64
STEPS4 = (30, 35, 40, 45)  # the paper's setting: 4 steps

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parts():
    models = load_models(tiny_spec())
    # Shared by every stream here (each has its own bank): the networks do not depend on steps or guidance.
    backend = EagerBackend(models, tiny_spec())
    return models, backend, PromptEncoder(models.tokenizer, models.text_encoder)


def make(parts, prompt="a painting of a cat", negative_prompt="", t_index_list=(32,), cfg_type="none", **runtime):
    models, backend, encoder = parts
    spec = tiny_spec(steps=len(t_index_list), cfg_type=cfg_type)
    cfg = StreamConfig(spec, t_index_list=t_index_list, **runtime)
    stream = StreamV2V(backend, encoder, models.scheduler, cfg)
    stream.update_prompt(prompt, negative_prompt=negative_prompt)
    return stream


def clip(n, seed=0):
    """A fast pan over a random texture: consecutive frames are far below a 0.98 cosine similarity."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (SIZE, SIZE + 8 * n, 3), dtype=np.uint8)
    return [np.ascontiguousarray(texture[:, 8 * i : 8 * i + SIZE]) for i in range(n)]


# --- similar-frame skip ---------------------------------------------------------------------------------


def test_repeated_frame_is_skipped_at_most_max_skip_times_in_a_row(parts):
    stream = make(parts, similar_filter=SimilarFilterConfig(enabled=True, max_skip=3))
    frame = clip(1)[0]
    last = stream(frame)
    run, processed = 0, 1
    for _ in range(12):
        before = stream.frame_id
        out = stream(frame)
        if stream.frame_id == before:  # skipped: the previous output, byte for byte, and no UNet call
            np.testing.assert_array_equal(out, last)
            run += 1
            assert run <= 3
        else:
            assert stream.frame_id == before + 1
            run, processed, last = 0, processed + 1, out
    # identical frames have skip probability 1: exactly 3 skips, then a processed frame, and again
    assert processed == 1 + 12 // 4 and stream.similar_filter.skipped_total == 9


def test_dissimilar_frames_are_never_skipped_and_filter_is_off_by_default(parts):
    assert not StreamConfig(tiny_spec()).similar_filter.enabled
    assert make(parts).similar_filter is None
    stream = make(parts, similar_filter=SimilarFilterConfig(enabled=True))
    for i, f in enumerate(clip(6)):
        stream(f)
        assert stream.frame_id == i + 1


def test_reset_forgets_the_previous_frame(parts):
    stream = make(parts, similar_filter=SimilarFilterConfig(enabled=True))
    frame = clip(1)[0]
    stream(frame)
    stream(frame)
    assert stream.frame_id == 1
    stream.reset()
    stream(frame)  # the first frame after a reset is always processed
    assert stream.frame_id == 1


def test_skip_probability_and_seeded_decisions():
    assert skip_probability(1.0, 0.98) == 1.0
    assert skip_probability(0.97, 0.98) == 0.0
    assert skip_probability(0.99, 0.98) == pytest.approx(0.5)
    assert skip_probability(1.0, 1.0) == 0.0  # threshold 1 never skips
    # Frames at cosine 0.99 of the reference with threshold 0.98: skipped about half the time, reproducibly.
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 3, 8, 8, generator=g)
    noise = torch.randn(1, 3, 8, 8, generator=g)
    noise -= (noise * ref).sum() / (ref * ref).sum() * ref  # orthogonal to ref
    theta = math.acos(0.99)
    near = ref / ref.norm() * math.cos(theta) + noise / noise.norm() * math.sin(theta)

    def decide(seed):
        f = SimilarFrameFilter(SimilarFilterConfig(enabled=True, seed=seed))
        assert not f.should_skip(ref)  # the first frame is always processed
        return f.should_skip(near)

    decisions = [decide(seed) for seed in range(400)]
    assert 0.4 < sum(decisions) / len(decisions) < 0.6
    assert decisions == [decide(seed) for seed in range(400)]  # seeded: the same stream skips the same frames
    with pytest.raises(ValueError, match="threshold"):
        SimilarFilterConfig(threshold=1.5)


# --- prompt and seed blending ---------------------------------------------------------------------------


def test_prompt_blends(parts):
    stream = make(parts)
    enc = stream.prompt_encoder
    cat, dog = enc("a cat"), enc("a dog")
    ptr = stream.encoder_hidden_states.data_ptr()
    stream.update_prompt([("a cat", 0.3)])
    torch.testing.assert_close(stream.prompt_embeds, cat.expand_as(stream.prompt_embeds), rtol=0, atol=1e-6)
    stream.update_prompt([("a cat", 1.0), ("a dog", 1.0)])
    torch.testing.assert_close(stream.prompt_embeds[0], ((cat + dog) / 2)[0], rtol=0, atol=1e-6)
    stream.update_prompt([("a cat", 2.0), ("a dog", 6.0)])  # weights are normalised
    torch.testing.assert_close(stream.prompt_embeds[0], (0.25 * cat + 0.75 * dog)[0], rtol=0, atol=1e-6)
    assert stream.encoder_hidden_states.data_ptr() == ptr and stream.prompt == [("a cat", 2.0), ("a dog", 6.0)]
    for bad, err in [([], ValueError), ([("a", -1.0)], ValueError), ([("a", 0.0)], ValueError), (3, TypeError)]:
        with pytest.raises(err):
            stream.update_prompt(bad)
    assert torch.equal(blend_prompts(enc, "a cat"), cat)


def test_seed_blends_keep_the_buffer_and_unit_variance(parts):
    stream = make(parts, t_index_list=(20, 30))
    shape = tuple(stream.noise.shape)
    ptr = stream.noise.data_ptr()
    torch.testing.assert_close(stream.noise, seed_noise(2, shape), rtol=0, atol=0)  # the config's seed
    stream.update_seed(7)
    torch.testing.assert_close(stream.noise, seed_noise(7, shape), rtol=0, atol=0)
    stream.update_seed([(7, 0.4)])
    torch.testing.assert_close(stream.noise, seed_noise(7, shape), rtol=0, atol=0)
    stream.update_seed([(1, 1.0), (2, 1.0)])
    torch.testing.assert_close(stream.noise, (seed_noise(1, shape) + seed_noise(2, shape)) / math.sqrt(2))
    assert stream.noise.data_ptr() == ptr
    big = blend_seeds([(1, 0.2), (2, 0.5), (3, 0.3)], (4, 4, 64, 64))
    assert abs(float(big.std()) - 1) < 0.02 and abs(float(big.mean())) < 0.02
    assert torch.equal(blend_seeds([(5, 0.5), (5, 0.5)], (2, 3)), seed_noise(5, (2, 3)))  # one seed, listed twice


@pytest.mark.parametrize("t_index_list", [(20, 30), STEPS4], ids=["2 steps", "4 steps"])
def test_live_seed_change_equals_a_stream_built_with_that_seed(parts, t_index_list):
    # With 4 steps a roll of the noise by +1 and by -1 differ (with 2 they coincide): RCFG's rolled copy of the
    # noise must follow the new seed exactly as a fresh stream's does.
    kw = dict(t_index_list=t_index_list, cfg_type="self", guidance_scale=1.5)
    a, b = make(parts, **kw), make(parts, seed=5, **kw)
    frames = clip(len(t_index_list) + 2)
    a(frames[0])
    a.update_seed(5)
    a.reset()
    for f in frames:
        np.testing.assert_array_equal(a(f), b(f))
    torch.testing.assert_close(a.stock_noise, b.stock_noise, rtol=0, atol=0)


# --- RCFG -----------------------------------------------------------------------------------------------


def lcm_coefficients(t_index_list):
    """StreamDiffusion's `prepare()` from the preset's own scheduler: sqrt(alpha_bar), sqrt(1 - alpha_bar), c_skip,
    c_out per slot, [B, 1, 1, 1] float32."""
    from diffusers import LCMScheduler

    scheduler = LCMScheduler.from_config(LCMScheduler.load_config(str(PRESETS["tiny"].config_dir / "scheduler.json")))
    scheduler.set_timesteps(50)
    t = [int(scheduler.timesteps[i]) for i in t_index_list]
    alpha_bar = scheduler.alphas_cumprod[t].double()
    skip, out = zip(*(scheduler.get_scalings_for_boundary_condition_discrete(ti) for ti in t))
    coef = lambda x: torch.as_tensor(x, dtype=torch.float64).view(-1, 1, 1, 1).float()  # noqa: E731
    return torch.tensor(t), coef(alpha_bar.sqrt()), coef((1 - alpha_bar).sqrt()), coef(skip), coef(out)


class StreamDiffusionReference:
    """StreamDiffusion's stream batch with RCFG (`predict_x0_batch` + `unet_step`), written out from its
    definitions with its own state: the latent buffer of slots 1.., the stock noise and the init noise. It calls
    the stream's networks; the bank (tested in test_bank.py) is read from the stream before each frame."""

    def __init__(self, stream, negative, seed):
        cfg = stream.cfg
        self.stream, self.cfg, self.negative = stream, cfg, negative
        self.t, self.alpha, self.beta, self.c_skip, self.c_out = lcm_coefficients(cfg.t_index_list)
        B = cfg.steps
        self.init_noise = seed_noise(seed, (B, 4, SIZE // 8, SIZE // 8))
        self.buffer = torch.zeros_like(self.init_noise[1:])  # x_t_latent_buffer: slots 1..B-1
        self.stock = torch.zeros_like(self.init_noise)

    def scheduler_step(self, eps, x):
        return self.c_out * (x - self.beta * eps) / self.alpha + self.c_skip * x

    def __call__(self, image, bank):
        cfg, B, init = self.cfg, self.cfg.steps, self.init_noise
        backend = self.stream.backend
        x_t = self.alpha[0] * backend.encode(image) + self.beta[0] * init[0:1]
        x = torch.cat([x_t, self.buffer])
        self.stock = torch.cat([init[0:1], self.stock[:-1]])
        text = self.stream.prompt_embeds[0:1].expand(B, -1, -1)
        t = self.t
        if cfg.cfg_type is CfgType.INITIALIZE:
            sample, tt, ehs = torch.cat([x[0:1], x]), torch.cat([t[0:1], t]), torch.cat([self.negative, text])
        elif cfg.cfg_type is CfgType.FULL:
            sample, tt, ehs = torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.negative.expand(B, -1, -1), text])
        else:
            sample, tt, ehs = x, t, text
        inputs = {"sample": sample, "timestep": tt, "encoder_hidden_states": ehs, **bank}
        pred = backend.unet(inputs)["noise_pred"]
        if cfg.cfg_type is CfgType.INITIALIZE:
            eps_text = pred[1:]
            self.stock = torch.cat([pred[0:1], self.stock[1:]])
        elif cfg.cfg_type is CfgType.FULL:
            uncond, eps_text = pred.chunk(2)
        else:
            eps_text = pred
        if cfg.cfg_type in (CfgType.SELF, CfgType.INITIALIZE):
            uncond = self.stock * cfg.delta
        eps = uncond + cfg.guidance_scale * (eps_text - uncond) if cfg.cfg_type is not CfgType.NONE else eps_text
        denoised = self.scheduler_step(eps, x)
        if cfg.cfg_type in (CfgType.SELF, CfgType.INITIALIZE):
            ones = torch.ones_like(self.alpha[0:1])
            delta_x = self.scheduler_step(eps, self.beta * self.stock)
            delta_x = torch.cat([self.alpha[1:], ones]) * delta_x / torch.cat([self.beta[1:], ones])
            self.stock = torch.cat([init[1:], init[0:1]]) + delta_x  # slot i takes slot i+1's init noise
        self.buffer = self.alpha[1:] * denoised[:-1] + self.beta[1:] * init[1:]
        return backend.decode(denoised[-1:])


def check_against_reference(stream, reference, frames, seed_change=None):
    """Run both on `frames`; `seed_change` = (frame index, seed): both switch to that seed's noise before it."""
    with torch.inference_mode():
        for i, f in enumerate(frames):
            if seed_change is not None and i == seed_change[0]:
                stream.update_seed(seed_change[1])
                reference.init_noise = seed_noise(seed_change[1], tuple(reference.init_noise.shape))
            image = frame_to_tensor(f, SIZE, SIZE, resize=False, device="cpu", dtype=torch.float32)
            bank = {k: v.clone() for k, v in stream.bank.inputs().items()}
            expected = tensor_to_frame(reference(image, bank), f)
            out = stream(f)
            assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1, i
            torch.testing.assert_close(stream.latents[1:], reference.buffer, atol=1e-5, rtol=1e-5, msg=f"frame {i}")
            if stream.cfg.cfg_type is not CfgType.FULL:
                torch.testing.assert_close(stream.stock_noise, reference.stock, atol=1e-5, rtol=1e-5, msg=f"frame {i}")


@pytest.mark.parametrize("t_index_list", [(20, 30), STEPS4], ids=["2 steps", "4 steps"])
@pytest.mark.parametrize("cfg_type", ["self", "initialize", "full"])
def test_rcfg_equals_streamdiffusion_reference(parts, cfg_type, t_index_list):
    neg = "blurry, low quality"
    B = len(t_index_list)
    kw = dict(t_index_list=t_index_list, cfg_type=cfg_type, guidance_scale=1.8, delta=0.6)
    stream = make(parts, negative_prompt=neg, **kw)
    unet_batch = {"self": B, "initialize": B + 1, "full": 2 * B}[cfg_type]
    assert stream.cfg.stream_batch == unet_batch == stream.sample.shape[0]
    assert all(t.shape[0] == unet_batch for t in stream.bank.tensors.values())  # a bank per UNet batch element
    reference = StreamDiffusionReference(stream, stream.prompt_encoder(neg), seed=stream.cfg.seed)
    # From the second frame on the stock noise and the bank are not trivial; B + 2 frames fill every slot.
    check_against_reference(stream, reference, clip(B + 2))


@pytest.mark.parametrize("cfg_type", ["self", "initialize"])
def test_rcfg_seed_change_mid_stream_equals_reference(parts, cfg_type):
    stream = make(parts, t_index_list=STEPS4, cfg_type=cfg_type, guidance_scale=1.8, delta=0.6)
    reference = StreamDiffusionReference(stream, stream.prompt_encoder(""), seed=stream.cfg.seed)
    check_against_reference(stream, reference, clip(6), seed_change=(2, 11))


def test_rcfg_modes_differ_from_none_and_full_needs_twice_the_batch(parts):
    frames = clip(3)
    outs = {}
    for cfg_type in ("none", "self", "initialize", "full"):
        stream = make(parts, t_index_list=(20, 30), cfg_type=cfg_type, guidance_scale=2.0)
        outs[cfg_type] = [stream(f) for f in frames]
    for cfg_type in ("self", "initialize", "full"):
        assert not np.array_equal(outs[cfg_type][-1], outs["none"][-1]), cfg_type
    assert [tiny_spec(steps=4, cfg_type=c).unet_batch for c in ("none", "self", "initialize", "full")] == [4, 4, 5, 8]


# --- priming --------------------------------------------------------------------------------------------


def test_priming_makes_the_first_output_a_full_translation(parts):
    frames = clip(4)
    cold = make(parts, t_index_list=(20, 30, 40))
    primed = make(parts, t_index_list=(20, 30, 40), prime=True)
    zero_latent_first = cold(frames[0])
    first = primed(frames[0])
    assert primed.frame_id == 1 and primed.bank.stored == 1  # priming calls neither count nor store
    assert not np.array_equal(first, zero_latent_first)
    # What the design says: frame 0 run through the stream batch `steps` times with an empty bank, i.e. a
    # cold stream that has seen frame 0 three times (bank emptied before each call); its last output.
    reference = make(parts, t_index_list=(20, 30, 40))
    for _ in range(3):
        reference.bank.reset()
        expected = reference(frames[0])
    np.testing.assert_array_equal(first, expected)
    # Latency stays steps - 1 frames: outputs 0..2 show frame 0, output 3 shows frame 1.
    outs = [first] + [primed(f) for f in frames[1:]]
    assert primed.frame_id == 4
    primed.reset()
    np.testing.assert_array_equal(primed(frames[0]), first)  # priming again after a reset
    assert not np.array_equal(outs[3], outs[2])
