"""`python -m streamv2v_trt video IN OUT --prompt "..."`: translate a video file.

Keeps the input's timestamps (fps, time base) and audio; frames are center-cropped and resized to the stream
size. Any failure prints one `error:` line; a run that stops early still leaves a playable partial output.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from ..video_io import TranslateReport, VideoError, VideoReader, VideoWriter, check_output_path, translate_video
from .stream_args import CliError, add_stream_args, build_stream

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("video", help="translate a video file", description=__doc__.splitlines()[0])
    p.add_argument("input", type=Path, help="input video (anything FFmpeg reads)")
    p.add_argument("output", type=Path, help="output video (.mp4, .mkv, .mov, .webm, .avi)")
    p.add_argument("--prompt", required=True, help="what the video should become")
    p.add_argument("--max-frames", type=int, help="stop after this many input frames")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_stream_args(p)
    p.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    if args.max_frames is not None and args.max_frames < 1:
        return _fail(f"--max-frames must be >= 1, got {args.max_frames}")
    if args.output.resolve() == args.input.resolve():
        return _fail("output path is the input path; choose another output file")
    try:
        check_output_path(args.output)
        reader = VideoReader(args.input)  # before loading the model: a bad input fails in milliseconds
    except VideoError as e:
        return _fail(str(e))
    with reader:
        try:
            stream = build_stream(args, prompt=args.prompt)
            info = reader.info
            writer = VideoWriter(
                args.output,
                stream.cfg.width,
                stream.cfg.height,
                info.fps or 30,
                time_base=info.time_base,
                audio_template=reader.audio,
            )
        except (CliError, VideoError) as e:
            return _fail(str(e))
        total = info.expected_frames or None
        if args.max_frames:
            total = min(total, args.max_frames) if total else args.max_frames
        audio = f" + {info.audio_codec} audio" if info.audio_codec else ""
        cfg = stream.cfg
        log.info(
            "%s: %dx%d %s @ %s fps%s -> %s at %dx%d, %d step(s), %s bank",
            info.path, info.width, info.height, info.codec, info.fps, audio,
            args.output, cfg.width, cfg.height, cfg.steps, cfg.bank.kind.value,
        )  # fmt: skip
        bar = tqdm(total=total, unit="frame", disable=args.no_progress, dynamic_ncols=True)

        def on_frame(r: TranslateReport) -> None:
            bar.n = r.frames_out
            bar.set_postfix_str(f"{r.fps:.1f} FPS, model {r.model_fps:.1f} FPS", refresh=False)
            bar.refresh()

        try:
            report = translate_video(stream, reader, writer, max_frames=args.max_frames, on_frame=on_frame)
        finally:
            bar.close()
    return _summarise(report, args.output, writer)


def _summarise(report: TranslateReport, output: Path, writer: VideoWriter) -> int:
    if report.frames_out == 0:
        output.unlink(missing_ok=True)  # an output with no frames is not a video; leave nothing behind
        return _fail(f"{report.error or 'no frames were translated'}; no output written")
    audio = ", audio copied" if writer.audio is not None else ""
    print(
        f"{'partial output' if report.error or report.interrupted else 'wrote'} {output}: {report.frames_out} "
        f"frames{audio} in {report.seconds:.1f} s, {report.fps:.1f} FPS (model {report.model_fps:.1f} FPS, "
        f"latency p50 {report.latency_ms(50):.0f} ms, p99 {report.latency_ms(99):.0f} ms)"
    )
    if report.interrupted:
        print(f"interrupted: {output} holds the {report.frames_out} frames translated so far", file=sys.stderr)
        return 130
    if report.error:
        return _fail(f"{report.error}; {output} holds the {report.frames_out} frames before it")
    return 0
