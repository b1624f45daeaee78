"""`python -m streamv2v_trt video IN OUT --prompt "..."`: translate a video file.

Keeps the input's timestamps (fps, time base) and audio; frames are center-cropped and resized to the stream
size: on a build folder of several sizes, the built size nearest the input's (`frame_sizes.nearest_size`: aspect
ratio first, then area), unless --height/--width name one; otherwise the stream's size (eager: the model preset's,
or --height/--width). Any failure prints one `error:` line. A run that fails part-way (a decode error mid-file,
Ctrl-C) leaves a playable file with the frames translated so far; an input that cannot be opened, or yields no
frame, leaves no output file at all.

ControlNets (`--controlnet NAME_OR_PATH[,..]`, the networks) are shown what `--control KIND[:SCALE][,..]` says, one
per ControlNet. Kind video reads user-made control frames (depth, pose, ...) from `--control-video FILE`, one file
per ControlNet of that kind, in order: frame i of the control video is the control image of input frame i, cropped
and resized as the input frames are. A control video must have the input's aspect ratio (else the crops would not
line up) and at least as many frames: a shorter one is refused before loading when the containers declare their
lengths, and otherwise stops the run where it ends (a playable partial output, as for a decode error).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..config import StreamConfig
from ..console import HelpFormatter, device_and_threads
from ..frame_sizes import nearest_size, size_text
from ..images import fit_to_size
from ..opening import open_stream
from ..stream import Stream
from ..video_io import VideoError, VideoInfo, VideoReader, VideoWriter, check_output_path
from .stream_args import CliError, add_stream_args, opening, stream_request

log = logging.getLogger(__name__)

SIZE_RULE = (
    "Inputs of any size are center-cropped and resized to the stream's size. A build folder of several sizes runs "
    "the built size nearest the input's: the nearest aspect ratio first, then the nearest area (--height/--width "
    "pick one instead). Eager runs the model preset's size or --height/--width (an input's own size would be slow "
    "and far from what the model was trained at)."
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "video",
        help="translate a video file",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1] + " " + SIZE_RULE,
        formatter_class=HelpFormatter,
    )
    p.add_argument("input", type=Path, help="input video (anything FFmpeg reads)")
    p.add_argument("output", type=Path, help="output video (.mp4, .mkv, .mov, .webm, .avi)")
    p.add_argument("--prompt", required=True, help="what the video should become")
    p.add_argument("--max-frames", type=int, help="stop after this many input frames")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--control-video",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="control frames for a ControlNet of kind video (--control video:SCALE), one FILE per such ControlNet "
        "in order; repeatable. Same aspect ratio as the input and at least as many frames",
    )
    add_stream_args(p)
    p.set_defaults(func=run)


@dataclass
class TranslateReport:
    frames_in: int = 0
    frames_out: int = 0
    seconds: float = 0.0
    model_seconds: list[float] = field(default_factory=list)  # per stream call
    error: str | None = None  # set when the run stopped early; the output holds the frames before it
    interrupted: bool = False

    @property
    def fps(self) -> float:
        return self.frames_out / self.seconds if self.seconds > 0 else 0.0

    @property
    def model_fps(self) -> float:
        total = sum(self.model_seconds)
        return len(self.model_seconds) / total if total > 0 else 0.0

    def latency_ms(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.model_seconds) * 1e3, q)) if self.model_seconds else 0.0


def translate_video(
    stream: Stream,
    reader: VideoReader,
    writer: VideoWriter,
    *,
    max_frames: int | None = None,
    on_frame: Callable[[TranslateReport], None] | None = None,
    controls: Sequence[tuple[int, VideoReader]] = (),
) -> TranslateReport:
    """Translate every frame of `reader` into `writer` with `stream` (any `Stream`); frame i out = frame i in.

    The stream batch delays its output by `steps - 1` frames; those first outputs (from empty slots) are
    dropped and the last input frame is pushed again at the end to flush, so the output has exactly the
    input's frames and timestamps. A read error stops the run and is returned in `report.error`; the
    writer is always closed, so the output is playable. KeyboardInterrupt also finalises the output.

    `controls`: (ControlNet index, reader) pairs of control videos (kind video): frame i of each is the control
    image of input frame i. A control video that ends first stops the run as a read error does.
    """
    cfg = stream.cfg
    delay = cfg.steps - 1
    pending: deque[int | None] = deque()  # timestamps of frames inside the stream batch
    report = TranslateReport()
    start = time.perf_counter()
    last: np.ndarray | None = None
    control_frames = [(index, c, c.frames()) for index, c in controls]

    def push(image: np.ndarray, pts: int | None) -> None:
        t0 = time.perf_counter()
        out = stream(image)
        report.model_seconds.append(time.perf_counter() - t0)
        pending.append(pts)
        if len(pending) > delay:
            writer.write(out, pending.popleft())
            report.frames_out += 1
        report.seconds = time.perf_counter() - start
        if on_frame is not None:
            on_frame(report)

    try:
        try:
            for frame in reader.frames(max_frames, on_audio=writer.mux_audio):
                for index, control, frames in control_frames:  # before the frame counts: it may not run
                    image = next(frames, None)
                    if image is None:
                        n = report.frames_in
                        raise VideoError(
                            f"control video {control.info.path} ended after {n} frames, before the input did: give "
                            "a control video as long as the input" + (f" (or --max-frames {n})" if n else "")
                        )
                    stream.set_control_frame(index, fit_to_size(image.image, cfg.height, cfg.width))
                report.frames_in += 1
                last = fit_to_size(frame.image, cfg.height, cfg.width)
                push(last, frame.pts)
        except VideoError as e:  # a read error, or the writer failed
            report.error = str(e)
        # Flush: push the last frame again until every real frame has left the stream batch.
        while last is not None and not writer.failed and report.frames_out < report.frames_in:
            try:
                push(last, None)
            except VideoError as e:
                report.error = report.error or str(e)
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        report.seconds = time.perf_counter() - start
        writer.close()
    return report


def control_videos(
    args: argparse.Namespace, cfg: StreamConfig, *, info: VideoInfo, resources: ExitStack
) -> list[tuple[int, VideoReader]]:
    """The `--control-video` readers, each paired with its ControlNet (the kind-video ones, in order), opened into
    `resources` and checked against the input before any model loads: count, aspect ratio, declared length."""
    indices = [i for i, kind in enumerate(cfg.control_kinds) if kind == "video"]
    if len(args.control_video) != len(indices):
        raise CliError(
            f"{len(args.control_video)} --control-video file(s) for {len(indices)} ControlNet(s) of kind video "
            f"(--control {args.control or 'not given: frame each'}): give one --control-video FILE per video:SCALE"
        )
    needed = min(info.expected_frames, args.max_frames or info.expected_frames)
    controls = []
    for index, path in zip(indices, args.control_video):
        reader = resources.enter_context(VideoReader(path))
        c = reader.info
        # fit_to_size crops each video to the stream's aspect ratio around its center: the same region only when
        # both have one aspect ratio (1%: encoders round odd sizes to even ones).
        if abs(c.width * info.height - info.width * c.height) > 0.01 * info.width * c.height:
            raise CliError(
                f"control video {path} is {c.width}x{c.height}, the input {info.width}x{info.height}: another aspect "
                "ratio, so their crops would not line up; make the control video from the input (same aspect ratio)"
            )
        if c.expected_frames and needed and c.expected_frames < needed:
            raise CliError(
                f"control video {path} has {c.expected_frames} frames, the input {needed} to translate: give a "
                f"control video as long as the input (or --max-frames {c.expected_frames})"
            )
        controls.append((index, reader))
    return controls


def fit_stream(stream: Stream, height: int, width: int, *, chosen: bool = False) -> None:
    """Resize `stream` to the built size nearest an input of height x width (`SIZE_RULE`); a stream of one size,
    an eager one (any size: it keeps its own) or a size the user `chosen` stays as it is."""
    sizes = stream.sizes
    if chosen or not sizes or len(sizes) == 1:
        return
    size = nearest_size(sizes, height, width)
    if size != (stream.cfg.height, stream.cfg.width):
        log.info("input %s: running the nearest built size, %s", size_text((height, width)), size_text(size))
        stream.resize(*size)


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
    with reader, ExitStack() as resources:
        try:
            source, cfg = stream_request(args)
            controls = control_videos(args, cfg, info=reader.info, resources=resources)
            with opening(source.engines, cfg.spec.model):
                stream = open_stream(source, cfg, prompt=args.prompt, negative_prompt=args.negative_prompt or "")
            info = reader.info
            fit_stream(stream, info.height, info.width, chosen=args.height is not None or args.width is not None)
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
            args.output, cfg.width, cfg.height, cfg.steps, cfg.spec.bank.value,
        )  # fmt: skip
        # Log lines (a backend's warnings mid-run) print above the bar rather than into its line.
        with logging_redirect_tqdm():
            bar = tqdm(total=total, unit="frame", disable=args.no_progress, dynamic_ncols=True)

            def on_frame(r: TranslateReport) -> None:
                bar.n = r.frames_out
                bar.set_postfix_str(f"{r.fps:.1f} FPS, model {r.model_fps:.1f} FPS", refresh=False)
                bar.refresh()

            try:
                report = translate_video(
                    stream, reader, writer, max_frames=args.max_frames, on_frame=on_frame, controls=controls
                )
            finally:
                bar.close()
    # The thread count torch runs with: the --threads policy open_stream applied (1 on a CPU by default).
    return _summarise(report, args.output, writer, device_and_threads(stream.device))


def _summarise(report: TranslateReport, output: Path, writer: VideoWriter, ran_on: str) -> int:
    """Print what was written and how fast; `ran_on` names the device and threads (`device_and_threads`)."""
    if report.frames_out == 0:
        output.unlink(missing_ok=True)  # an output with no frames is not a video; leave nothing behind
        return _fail(f"{report.error or 'no frames were translated'}; no output written")
    audio = f", {writer.audio_packets} audio packets copied" if writer.audio_packets else ""
    print(
        f"{'partial output' if report.error or report.interrupted else 'wrote'} {output}: {report.frames_out} "
        f"frames{audio} in {report.seconds:.1f} s, {report.fps:.1f} FPS (model {report.model_fps:.1f} FPS, "
        f"latency p50 {report.latency_ms(50):.0f} ms, p99 {report.latency_ms(99):.0f} ms) on {ran_on}"
    )
    if report.interrupted:
        print(f"interrupted: {output} holds the {report.frames_out} frames translated so far", file=sys.stderr)
        return 130
    if report.error:
        return _fail(f"{report.error}; {output} holds the {report.frames_out} frames before it")
    return 0
