"""ControlNet beside the bank, eager: the networks equal diffusers' own ControlNet call, a scale of 0 equals the stream
without ControlNet exactly, the ControlNet's attention never sees the bank, and the spec, config and errors.

The tiny model, fp32, on the CPU. Random ControlNets get non-zero residual convolutions (models/controlnets.py), so
every comparison here would fail if the residuals were dropped, mis-ordered or mis-scaled.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import tiny_spec

from streamv2v_trt import StreamConfig, StreamV2V
from streamv2v_trt.control_net import INPUT_NAMES, run_controlnets
from streamv2v_trt.layout import bank_layout, controlnet_network, residual_names
from streamv2v_trt.models.controlnets import check_fits, controlnet_hashes, find_controlnet, load_controlnets
from streamv2v_trt.models.loader import find_weights, load_unet
from streamv2v_trt.multistream import MultiStream
from streamv2v_trt.presets import CONTROLNET_PRESETS, ModelUnavailable
from streamv2v_trt.spec import EngineSpec

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64
# fp32, the BankUNet's empty-bank attention over [k ; k] against diffusers' plain attention over k: the same values
# summed in another order, a few ulps per layer (tests/test_attention.py bounds one layer by 1e-5).
FP32 = 1e-5


def clip(n: int, seed: int = 0) -> list[np.ndarray]:
    """A pan over a random texture: consecutive frames share most content."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (SIZE, SIZE + 4 * n, 3), dtype=np.uint8)
    return [np.ascontiguousarray(texture[:, 4 * i : 4 * i + SIZE]) for i in range(n)]


def stream(controlnets=(), steps=1, **runtime) -> StreamV2V:
    t_index = (32,) if steps == 1 else (30, 40)
    cfg = StreamConfig(tiny_spec(controlnets=controlnets, steps=steps), t_index_list=t_index, **runtime)
    return StreamV2V.from_pretrained(cfg, prompt="a painting of a cat")


def diffusers_reference(spec: EngineSpec):
    """Fresh diffusers modules with the same seeded weights and diffusers' own attention processors."""
    unet = load_unet(spec, find_weights(spec), device="cpu")
    return unet, load_controlnets(spec, unet.config, "cpu")


@pytest.mark.parametrize("names", [("tiny",), ("tiny", "tiny")])
def test_unet_and_controlnets_equal_diffusers_own_controlnet_call(names):
    """Two steps (a UNet batch of 2) with another scale per batch element: each element's residuals are diffusers'
    `ControlNetModel(..., conditioning_scale=s)` summed over the ControlNets, added by `UNet2DConditionModel`."""
    from streamv2v_trt.backends.eager import open_eager

    spec = tiny_spec(controlnets=names, steps=2)
    backend, encoder, _, _ = open_eager(StreamConfig(spec, t_index_list=(30, 40)), torch.device("cpu"))
    unet, controlnets = diffusers_reference(spec)
    g = torch.Generator().manual_seed(0)
    B, (h, w) = spec.unet_batch, spec.latent_hw
    sample = torch.randn(B, 4, h, w, generator=g)
    timestep = torch.tensor([801, 601])
    ehs = encoder("a cat").expand(B, -1, -1).contiguous()
    conds = [torch.rand(B, 3, SIZE, SIZE, generator=g) for _ in names]
    scales = [torch.tensor([0.7, 1.3]), torch.tensor([0.25, 0.0])][: len(names)]

    layout = backend.layout
    inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": ehs}
    inputs["bank_valid"] = torch.zeros(B, layout.slots)  # empty bank: EA is plain self-attention
    for layer in layout.layers:
        for p in layout.parts(layer):
            inputs[f"bank_{p}.{layer.index}"] = torch.randn(layout.bank_shape(layer, B), generator=g)  # never read
    residuals = {n: torch.empty(B, *shape) for n, shape in zip(layout.residual_names(), layout.residuals)}
    run_controlnets(backend, inputs, conds, scales, residuals)
    got = backend.unet({**inputs, **residuals})["noise_pred"]

    with torch.no_grad():
        for b in range(B):  # diffusers, one batch element at a time with its scalar scale
            down, mid = None, None
            for net, cond, scale in zip(controlnets, conds, scales):
                d, m = net(sample[b : b + 1], timestep[b : b + 1], ehs[b : b + 1], cond[b : b + 1],
                           conditioning_scale=float(scale[b]), return_dict=False)  # fmt: skip
                down = d if down is None else [x + y for x, y in zip(down, d)]
                mid = m if mid is None else mid + m
            for name, r in zip(residual_names(len(down) + 1), [*down, mid]):
                torch.testing.assert_close(residuals[name][b : b + 1], r, atol=FP32, rtol=FP32)
            expected = unet(sample[b : b + 1], timestep[b : b + 1], ehs[b : b + 1],
                            down_block_additional_residuals=down, mid_block_additional_residual=mid).sample  # fmt: skip
            plain = unet(sample[b : b + 1], timestep[b : b + 1], ehs[b : b + 1]).sample
            torch.testing.assert_close(got[b : b + 1], expected, atol=FP32, rtol=FP32)
            assert (expected - plain).abs().max() > 1e-2  # the residuals change the output: not a vacuous pass


def test_residual_shapes_in_the_layout_are_the_controlnets_outputs_at_any_size():
    spec = tiny_spec(controlnets=("tiny",), height=64, width=96)
    unet, (net,) = diffusers_reference(spec)
    layout = bank_layout(unet, spec)
    h, w = spec.latent_hw
    with torch.no_grad():
        cond = torch.zeros(1, 3, 64, 96)
        down, mid = net(torch.zeros(1, 4, h, w), 1, torch.zeros(1, 77, 32), cond, return_dict=False)
    assert layout.residuals == tuple(tuple(r.shape[1:]) for r in [*down, mid])
    specs = layout.network_specs(spec, (77, 32))
    assert sorted(specs) == sorted(["unet", "vae_encoder", "vae_decoder", controlnet_network(0)])
    unet_inputs = {t.name: t.shape for t in specs["unet"] if t.is_input}
    outputs = {t.name: t.shape for t in specs[controlnet_network(0)] if not t.is_input}
    assert outputs == {n: unet_inputs[n] for n in layout.residual_names()}  # the ControlNet feeds the UNet
    assert [t.name for t in specs[controlnet_network(0)] if t.is_input] == list(INPUT_NAMES)
    assert layout.input_names()[-len(outputs) :] == layout.residual_names()
    # Without ControlNets the UNet has no residual inputs and there is no fourth network: folders are unchanged.
    plain = bank_layout(unet, tiny_spec())
    assert plain.residuals == () and sorted(plain.network_specs(tiny_spec(), (77, 32))) == sorted(
        ["unet", "vae_encoder", "vae_decoder"]
    )


@pytest.mark.parametrize("steps", [1, 2])
def test_scale_zero_equals_the_stream_without_controlnet_frame_by_frame(steps):
    """Exactly: the ControlNet's residuals times 0 are 0, and x + 0 is x in floating point."""
    with_cn, without = stream(("tiny", "tiny"), steps, controlnet_scales=(0.0, 0.0)), stream((), steps)
    frames = clip(9)  # frames 0, 4, 8 update the bank
    for i, f in enumerate(frames):
        np.testing.assert_array_equal(with_cn(f), without(f), err_msg=f"frame {i}")
    with_cn.update_control(scales=(0.0, 0.8))  # live: the next frame differs
    assert not np.array_equal(with_cn(frames[0]), without(frames[0]))
    assert with_cn.cfg.controlnet_scales == (0.0, 0.8)
    for bad, words in (({"scales": (1.0,)}, "one scale and one control kind each"), ({"kinds": ("x", "frame")}, "x")):
        with pytest.raises(ValueError, match=words):
            with_cn.update_control(**bad)
        assert with_cn.cfg.controlnet_scales == (0.0, 0.8) and with_cn.cfg.control_kinds == ("frame", "frame")
        for buffer, scale in zip(with_cn.control_scale, (0.0, 0.8)):  # nothing changed
            assert torch.equal(buffer, torch.full_like(buffer, scale))


def test_controlnet_attention_ignores_the_bank():
    """Its processors are diffusers' plain ones, and with the bank full the residuals the stream fed the UNet are
    diffusers' ControlNet on the UNet's own inputs (sample, timestep, prompt) and the control image."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from streamv2v_trt.attention import BankSelfAttnProcessor

    s = stream(("tiny",))
    net = s.backend.controlnets[0].controlnet
    assert all(type(p) is AttnProcessor2_0 for p in net.attn_processors.values())
    assert any(isinstance(p, BankSelfAttnProcessor) for p in s.backend.bank_unet.unet.attn_processors.values())
    for f in clip(6):
        s(f)
    assert s.bank.stored == 2 and bool((s.bank.inputs()["bank_valid"] > 0).all())
    _, (reference,) = diffusers_reference(s.cfg.spec)
    with torch.no_grad():
        down, mid = reference(s.sample, s.timestep, s.encoder_hidden_states, s.control_cond[0],
                              conditioning_scale=1.0, return_dict=False)  # fmt: skip
    np.testing.assert_array_equal(s.control_cond[0][0].numpy(), (s.edge.stage(clip(6)[5])[0] * 0.5 + 0.5).numpy())
    for name, r in zip(s.backend.layout.residual_names(), [*down, mid]):
        torch.testing.assert_close(s.residuals[name], r, atol=FP32, rtol=FP32)


def test_control_images_move_down_the_slots_with_their_latents():
    """Slot i holds the frame that entered i frames ago, at step i: its control image is that frame's."""
    s, frames = stream(("tiny",), steps=2), clip(3)
    for f in frames:
        s(f)
    expected = [s.edge.stage(frames[2])[0], s.edge.stage(frames[1])[0]]  # slot 0: the last frame; 1: the one before
    for i, image in enumerate(expected):
        np.testing.assert_array_equal(s.control_cond[0][i].numpy(), (image * 0.5 + 0.5).numpy())
    s.reset()
    assert not s.control_cond[0].any() and not s.previous.any()


def test_previous_output_kind_and_multistream_slots_have_their_own_scales():
    """A MultiStream slot with scale 0 gives the frames of a stream without ControlNet; another slot's scale and
    control image kind are its own (the "previous" kind: the slot's last output)."""
    multi = MultiStream.from_pretrained(tiny_spec(controlnets=("tiny",)), streams=2, prompt="a painting of a cat")
    alone = stream(())
    multi.slots[0].update_control(scales=(0.0,))
    multi.slots[1].update_control(scales=(1.0,), kinds=("previous",))
    frames = clip(5)
    for i, f in enumerate(frames):
        out = multi({0: f, 1: frames[-1 - i]})
        # Batched vs alone: the same rows in another GEMM blocking (tests/test_multistream.py); 1 level of 255.
        assert np.abs(out[0].astype(int) - alone(f).astype(int)).max() <= 1, f"tick {i}"
        expected_prev = torch.from_numpy(out[1]).permute(2, 0, 1)[None].float() / 255
        got_prev = (multi.slots[1].previous * 0.5 + 0.5).clamp(0, 1)  # what the next tick's control image is
        assert (got_prev - expected_prev).abs().max() <= 0.5 / 255 + 1e-6  # the output frame's uint8 rounding
    assert multi.slots[1].control_cond[0].abs().sum() > 0
    multi.resize(64, 96)  # one batch is one size; each slot keeps its own scales and kinds
    assert [s.cfg.controlnet_scales for s in multi.slots] == [(0.0,), (1.0,)]
    assert multi.slots[1].cfg.control_kinds == ("previous",) and multi.slots[0].control_scale[0].eq(0).all()
    out = multi({0: np.zeros((64, 96, 3), np.uint8), 1: np.zeros((64, 96, 3), np.uint8)})
    assert out[1].shape == (64, 96, 3)


def test_spec_flag_json_and_config_checks():
    spec = tiny_spec(controlnets=["tiny", "some/controlnet"])
    assert spec.controlnets == ("tiny", "some/controlnet")
    assert "--controlnet tiny,some/controlnet" in spec.build_command()
    assert EngineSpec.from_json(spec.to_json()) == spec
    old = {k: v for k, v in tiny_spec().to_json().items() if k != "controlnets"}  # a manifest from before ControlNet
    assert EngineSpec.from_json(old).controlnets == ()
    assert spec.differences(tiny_spec()) == ["controlnets: engines have ('tiny', 'some/controlnet'), asked ()"]
    cfg = StreamConfig(spec)
    assert cfg.controlnet_scales == (1.0, 1.0) and cfg.control_kinds == ("frame", "frame")
    with pytest.raises(ValueError, match="one scale and one control kind each"):
        StreamConfig(spec, controlnet_scales=(1.0,))
    assert cfg.with_spec(controlnets=()).controlnet_scales == ()


def test_errors_name_what_is_wrong():
    with pytest.raises(ModelUnavailable, match="neither a preset"):
        find_controlnet("no-such-controlnet", 0, 0)
    sd15 = find_controlnet("sd15-canny", 0, 0)
    tiny_unet = load_unet(tiny_spec(), find_weights(tiny_spec())).config
    if sd15.random:  # the sd15 architecture against the tiny UNet, from the configs alone
        config = json.loads(sd15.recipe)["config"]
        with pytest.raises(ValueError, match=r"does not fit the UNet of model 'tiny'.*preset tiny"):
            check_fits("sd15-canny", config, dict(tiny_unet), "tiny")
    assert set(CONTROLNET_PRESETS) == {"tiny", "sd15-canny", "sd-turbo-canny"}
    hashes = controlnet_hashes(tiny_spec(controlnets=("tiny", "tiny")))  # what a manifest will record
    assert len(set(hashes)) == 2 and hashes == controlnet_hashes(tiny_spec(controlnets=("tiny", "tiny")))
    assert hashes[0] != controlnet_hashes(tiny_spec(controlnets=("tiny",), weights_seed=1))[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_with_controlnets_equals_eager():
    """Whole frames (control images, both ControlNets, the UNet with their residuals) replayed from CUDA graphs equal
    the same stream run call by call; a scale change needs no recapture, a control image kind is another graph."""
    from streamv2v_trt.cuda_graph import CudaGraphStream

    cfg = StreamConfig(tiny_spec(controlnets=("tiny", "tiny"), steps=2), t_index_list=(30, 40))
    plain = StreamV2V.from_pretrained(cfg, device="cuda", prompt="a cat")
    graphed = CudaGraphStream(StreamV2V.from_pretrained(cfg, device="cuda", prompt="a cat"))
    for i, frame in enumerate(clip(24)):
        if i == 10:
            for s in (plain, graphed):
                s.update_control(scales=(0.5, 1.2))
        if i == 16:
            for s in (plain, graphed):
                s.update_control(kinds=("previous", "frame"))
        if i == 20:
            for s in (plain, graphed):
                s.reset()
        a, b = plain(frame), graphed(frame)
        # Replayed vs eager kernels on one GPU: the same work, so at most the last bit of a pixel's rounding.
        assert np.abs(a.astype(np.int16) - b).max() <= 1, f"frame {i}"
    assert {kinds for _, kinds in graphed.graphs} == {("frame", "frame"), ("previous", "frame")}


def test_controlnets_load_from_a_local_folder_and_a_hub_id_without_network_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    spec = tiny_spec(controlnets=("tiny",))
    unet_config = load_unet(spec, find_weights(spec)).config
    (random,) = load_controlnets(spec, unet_config, "cpu")
    folder = tmp_path / "my-controlnet"
    random.save_pretrained(folder, safe_serialization=True)
    (loaded,) = load_controlnets(dataclasses.replace(spec, controlnets=(str(folder),)), unet_config, "cpu")
    for (name, a), b in zip(random.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    weights = find_controlnet(str(folder), 0, 0)
    assert not weights.random and weights.hash() == find_controlnet(str(folder), 5, 1).hash()  # by the files alone
    (folder / "config.json").unlink()
    with pytest.raises(ModelUnavailable, match="not a diffusers ControlNet folder: no config.json"):
        find_controlnet(str(folder), 0, 0)
    # Offline mode stands in for no network: the hub is never asked, so the test cannot hang on a connection.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailable) as e:
        find_controlnet("someone/not-cached-controlnet", 0, 0)
    message = str(e.value)
    assert "\n" not in message and "ControlNet 'someone/not-cached-controlnet': the Hugging Face hub cannot" in message
    assert "--controlnet PATH, with config.json" in message and "hf download someone/not-cached-controlnet" in message


@pytest.mark.parametrize("preset", list(CONTROLNET_PRESETS.values()), ids=list(CONTROLNET_PRESETS))
def test_preset_configs_are_controlnets_of_their_unet(preset):
    """Each shipped controlnet.json is `ControlNetModel.from_unet` of its model's UNet config (the SD1.5 one is
    lllyasviel/control_v11p_sd15_canny's architecture, the sd-turbo one SD2.1's), and fits it. Meta device: no
    weights are made."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from streamv2v_trt.presets import PRESETS

    unet_config = json.loads((PRESETS[preset.model].config_dir / "unet.json").read_text())
    shipped = json.loads(preset.config.read_text())
    with torch.device("meta"):
        derived = ControlNetModel.from_unet(UNet2DConditionModel.from_config(unet_config), load_weights_from_unet=False)
    for key, value in shipped.items():
        if not key.startswith("_"):
            got = derived.config[key]
            assert (list(got) if isinstance(got, tuple) else got) == value, key
    check_fits(preset.name, shipped, unet_config, preset.model)


def test_canny_and_video_control_images_feed_the_controlnets():
    """The kinds of control_images.py in the stream: "canny" gives the ControlNet the Canny edges of the frame in
    slot 0, "video" the frame given by `set_control_frame`; an unknown kind and a wrong-size control frame are
    refused and change nothing."""
    from streamv2v_trt.control_images import ControlImages
    from streamv2v_trt.frames import FrameError

    s, frames = stream(("tiny", "tiny"), control_kinds=("canny", "video")), clip(2)
    user = np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    s.set_control_frame(1, user)
    s(frames[0])
    edges = ControlImages("canny", SIZE, SIZE)(s.edge.stage(frames[0]), None)  # the frame as the stream saw it
    np.testing.assert_array_equal(s.control_cond[0][0].numpy(), edges[0].numpy())
    assert 0 < s.control_cond[0][0].mean() < 1  # edges and non-edges: a real edge map, not a constant
    np.testing.assert_allclose(s.control_cond[1][0].numpy(), user.transpose(2, 0, 1) / 255.0, atol=1e-6)
    with pytest.raises(FrameError, match="expects 64x64"):
        s.set_control_frame(1, user[:32])
    with pytest.raises(ValueError, match="is for the video kind"):
        s.set_control_frame(0, user)
    with pytest.raises(ValueError, match="kind 'depth' is unknown: use one of canny, frame, previous, video"):
        s.update_control(kinds=("depth", "video"))
    assert s.cfg.control_kinds == ("canny", "video")
