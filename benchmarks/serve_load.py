"""Load test of a running `serve`: N WebSocket clients, each sending frames as fast as they are answered.

    python -m benchmarks.serve_load --url ws://127.0.0.1:7860/ws --clients 4 --seconds 20
    python -m benchmarks.serve_load --url wss://demo.example.com/ws --origin https://demo.example.com \\
        --clients 8 --seconds 60 --size 1280x720 --label "H200, sd-turbo, tensorrt+graphs" --json load.json
    python -m benchmarks.serve_load --url ws://127.0.0.1:7860/ws --clients 4 --half-rate 1 --seconds 20
    python -m benchmarks.serve_load --webrtc --url http://127.0.0.1:7860 --clients 4   (benchmarks/serve_load_webrtc.py)

The load is closed-loop: a client sends a frame, waits for that frame's answer (`result` and its JPEG, `dropped` or
`error`), then sends the next, so each client keeps `--inflight` frames (default 1) at the server and the server's
speed sets the rate. `--half-rate N`: the first N clients send at about half that rate (a slow camera or a slow
link): after each answer, such a client waits as long as that frame's round trip took before it sends the next.
`--inflight 2` is what the page does, and it keeps a batched server's slots full
(docs/SCALING.md); with more, the server's latest-frame-wins slot drops frames, and they are counted. Frames are a
moving pattern (it changes enough between frames that serve's similar-frame filter does not skip them), JPEG-encoded
once before the run at the size the server's `ready` message announces, or `--size WxH` (the server then resizes
them).

All clients connect at once. The first `--warmup` seconds are not measured; then, over `--seconds`, per client:
frames sent, results (answers whose JPEG arrived in the window), FPS (results / seconds), round-trip latency p50/p99
(frame sent to its JPEG received), the server's own `model_ms` p50 (its batched tick), and dropped frames (replaced
by a newer frame, or past the server's `--frame-budget-ms`). The p99 spread is the largest served client's p99 over
the smallest: 1.0 when every stream sees the same tail latency. Errors
are counted over the whole run: `error` messages, answers that never came (`--timeout`), a connection the server
closed before the end. A client is `refused` when the server says it is full: close code 1013 or a "busy" error
before `ready`, or HTTP 429/503 at the handshake; `failed` when the handshake or `ready` went wrong otherwise (a
Host or Origin refusal, 1008, says so); `unreachable` when no connection could be made. The command exits 1 only
when no client reached the server, 2 on bad arguments.

The client machine (CPU, logical CPUs, load average before and after) is recorded, not the server's: name the
server's hardware, model and engines with `--label`. The client imports neither torch nor this project, only
websockets, numpy and pillow, so it can run on another machine. docs/SCALING.md explains how to read the result.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import io
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import websockets
from PIL import Image
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

log = logging.getLogger("benchmarks.serve_load")

BUSY_CLOSE = 1013  # "try again later": the server is full
BUSY_HTTP = (429, 503)  # a proxy or a future server may refuse at the handshake instead
PATTERN_FRAMES = 30  # the clip each client loops over
MAX_NOTES = 5  # error messages kept per client


@dataclass
class ClientStats:
    client: int
    rate: str = "full"  # full | half (--half-rate)
    status: str = "unreachable"  # served | refused | failed | unreachable
    sent: int = 0  # frames sent in the measured window
    results: int = 0  # results whose JPEG arrived in the window
    fps: float = 0.0  # results / window seconds
    p50_ms: float | None = None  # round trip, frame sent -> its JPEG received
    p99_ms: float | None = None
    model_ms_p50: float | None = None  # the server's own model time for those results
    dropped: int = 0  # in the window: the server replaced the frame with a newer one
    errors: int = 0  # over the whole run: error messages, lost answers, a close before the end
    results_total: int = 0  # warm-up included
    close_code: int | None = None  # when the server closed the connection
    notes: list[str] = field(default_factory=list)  # the first error or refusal messages
    latencies_ms: list[float] = field(default_factory=list, repr=False)  # these two are not in the JSON
    model_ms: list[float] = field(default_factory=list, repr=False)

    def note(self, text: str) -> None:
        if len(self.notes) < MAX_NOTES:
            self.notes.append(text[:300])

    def finish(self, window_s: float) -> None:
        """Rates and percentiles of the window, also for a connection that ended early."""
        self.fps = self.results / window_s
        if self.latencies_ms:
            self.p50_ms, self.p99_ms = (float(v) for v in np.percentile(self.latencies_ms, [50, 99]))
        if self.model_ms:
            self.model_ms_p50 = float(np.percentile(self.model_ms, 50))


@dataclass(frozen=True)
class Window:
    """perf_counter times shared by every client: measure from `start`, stop at `end`."""

    start: float
    end: float

    def __contains__(self, t: float) -> bool:
        return self.start <= t <= self.end


@functools.cache  # one clip per size, shared by all clients; made once (it blocks the loop briefly, in the warm-up)
def pattern_jpegs(width: int, height: int, quality: int, n: int = PATTERN_FRAMES) -> tuple[bytes, ...]:
    """`n` JPEG frames of a moving pattern that loops: a drifting colour wave (1.47 rad of phase per frame, so
    consecutive frames' cosine similarity is far under serve's 0.98 skip threshold) and a white square crossing."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)  # [H, W] each
    side = max(2, min(height, width) // 4)
    out = []
    for i in range(n):
        phase = 2 * np.pi * 7 * i / n  # 7 periods per loop: the wrap from frame n-1 to 0 is an ordinary step
        img = np.stack([np.sin(9 * x + 4 * y + phase), np.cos(6 * y - 3 * x + phase), np.sin(7 * (x + y) - phase)], -1)
        img = ((img * 0.5 + 0.5) * 255).astype(np.uint8)  # [H, W, 3]
        left = (i * (width - side)) // max(1, n - 1)
        top = (height - side) // 2
        img[top : top + side, left : left + side] = 255
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return tuple(out)


def parse(text: str | bytes) -> dict:
    """A server's text message; anything that is not a JSON object becomes an error message (counted)."""
    try:
        msg = json.loads(text)
    except ValueError:
        msg = None
    return msg if isinstance(msg, dict) else {"type": "error", "message": f"not a JSON object: {text[:100]!r}"}


def is_busy(msg: dict) -> bool:
    return msg.get("type") == "error" and "busy" in str(msg.get("message", "")).lower()


async def run_client(i: int, args: argparse.Namespace, window: Window, ready: list) -> ClientStats:
    stats = ClientStats(i, rate="half" if i < args.half_rate else "full")
    try:
        ws = await connect(
            args.url, origin=args.origin, open_timeout=args.timeout, close_timeout=2, max_size=None,
            ping_interval=None,  # no keep-alive traffic in the measurement; the run is short
        )  # fmt: skip
    except InvalidStatus as e:  # the server answered the handshake, with a refusal
        code = e.response.status_code
        stats.status = "refused" if code in BUSY_HTTP else "failed"
        stats.errors += stats.status == "failed"
        stats.note(f"handshake answered HTTP {code}")
        return stats
    except (OSError, asyncio.TimeoutError, InvalidHandshake) as e:
        stats.note(f"could not connect: {type(e).__name__}: {e}")
        return stats
    try:
        await session(ws, i, args, window, ready, stats)
    except ConnectionClosed as e:
        stats.close_code = e.rcvd.code if e.rcvd else 1006  # 1006: closed without a close frame
        if stats.status == "served":
            if time.perf_counter() < window.end:
                stats.errors += 1
                reason = f" {e.rcvd.reason!r}" if e.rcvd and e.rcvd.reason else ""
                stats.note(f"server closed the connection mid-run (code {stats.close_code}{reason})")
        elif stats.close_code == BUSY_CLOSE:
            stats.status = "refused"
        else:
            stats.status, stats.errors = "failed", stats.errors + 1
            stats.note(f"closed before ready (code {stats.close_code})")
    except asyncio.TimeoutError:  # only `ready` is awaited without a deadline check
        stats.status, stats.errors = "failed", stats.errors + 1
        stats.note(f"no ready message within {args.timeout:g} s")
    finally:
        await ws.close()
        stats.finish(window.end - window.start)
    return stats


async def greet(ws: ClientConnection, args, stats: ClientStats) -> dict | None:
    """The server's `ready` message, or None after a refusal (busy: `refused`) or anything else (`failed`)."""
    stats.status = "failed"  # until ready
    first = parse(await asyncio.wait_for(ws.recv(), args.timeout))
    if first.get("type") == "ready" and (args.size or ("width" in first and "height" in first)):
        stats.status = "served"
        return first
    stats.note(str(first.get("message", f"expected a ready message with the size, got {first}")))
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(ws.wait_closed(), 2)  # the close that follows a refusal, with its code
    stats.close_code = ws.close_code
    if is_busy(first) or stats.close_code == BUSY_CLOSE:
        stats.status = "refused"
    else:
        stats.errors += 1
    return None


@dataclass
class Answers:
    """A client's frames at the server, and what the server says about them."""

    inflight: dict[int, float] = field(default_factory=dict)  # seq -> send time (the server numbers from 0 too)
    pending: dict | None = None  # a result whose JPEG comes next

    def take(self, msg: str | bytes, now: float, window: Window, stats: ClientStats) -> float | None:
        """Count `msg`; returns the send time of the frame it answers (a result's JPEG, dropped, error), else None."""
        if isinstance(msg, bytes):
            if self.pending is None:
                stats.errors += 1
                stats.note("a binary message that follows no result")
                return None
            result, self.pending = self.pending, None
            sent_at = self.inflight.pop(result.get("seq"), None)
            stats.results_total += 1
            if now in window and sent_at is not None:
                stats.results += 1
                stats.latencies_ms.append((now - sent_at) * 1e3)
                if isinstance(result.get("model_ms"), (int, float)):
                    stats.model_ms.append(result["model_ms"])
            return sent_at
        reply = parse(msg)
        kind = reply.get("type")
        if kind == "result":
            self.pending = reply
        elif kind == "dropped":
            stats.dropped += now in window
            return self.inflight.pop(reply.get("seq"), None)
        elif kind == "error":
            stats.errors += 1
            stats.note(str(reply.get("message", reply)))
            return self.inflight.pop(reply.get("seq"), None)
        return None

    def lost(self, timeout: float, stats: ClientStats) -> None:
        """No answer for `timeout` seconds: the frames in flight count as errors, and new ones are sent."""
        stats.errors += len(self.inflight)
        stats.note(f"no answer for {timeout:g} s to frame(s) {sorted(self.inflight)}")
        self.inflight.clear()


async def session(ws: ClientConnection, i: int, args, window: Window, ready: list, stats: ClientStats) -> None:
    hello = await greet(ws, args, stats)
    if hello is None:
        return
    ready.append(hello)
    clip = pattern_jpegs(*(args.size or (int(hello["width"]), int(hello["height"]))), args.quality)
    answers, seq = Answers(), 0
    resume = 0.0  # a half-rate client sends nothing before this time
    while True:
        while len(answers.inflight) < args.inflight and time.perf_counter() >= resume:
            await ws.send(clip[(seq + 7 * i) % len(clip)])  # clients start at different frames of the clip
            now = time.perf_counter()
            answers.inflight[seq] = now
            stats.sent += now in window
            seq += 1
        now = time.perf_counter()
        left = window.end - now
        if left <= 0:
            return
        pause = resume - now if len(answers.inflight) < args.inflight else math.inf  # a half-rate client's
        wait = min(left, args.timeout, pause)
        try:
            msg = await asyncio.wait_for(ws.recv(), wait)
        except asyncio.TimeoutError:  # cancelling recv loses no message
            if wait != pause and time.perf_counter() < window.end:
                answers.lost(args.timeout, stats)
            continue
        now = time.perf_counter()
        sent_at = answers.take(msg, now, window, stats)
        if stats.rate == "half" and sent_at is not None:
            resume = now + (now - sent_at)  # as long again as the round trip: half the closed-loop rate


async def run(args: argparse.Namespace) -> tuple[list[ClientStats], list[dict]]:
    if args.size:
        pattern_jpegs(*args.size, args.quality)  # before the clock starts
    t0 = time.perf_counter()
    window = Window(t0 + args.warmup, t0 + args.warmup + args.seconds)
    ready: list[dict] = []
    clients = [run_client(i, args, window, ready) for i in range(args.clients)]
    return list(await asyncio.gather(*clients)), ready


def machine() -> dict:
    """The client machine: where this command runs (the server's is in --label)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_model": model, "logical_cpus": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "websockets": websockets.__version__,
    }  # fmt: skip


def totals(stats: list[ClientStats], seconds: float) -> dict:
    lat = [v for s in stats for v in s.latencies_ms]
    count = {k: sum(s.status == k for s in stats) for k in ("served", "refused", "failed", "unreachable")}
    p50, p99 = (float(v) for v in np.percentile(lat, [50, 99])) if lat else (None, None)
    p99s = [s.p99_ms for s in stats if s.status == "served" and s.p99_ms is not None]
    return {
        **count, "results": sum(s.results for s in stats), "fps": sum(s.results for s in stats) / seconds,
        "p50_ms": p50, "p99_ms": p99, "dropped": sum(s.dropped for s in stats),
        "errors": sum(s.errors for s in stats),
        "p99_spread": max(p99s) / min(p99s) if len(p99s) > 1 else None,  # 1.0: every stream's tail alike
    }  # fmt: skip


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def table(stats: list[ClientStats], total: dict) -> str:
    head = (f"{'client':<7} {'rate':<5} {'status':<11} {'sent':>6} {'results':>7} {'FPS':>7} {'p50 ms':>8} "
            f"{'p99 ms':>8} {'model ms':>8} {'dropped':>7} {'errors':>6}")  # fmt: skip
    rows = [head, "-" * len(head)]
    for s in stats:
        rows.append(
            f"{s.client:<7} {s.rate:<5} {s.status:<11} {s.sent:>6} {s.results:>7} {s.fps:>7.1f} {_ms(s.p50_ms):>8} "
            f"{_ms(s.p99_ms):>8} {_ms(s.model_ms_p50):>8} {s.dropped:>7} {s.errors:>6}"
        )
    rows.append("-" * len(head))
    rows.append(
        f"{'all':<7} {'':<5} {'':<11} {sum(s.sent for s in stats):>6} {total['results']:>7} {total['fps']:>7.1f} "
        f"{_ms(total['p50_ms']):>8} {_ms(total['p99_ms']):>8} {'':>8} {total['dropped']:>7} {total['errors']:>6}"
    )
    rows.append(f"clients: {total['served']} served, {total['refused']} refused, {total['failed']} failed, "
                f"{total['unreachable']} unreachable; aggregate {total['fps']:.1f} results/s")  # fmt: skip
    if total["p99_spread"] is not None:
        rows.append(f"p99 spread (largest client p99 / smallest): {total['p99_spread']:.2f}")
    for s in stats:
        rows.extend(f"  client {s.client}: {n}" for n in s.notes)
    return "\n".join(rows)


def size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: give WIDTHxHEIGHT, e.g. 640x480") from None
    if w < 8 or h < 8:
        raise argparse.ArgumentTypeError(f"size {text!r}: at least 8x8")
    return w, h


def websocket_url(text: str) -> str:
    if urlsplit(text).scheme not in ("ws", "wss") or not urlsplit(text).hostname:
        raise argparse.ArgumentTypeError(f"url {text!r}: give ws://HOST:PORT/ws or wss://HOST/ws")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.serve_load",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--url", required=True, type=websocket_url, help="the server's WebSocket, e.g. ws://127.0.0.1:7860/ws"
    )
    p.add_argument("--clients", type=int, default=1, help="concurrent clients (default: 1)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured window (default: 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before the window, not measured (default: 2)")
    p.add_argument("--inflight", type=int, default=1, help="frames each client keeps at the server (default: 1)")
    p.add_argument("--half-rate", type=int, default=0, metavar="N",
                   help="the first N clients send at about half the rate: after each answer they wait as long as "
                   "its round trip before sending the next frame (default: 0)")  # fmt: skip
    p.add_argument("--size", type=size, default=None, help="send WxH frames (default: the size `ready` announces)")
    p.add_argument("--quality", type=int, default=85, help="JPEG quality of the frames (default: 85, as the page)")
    p.add_argument("--origin", default=None, help="send this Origin header (default: none, as a script)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to connect, to get `ready`, and to wait for an answer before counting it lost "
                   "(default: 30)")  # fmt: skip
    p.add_argument("--label", default="", help="the server's hardware, model and engines, kept in the JSON")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    p.add_argument("--webrtc", action="store_true", help="aiortc clients of serve --webrtc (see --webrtc --help)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--webrtc" in argv:  # aiortc clients of serve --webrtc: their own flags (benchmarks/serve_load_webrtc.py)
        from . import serve_load_webrtc

        return serve_load_webrtc.main([a for a in argv if a != "--webrtc"])
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("clients", "seconds", "inflight", "timeout"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be > 0, got {getattr(args, name)}")
    if not 0 <= args.half_rate <= args.clients:
        parser.error(f"--half-rate must be in 0..--clients ({args.clients}), got {args.half_rate}")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    info = machine()
    load_before = os.getloadavg()
    log.info("%d client(s) -> %s: %g s warm-up, %g s measured", args.clients, args.url, args.warmup, args.seconds)
    stats, ready = asyncio.run(run(args))
    load_after = os.getloadavg()
    total = totals(stats, args.seconds)
    hello = ready[0] if ready else {}
    w, h = args.size or (hello.get("width"), hello.get("height"))
    frame = f"{w}x{h}" if w else "no"  # no client got `ready`
    print(
        f"serve_load {args.url}: {args.clients} client(s), {frame} JPEG frames, {args.inflight} in flight each, "
        f"{args.half_rate} at half rate, {args.warmup:g} s warm-up, {args.seconds:g} s measured"
        f"{f', server: {args.label}' if args.label else ''}"
    )
    print(f"client machine: {info['cpu_model']}, {info['logical_cpus']} logical CPUs, load average (1 min) "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after")  # fmt: skip
    print(table(stats, total))
    if args.json:
        report = {
            "benchmark": "serve_load",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m benchmarks.serve_load " + " ".join(argv if argv is not None else sys.argv[1:]),
            "url": args.url,
            "args": {k: list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v
                     for k, v in vars(args).items()},
            "machine": {**info, "load_avg_before": [round(v, 2) for v in load_before],
                        "load_avg_after": [round(v, 2) for v in load_after]},
            "server": {"label": args.label, "ready": hello},
            "frame_size": [w, h] if w else None,
            "totals": total,
            "clients": [{k: v for k, v in asdict(s).items() if k not in ("latencies_ms", "model_ms")} for s in stats],
        }  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log.info("wrote %s", args.json)
    if total["unreachable"] == len(stats):
        print(f"error: could not reach {args.url}: {stats[0].notes[0] if stats[0].notes else 'no connection'}; "
              "is `python -m streamv2v_trt serve` running there?", file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
