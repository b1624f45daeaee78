"""`python -m streamv2v_trt video`: frames, timestamps and audio survive; bad inputs fail cleanly."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import terminal_lines
from skimage import data

from streamv2v_trt.cli.main import main
from streamv2v_trt.video_io import VideoReader

FPS = 12
SIZE = ["--height", "64", "--width", "64", "--no-progress"]


def pan_frames(n: int) -> list[np.ndarray]:
    """The astronaut photo panned 2 px per frame, 64x64."""
    img = data.astronaut()[::4, ::4]  # [128, 128, 3]
    return [np.ascontiguousarray(img[20:84, 10 + 2 * i : 74 + 2 * i]) for i in range(n)]


def write_clip(path: Path, frames: list[np.ndarray], *, audio: bool = False) -> None:
    # faststart puts the index first, so a truncated copy still opens and decodes up to the cut
    options = {"movflags": "faststart"} if path.suffix == ".mp4" else {}
    with av.open(str(path), "w", options=options) as c:
        v = c.add_stream("libx264", rate=FPS)
        v.width, v.height, v.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        a = None
        if audio:
            a = c.add_stream("aac", rate=16000)
            a.layout = "mono"
            t = np.arange(16000 * len(frames) // FPS) / 16000
            af = av.AudioFrame.from_ndarray((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None], "flt", "mono")
            af.sample_rate, af.pts = 16000, 0
            for p in a.encode(af):
                c.mux(p)
            for p in a.encode(None):
                c.mux(p)
        for f in frames:
            for p in v.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in v.encode(None):
            c.mux(p)


def read_all(path: Path) -> tuple[VideoReader, list]:
    reader = VideoReader(path)
    frames = list(reader.frames())
    reader.close()
    return reader, frames


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("video") / "pan.mp4"
    write_clip(path, pan_frames(12))
    return path


def test_translates_every_frame_at_the_input_fps(clip, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    assert main(["video", str(clip), str(out), "--prompt", "an oil painting", *SIZE]) == 0
    reader, frames = read_all(out)
    assert len(frames) == 12
    assert reader.info.fps == Fraction(FPS)
    assert (reader.info.width, reader.info.height) == (64, 64)
    (summary,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("wrote")]
    # An FPS names the device and the threads it was measured with, as the demo and benchmarks.fps do.
    assert " FPS (model " in summary and " ms) on cpu (" in summary, summary
    assert summary.endswith("), 1 CPU thread(s)"), summary  # the CPU default: one intra-op thread


def test_stream_batch_keeps_timestamps_and_audio(tmp_path):
    src = tmp_path / "with_audio.mp4"
    write_clip(src, pan_frames(12), audio=True)
    out = tmp_path / "out.mkv"
    # 2 steps: the stream delays frames by one; the CLI drops the empty first output and flushes the last one.
    assert main(["video", str(src), str(out), "--prompt", "a cat", "--steps", "2", "--strength", "0.5", *SIZE]) == 0
    src_reader, src_frames = read_all(src)
    reader, frames = read_all(out)
    assert len(frames) == 12
    # Relative times: Matroska shifts everything by the AAC priming delay (no negative timestamps there).
    times = lambda r, fr: [float((f.pts - fr[0].pts) * r.info.time_base) for f in fr]  # noqa: E731
    assert times(reader, frames) == pytest.approx(times(src_reader, src_frames), abs=2e-3)
    assert reader.info.audio_codec == "aac"


def test_max_frames(clip, tmp_path):
    out = tmp_path / "out.mp4"
    assert main(["video", str(clip), str(out), "--prompt", "x", "--max-frames", "5", *SIZE]) == 0
    assert len(read_all(out)[1]) == 5


def test_missing_input_fails_cleanly(tmp_path, capsys):
    out = tmp_path / "out.mp4"
    assert main(["video", str(tmp_path / "nope.mp4"), str(out), "--prompt", "x", *SIZE]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: input video not found") and "Traceback" not in err
    assert not out.exists()


def test_not_a_video_fails_cleanly(tmp_path, capsys):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert main(["video", str(junk), str(tmp_path / "out.mp4"), "--prompt", "x", *SIZE]) == 1
    assert "cannot open" in capsys.readouterr().err


def test_unknown_output_container_fails_before_loading(clip, tmp_path, capsys):
    assert main(["video", str(clip), str(tmp_path / "out.xyz"), "--prompt", "x", *SIZE]) == 1
    assert "unknown container '.xyz'" in capsys.readouterr().err


def test_engines_need_the_engine_runtime_or_a_clear_message(clip, tmp_path, capsys):
    rc = main(["video", str(clip), str(tmp_path / "o.mp4"), "--prompt", "x", "--backend", "onnxruntime", *SIZE])
    assert rc == 1 and "--engines" in capsys.readouterr().err


def test_truncated_input_leaves_a_playable_partial_output(tmp_path, capsys):
    full = tmp_path / "full.mp4"
    write_clip(full, pan_frames(24))
    data_ = full.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data_[: int(len(data_) * 0.8)])
    out = tmp_path / "out.mp4"
    assert main(["video", str(cut), str(out), "--prompt", "x", *SIZE]) == 1
    captured = capsys.readouterr()
    assert "error:" in captured.err and "Traceback" not in captured.err
    assert "frames before it" in captured.err
    _, frames = read_all(out)  # the partial output decodes to the end
    assert 0 < len(frames) < 24
    assert f"{len(frames)} frames" in captured.out


def test_reader_reports_a_stream_that_ends_before_its_declared_length(tmp_path):
    from streamv2v_trt.video_io import VideoError

    full = tmp_path / "full.mkv"
    write_clip(full, pan_frames(24))
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(full.read_bytes()[: int(full.stat().st_size * 0.8)])  # the header still says 2 s
    got = []
    with VideoReader(cut) as reader, pytest.raises(VideoError, match=r"ended after \d+ of 24 frames"):
        for frame in reader.frames():
            got.append(frame)
    assert 0 < len(got) < 24 and [f.index for f in got] == list(range(len(got)))


def test_audio_is_reported_copied_only_when_the_output_has_it(tmp_path, capsys):
    """A partial run used to print "audio copied" for an output without an audio stream."""
    full = tmp_path / "full.mp4"
    write_clip(full, pan_frames(24), audio=True)
    for name, data_ in (("whole", full.read_bytes()), ("cut", full.read_bytes()[: int(full.stat().st_size * 0.8)])):
        src, out = tmp_path / f"{name}.mp4", tmp_path / f"{name}-out.mp4"
        src.write_bytes(data_)
        main(["video", str(src), str(out), "--prompt", "x", *SIZE])
        printed = capsys.readouterr().out
        with av.open(str(out)) as c:
            audio_packets = sum(1 for p in c.demux(audio=0) if p.size) if c.streams.audio else 0
        assert ("audio packets copied" in printed) == (audio_packets > 0), (name, printed, audio_packets)


def test_log_lines_print_above_the_progress_bar(clip, tmp_path, capsys, monkeypatch):
    """A warning logged mid-run gets a line of its own instead of being appended to the bar's line."""
    import logging
    import sys

    from streamv2v_trt.cli import video

    translate = video.translate_video

    def warns_mid_run(*args, on_frame, **kwargs):
        def on_frame_then_warn(report):
            on_frame(report)
            if report.frames_out == 3:
                logging.getLogger("streamv2v_trt.test").warning("a warning mid-run")

        return translate(*args, on_frame=on_frame_then_warn, **kwargs)

    monkeypatch.setattr(video, "translate_video", warns_mid_run)
    # The console handler configure_logging installs outside pytest (pytest's own handlers make it a no-op here).
    console = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(console)
    try:
        rc = main(["video", str(clip), str(tmp_path / "out.mp4"), "--prompt", "x", "--height", "64", "--width", "64"])
    finally:
        logging.getLogger().removeHandler(console)
    shown = terminal_lines(capsys.readouterr().err)
    assert rc == 0 and "a warning mid-run" in shown, shown
    assert any("12/12" in line for line in shown), shown  # the bar was drawn


def test_the_nearest_built_size_aspect_first_then_area():
    from streamv2v_trt.frame_sizes import nearest_size, parse_size, size_text

    built = ((512, 512), (512, 768), (768, 512), (1024, 1024))  # (height, width)
    assert nearest_size(built, 1080, 1920) == (512, 768)  # 16:9 landscape: the 3:2 landscape size
    assert nearest_size(built, 640, 480) == (768, 512)  # 3:4 portrait: the 2:3 portrait size
    assert nearest_size(built, 600, 600) == (512, 512) and nearest_size(built, 900, 900) == (1024, 1024)
    assert nearest_size(built, 4000, 4000) == (1024, 1024)  # far beyond every size: still the nearest
    # Areas 4x smaller and 4x larger are equally far: the earlier size in the build's order.
    assert nearest_size(((256, 256), (1024, 1024)), 512, 512) == (256, 256)
    assert nearest_size(((1024, 1024), (256, 256)), 512, 512) == (1024, 1024)
    assert parse_size("768x512") == (512, 768) and size_text((512, 768)) == "768x512"
    for bad in ("768", "768x", "x512", "768*512", "-8x8"):
        with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
            parse_size(bad)


def test_fit_stream_resizes_to_the_nearest_built_size_unless_one_was_chosen():
    from conftest import tiny_spec

    from streamv2v_trt import StreamConfig, StreamV2V
    from streamv2v_trt.cli.video import fit_stream

    stream = StreamV2V.from_pretrained(StreamConfig(tiny_spec()))  # 64x64
    size = lambda: (stream.cfg.height, stream.cfg.width)  # noqa: E731
    fit_stream(stream, 720, 1280)
    assert size() == (64, 64)  # eager: any size would do, so the stream keeps its own (the preset's or asked)
    # What a build folder of two sizes reports (NamedIOBackend.sizes): the eager networks run both.
    stream.backend.sizes = ((64, 64), (48, 80))
    fit_stream(stream, 720, 1280, chosen=True)
    assert size() == (64, 64)  # --height/--width given: kept
    fit_stream(stream, 720, 1280)
    assert size() == (48, 80)
    out = stream(np.zeros((48, 80, 3), np.uint8))
    assert out.shape == (48, 80, 3)
    fit_stream(stream, 500, 480)
    assert size() == (64, 64)


# -- ControlNet: --controlnet (the networks), --control KIND[:SCALE] (what each is shown), --control-video FILE ----
CONTROLNET = ["--controlnet", "tiny"]


def decoded(path: Path) -> np.ndarray:
    _, frames = read_all(path)
    return np.stack([f.image for f in frames]).astype(np.int16)  # [N, H, W, 3]


def test_control_scale_reaches_the_stream(clip, tmp_path):
    runs = {"none": [], "zero": [*CONTROLNET, "--control", "canny:0"], "canny": [*CONTROLNET, "--control", "canny:0.8"]}
    out = {}
    for name, flags in runs.items():
        assert main(["video", str(clip), str(tmp_path / f"{name}.mp4"), "--prompt", "x", *SIZE, *flags]) == 0
        out[name] = decoded(tmp_path / f"{name}.mp4")
    assert out["none"].shape == out["canny"].shape == (12, 64, 64, 3)
    # A scale of 0 adds exactly nothing: the same frames as without a ControlNet, so the same encoded video.
    assert np.array_equal(out["zero"], out["none"])
    assert np.abs(out["canny"] - out["none"]).mean() > 1.0  # the ControlNet changes the output


def test_control_video_frames_are_the_control_images(clip, tmp_path):
    # The input itself as the control video: kind video then sees the frames kind frame makes from the input.
    frame, video = tmp_path / "frame.mp4", tmp_path / "video.mp4"
    assert main(["video", str(clip), str(frame), "--prompt", "x", *SIZE, *CONTROLNET, "--control", "frame"]) == 0
    flags = [*CONTROLNET, "--control", "video:1", "--control-video", str(clip)]
    assert main(["video", str(clip), str(video), "--prompt", "x", *SIZE, *flags]) == 0
    assert np.array_equal(decoded(video), decoded(frame))
    # Another control video (the pan in negative) changes the output.
    other = tmp_path / "negative.mp4"
    write_clip(other, [255 - f for f in pan_frames(12)])
    flags[-1] = str(other)
    assert main(["video", str(clip), str(tmp_path / "o.mp4"), "--prompt", "x", *SIZE, *flags]) == 0
    assert np.abs(decoded(tmp_path / "o.mp4") - decoded(frame)).mean() > 1.0


def test_a_control_video_shorter_than_declared_leaves_a_playable_partial_output(tmp_path, capsys):
    clip, full = tmp_path / "clip.mp4", tmp_path / "full.mp4"
    write_clip(clip, pan_frames(24))
    write_clip(full, [255 - f for f in pan_frames(24)])
    data_ = full.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data_[: int(len(data_) * 0.8)])  # declares 24 frames, decodes fewer: found mid-run
    out = tmp_path / "out.mp4"
    flags = [*CONTROLNET, "--control", "video:1", "--control-video", str(cut)]
    assert main(["video", str(clip), str(out), "--prompt", "x", *SIZE, *flags]) == 1
    captured = capsys.readouterr()
    assert "error:" in captured.err and "Traceback" not in captured.err
    assert str(cut) in captured.err and "frames before it" in captured.err
    frames = decoded(out)  # the partial output decodes to the end
    assert 0 < len(frames) < 24
    assert f"{len(frames)} frames" in captured.out


@pytest.mark.parametrize(
    "make, flags, said",
    [
        (lambda p: write_clip(p, pan_frames(6)), [], "has 6 frames, the input 12"),
        (lambda p: write_clip(p, [np.zeros((64, 96, 3), np.uint8)] * 12), [], "another aspect ratio"),
        (lambda p: write_clip(p, pan_frames(12)), ["--control", "frame"], "0 ControlNet(s) of kind video"),
        (lambda p: p.write_bytes(b"not a video"), [], "control.mp4"),
    ],
)
def test_unusable_control_videos_fail_before_loading(clip, tmp_path, capsys, make, flags, said):
    control, out = tmp_path / "control.mp4", tmp_path / "out.mp4"
    make(control)
    flags = flags or ["--control", "video:0.5"]
    args = ["video", str(clip), str(out), "--prompt", "x", *SIZE, *CONTROLNET, *flags, "--control-video", str(control)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--control", "canny"], "no ControlNet; add --controlnet"),
        ([*CONTROLNET, "--control", "canny,frame"], "2 control(s) for 1 ControlNet(s)"),
        ([*CONTROLNET, "--control", "depth:1"], "control kind 'depth' is unknown"),
        ([*CONTROLNET, "--control", "canny:x"], "is not a number"),
        ([*CONTROLNET, "--control", "canny:-1"], "finite number >= 0"),
        ([*CONTROLNET, "--control", "video"], "1 ControlNet(s) of kind video"),
    ],
)
def test_control_flag_mistakes_are_one_line(clip, tmp_path, capsys, flags, said):
    assert main(["video", str(clip), str(tmp_path / "o.mp4"), "--prompt", "x", *SIZE, *flags]) == 1
    err = capsys.readouterr().err
    assert said in err and err.startswith("error:") and "Traceback" not in err, err


def test_a_control_video_that_ends_first_stops_the_run_with_its_frames_written(clip, tmp_path):
    # A container that does not declare a length is only found short mid-run: translate_video stops there.
    from streamv2v_trt.cli.video import translate_video
    from streamv2v_trt.config import StreamConfig
    from streamv2v_trt.opening import open_stream
    from streamv2v_trt.source import Source
    from streamv2v_trt.spec import EngineSpec
    from streamv2v_trt.video_io import VideoWriter

    spec = EngineSpec.resolve("tiny", height=64, width=64, controlnets=("tiny",))
    stream = open_stream(Source(device="cpu"), StreamConfig(spec, control_kinds=("video",)), prompt="x")
    short = tmp_path / "short.mp4"
    write_clip(short, pan_frames(5))
    out = tmp_path / "out.mp4"
    with VideoReader(clip) as reader, VideoReader(short) as control:
        writer = VideoWriter(out, 64, 64, Fraction(FPS))
        report = translate_video(stream, reader, writer, controls=[(0, control)])
    assert "ended after 5 frames" in report.error and str(short) in report.error
    assert report.frames_in == report.frames_out == 5
    assert len(decoded(out)) == 5  # playable, every frame that had a control image
