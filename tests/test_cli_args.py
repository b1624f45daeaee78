"""The stream flags shared by `video` and `serve` (streamv2v_trt/cli/stream_args.py): guidance, priming,
similar-frame filter and LoRA map into StreamConfig / the loaded stream; bad values fail with one clear line."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from streamv2v_trt import CfgType, EngineSpec, SimilarFilterConfig, StreamConfig
from streamv2v_trt.cli.main import build_parser, main
from streamv2v_trt.cli.stream_args import CliError, opening, resolve_spec, stream_config, stream_request
from streamv2v_trt.config import BankConfig
from streamv2v_trt.models.loader import load_models
from streamv2v_trt.spec import t_index_list_from_strength
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
    w = load_models(EngineSpec("tiny", precision="fp32")).unet.get_submodule(LORA_LAYER).weight
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


CPU = torch.device("cpu")


def config(args) -> StreamConfig:
    return stream_config(args, resolve_spec(args, CPU))


def open_stream(args):
    """What `video` opens for the flags: their Source and StreamConfig through the library (CliError)."""
    from streamv2v_trt.opening import open_stream as open_source

    source, cfg = stream_request(args)
    with opening(source.engines, cfg.spec.model):
        return open_source(source, cfg, negative_prompt=args.negative_prompt or "")


def test_video_defaults_keep_features_off_and_serve_turns_live_ones_on():
    cfg = config(video_args())
    assert cfg.cfg_type is CfgType.NONE and cfg.guidance_scale == 1.0 and cfg.delta == 1.0
    assert not cfg.prime and not cfg.similar_filter.enabled
    live = config(serve_args())
    assert live.prime and live.similar_filter == SimilarFilterConfig(enabled=True, threshold=0.98, max_skip=10, seed=2)
    off = config(serve_args("--no-prime", "--no-similar-filter"))
    assert not off.prime and not off.similar_filter.enabled
    # CUDA graphs cannot replay the filter: live defaults turn it off there, an explicit --similar-filter is refused.
    assert not config(serve_args("--cuda-graphs")).similar_filter.enabled
    with pytest.raises(CliError, match="--cuda-graphs cannot replay the similar-frame filter"):
        config(serve_args("--cuda-graphs", "--similar-filter"))


def test_defaults_come_from_the_preset_and_cpu_runs_fp32():
    spec = resolve_spec(build_parser().parse_args(["video", "a.mp4", "b.mp4", "--prompt", "x"]), CPU)
    assert spec == EngineSpec.resolve("tiny", precision="fp32")
    assert (spec.height, spec.width, spec.steps) == (128, 128, 1)
    args = build_parser().parse_args(["video", "a.mp4", "b.mp4", "--prompt", "x", "--model", "sd15"])
    assert resolve_spec(args, CPU).steps == 4 and config(args).t_index_list == (30, 35, 40, 45)


def test_flags_map_into_the_stream_config():
    cfg = config(
        video_args(
            "--cfg-type", "self", "--guidance-scale", "1.5", "--delta", "0.7", "--prime", "--seed", "5",
            "--similar-filter", "--similar-threshold", "0.9", "--max-skip", "3", "--steps", "2",
        )
    )  # fmt: skip
    spec = EngineSpec("tiny", height=32, width=32, steps=2, cfg_type="self", precision="fp32")
    assert cfg == StreamConfig(
        spec, seed=5, guidance_scale=1.5, delta=0.7, prime=True, bank=BankConfig(seed=5),
        similar_filter=SimilarFilterConfig(True, 0.9, 3, seed=5),
    )  # fmt: skip
    assert cfg.steps == 2
    # Guidance without --guidance-scale uses StreamDiffusion's default, so --cfg-type alone is not a no-op.
    assert config(video_args("--cfg-type", "full")).guidance_scale == 1.2
    assert config(video_args("--cfg-type", "initialize", "--negative-prompt", "blurry")).stream_batch == 2
    assert config(video_args("--strength", "0.5", "--steps", "2")).t_index_list == t_index_list_from_strength(0.5, 2)


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
        (["--similar-filter", "--max-skip", "-1"], "--max-skip must be a number of frames >= 0"),
    ],
)
def test_bad_values_are_refused_with_the_flag_named(flags, message):
    with pytest.raises(CliError, match="^" + message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        config(video_args(*flags))


def test_lora_flag_is_fused_and_a_bad_path_fails_in_one_line(lora_file, tmp_path, capsys):
    stream = open_stream(video_args("--lora", f"{lora_file}:0.5", "--device", "cpu"))
    fused = stream.backend.bank_unet.unet.get_submodule(LORA_LAYER).weight
    base = load_models(EngineSpec("tiny", precision="fp32")).unet.get_submodule(LORA_LAYER).weight
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


@pytest.fixture(scope="module")
def engines(tiny_build):
    return tiny_build(EngineSpec("tiny", height=32, width=32, steps=2, precision="fp32"))


def engine_args(engines, *flags):
    return build_parser().parse_args(["serve", "--engines", str(engines), "--device", "cpu", *flags])


def test_engine_flags_apply_runtime_features_and_refuse_what_needs_a_rebuild(engines, lora_file, tiny_build):
    stream = open_stream(engine_args(engines, "--cfg-type", "self", "--delta", "0.5", "--max-skip", "4"))
    cfg = stream.cfg
    assert (cfg.cfg_type, cfg.guidance_scale, cfg.delta) == (CfgType.SELF, 1.2, 0.5)
    assert cfg.prime and cfg.similar_filter.enabled and cfg.similar_filter.max_skip == 4
    assert stream.backend.name == "onnxruntime"
    # engines built frozen without it: a LoRA needs a rebuild (a swappable folder, the --onnx-only default, takes it)
    frozen = tiny_build(EngineSpec("tiny", height=32, width=32, steps=2, precision="fp32"), weights="frozen")
    with pytest.raises(CliError, match="--lora") as lora:
        open_stream(engine_args(frozen, "--lora", str(lora_file)))
    assert "loras: engines were built with no LoRA" in str(lora.value)
    with pytest.raises(CliError, match="UNet batch: engines have 2") as batch:  # initialize: one more element
        open_stream(engine_args(engines, "--cfg-type", "initialize"))
    assert "--cfg-type initialize" in str(batch.value)


def test_engine_runtime_flags_are_applied_not_dropped(engines):
    """--seed and --strength are runtime settings: with --engines they reach the stream (they used to be dropped)."""
    stream = open_stream(engine_args(engines, "--seed", "7", "--strength", "0.5", "--no-similar-filter"))
    assert stream.cfg.seed == 7 and stream.seed == 7 and stream.cfg.bank.seed == 7
    assert stream.cfg.t_index_list == t_index_list_from_strength(0.5, 2)
    other = open_stream(engine_args(engines, "--seed", "8", "--no-similar-filter"))
    assert not torch.equal(stream.noise, other.noise)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--height", "64"], "--height 64 (engines: 32)"),
        (["--steps", "1"], "--steps 1 (engines: 2)"),
        (["--bank", "fifo", "--bank-frames", "2"], "--bank fifo (engines: dyme)"),
        (["--vae", "full"], "--vae full (engines: taesd)"),
        (["--model", "sd15"], "--model sd15 (engines: tiny)"),
        (["--controlnet", "tiny"], "--controlnet tiny (engines: none)"),
    ],
)
def test_flags_the_engines_fix_are_refused_with_the_rebuild_command(engines, flags, named):
    with pytest.raises(CliError) as e:
        open_stream(engine_args(engines, *flags))
    assert named in str(e.value) and "python -m build_engines" in str(e.value)


def test_engine_folders_run_on_their_own_backend_by_default_and_refuse_eager(engines):
    with pytest.raises(CliError, match="--backend eager runs the PyTorch weights"):
        open_stream(engine_args(engines, "--backend", "eager"))
    with pytest.raises(CliError, match="--compile has no effect"):
        open_stream(engine_args(engines, "--compile"))
    with pytest.raises(CliError, match="no TensorRT engines in this folder"):
        open_stream(engine_args(engines, "--backend", "tensorrt"))


# -- a hub id that cannot be fetched -------------------------------------------------------------------------

HUB_ID = "someone/not-cached-model"  # made up: never in a cache, and the hub is never asked (offline mode)


@pytest.fixture
def offline_hub(monkeypatch):
    """The Hugging Face hub in offline mode, as without network: nothing may try the real network for long."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: set it too


def says_what_to_do(message: str) -> bool:
    """An unreachable hub is named, with the ways to run without it: a local folder, a download, a preset."""
    return (
        f"model {HUB_ID!r}: the Hugging Face hub cannot be reached" in message
        and "not in the local cache" in message
        and "--model PATH, with unet/, vae/, text_encoder/, tokenizer/, scheduler/" in message
        and f"hf download {HUB_ID}" in message
        and "tiny, sd-turbo, sd15" in message
    )


def test_a_hub_id_that_cannot_be_fetched_is_one_error_that_says_what_to_do(offline_hub):
    from streamv2v_trt.models.loader import ModelUnavailable, find_weights

    with pytest.raises(ModelUnavailable) as e:
        find_weights(EngineSpec(HUB_ID, height=64, width=64))
    assert says_what_to_do(str(e.value)) and "HF_HUB_OFFLINE is set" in str(e.value), e.value
    assert isinstance(e.value, FileNotFoundError)  # what callers catching FileNotFoundError still get


@pytest.mark.parametrize("command", ["build_engines", "demo", "video", "serve", "benchmarks.fps"])
def test_every_cli_prints_an_unreachable_hub_as_one_line(offline_hub, command, tmp_path, capsys):
    if command == "serve":
        pytest.importorskip("uvicorn")  # serve needs the web extra before it loads a model
    clip = tmp_path / "in.mp4"
    write_clip(clip, [np.zeros((32, 32, 3), np.uint8)] * 2)
    model = ["--model", HUB_ID]
    if command == "build_engines":
        from build_engines.__main__ import main as build_main

        rc = build_main([*model, *SIZE, "--onnx-only", "--out", str(tmp_path / "out")])
    elif command == "benchmarks.fps":
        from benchmarks.fps import main as fps_main

        rc = fps_main([*model, *SIZE, "--backends", "eager", "--frames", "1", "--warmup", "0"])
    else:
        argv = {
            "demo": ["demo", "--size", "32", "--frames", "1", "--out", str(tmp_path / "demo.mp4")],
            "video": ["video", str(clip), str(tmp_path / "out.mp4"), "--prompt", "x", *SIZE, "--no-progress"],
            "serve": ["serve", *SIZE, "--device", "cpu"],
        }[command]
        rc = main([*argv, *model])
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 1 and "Traceback" not in err and len(error_lines) == 1, err
    assert says_what_to_do(error_lines[0]) and not error_lines[0].startswith("error: cannot load model"), err
