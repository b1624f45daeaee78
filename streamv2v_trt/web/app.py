"""The live camera demo: a FastAPI app with one page and one WebSocket per camera.

Protocol on `/ws` (every binary message from the page is one frame; frames are numbered 0, 1, 2, ... in
the order they arrive, which is the order the page sent them, so both sides agree on `seq`):

    page -> server   binary: a JPEG/PNG/WebP frame
                     text:   {"type": "prompt", "prompt": "..."} | {"type": "reset"}
    server -> page   {"type": "ready", "width", "height", "prompt", "max_frame_bytes"}
                     {"type": "result", "seq", "model_ms", "server_ms", "fps", "dropped"} then binary JPEG
                     {"type": "dropped", "seq"}            (a newer frame replaced it while the model was busy)
                     {"type": "error", "seq"?, "message"}  (bad frame or message; the socket stays usable)
                     {"type": "prompt", "prompt"} | {"type": "reset"}   (acknowledgements)

Each connection has its own StreamV2V (its own bank). All model calls go through one worker thread, so
connections share the accelerator in turn. Per connection, one frame waits at most: a newer frame
replaces it (latest frame wins), so a slow model drops frames instead of queueing them.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources

import numpy as np
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse
from PIL import Image, UnidentifiedImageError

from ..frames import FrameError
from ..pipeline import StreamV2V
from ..video_io import fit_to_size

log = logging.getLogger(__name__)

IMAGE_FORMATS = {"JPEG", "PNG", "WEBP"}


@dataclass(frozen=True)
class Limits:
    max_frame_bytes: int = 2 * 1024 * 1024  # a 1080p JPEG is ~0.5 MB; the page sends stream-sized frames
    max_frame_pixels: int = 4096 * 4096  # checked from the header, before decoding
    max_prompt_chars: int = 1000
    max_connections: int = 8  # each holds a bank on the accelerator
    jpeg_quality: int = 85


class BadFrame(ValueError):
    """A frame message that is not a usable image; reported to the page, the connection goes on."""


def decode_image(data: bytes, limits: Limits) -> np.ndarray:
    """JPEG/PNG/WebP bytes -> RGB uint8 [H, W, 3]; BadFrame for anything else."""
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except (UnidentifiedImageError, OSError) as e:
        raise BadFrame(f"frame of {len(data)} bytes is not an image; send JPEG, PNG or WebP bytes") from e
    if img.format not in IMAGE_FORMATS:
        raise BadFrame(f"frame is {img.format}; send JPEG, PNG or WebP")
    w, h = img.size
    if w * h > limits.max_frame_pixels:
        raise BadFrame(f"frame is {w}x{h}, over the limit of {limits.max_frame_pixels} pixels")
    try:
        return np.array(img.convert("RGB"))  # a writable copy: torch warns on read-only arrays
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # truncated or corrupt image data
        raise BadFrame(f"frame could not be decoded: {' '.join(str(e).split())}") from e


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def index_html() -> str:
    return resources.files(__package__).joinpath("index.html").read_text(encoding="utf-8")


def create_app(stream_factory: Callable[[], StreamV2V], limits: Limits = Limits()) -> FastAPI:
    """The demo app. `stream_factory()` makes a fresh stream (own bank) for each connection."""
    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamv2v-model")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        model_thread.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="StreamV2V live demo", lifespan=lifespan)
    app.state.limits = limits
    app.state.connections = 0
    page = index_html()

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.websocket("/ws")
    async def ws_endpoint(ws: WebSocket) -> None:
        await ws.accept()
        if app.state.connections >= limits.max_connections:
            await ws.send_json({"type": "error", "message": f"server busy: {limits.max_connections} cameras connected"})
            await ws.close(code=1013)
            return
        app.state.connections += 1
        try:
            loop = asyncio.get_running_loop()
            try:
                stream = await loop.run_in_executor(model_thread, stream_factory)
            except Exception as e:  # the page must hear why; the server keeps serving others
                log.exception("could not create a stream for a new connection")
                await ws.send_json({"type": "error", "message": f"could not create a stream: {e}"})
                await ws.close(code=1011)
                return
            await Session(ws, stream, model_thread, limits).run()
        finally:
            app.state.connections -= 1

    return app


class Session:
    """One camera: a receiver task fills the latest-frame slot, a worker task drains it through the model."""

    def __init__(self, ws: WebSocket, stream: StreamV2V, model_thread: ThreadPoolExecutor, limits: Limits) -> None:
        self.ws, self.stream, self.model_thread, self.limits = ws, stream, model_thread, limits
        self.slot: tuple[int, bytes, float] | None = None  # (seq, data, receive time): at most one waiting frame
        self.wake = asyncio.Event()
        self.send_lock = asyncio.Lock()  # a result is two messages (JSON then JPEG) that must stay together
        self.seq = 0
        self.dropped = 0
        self.fps = 0.0
        self._last_done: float | None = None

    async def run(self) -> None:
        cfg = self.stream.cfg
        await self.send({
            "type": "ready", "width": cfg.width, "height": cfg.height, "prompt": self.stream.prompt,
            "max_frame_bytes": self.limits.max_frame_bytes,
        })  # fmt: skip
        worker = asyncio.create_task(self.work())
        try:
            await self.receive()
        except WebSocketDisconnect:
            pass
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError):
                await worker

    async def send(self, msg: dict, data: bytes | None = None) -> None:
        async with self.send_lock:
            await self.ws.send_text(json.dumps(msg))
            if data is not None:
                await self.ws.send_bytes(data)

    async def receive(self) -> None:
        while True:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            if msg.get("bytes") is not None:
                await self.on_frame(msg["bytes"])
            elif msg.get("text") is not None:
                await self.on_text(msg["text"])

    async def on_frame(self, data: bytes) -> None:
        seq, self.seq = self.seq, self.seq + 1
        if len(data) > self.limits.max_frame_bytes:
            await self.send({
                "type": "error", "seq": seq,
                "message": f"frame of {len(data)} bytes is over the limit of {self.limits.max_frame_bytes} bytes; "
                "send smaller JPEGs",
            })  # fmt: skip
            return
        if self.slot is not None:  # the model is busy: the waiting frame is stale, the new one wins
            self.dropped += 1
            await self.send({"type": "dropped", "seq": self.slot[0]})
        self.slot = (seq, data, time.perf_counter())
        self.wake.set()

    async def on_text(self, text: str) -> None:
        try:
            msg = json.loads(text)
            kind = msg["type"]
        except (json.JSONDecodeError, TypeError, KeyError):
            await self.send({"type": "error", "message": 'malformed message: expected JSON like {"type": "prompt", '
                             '"prompt": "..."}'})  # fmt: skip
            return
        loop = asyncio.get_running_loop()
        if kind == "prompt":
            prompt = msg.get("prompt")
            if not isinstance(prompt, str) or len(prompt) > self.limits.max_prompt_chars:
                await self.send({"type": "error", "message": f"prompt must be a string of at most "
                                 f"{self.limits.max_prompt_chars} characters"})  # fmt: skip
                return
            # Runs on the model thread, between two frames: the stream is never changed mid-frame.
            await loop.run_in_executor(self.model_thread, self.stream.update_prompt, prompt)
            await self.send({"type": "prompt", "prompt": prompt})
        elif kind == "reset":
            await loop.run_in_executor(self.model_thread, self.stream.reset)
            await self.send({"type": "reset"})
        else:
            await self.send({"type": "error", "message": f"unknown message type {kind!r}; expected prompt or reset"})

    async def work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            self.wake.clear()
            if self.slot is None:
                continue
            seq, data, received = self.slot
            self.slot = None
            try:
                jpeg, model_s = await loop.run_in_executor(self.model_thread, self.translate, data)
            except (BadFrame, FrameError) as e:
                await self.send({"type": "error", "seq": seq, "message": str(e)})
                continue
            except Exception as e:  # a model failure must not kill the server; the page shows it
                log.exception("frame %d failed", seq)
                await self.send({"type": "error", "seq": seq, "message": f"internal error: {e}"})
                continue
            now = time.perf_counter()
            if self._last_done is not None:
                inst = 1.0 / max(now - self._last_done, 1e-6)
                self.fps = inst if self.fps == 0 else 0.8 * self.fps + 0.2 * inst
            self._last_done = now
            stats = {
                "type": "result", "seq": seq, "model_ms": round(model_s * 1e3, 1),
                "server_ms": round((now - received) * 1e3, 1), "fps": round(self.fps, 2), "dropped": self.dropped,
            }  # fmt: skip
            await self.send(stats, jpeg)

    def translate(self, data: bytes) -> tuple[bytes, float]:
        """On the model thread: decode, fit, run the stream, encode."""
        cfg = self.stream.cfg
        image = fit_to_size(decode_image(data, self.limits), cfg.height, cfg.width)
        t0 = time.perf_counter()
        out = self.stream(image)
        model_s = time.perf_counter() - t0
        return encode_jpeg(out, self.limits.jpeg_quality), model_s
