"""The stream flags shared by `video` and `serve` (streamv2v_trt/cli/stream_args.py): guidance, priming,
similar-frame filter and LoRA map into StreamConfig / the loaded stream; bad values fail with one clear line."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from build_engines import BuildConfig, build
from streamv2v_trt import CfgType, SimilarFilterConfig, StreamConfig
from streamv2v_trt.cli.main import build_parser, main
from streamv2v_trt.cli.serve import stream_factory_from
from streamv2v_trt.cli.stream_args import CliError, build_stream, stream_config
from streamv2v_trt.models import load_models
from streamv2v_trt.video_io import VideoReader

SIZE = ["--height", "32", "--width", "32"]
LORA_LAYER = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"


def write_clip(path, frames: list[np.ndarray]) -> None:
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=12)
        v.width, v.height, v.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for f in frames:
            c.mux(v.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(v.encode(None))


def read_frames(path) -> list[np.ndarray]:
    with VideoReader(path) as reader:
        return [f.image for f in reader.frames()]


def video_args(*flags: str):
    return build_parser().parse_args(["video", "in.mp4", "out.mp4", "--prompt", "x", *SIZE, *flags])


def serve_args(*flags: str):
    return build_parser().parse_args(["serve", *SIZE, *flags])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    """A rank-2 LoRA on one UNet attention projection of the tiny model."""
    w = load_models("tiny").unet.get_submodule(LORA_LAYER).weight
    gen = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    save_file(
        {
            f"unet.{LORA_LAYER}.lora_A.weight": torch.randn(2, w.shape[1], generator=gen),
            f"unet.{LORA_LAYER}.lora_B.weight": torch.randn(w.shape[0], 2, generator=gen),
        },
        str(path),
    )
    return path


def test_video_defaults_keep_features_off_and_serve_turns_live_ones_on():
    cfg = stream_config(video_args())
    assert cfg.cfg_type is CfgType.NONE and cfg.guidance_scale == 1.0 and cfg.delta == 1.0
    assert not cfg.prime and not cfg.similar_filter.enabled
    live = stream_config(serve_args())
    assert live.prime and live.similar_filter == SimilarFilterConfig(enabled=True, threshold=0.98, max_skip=10, seed=2)
    off = stream_config(serve_args("--no-prime", "--no-similar-filter"))
    assert not off.prime and not off.similar_filter.enabled


def test_flags_map_into_the_stream_config():
    cfg = stream_config(
        video_args(
            "--cfg-type", "self", "--guidance-scale", "1.5", "--delta", "0.7", "--prime", "--seed", "5",
            "--similar-filter", "--similar-threshold", "0.9", "--max-skip", "3", "--steps", "2",
        )
    )  # fmt: skip
    assert cfg == StreamConfig(
        height=32, width=32, t_index_list=cfg.t_index_list, seed=5, cfg_type=CfgType.SELF, guidance_scale=1.5,
        delta=0.7, prime=True, bank=cfg.bank, similar_filter=SimilarFilterConfig(True, 0.9, 3, seed=5),
    )  # fmt: skip
    assert cfg.steps == 2
    # Guidance without --guidance-scale uses StreamDiffusion's default, so --cfg-type alone is not a no-op.
    assert stream_config(video_args("--cfg-type", "full")).guidance_scale == 1.2
    assert stream_config(video_args("--cfg-type", "initialize", "--negative-prompt", "blurry")).unet_batch == 2


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--guidance-scale", "1.5"], "--guidance-scale has no effect: guidance is none; add a --cfg-type"),
        (["--cfg-type", "self", "--guidance-scale", "0.5"], "--guidance-scale must be a number >= 1"),
        (["--cfg-type", "self", "--guidance-scale", "nan"], "--guidance-scale must be a number >= 1"),
        (["--cfg-type", "full", "--delta", "0.5"], "--delta has no effect: guidance is full"),
        (["--cfg-type", "self", "--delta", "-1"], "--delta must be a number >= 0"),
        (["--cfg-type", "self", "--negative-prompt", "ugly"], "--negative-prompt has no effect"),
        (["--similar-threshold", "0.9"], "--similar-threshold has no effect: the similar-frame filter is off"),
        (["--similar-filter", "--similar-threshold", "1.5"], "--similar-threshold must be a cosine similarity"),
        (["--similar-filter", "--max-skip", "0"], "--max-skip must be >= 1"),
    ],
)
def test_bad_values_are_refused_with_the_flag_named(flags, message):
    with pytest.raises(CliError, match="^" + message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        stream_config(video_args(*flags))


def test_lora_flag_is_fused_and_a_bad_path_fails_in_one_line(lora_file, tmp_path, capsys):
    stream = build_stream(video_args("--lora", f"{lora_file}:0.5", "--device", "cpu"))
    fused = stream.backend.bank_unet.unet.get_submodule(LORA_LAYER).weight
    base = load_models("tiny").unet.get_submodule(LORA_LAYER).weight
    assert (fused - base).abs().max() > 1e-3

    clip = tmp_path / "in.mp4"
    write_clip(clip, [np.zeros((32, 32, 3), np.uint8)] * 2)
    missing = tmp_path / "nope.safetensors"
    rc = main(["video", str(clip), str(tmp_path / "o.mp4"), "--prompt", "x", *SIZE, "--lora", f"{missing}:0.8"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1
    assert err.startswith(f"error: --lora {missing}:0.8: no such file") and "Traceback" not in err
    not_lora = tmp_path / "weights.bin"
    not_lora.write_bytes(b"\0")
    assert main(["video", str(clip), str(tmp_path / "o.mp4"), "--prompt", "x", *SIZE, "--lora", str(not_lora)]) == 1
    assert "only .safetensors" in capsys.readouterr().err


def test_video_with_guidance_and_priming_runs_on_a_short_clip(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (32, 32, 3)).astype(np.int16)
    clip = tmp_path / "in.mp4"
    write_clip(clip, [np.clip(base + 3 * i, 0, 255).astype(np.uint8) for i in range(6)])
    common = ["video", str(clip), "--prompt", "a cat", *SIZE, "--steps", "2", "--no-progress", "--device", "cpu"]
    guided, plain = tmp_path / "guided.mp4", tmp_path / "plain.mp4"
    assert (
        main([*common[:2], str(guided), *common[2:], "--cfg-type", "self", "--guidance-scale", "1.5", "--prime"]) == 0
    )
    assert main([*common[:2], str(plain), *common[2:]]) == 0
    out, ref = read_frames(guided), read_frames(plain)
    assert len(out) == len(ref) == 6
    assert max(np.abs(a.astype(np.int16) - b).max() for a, b in zip(out, ref)) > 2  # the flags took effect


def test_serve_streams_keep_the_config_and_negative_prompt():
    args = serve_args("--cfg-type", "initialize", "--negative-prompt", "blurry", "--steps", "2", "--device", "cpu")
    template = build_stream(args, prompt="a cat")
    stream = stream_factory_from(template, "a cat")()
    assert stream is not template and stream.cfg == template.cfg
    assert stream.cfg.prime and stream.cfg.similar_filter.enabled and stream.similar_filter is not None
    assert stream.negative_prompt == "blurry"
    torch.testing.assert_close(stream.negative_embeds, template.negative_embeds)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "tiny32"
    build(BuildConfig.from_stream("tiny", StreamConfig(32, 32), out, precision="fp32", onnx_only=True))
    return out


def test_engine_flags_apply_runtime_features_and_refuse_what_needs_a_rebuild(engines, lora_file):
    def engine_args(*flags):
        return build_parser().parse_args(["serve", "--engines", str(engines), "--device", "cpu", *flags])

    stream = build_stream(engine_args("--cfg-type", "self", "--delta", "0.5", "--max-skip", "4"))
    cfg = stream.cfg
    assert (cfg.cfg_type, cfg.guidance_scale, cfg.delta) == (CfgType.SELF, 1.2, 0.5)
    assert cfg.prime and cfg.similar_filter.enabled and cfg.similar_filter.max_skip == 4
    assert stream.backend.name == "onnxruntime"
    with pytest.raises(CliError, match="--lora") as lora:  # engines built without it: a LoRA needs a rebuild
        build_stream(engine_args("--lora", str(lora_file)))
    assert "loras: engine was built with no LoRA" in str(lora.value)
    with pytest.raises(CliError, match="UNet batch: engines have 1") as batch:  # initialize: one more element
        build_stream(engine_args("--cfg-type", "initialize"))
    assert "--cfg-type initialize" in str(batch.value)
