"""`python -m benchmarks.serve_load --webrtc`: N aiortc clients of `serve --webrtc`, latency measured per frame.

    python -m benchmarks.serve_load --webrtc --url http://127.0.0.1:7860 --clients 4 --seconds 20 --fps 30

Each client offers one video track and a data channel (POST URL/webrtc/offer, web/webrtc.py) and sends frames at
`--fps` like a camera (open loop: the server's latest-frame-wins slot drops what the model cannot take). Every frame
carries its number in a stamp: the top rows hold STAMP_BITS black or white blocks (the number modulo 2**STAMP_BITS),
and the client asks the server (`{"type": "stamp", "rows": R}`) to copy those rows of each input over its output, so
the number survives any model and both video codecs. The client reads the number back from each frame on the
server's track: latency is sent -> decoded back here (the whole path: encode, network, the server's decode, slot and
model, encode, network, decode), and a frame never seen while a later one was is dropped. Per client: frames sent
and received in the window, FPS, latency p50/p99, the server's model_ms p50 (its `result` messages on the data
channel), dropped frames. Like serve_load, the client imports neither torch nor this project.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import logging
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import av
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from .serve_load import ClientStats, Window, parse, table, totals

log = logging.getLogger("benchmarks.serve_load")

STAMP_BITS = 8  # the number modulo 256: at 30 FPS, 8.5 s before it repeats, far above any latency measured
CLOCK = 90_000  # RTP video clock, Hz


def stamp_rows(height: int) -> int:
    """Rows of the stamp strip for frames `height` high (the page uses the same rule): an eighth, 4 at least."""
    return min(max(4, height // 8), height // 4)


def draw_stamp(image: np.ndarray, number: int) -> None:
    """Write `number` mod 2**STAMP_BITS into the top `stamp_rows` rows of `image` [H, W, 3]: one block per bit,
    most significant first, white for 1 and black for 0, across the width (blocks survive video coding)."""
    rows, block = stamp_rows(image.shape[0]), image.shape[1] // STAMP_BITS
    image[:rows] = 0
    for b in range(STAMP_BITS):
        if (number >> (STAMP_BITS - 1 - b)) & 1:
            image[:rows, b * block : (b + 1) * block] = 255


def read_stamp(image: np.ndarray) -> int | None:
    """The number `draw_stamp` wrote (mod 2**STAMP_BITS), or None when there is none: each block's middle half (edges
    the codec blurred do not count) must be clearly dark or light (a frame sent before the server took the stamp
    message holds the model's output there)."""
    rows, block = stamp_rows(image.shape[0]), image.shape[1] // STAMP_BITS
    number = 0
    for b in range(STAMP_BITS):
        mean = image[rows // 4 : rows - rows // 4, b * block + block // 4 : (b + 1) * block - block // 4].mean()
        if 64 < mean < 191:  # a quarter of the range from black or white: codecs move a flat block far less
            return None
        number = number << 1 | int(mean >= 191)
    return number


class StampedTrack(MediaStreamTrack):
    """Frames at `fps` once the size is known (`start`): a moving gradient with the frame's number stamped on."""

    kind = "video"

    def __init__(self, fps: float) -> None:
        super().__init__()
        self.fps, self.size = fps, asyncio.get_running_loop().create_future()
        self.sent: dict[int, float] = {}  # frame number -> perf_counter when it was handed to the encoder
        self.n = 0
        self.t0 = 0.0

    def start(self, width: int, height: int) -> None:
        if not self.size.done():
            self.size.set_result((width, height))

    async def recv(self) -> av.VideoFrame:
        width, height = await self.size
        if self.n == 0:
            self.t0 = time.monotonic()
        await asyncio.sleep(max(0.0, self.t0 + self.n / self.fps - time.monotonic()))
        y, x = np.mgrid[0:height, 0:width]
        image = np.stack([(x * 4 + self.n * 7) % 256, (y * 4) % 256, np.full_like(x, self.n * 13 % 256)], -1)
        image = image.astype(np.uint8)  # [H, W, 3]
        draw_stamp(image, self.n)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts, frame.time_base = int(self.n * CLOCK / self.fps), fractions.Fraction(1, CLOCK)
        self.sent[self.n] = time.perf_counter()
        self.n += 1
        return frame

    def number(self, code: int) -> int:
        """The newest frame number sent whose stamp reads `code`."""
        last = self.n - 1
        return last - (last - code) % (1 << STAMP_BITS)


def post_offer(url: str, offer: dict, origin: str | None, timeout: float) -> tuple[int, dict]:
    """POST the offer; (HTTP status, JSON body)."""
    headers = {"Content-Type": "application/json", **({"Origin": origin} if origin else {})}
    request = urllib.request.Request(f"{url.rstrip('/')}/webrtc/offer", json.dumps(offer).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, parse(e.read())


class Client:
    """One aiortc client: its connection, its stamped track, and what came back."""

    def __init__(self, i: int, args: argparse.Namespace, window: Window, ready: list) -> None:
        self.args, self.window, self.ready = args, window, ready
        self.stats = ClientStats(i)
        self.pc = RTCPeerConnection()
        self.track = StampedTrack(args.fps)
        self.pc.addTrack(self.track)
        self.channel = self.pc.createDataChannel("control")
        self.channel.on("message", self.on_message)
        self.readers: list[asyncio.Task] = []
        self.pc.on("track", lambda remote: self.readers.append(asyncio.ensure_future(self.read(remote))))
        self.seen: dict[int, float] = {}  # frame number -> latency (ms), for frames sent in the window
        self.newest = -1  # the newest frame number read back

    def on_message(self, text: str) -> None:
        msg, stats = parse(text), self.stats
        kind = msg.get("type")
        if kind == "ready":
            self.ready.append(msg)
            self.channel.send(json.dumps({"type": "stamp", "rows": stamp_rows(msg["height"])}))
            self.track.start(msg["width"], msg["height"])
        elif kind == "result" and time.perf_counter() in self.window:
            stats.model_ms.append(msg["model_ms"])
        elif kind == "error":
            stats.errors += 1
            stats.note(str(msg.get("message")))

    async def read(self, remote: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await remote.recv()
                now = time.perf_counter()
                code = read_stamp(frame.to_ndarray(format="rgb24"))
                if code is None:
                    continue
                n = self.track.number(code)
                if n <= self.newest:  # shown again, or out of order (counted as an error)
                    self.stats.errors += n < self.newest
                    continue
                self.newest = n
                if self.track.sent.get(n, 0.0) in self.window:
                    self.seen[n] = (now - self.track.sent[n]) * 1e3
        except MediaStreamError:
            pass

    async def run(self) -> ClientStats:
        args, stats = self.args, self.stats
        try:
            await self.pc.setLocalDescription(await self.pc.createOffer())
            offer = {"sdp": self.pc.localDescription.sdp, "type": "offer"}
            loop = asyncio.get_running_loop()
            try:
                status, answer = await loop.run_in_executor(None, post_offer, args.url, offer, args.origin,
                                                            args.timeout)  # fmt: skip
            except OSError as e:
                stats.note(f"could not post the offer: {e}")
                return stats
            if status != 200:
                stats.status = "refused" if status == 503 and "busy" in str(answer.get("error")) else "failed"
                stats.note(f"HTTP {status}: {answer.get('error')}")
                return stats
            stats.status = "served"
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
            await asyncio.sleep(max(0.0, self.window.end - time.perf_counter()) + 1.0)  # + answers on the way
        finally:
            await self.pc.close()
            for task in self.readers:
                task.cancel()
        sent = [n for n, t in self.track.sent.items() if t in self.window]
        stats.sent, stats.results = len(sent), len(self.seen)
        stats.latencies_ms = list(self.seen.values())
        stats.dropped = sum(1 for n in sent if n not in self.seen and n < self.newest)  # a later one came back
        stats.results_total = self.newest + 1
        stats.finish(self.window.end - self.window.start)
        return stats


async def run(args: argparse.Namespace) -> tuple[list[ClientStats], list[dict]]:
    t0 = time.perf_counter()
    window = Window(t0 + args.warmup, t0 + args.warmup + args.seconds)
    ready: list[dict] = []
    return list(await asyncio.gather(*(Client(i, args, window, ready).run() for i in range(args.clients)))), ready


def http_url(text: str) -> str:
    if urlsplit(text).scheme not in ("http", "https") or not urlsplit(text).hostname:
        raise argparse.ArgumentTypeError(f"url {text!r}: give the server's http(s)://HOST:PORT")
    return text


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_load --webrtc", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, type=http_url, help="the server, e.g. http://127.0.0.1:7860")
    p.add_argument("--clients", type=int, default=1, help="concurrent clients (default: 1)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured window (default: 10)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before the window, not measured (default: 3)")
    p.add_argument("--fps", type=float, default=30.0, help="frames each client sends per second (default: 30)")
    p.add_argument("--origin", default=None, help="send this Origin header (default: none, as a script)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the answer (default: 30)")
    args = p.parse_args(argv)
    for name in ("clients", "seconds", "fps", "timeout"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be > 0, got {getattr(args, name)}")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aioice").setLevel(logging.WARNING)  # a line per candidate pair and client otherwise
    stats, ready = asyncio.run(run(args))
    hello = ready[0] if ready else {}
    print(f"serve_load --webrtc {args.url}: {args.clients} client(s), {hello.get('width')}x{hello.get('height')} "
          f"frames at {args.fps:g} FPS each, {args.warmup:g} s warm-up, {args.seconds:g} s measured; latency: "
          "frame sent -> read back from the server's track (stamped)")  # fmt: skip
    print(table(stats, totals(stats, args.seconds)))
    if all(s.status == "unreachable" for s in stats):
        print(f"error: could not reach {args.url}: is `python -m streamv2v_trt serve --webrtc` running?")
        return 1
    return 0
