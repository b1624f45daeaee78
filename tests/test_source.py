"""One way to open a stream (`Source` + `StreamConfig` -> `open_stream` / `open_multistream`), the backend table it
reads (`flavours.py`), flags that come from the config fields (`flags.py`), and `benchmarks.fps --streams K`."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from build_engines.__main__ import build_parser as build_engines_parser
from streamv2v_trt import BackendKind, Builder, EngineSpec, Source, StreamConfig, open_multistream, open_stream
from streamv2v_trt.cli.main import build_parser
from streamv2v_trt.config import SimilarFilterConfig
from streamv2v_trt.flags import field_default, flagged, option
from streamv2v_trt.flavours import CAPTURABLE_BACKENDS, ENGINE_BACKENDS, build_for, folder_backend
from streamv2v_trt.pipeline import StreamV2V

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = EngineSpec("tiny", height=32, width=32, precision="fp32")


def test_a_source_is_plain_frozen_and_picklable():
    source = Source(engines="engines/x", backend="aoti", device="cpu", threads=2, cuda_graphs=False)
    assert source.engines == Path("engines/x") and source.backend is BackendKind.AOTI and source.device == "cpu"
    assert pickle.loads(pickle.dumps(source)) == source  # what a Ray replica receives
    with pytest.raises(dataclasses.FrozenInstanceError):
        source.threads = 1


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"model": "tiny", "engines": "x"}, "a model (eager) or a build folder (engines), not both"),
        ({"engines": "x", "backend": "eager"}, "the eager backend runs the PyTorch weights, not a build folder"),
        ({"backend": "onnxruntime"}, "the onnxruntime backend runs a build folder: give Source(engines=DIR)"),
        ({"engines": "x", "compile": True}, "compile applies to the eager backend"),
        ({"threads": 0}, "threads must be >= 1"),
        ({"backend": "onnx"}, "unknown backend 'onnx': expected one of eager, onnxruntime, tensorrt, aoti"),
    ],
)
def test_a_source_refuses_what_cannot_work_and_says_what_to_do(kwargs, says):
    with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)")):
        Source(**kwargs)


def test_cuda_graphs_on_a_cpu_are_refused_before_anything_loads():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA GPU, the streams run on cpu"):
        open_stream(Source(device="cpu", cuda_graphs=True), StreamConfig(SPEC))


def test_the_backend_table_answers_every_question_about_a_backend():
    assert ENGINE_BACKENDS == (BackendKind.ONNXRUNTIME, BackendKind.TENSORRT, BackendKind.AOTI)
    assert BackendKind.ONNXRUNTIME not in CAPTURABLE_BACKENDS and BackendKind.TENSORRT in CAPTURABLE_BACKENDS
    # Which backend a folder runs on by default: its compiled files where they run, else its ONNX.
    assert folder_backend(None, "cuda") is BackendKind.ONNXRUNTIME
    assert folder_backend("tensorrt-rtx", "cuda") is BackendKind.TENSORRT
    assert folder_backend("tensorrt", "cpu") is BackendKind.ONNXRUNTIME
    assert folder_backend("aoti", "cpu") is BackendKind.AOTI
    # Which build gives a backend its files: the folder's own TensorRT flavour is kept (multistream used to drop it).
    assert build_for("tensorrt", "tensorrt-rtx") == (Builder.TENSORRT_RTX, False)
    assert build_for("tensorrt") == (None, False)  # auto
    assert build_for("onnxruntime", "tensorrt") == (Builder.TENSORRT, False)  # the ONNX beside its engines
    assert build_for("onnxruntime", "aoti") == (None, True)
    assert build_for("aoti") == (Builder.AOTI, False)
    assert str(BackendKind.AOTI) == f"{Builder.AOTI}" == "aoti"  # names print as themselves in messages


def test_open_stream_and_open_multistream_run_the_same_frames():
    """A MultiStream slot equals a stream of its own, opened from the same Source and config."""
    source, cfg = Source(device="cpu", threads=1), StreamConfig(SPEC, seed=5)
    alone = open_stream(source, cfg, prompt="a cat")
    assert isinstance(alone, StreamV2V) and alone.cfg == cfg and alone.prompt == "a cat" and alone.device.type == "cpu"
    multi = open_multistream(source, cfg, 2, prompt="a cat")
    assert multi.streams == 2 and all(slot.prompt == "a cat" for slot in multi.slots)
    rng = np.random.default_rng(0)
    for _ in range(5):
        frame = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        out = multi({1: frame})[1]
        assert np.abs(out.astype(int) - alone(frame).astype(int)).max() <= 1
    default = open_stream(Source(device="cpu"), seed=7)  # the preset's spec (fp32 on the CPU), runtime keywords
    assert default.cfg.spec == EngineSpec.resolve("tiny", precision="fp32") and default.cfg.seed == 7


def test_build_engines_defaults_and_help_come_from_the_spec_fields():
    parser = build_engines_parser()
    actions = {a.dest: a for a in parser._actions}
    for f in flagged(EngineSpec):
        action = actions[option(EngineSpec, f.name).removeprefix("--").replace("-", "_")]
        if f.name in ("model", "height", "width", "steps", "precision"):
            continue  # the model is build_engines' own; size, steps and precision are resolved later
        assert action.default == (list(f.default) if f.name == "loras" else f.default), f.name
    text = parser.format_help()
    for value in ("0.98", "0.8", "dyme", "taesd", "mid_block.,up_blocks.0.,up_blocks.1."):
        assert f"(default: {value})" in " ".join(text.split()), value


def test_runtime_help_reads_the_config_defaults(monkeypatch):
    monkeypatch.setattr(SimilarFilterConfig.__dataclass_fields__["threshold"], "default", 0.5)
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["video"].format_help().split())
    assert "skipped (default: 0.5)" in text and f"(default: {field_default(StreamConfig, 'seed')})" in text


def test_fps_runs_a_multistream_beside_separate_streams(tmp_path):
    from benchmarks.fps import main as fps_main

    out = tmp_path / "fps.json"
    argv = ["--model", "tiny", "--height", "32", "--width", "32", "--backends", "eager", "--streams", "2", "--frames",
            "3", "--warmup", "1", "--threads", "1", "--device", "cpu", "--json", str(out)]  # fmt: skip
    assert fps_main(argv) == 0
    report = json.loads(out.read_text())
    rows = {r["backend"]: r for r in report["results"]}
    assert set(rows) == {"eager x2", "eager multi2"} and report["config"]["streams"] == 2
    assert rows["eager multi2"]["layout"] == "multi" and rows["eager multi2"]["psnr_ok"]  # the same frames
    assert rows["eager multi2"]["psnr_min_db"] >= 40 and set(report["ratios"]) == {"eager multi2/x2"}
    assert torch.get_num_threads() == 1


def test_fps_runs_every_backend_with_and_without_controlnets_in_one_run(tmp_path):
    from benchmarks.fps import main as fps_main

    out = tmp_path / "fps.json"
    argv = ["--model", "tiny", "--height", "32", "--width", "32", "--backends", "eager", "--streams", "2", "--frames",
            "3", "--warmup", "1", "--threads", "1", "--device", "cpu", "--json", str(out), "--controlnet", "tiny",
            "--control", "canny:0.8"]  # fmt: skip
    assert fps_main(argv) == 0
    report = json.loads(out.read_text())
    rows = {r["backend"]: r for r in report["results"]}
    assert set(rows) == {"eager x2", "eager multi2", "eager x2 +controlnet", "eager multi2 +controlnet"}
    assert rows["eager x2"]["controlnets"] == [] and rows["eager x2 +controlnet"]["controlnets"] == ["tiny:canny:0.8"]
    # The batched ControlNet rows are checked against eager's separate streams with the ControlNet.
    assert rows["eager multi2 +controlnet"]["psnr_ok"] and rows["eager multi2 +controlnet"]["psnr_min_db"] >= 40
    assert {"eager x2 +controlnet/eager x2", "eager multi2 +controlnet/eager multi2"} <= set(report["ratios"])


def test_fps_refuses_a_control_kind_it_cannot_feed(capsys):
    from benchmarks.fps import main as fps_main

    argv = ["--model", "tiny", "--height", "32", "--width", "32", "--backends", "eager", "--frames", "1", "--device",
            "cpu", "--controlnet", "tiny", "--control", "depth"]  # fmt: skip
    assert fps_main(argv) == 1
    assert "control kind 'depth' is unknown" in capsys.readouterr().err


def test_controlnet_benchmark_measures_cost_and_warp_error_beside_no_controlnet(tmp_path):
    from benchmarks.controlnet import main as controlnet_main

    out = tmp_path / "controlnet.json"
    argv = ["--model", "tiny", "--height", "32", "--width", "32", "--frames", "6", "--warmup", "1", "--device", "cpu",
            "--kinds", "canny,previous", "--json", str(out)]  # fmt: skip
    assert controlnet_main(argv) == 0
    report = json.loads(out.read_text())
    rows = {r["kind"]: r for r in report["rows"]}
    assert list(rows) == ["none", "canny", "previous"] and report["config"]["threads"] == 1
    assert all(r["p50_ms"] > 0 and r["warp_error"] > 0 for r in rows.values())
    assert rows["none"]["warp_vs_none"] == 1.0 and rows["none"]["cost_ms_vs_none"] == 0.0
    assert rows["canny"]["warp_vs_none"] == pytest.approx(rows["canny"]["warp_error"] / rows["none"]["warp_error"])


def test_zoom_clip_zooms_into_the_center():
    from streamv2v_trt.clips import zoom_clip

    frames = zoom_clip(5, 32, 48, rate=0.05)
    assert len(frames) == 5 and all(f.shape == (32, 48, 3) and f.dtype == np.uint8 for f in frames)
    assert all(np.abs(a.astype(int) - b).mean() > 0.5 for a, b in zip(frames, frames[1:]))  # it moves every frame
    with pytest.raises(ValueError, match="zoom below 16 source pixels"):
        zoom_clip(500, 32, 32, rate=0.05)
