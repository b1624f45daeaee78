"""`serve --webrtc`: the live page's frames over WebRTC (aiortc), beside the WebSocket, on the same hub and slots.

    GET  /webrtc/ice     -> {"iceServers": [{"urls", "username"?, "credential"?}, ...]}  (serve --ice-server)
    POST /webrtc/offer   {"sdp": "...", "type": "offer"}  ->  {"sdp": "...", "type": "answer"}
                         or {"error": "..."}: 400 unusable offer, 403 Host/Origin refused, 413 too large,
                         503 busy or starting (the same words as the WebSocket's errors)

The offer holds one video track (the page's frames, each one camera or test-pattern frame at the stream's size) and
one data channel; the answer adds the server's video track (the translated frames). The data channel carries the
WebSocket protocol's text messages both ways, as they are (web/app.py: ready, prompt, reset, size, loras, stamp,
result, dropped, error): a `Session` runs them, with three methods of its own (`WebRtcSession`). What differs:
frames arrive decoded from the track and leave on the server's track, so no JPEG is sent after a `result`.

Each offer takes a slot before it is answered (the busy rule) and holds it until the session ends: the peer closes,
its connection fails, or no frame came for the idle timeout (a page that vanished without closing included). The
track's frames go into the session's latest-frame-wins slot as the WebSocket's JPEGs do; the server's track sends
the newest translated frame and never queues. STUN/TURN servers (`serve --ice-server URL`) are given to aiortc
and, by `/webrtc/ice` (under the same Host/Origin policy), to the page; without any, host candidates only:
loopback and LAN.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..client_limits import Limits
from ..hub import Hub, Latest, NotReady
from ..images import fit_to_size
from .access import Access
from .app import Session, open_slot
from .loras import LoraPicker

log = logging.getLogger(__name__)

MAX_OFFER_BYTES = 64 * 1024  # a browser's offer with one track and a data channel is ~5 KB
INBOX = 16  # messages and frames waiting for the session's receiver; a frame over that is dropped on arrival
CONNECT_TIMEOUT_S = 30.0  # from the answer to the data channel opening; then the slot is given back
CLOCK = 90_000  # the RTP video clock, Hz
DISCONNECT = {"type": "websocket.disconnect"}  # what `Session.receive` ends on


def ice_server(url: str) -> RTCIceServer:
    """`--ice-server` -> aiortc's: stun:HOST[:PORT], or turn(s):USER:PASSWORD@HOST[:PORT][?transport=udp|tcp]."""
    scheme, sep, rest = url.partition(":")
    if not sep or scheme not in ("stun", "turn", "turns") or not rest:
        raise ValueError(f"ICE server {url!r} is not a stun:, turn: or turns: URL (e.g. stun:stun.example.com:3478 "
                         "or turn:USER:PASSWORD@turn.example.com:3478)")  # fmt: skip
    credentials, at, host = rest.rpartition("@")
    if not at:
        return RTCIceServer(urls=url)
    username, _, credential = credentials.partition(":")
    return RTCIceServer(urls=f"{scheme}:{host}", username=unquote(username), credential=unquote(credential))


class PeerChannel:
    """A peer connection with the face of the WebSocket that `Session` uses: `receive` gives ASGI-like messages
    (a track frame as "bytes", a data-channel message as "text", then a disconnect), `send_text` writes to the
    data channel, `close` closes the connection. Sending on a closed channel raises ConnectionError, which the
    session takes for a peer that is gone."""

    def __init__(self, pc: RTCPeerConnection) -> None:
        self.pc = pc
        self.inbox: asyncio.Queue[dict] = asyncio.Queue()
        self.channel: Any = None  # the page's data channel, once it opened
        self.opened = asyncio.Event()
        self.reader: asyncio.Task | None = None  # reads the page's video track

    def put(self, msg: dict) -> None:
        # The receiver only files each frame into the session's latest-frame-wins slot, so it is behind only when
        # the event loop is starved; then this frame is dropped unseen rather than queued without bound.
        if "bytes" in msg and self.inbox.qsize() >= INBOX:
            return
        self.inbox.put_nowait(msg)

    async def receive(self) -> dict:
        return await self.inbox.get()

    async def send_text(self, text: str) -> None:
        try:
            await asyncio.wait_for(self.opened.wait(), CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ConnectionError(f"the data channel did not open within {CONNECT_TIMEOUT_S:g} s") from None
        if self.channel.readyState != "open":
            raise ConnectionError("the data channel is closed")
        self.channel.send(text)

    async def send_bytes(self, _data: bytes) -> None:
        raise ConnectionError("a WebRTC session sends frames on its video track, not on the data channel")

    async def close(self, code: int = 1000, reason: str = "") -> None:
        log.info("closing a WebRTC session (%d %s)", code, reason)
        self.put(DISCONNECT)
        await self.pc.close()

    def on_datachannel(self, channel: Any) -> None:
        if self.channel is not None:  # one channel per session: a second one is not listened to
            channel.close()
            return
        self.channel = channel
        channel.on("message", self.on_message)
        channel.on("close", lambda: self.put(DISCONNECT))
        if channel.readyState == "open":
            self.opened.set()
        else:
            channel.on("open", self.opened.set)

    def on_message(self, message: str | bytes) -> None:
        # Binary messages are decoded as text, so they get the protocol's answer (an error), not a frame's.
        text = message if isinstance(message, str) else message.decode("utf-8", "replace")
        self.put({"type": "websocket.receive", "text": text})

    def on_track(self, track: MediaStreamTrack, out: FrameTrack) -> None:
        if track.kind != "video" or self.reader is not None:  # audio, or a second video track: not read
            return
        self.pc.addTrack(out)  # answered with our track on the same transceiver (sendrecv)
        self.reader = asyncio.ensure_future(self.read(track))

    async def read(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                self.put({"type": "websocket.receive", "bytes": await track.recv()})
        except MediaStreamError:  # the track ended: the peer stopped sending or the connection closed
            self.put(DISCONNECT)

    def on_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            self.put(DISCONNECT)


class FrameTrack(MediaStreamTrack):
    """The server's video track: the newest translated frame, sent once; `recv` waits for the next one, so a
    frame is never sent twice and never waits behind another."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self.latest: Latest[np.ndarray] = Latest()
        self.ready = asyncio.Event()
        self.start = time.monotonic()
        self.pts = -1
        self.count = 0

    def put(self, frame: np.ndarray) -> None:
        self.latest.put(self.count, frame)
        self.count += 1
        self.ready.set()

    async def recv(self) -> av.VideoFrame:
        while self.latest.item is None:
            if self.readyState != "live":
                raise MediaStreamError
            self.ready.clear()
            await self.ready.wait()
        frame = av.VideoFrame.from_ndarray(self.latest.take(), format="rgb24")
        self.pts = max(self.pts + 1, int((time.monotonic() - self.start) * CLOCK))  # increasing, real time
        frame.pts, frame.time_base = self.pts, fractions.Fraction(1, CLOCK)
        return frame

    def stop(self) -> None:
        super().stop()
        self.ready.set()


class WebRtcSession(Session):
    """A `Session` whose frames are the track's (decoded by the browser's codec, fitted to the slot's size) and
    whose results go out on `out`, the server's track; the text messages are the WebSocket's."""

    def __init__(self, channel: PeerChannel, out: FrameTrack, *args) -> None:
        super().__init__(channel, *args)
        self.out = out

    def frame_refusal(self, frame: av.VideoFrame) -> str | None:
        if frame.width * frame.height > self.limits.max_frame_pixels:
            return f"frame is {frame.width}x{frame.height}, over the limit of {self.limits.max_frame_pixels} " \
                f"pixels; send frames near the stream size ({self.width}x{self.height})"  # fmt: skip
        return None

    def decode(self, frame: av.VideoFrame, height: int, width: int) -> np.ndarray:
        return fit_to_size(frame.to_ndarray(format="rgb24"), height, width)

    async def encode(self, frame: np.ndarray) -> None:
        self.out.put(frame)
        return None


def refused(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def read_offer(request: Request) -> tuple[str | None, JSONResponse | None]:
    """The SDP of the request's offer, or the error answer saying what is wrong with the request."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_OFFER_BYTES:
            return None, refused(413, f"offer over {MAX_OFFER_BYTES} bytes; send one video track and a data channel")
    try:
        msg = json.loads(body)
    except (ValueError, RecursionError):
        msg = None
    if not isinstance(msg, dict) or msg.get("type") != "offer" or not isinstance(msg.get("sdp"), str):
        return None, refused(400, 'expected a JSON object {"type": "offer", "sdp": "..."} (RTCPeerConnection\'s '
                             "localDescription after createOffer)")  # fmt: skip
    return msg["sdp"], None


class Peers:
    """`POST /webrtc/offer` and the sessions it started (closed with the app)."""

    def __init__(
        self, hub: Hub, limits: Limits, access: Access, image_pool: ThreadPoolExecutor, loras: LoraPicker | None,
        ice_urls: tuple[str, ...],
    ) -> None:  # fmt: skip
        self.hub, self.limits, self.access, self.image_pool, self.loras = hub, limits, access, image_pool, loras
        self.config = RTCConfiguration(iceServers=[ice_server(url) for url in ice_urls])
        self.tasks: set[asyncio.Task] = set()
        self.channels: set[PeerChannel] = set()

    async def offer(self, request: Request) -> JSONResponse:
        refusal = self.access.refusal(request.headers, secure=request.url.scheme == "https")
        if refusal is not None:  # before any slot is taken
            log.warning("refused a WebRTC offer: %s", refusal)
            return refused(403, refusal)
        sdp, error = await read_offer(request)
        if error is not None:
            return error
        try:
            slot = await open_slot(self.hub)
        except NotReady as e:
            return refused(503, f"server starting: {e}")
        except Exception as e:
            log.exception("could not open a slot for a WebRTC offer")
            return refused(500, f"could not open a stream: {e}")
        if slot is None:
            return refused(503, f"server busy: all {self.hub.capacity} streams are in use; try again later")
        return await self.answer(sdp, slot)

    async def ice(self, request: Request) -> JSONResponse:
        """The ICE servers for the page's RTCPeerConnection (TURN credentials included: a TURN server serves only
        clients that hold them, and the pages this policy allows are this server's clients)."""
        refusal = self.access.refusal(request.headers, secure=request.url.scheme == "https")
        if refusal is not None:
            return refused(403, refusal)
        servers = []
        for server in self.config.iceServers:
            login = {"username": server.username, "credential": server.credential} if server.username else {}
            servers.append({"urls": server.urls, **login})
        return JSONResponse({"iceServers": servers})

    async def answer(self, sdp: str, slot: Any) -> JSONResponse:
        """Answer the offer and start its session on `slot`; an unusable offer gives the slot back."""
        pc = RTCPeerConnection(self.config)
        channel, out = PeerChannel(pc), FrameTrack()
        pc.on("datachannel", channel.on_datachannel)
        pc.on("track", lambda track: channel.on_track(track, out))
        pc.on("connectionstatechange", channel.on_state)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            if channel.reader is None:
                raise ValueError("the offer has no video track to receive")
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as e:  # aiortc raises ValueError and others on SDP it cannot use: the client is told
            await pc.close()
            self.hub.close(slot)
            log.warning("refused a WebRTC offer: %s", e)
            return refused(400, f"could not use this offer ({' '.join(str(e).split())[:300]}); send the offer of "
                           "an RTCPeerConnection with one video track (sendrecv) and a data channel")  # fmt: skip
        session = WebRtcSession(channel, out, self.hub, slot, self.image_pool, self.limits, self.loras)
        task = asyncio.create_task(self.run_session(session, channel, slot))
        self.tasks.add(task)
        self.channels.add(channel)
        task.add_done_callback(lambda t: (self.tasks.discard(t), self.channels.discard(channel)))
        return JSONResponse({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type})

    async def run_session(self, session: WebRtcSession, channel: PeerChannel, slot: Any) -> None:
        try:
            await session.run()
        except ConnectionError as e:  # the peer never opened its data channel, or left while greeted
            log.info("a WebRTC session ended: %s", e)
        except Exception:
            log.exception("a WebRTC session failed")
        finally:
            self.hub.close(slot)  # at once: the next client may take it
            if channel.reader is not None:
                channel.reader.cancel()
            await channel.pc.close()

    async def close_all(self) -> None:
        for channel in list(self.channels):
            await channel.pc.close()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=5)


def add_webrtc(
    app: FastAPI, hub: Hub, limits: Limits, access: Access, image_pool: ThreadPoolExecutor,
    loras: LoraPicker | None, ice_urls: tuple[str, ...],
) -> Peers:  # fmt: skip
    """Add `POST /webrtc/offer` and `GET /webrtc/ice` to `app`; the sessions they start, for the app's shutdown."""
    peers = Peers(hub, limits, access, image_pool, loras, ice_urls)
    app.post("/webrtc/offer")(peers.offer)
    app.get("/webrtc/ice")(peers.ice)
    return peers
