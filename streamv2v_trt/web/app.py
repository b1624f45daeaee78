"""The live camera demo: a FastAPI app with one page and one WebSocket per camera.

Protocol on `/ws` (every binary message from the page is one frame; frames are numbered 0, 1, 2, ... in
the order they arrive, which is the order the page sent them, so both sides agree on `seq`):

    page -> server   binary: a JPEG/PNG/WebP frame
                     text:   {"type": "prompt", "prompt": "..."} | {"type": "reset"}
                             {"type": "size", "size": "768x512"}   (WIDTHxHEIGHT, one of ready's "sizes")
                             {"type": "loras", "loras": [{"name", "scale"}, ...]}  (serve --lora-dir: web/loras.py)
                             {"type": "stamp", "rows": N}  (latency test pattern: the top N rows of each frame come
                             back over the model's output, so the page can read its frame counter there; 0: off)
                             {"type": "control", "scales": [x, ..]?, "show": bool?}  (serve --controlnet: this
                             connection's ControlNet scales, one per ready's "controls", each in [0, 2]; show:
                             send the first ControlNet's control image, at most CONTROL_VIEW_HZ times a second)
    server -> page   {"type": "ready", "width", "height", "prompt", "max_frame_bytes", "sizes": ["512x512", ...],
                     "controls": [{"kind", "scale"}, ...]}  (+ "lora_files", "loras" with serve --lora-dir)
                     {"type": "result", "seq", "model_ms", "server_ms", "fps", "dropped"} then binary JPEG
                     {"type": "dropped", "seq"}            (a newer frame replaced it while the model was busy)
                     {"type": "error", "seq"?, "message"}  (bad frame or message; the socket stays usable)
                     {"type": "prompt", "prompt"} | {"type": "reset"} | {"type": "stamp", "rows"}   (acks)
                     {"type": "size", "size", "width", "height"}   (from the next frame on; a new scene)
                     {"type": "control", "scales", "show"}   (ack)
                     {"type": "control_image", "index": 0, "jpeg": BASE64}   (while show is on, after results;
                     in the text message, so it needs no binary slot and travels the WebRTC data channel too)
                     {"type": "loras", "loras"}   (the server's LoRA set changed: sent to every page)

The server closes the socket after an error message in five cases: the request's Host or Origin is not
allowed (1008, before any slot is taken), every slot of the hub is taken (1013, "server busy"), the hub has no
stream ready yet (1013, "server starting"), the connection's stream was lost (1011, "stream lost": the process
holding it stopped; reconnect for a fresh one), or no frame came for `Limits.idle_timeout_s` (1001).

The app serves from a `Hub` (`streamv2v_trt/hub.py`) and uses nothing else of it: every connection holds
one slot (its own stream and bank) from connect to disconnect; the hub batches the slots' frames into one
model call per tick on its own thread. Decoding, resizing and encoding images run on a small pool beside it,
so a large frame costs its sender, not the model. Per connection a frame is decoded as soon as it arrives and
pushed to the hub, where one frame per slot waits at most: a newer one replaces it (latest frame wins, the
replaced one is answered `dropped`), so a slow model drops frames instead of queueing them. What the hub says
about a slot comes back in its results: a `SlotLost` error ends the session (close 1011).

`serve --webrtc` adds a second transport to the same hub and the same `Session` (web/webrtc.py): frames on a video
track each way, these text messages on a data channel.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, PlainTextResponse

from ..client_limits import Limits
from ..frame_sizes import parse_size, size_text
from ..frames import FrameError
from ..hub import Hub, Latest, NotReady, Result, SizeUnavailable, SlotLost  # the protocol only: no model loads here
from .access import Access
from .codec import BadFrame, decode_frame, encode_jpeg
from .loras import LoraPicker, LoraRefused

log = logging.getLogger(__name__)

IMAGE_THREADS = 4  # decode/encode threads shared by all connections; each connection uses at most two at a time
MAX_IN_WORK = 3  # frames of one connection between decode and answer: one in a tick, one waiting, one answered
CONTROL_VIEW_HZ = 2.0  # control images a second at most per connection: a view to check, not a second video stream
MAX_CONTROL_SCALE = 2.0  # the slider's range; diffusers' examples use 0..2


def index_html() -> str:
    return resources.files(__package__).joinpath("index.html").read_text(encoding="utf-8")


def create_app(
    hub: Hub,
    limits: Limits | None = None,
    access: Access | None = None,
    on_shutdown: Callable[[], None] | None = None,
    loras: LoraPicker | None = None,
    webrtc: tuple[str, ...] | None = None,
) -> FastAPI:
    """The demo app, serving from `hub` (a `StreamServer`, or any `Hub`): one slot per connection, for its life.
    The hub belongs to the caller (start and stop it around the app), or, where the app is built inside a server
    process (Ray's ingress), `on_shutdown` stops it when the app shuts down. Default `limits`: `Limits()`;
    default `access`: localhost only. `loras`: the LoRA picker (`serve --lora-dir`; the hub then needs
    `set_loras`, web/loras.py); None: the page offers none. `webrtc`: the ICE (STUN/TURN) server URLs of the
    WebRTC transport (`serve --webrtc`, web/webrtc.py; () for none); None: no WebRTC (aiortc is not imported)."""
    limits, access = limits or Limits(), access or Access()
    image_pool = ThreadPoolExecutor(max_workers=IMAGE_THREADS, thread_name_prefix="streamv2v-image")
    peers = None

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        try:
            yield
        finally:
            if peers is not None:
                await peers.close_all()
            image_pool.shutdown(wait=False, cancel_futures=True)
            if on_shutdown is not None:
                on_shutdown()

    # No /docs or /openapi.json: the app has one page and one socket, and serves nothing it does not check.
    app = FastAPI(title="StreamV2V live demo", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.limits = limits
    app.state.hub = hub
    page = index_html()

    @app.get("/", response_class=HTMLResponse)
    async def index(request: Request):
        refusal = access.refusal(request.headers, secure=request.url.scheme == "https")
        if refusal is not None:
            log.warning("refused the page: %s", refusal)
            return PlainTextResponse(refusal, status_code=403)
        return HTMLResponse(page)

    @app.websocket("/ws")
    async def ws_endpoint(ws: WebSocket) -> None:
        await ws.accept()
        refusal = access.refusal(ws.headers, secure=ws.url.scheme == "wss")
        if refusal is not None:  # before any slot is taken
            log.warning("refused a WebSocket: %s", refusal)
            await ws.send_json({"type": "error", "message": refusal})
            await ws.close(code=1008, reason="host or origin not allowed")  # 1008: policy violation, do not retry
            return
        try:
            slot = await open_slot(hub)
        except NotReady as e:  # starting (models loading): not busy, and soon worth another try
            await ws.send_json({"type": "error", "message": f"server starting: {e}"})
            await ws.close(code=1013)  # 1013: try again later
            return
        except Exception as e:  # the page must hear why; the server keeps serving others
            log.exception("could not open a slot for a new connection")
            await ws.send_json({"type": "error", "message": f"could not open a stream: {e}"})
            await ws.close(code=1011)
            return
        if slot is None:
            await ws.send_json({"type": "error", "message": f"server busy: all {hub.capacity} streams are in use; "
                                "try again later"})  # fmt: skip
            await ws.close(code=1013)  # 1013: try again later
            return
        try:
            await Session(ws, hub, slot, image_pool, limits, loras).run()
        finally:
            hub.close(slot)  # at once, whatever ended the session: the next connection may take the slot

    if webrtc is not None:
        from .webrtc import add_webrtc  # aiortc only when asked for

        peers = add_webrtc(app, hub, limits, access, image_pool, loras, webrtc)
    return app


async def open_slot(hub: Hub) -> Any | None:
    """`hub.open()` on a worker thread (it blocks until the hub's loop has made the slot fresh). When the waiting
    task is cancelled (the server shuts down), the slot is given back once the open finishes."""
    opening = asyncio.get_running_loop().run_in_executor(None, hub.open)

    def give_back(done: asyncio.Future) -> None:
        if not done.cancelled() and done.exception() is None and done.result() is not None:
            hub.close(done.result())

    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        opening.add_done_callback(give_back)
        raise


class BadMessage(ValueError):
    """A text message the server cannot apply; answered with an error, the connection goes on."""


MALFORMED = 'malformed message: expected a JSON object like {"type": "prompt", "prompt": "..."} or {"type": "reset"}'
MAX_STAMP_SHARE = 4  # the stamp strip covers at most a quarter of the frame's rows
CLOSED = (WebSocketDisconnect, RuntimeError, OSError)  # what sending or receiving raises once the peer is gone


class Session:
    """One camera on one hub slot, as three tasks: the receiver keeps the newest frame not yet decoded, the pusher
    decodes it on the image pool and pushes it to the hub, the sender turns the hub's answers into messages
    (encoding results on the image pool). A frame is "in work" from decode to its answer.

    The transport is `ws` (a WebSocket: receive, send_text, send_bytes, close) and three methods that a WebRTC
    session overrides (web/webrtc.py): `frame_refusal`, `decode` and `encode`; the messages are the same."""

    def __init__(
        self, ws: WebSocket, hub: Hub, slot: Any, image_pool: ThreadPoolExecutor, limits: Limits,
        loras: LoraPicker | None = None,
    ) -> None:  # fmt: skip
        self.ws, self.hub, self.slot, self.image_pool, self.limits = ws, hub, slot, image_pool, limits
        self.height, self.width = hub.height, hub.width  # the slot's frame size: frames are decoded to it
        self.moving = False  # a size change is under way: frames decoded for the old size are dropped
        self.loras = loras
        self.loop = asyncio.get_running_loop()
        self.frame: Latest[tuple[int, bytes, float]] = Latest()  # (seq, data, receive time): the newest not decoded
        self.in_work = 0  # frames decoding, in the hub, or being answered; at most MAX_IN_WORK
        self.answers: asyncio.Queue[tuple[int, float, np.ndarray | None, Result]] = asyncio.Queue()  # hub thread
        self.wake = asyncio.Event()  # a frame came in, or a frame left work
        self.last_active = time.monotonic()  # when a frame last came in or was answered (the idle timeout)
        self.send_lock = asyncio.Lock()  # a result is two messages (JSON then JPEG) that must stay together
        self.seq = 0
        self.stamp_rows = 0  # the top rows of each input frame copied over its output ({"type": "stamp"})
        self.dropped = 0
        self.fps = 0.0
        self._last_done: float | None = None
        self.control_scales = tuple(scale for _, scale in hub.controls)  # this connection's ({"type": "control"})
        self.show_control = False  # send the control image now and then ({"type": "control", "show": true})
        self._control_view: asyncio.Task | None = None  # the control image being fetched and sent, if any
        self._control_sent_at = 0.0

    async def run(self) -> None:
        await self.send({
            "type": "ready", "width": self.hub.width, "height": self.hub.height, "prompt": self.hub.prompt,
            "max_frame_bytes": self.limits.max_frame_bytes, "sizes": [size_text(s) for s in self.hub.sizes],
            "controls": [{"kind": kind, "scale": scale} for kind, scale in self.hub.controls],
            **(self.loras.ready() if self.loras else {}),
        })  # fmt: skip
        if self.loras:  # told when another page changes the server's LoRA set
            self.loras.pages.add(self.send)
        tasks = [asyncio.create_task(work) for work in (self.receive(), self.push_frames(), self.send_answers())]
        try:  # the session ends when the receiver does (disconnect, idle) or a worker fails (socket gone)
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if self.loras:
                self.loras.pages.discard(self.send)
            if self._control_view is not None:
                tasks.append(self._control_view)
            for task in tasks:
                task.cancel()
            # asyncio.wait, not gather: when the server cancels this task meanwhile, gather would raise a child's
            # CancelledError in place of the server's own, and the server's cancel scope would not recognise it.
            await asyncio.wait(tasks)
        for task in tasks:  # all of them: a worker may fail (peer gone) before its cancel lands, unretrieved
            error = None if task.cancelled() else task.exception()
            if error is not None and not isinstance(error, CLOSED):
                log.error("a connection failed", exc_info=error)

    async def send(self, msg: dict, data: bytes | None = None) -> None:
        async with self.send_lock:
            await self.ws.send_text(json.dumps(msg))
            if data is not None:
                await self.ws.send_bytes(data)

    async def receive(self) -> None:
        while True:
            msg = await self.next_message()
            if msg is None:
                await self.close_idle()
                return
            if msg["type"] == "websocket.disconnect":
                return
            if msg.get("bytes") is not None:
                await self.on_frame(msg["bytes"])
            elif msg.get("text") is not None:
                try:
                    await self.on_text(msg["text"])
                except SlotLost as e:
                    await self.close_lost(e)
                    return

    async def next_message(self) -> dict | None:
        """The next ASGI message, or None once the connection is idle: no frame waiting or in work, and none
        received or answered for `idle_timeout_s` (text messages do not count: they hold no camera)."""
        timeout = self.limits.idle_timeout_s
        if timeout <= 0:
            return await self.ws.receive()
        while True:
            busy = self.in_work > 0 or self.frame.item is not None
            idle = 0.0 if busy else time.monotonic() - self.last_active
            if idle >= timeout:
                return None
            try:  # a receive cancelled by the timeout loses no message (it waits on the server's queue)
                return await asyncio.wait_for(self.ws.receive(), timeout - idle)
            except asyncio.TimeoutError:
                continue

    async def close_idle(self) -> None:
        timeout = self.limits.idle_timeout_s
        await self.send({"type": "error", "message": f"no frame for {timeout:g} s: closed this idle connection to "
                         "free its slot; reload the page to reconnect"})  # fmt: skip
        # 1001 (going away), not 1008 (policy violation): the client broke no rule, the server leaves a connection
        # it no longer serves, and a client may reconnect when it has frames. 1008 means a refused host or origin.
        await self.ws.close(code=1001, reason="idle")

    async def on_frame(self, data: bytes) -> None:
        seq, self.seq = self.seq, self.seq + 1
        self.last_active = time.monotonic()
        refusal = self.frame_refusal(data)
        if refusal is not None:
            await self.send({"type": "error", "seq": seq, "message": refusal})
            return
        # Replaced before any await, so the pusher never takes a frame that is also answered as dropped.
        replaced = self.frame.put(seq, (seq, data, time.perf_counter()))
        self.wake.set()
        if replaced is not None:  # still not decoded (this connection has MAX_IN_WORK in work): the new one wins
            self.dropped += 1
            await self.send({"type": "dropped", "seq": replaced[0]})

    def frame_refusal(self, data: Any) -> str | None:
        """Why a received frame is refused before it is decoded, or None."""
        if len(data) > self.limits.max_frame_bytes:
            return f"frame of {len(data)} bytes is over the limit of {self.limits.max_frame_bytes} bytes; send " \
                "smaller JPEGs"  # fmt: skip
        return None

    def decode(self, data: Any, height: int, width: int) -> np.ndarray:
        """A received frame -> RGB uint8 [height, width, 3] (on the image pool); BadFrame when it is not one."""
        return decode_frame(data, self.limits, height, width)

    async def encode(self, frame: np.ndarray) -> bytes | None:
        """An output frame -> what follows its result message (a JPEG); None: nothing follows."""
        return await self.loop.run_in_executor(self.image_pool, encode_jpeg, frame, self.limits.jpeg_quality)

    async def on_text(self, text: str) -> None:
        """Every text message gets one answer, an acknowledgement or an error; none ends the connection (but a
        stream the hub lost, `SlotLost`, raised for the session to end)."""
        try:
            reply = await self.apply_text(text)
        except BadMessage as e:
            reply = {"type": "error", "message": str(e)}
        except SlotLost:
            raise
        except Exception as e:  # the stream failed to apply a valid message: a server bug, but the page must hear it
            log.exception("text message %.100r failed", text)
            reply = {"type": "error", "message": f"internal error: {e}"}
        await self.send(reply)

    async def apply_text(self, text: str) -> dict:
        """Parse and apply one text message; its acknowledgement, or BadMessage saying what is wrong."""
        if len(text) > self.limits.max_text_chars:
            raise BadMessage(f"text message of {len(text)} characters is over the limit of "
                             f"{self.limits.max_text_chars}")  # fmt: skip
        try:
            msg = json.loads(text)
        except (ValueError, RecursionError) as e:  # RecursionError: deeply nested arrays or objects
            raise BadMessage(MALFORMED) from e
        kind = msg.get("type") if isinstance(msg, dict) else None
        if not isinstance(kind, str):
            raise BadMessage(MALFORMED)
        if kind == "prompt":
            prompt = msg.get("prompt")
            if not isinstance(prompt, str) or len(prompt) > self.limits.max_prompt_chars:
                raise BadMessage(f"prompt must be a string of at most {self.limits.max_prompt_chars} characters")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate ("\ud800"): JSON allows it, a tokenizer does not
                raise BadMessage("prompt is not valid Unicode text (it holds a lone surrogate escape)") from e
            # The hub applies it between two ticks: the stream is never changed mid-frame.
            await asyncio.wrap_future(self.hub.update_prompt(self.slot, prompt))
            return {"type": "prompt", "prompt": prompt}
        if kind == "reset":
            await asyncio.wrap_future(self.hub.reset(self.slot))
            return {"type": "reset"}
        apply = {"size": self.apply_size, "loras": self.apply_loras, "control": self.apply_control}.get(kind)
        if apply is not None:
            return await apply(msg)
        if kind == "stamp":
            rows = msg.get("rows")
            most = self.height // MAX_STAMP_SHARE
            if not isinstance(rows, int) or isinstance(rows, bool) or not 0 <= rows <= most:
                raise BadMessage(f"stamp rows must be a whole number from 0 to {most} (a quarter of the frame)")
            self.stamp_rows = rows
            return {"type": "stamp", "rows": rows}
        raise BadMessage(f"unknown message type {kind[:100]!r}; expected prompt, reset, size, loras, control or stamp")

    async def apply_control(self, msg: dict) -> dict:
        """{"type": "control", "scales": [..], "show": bool}: this connection's ControlNet scales (its slot's
        stream only) and whether it sees the control image. A BadMessage changes nothing."""
        n = len(self.hub.controls)
        if not n:
            raise BadMessage("this server runs no ControlNet: start it with serve --controlnet NAME --control KIND")
        scales, show = msg.get("scales"), msg.get("show")
        if scales is None and show is None:
            raise BadMessage('a control message needs "scales" (a list of numbers) or "show" (true or false)')
        if show is not None and not isinstance(show, bool):
            raise BadMessage(f'"show" must be true or false, got {str(show)[:40]!r}')
        if scales is not None:
            numbers = isinstance(scales, list) and all(
                isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in scales
            )
            if not numbers or len(scales) != n or not all(0 <= x <= MAX_CONTROL_SCALE for x in scales):
                raise BadMessage(f'"scales" must be a list of {n} number(s) from 0 to {MAX_CONTROL_SCALE:g}, one per '
                                 "ControlNet (ready's \"controls\")")  # fmt: skip
            scales = tuple(float(x) for x in scales)
            await asyncio.wrap_future(self.hub.update_control(self.slot, scales))  # between two ticks
            self.control_scales = scales
        if show is not None:
            self.show_control = show
        return {"type": "control", "scales": list(self.control_scales), "show": self.show_control}

    def view_control(self) -> None:
        """After a result: fetch and send the control image, unless one is under way or was sent too recently."""
        now = time.monotonic()
        if self._control_view is not None and not self._control_view.done():
            return
        if now - self._control_sent_at < 1.0 / CONTROL_VIEW_HZ:
            return
        self._control_sent_at = now
        self._control_view = asyncio.create_task(self.send_control_image())

    async def send_control_image(self) -> None:
        try:
            image = await asyncio.wrap_future(self.hub.control_image(self.slot, 0))
            data = await self.loop.run_in_executor(self.image_pool, encode_jpeg, image, self.limits.jpeg_quality)
        except SlotLost:  # the frames' answers end the session
            return
        except Exception as e:  # the view stops; the stream goes on
            log.exception("the control image could not be sent")
            self.show_control = False
            await self.send({"type": "error", "message": f"control image: internal error: {e}"})
            return
        await self.send({"type": "control_image", "index": 0, "jpeg": base64.b64encode(data).decode("ascii")})

    async def apply_size(self, msg: dict) -> dict:
        """{"type": "size", "size": "WIDTHxHEIGHT"}: the slot's stream at one of the hub's sizes (a new scene).
        An unknown or unavailable size is a BadMessage: the slot keeps its size and the session goes on."""
        offered = ", ".join(size_text(s) for s in self.hub.sizes)
        text = msg.get("size")
        try:
            size = parse_size(text)
        except ValueError as e:
            raise BadMessage(f"{e}; this server offers {offered}") from e
        if size not in self.hub.sizes:
            raise BadMessage(f"size {size_text(size)} is not served here; pick one of {offered}")
        self.moving = True  # frames decoded for the old size are dropped, not pushed into the new stream
        try:
            await asyncio.wrap_future(self.hub.resize(self.slot, *size))
            self.height, self.width = size
        except SizeUnavailable as e:
            raise BadMessage(str(e)) from e
        finally:
            self.moving = False
            self.wake.set()
        return {"type": "size", "size": size_text(size), "width": self.width, "height": self.height}

    async def apply_loras(self, msg: dict) -> dict:
        """The server's LoRA set, for every connection (web/loras.py); BadMessage when refused or not offered."""
        if self.loras is None:
            raise BadMessage("this server offers no LoRAs: start it with serve --lora-dir DIR")
        try:
            return await self.loras.apply(msg, self.hub, self.send)
        except LoraRefused as e:
            raise BadMessage(str(e)) from e

    async def push_frames(self) -> None:
        """Decode the newest frame off the model thread and push it to the hub (which keeps the newest per slot),
        while fewer than MAX_IN_WORK frames are in work: a client that reads no answers stops being fed."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            if self.frame.item is None or self.in_work >= MAX_IN_WORK:
                continue
            seq, data, received = self.frame.take()
            self.in_work += 1
            try:
                image = await self.loop.run_in_executor(self.image_pool, self.decode, data, self.height, self.width)
                if self.moving or image.shape[:2] != (self.height, self.width):  # decoded for the old size
                    self.dropped += 1
                    await self.answer({"type": "dropped", "seq": seq})
                    continue
                stamp = image[: self.stamp_rows].copy() if self.stamp_rows else None  # the model may change them
                self.hub.push(self.slot, image, partial(self.deliver, seq, received, stamp))
            except BadFrame as e:
                await self.answer({"type": "error", "seq": seq, "message": str(e)})
            except Exception as e:  # the hub refused the frame: the page hears it, the connection goes on
                log.exception("frame %d could not be queued", seq)
                await self.answer({"type": "error", "seq": seq, "message": f"internal error: {e}"})

    def deliver(self, seq: int, received: float, stamp: np.ndarray | None, result: Result) -> None:
        """The hub's answer to frame `seq`, on the hub's thread: handed to this connection's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.answers.put_nowait, (seq, received, stamp, result))
        except RuntimeError:  # the event loop has closed (the server is shutting down): nobody is listening
            pass

    async def send_answers(self) -> None:
        """The hub's answers in the order they came: dropped, error, or a result (encoded off the model thread).
        An answer that the stream was lost ends the session."""
        while True:
            seq, received, stamp, result = await self.answers.get()
            if isinstance(result.error, SlotLost):
                await self.close_lost(result.error)
                return
            if result.dropped:
                self.dropped += 1
                await self.answer({"type": "dropped", "seq": seq})
                continue
            if result.error is not None:
                message = str(result.error)
                if not isinstance(result.error, FrameError):  # a model fault: the hub logged it with its traceback
                    log.error("frame %d failed: %s", seq, message)
                    message = f"internal error: {message}"
                await self.answer({"type": "error", "seq": seq, "message": message})
                continue
            frame = result.frame
            if stamp is not None and stamp.shape[1:] == frame.shape[1:]:  # not across a size change
                frame = frame.copy()  # the hub's array may be a view of its own buffer
                frame[: len(stamp)] = stamp
            try:
                data = await self.encode(frame)
            except Exception as e:
                log.exception("frame %d could not be encoded", seq)
                await self.answer({"type": "error", "seq": seq, "message": f"internal error: {e}"})
                continue
            now = time.perf_counter()
            if self._last_done is not None:
                inst = 1.0 / max(now - self._last_done, 1e-6)
                self.fps = inst if self.fps == 0 else 0.8 * self.fps + 0.2 * inst
            self._last_done = now
            stats = {
                "type": "result", "seq": seq, "model_ms": round(result.tick_s * 1e3, 1),
                "server_ms": round((now - received) * 1e3, 1), "fps": round(self.fps, 2), "dropped": self.dropped,
            }  # fmt: skip
            await self.answer(stats, data)
            if self.show_control:
                self.view_control()

    async def close_lost(self, error: SlotLost) -> None:
        """The hub lost this connection's stream (the process holding it stopped): say why, then close 1011 (the
        server failed; the page may reconnect at once for a fresh stream)."""
        log.warning("closing a connection whose stream was lost: %s", error)
        await self.send({"type": "error", "message": str(error)})
        await self.ws.close(code=1011, reason="stream lost")

    async def answer(self, msg: dict, data: bytes | None = None) -> None:
        """Send the answer to a frame in work; the frame leaves work, making room for the next."""
        try:
            await self.send(msg, data)
        finally:
            self.in_work -= 1
            self.last_active = time.monotonic()
            self.wake.set()
