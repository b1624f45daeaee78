"""Video files in and out (PyAV).

Reading yields RGB uint8 frames with their timestamps; writing keeps the input's timestamps (so its fps and
time base, variable frame rate included) and copies the audio packets through untouched. Every failure is a
`VideoError` with a one-line message; a writer always finalises what it has, so a failed run leaves a
playable partial file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

log = logging.getLogger(__name__)

# Output codec per container extension: widely playable, and all in the PyAV wheels.
CODECS = {".mp4": "libx264", ".mov": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9", ".avi": "mpeg4"}


class VideoError(RuntimeError):
    """A video that cannot be read or written; the message is one line and says what to do."""


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    width: int
    height: int
    fps: Fraction | None  # average rate; None when the container does not say
    time_base: Fraction | None
    frames: int  # declared frame count, 0 when unknown
    duration_s: float | None
    codec: str
    audio_codec: str | None

    @property
    def expected_frames(self) -> int:
        """Declared count, else duration x fps, else 0 (unknown)."""
        if self.frames:
            return self.frames
        if self.duration_s and self.fps:
            return int(round(self.duration_s * float(self.fps)))
        return 0


@dataclass
class Frame:
    image: np.ndarray  # [H, W, 3] uint8 RGB
    pts: int | None  # in the input video stream's time base
    index: int


def _one_line(e: BaseException) -> str:
    text = getattr(e, "strerror", None) if isinstance(e, av.error.FFmpegError) else None
    return " ".join(str(text or e).split()) or type(e).__name__


class VideoReader:
    """Decode the first video stream of a file. Audio packets, if any, go to `on_audio` untouched."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise VideoError(f"input video not found: {self.path}")
        if not self.path.is_file():
            raise VideoError(f"input {self.path} is not a file")
        try:
            self.container = av.open(str(self.path), "r")
        except (av.error.FFmpegError, UnicodeDecodeError) as e:
            raise VideoError(
                f"cannot open {self.path} as a video ({_one_line(e)}); is it a complete video file?"
            ) from e
        if not self.container.streams.video:
            self.container.close()
            raise VideoError(f"{self.path} has no video stream")
        self.video = self.container.streams.video[0]
        self.audio = self.container.streams.audio[0] if self.container.streams.audio else None
        ctx = self.video.codec_context
        if ctx is None or not ctx.width or not ctx.height:
            self.container.close()
            raise VideoError(
                f"{self.path}: video codec {ctx.name if ctx else getattr(self.video, 'name', '?')} cannot be decoded "
                "by this FFmpeg build; re-encode it to H.264 (ffmpeg -i IN -c:v libx264 OUT.mp4)"
            )
        duration = None
        if self.video.duration is not None and self.video.time_base is not None:
            duration = float(self.video.duration * self.video.time_base)
        elif self.container.duration is not None:
            duration = self.container.duration / av.time_base
        self.info = VideoInfo(
            path=self.path,
            width=ctx.width,
            height=ctx.height,
            fps=Fraction(self.video.average_rate) if self.video.average_rate else None,
            time_base=Fraction(self.video.time_base) if self.video.time_base else None,
            frames=int(self.video.frames or 0),
            duration_s=duration,
            codec=ctx.name,
            audio_codec=self.audio.codec_context.name if self.audio is not None else None,
        )

    def frames(
        self, max_frames: int | None = None, on_audio: Callable[[av.Packet], None] | None = None
    ) -> Iterator[Frame]:
        """Decoded frames in order. Raises VideoError on a decode error or a stream shorter than declared."""
        streams = [self.video] + ([self.audio] if self.audio is not None and on_audio is not None else [])
        n = 0
        error: av.error.FFmpegError | None = None
        try:
            for packet in self.container.demux(*streams):
                if packet.stream.type == "audio":
                    if packet.dts is not None:  # the demuxer's final empty packet has no timestamps
                        on_audio(packet)
                    continue
                for frame in packet.decode():
                    yield Frame(frame.to_ndarray(format="rgb24"), frame.pts, n)
                    n += 1
                    if max_frames is not None and n >= max_frames:
                        return
        except av.error.FFmpegError as e:
            error = e
        if error is not None:
            # The decoder still holds frames it had buffered (B-frames, lookahead): hand them out first.
            try:
                for frame in self.video.codec_context.decode(None):
                    yield Frame(frame.to_ndarray(format="rgb24"), frame.pts, n)
                    n += 1
                    if max_frames is not None and n >= max_frames:
                        return  # got what was asked for; the error lies beyond it
            except av.error.FFmpegError:
                pass
            raise VideoError(f"decode error in {self.path} after {n} frames: {_one_line(error)}") from error
        self._check_count(n)

    def _check_count(self, n: int) -> None:
        """A stream that decoded fewer frames than it declared is truncated or damaged."""
        expected = self.info.expected_frames
        # A declared count is exact; a duration-based estimate gets some slack for rounding.
        slack = 0 if self.info.frames else max(2, expected // 50)
        if expected and n < expected - slack:
            raise VideoError(f"{self.path} ended after {n} of {expected} frames: the file is truncated or damaged")
        if n == 0:
            raise VideoError(f"{self.path} has a video stream but no decodable frames")

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_output_path(path: Path) -> str:
    """The video codec for `path`'s container; raises VideoError for an unknown one or a missing folder."""
    codec = CODECS.get(path.suffix.lower())
    if codec is None:
        raise VideoError(f"output {path}: unknown container {path.suffix!r}; use one of {', '.join(CODECS)}")
    if not path.parent.is_dir():
        raise VideoError(f"output folder {path.parent} does not exist")
    return codec


class VideoWriter:
    """Encode RGB uint8 frames; timestamps in `time_base` (the input's), audio copied from a template stream."""

    def __init__(
        self,
        path: str | Path,
        width: int,
        height: int,
        fps: Fraction,
        *,
        time_base: Fraction | None = None,
        codec: str | None = None,
        audio_template: av.audio.stream.AudioStream | None = None,
        options: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        codec = codec or check_output_path(self.path)
        if width % 2 or height % 2:
            raise VideoError(f"output size {width}x{height} must be even for yuv420p video")
        try:
            av.codec.Codec(codec, "w")
        except (av.error.FFmpegError, ValueError) as e:
            raise VideoError(f"encoder {codec!r} is not available in this PyAV/FFmpeg build") from e
        self.fps = Fraction(fps)
        self.time_base = Fraction(time_base) if time_base else 1 / self.fps  # of the pts given to write()
        # MPEG-4 Part 2 refuses time bases finer than 1/65535 (e.g. 1/90000 from cameras): encode at 1/fps.
        fine = codec == "mpeg4" and self.time_base.denominator > 65535
        self.codec_time_base = 1 / self.fps if fine else self.time_base
        try:
            self.container = av.open(str(self.path), "w")
        except (av.error.FFmpegError, ValueError, OSError) as e:
            raise VideoError(f"cannot create {self.path}: {_one_line(e)}") from e
        self.stream = self.container.add_stream(codec, rate=self.fps, options=options or {})
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.stream.codec_context.time_base = self.codec_time_base
        self.audio = None
        if audio_template is not None:
            name = audio_template.codec_context.name
            if name in self.container.supported_codecs:
                self.audio = self.container.add_stream_from_template(audio_template)
            else:
                log.warning("audio codec %s cannot go into a %s file; the output has no audio", name, suffix)
        self.frames_written = 0
        self.audio_packets = 0  # audio packets actually muxed (a stream without packets is no audio)
        self.failed = False  # the encoder refused a frame: nothing more can be written
        self._last_pts: int | None = None
        self._closed = False

    def write(self, image: np.ndarray, pts: int | None = None) -> None:
        """One RGB uint8 [H, W, 3] frame. `pts` in `time_base`; None continues at the stream's rate."""
        tb = self.codec_time_base
        if pts is not None:
            pts = round(pts * self.time_base / tb)
        if pts is None or (self._last_pts is not None and pts <= self._last_pts):
            step = max(1, round(1 / (self.fps * tb)))  # one frame period in codec time base units
            pts = 0 if self._last_pts is None else self._last_pts + step
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts, frame.time_base = pts, tb
        self._last_pts = pts
        try:
            for packet in self.stream.encode(frame):
                self.container.mux(packet)
        except av.error.FFmpegError as e:
            self.failed = True
            raise VideoError(f"encoding {self.path} failed after {self.frames_written} frames: {_one_line(e)}") from e
        self.frames_written += 1

    def mux_audio(self, packet: av.Packet) -> None:
        if self.audio is not None:
            packet.stream = self.audio
            try:
                self.container.mux(packet)
                self.audio_packets += 1
            except av.error.FFmpegError as e:  # audio is a bonus: keep the video going without it
                log.warning("audio dropped from %s: %s", self.path, _one_line(e))
                self.audio = None

    def close(self) -> None:
        """Flush the encoder and write the trailer: the file is playable whatever happened before."""
        if self._closed:
            return
        self._closed = True
        try:
            for packet in self.stream.encode(None):
                self.container.mux(packet)
        except av.error.FFmpegError as e:
            log.warning("flushing %s failed: %s", self.path, _one_line(e))
        finally:
            self.container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
