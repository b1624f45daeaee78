"""`serve --webrtc` (web/webrtc.py) over a real server on the tiny model: aiortc clients
(benchmarks/serve_load_webrtc.py) and the page in headless Chromium with its fake camera, beside WebSocket sessions
on the same slots. The hub fixtures are test_web.py's, imported."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip("aiortc")
pytest.importorskip("fastapi")
from conftest import wait_until  # noqa: E402
from test_web import K, chromium_page, hub, jpeg, multi, needs_chromium, serve_args  # noqa: E402, F401

from benchmarks import serve_load  # noqa: E402
from benchmarks import serve_load_webrtc as rtc  # noqa: E402
from streamv2v_trt.cli import serve  # noqa: E402
from streamv2v_trt.web import Limits, create_app, webrtc  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def rtc_server():
    """`rtc_server(hub, limits=Limits(), webrtc=())` -> the http URL of uvicorn serving `create_app(hub, ...)`."""
    import uvicorn

    servers = []

    def start(hub, limits: Limits | None = None, webrtc: tuple[str, ...] | None = ()) -> str:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        app = create_app(hub, limits or Limits(), webrtc=webrtc)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        servers.append((server, thread))
        wait_until(lambda: server.started, "uvicorn did not start", 20)
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def load_args(url: str, **kw) -> argparse.Namespace:
    defaults = {"url": url, "clients": 1, "seconds": 3.0, "warmup": 2.0, "fps": 15.0, "origin": None, "timeout": 10.0}
    return argparse.Namespace(**{**defaults, **kw})


def post(url: str, body: bytes, origin: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Origin": origin} if origin else {})}
    request = urllib.request.Request(url + "/webrtc/offer", body, headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_stamp_reads_back_what_was_drawn():
    for height, width in [(64, 64), (48, 80), (512, 512)]:
        for n in (0, 1, 170, 255, 256 + 37):
            image = np.random.default_rng(n).integers(0, 256, (height, width, 3), dtype=np.uint8)
            rtc.draw_stamp(image, n)
            assert rtc.read_stamp(image) == n % 256
    assert rtc.read_stamp(np.full((64, 64, 3), 128, np.uint8)) is None  # no stamp: not a number


def test_webrtc_and_websocket_share_the_slots_and_frames_come_back_in_order(rtc_server, hub):
    """One WebSocket holds a slot; K WebRTC clients then ask for the other K-1: one is told busy, the others get
    their stamped frames back in order (an out-of-order frame counts as an error). Every slot is given back."""
    from websockets.sync.client import connect

    spy = hub()
    url = rtc_server(spy)
    with connect(url.replace("http", "ws") + "/ws") as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "ready"
        stats, ready = asyncio.run(rtc.run(load_args(url, clients=K)))
        ws.send(jpeg())  # the WebSocket session was served throughout
        assert json.loads(ws.recv(timeout=10))["type"] == "result"
    assert sorted(s.status for s in stats) == ["refused"] + ["served"] * (K - 1), [s.notes for s in stats]
    assert all("server busy" in n for s in stats if s.status == "refused" for n in s.notes)
    for s in stats:
        if s.status == "served":
            assert s.errors == 0 and s.results >= 3 and s.p99_ms is not None, s
    assert ready[0]["width"] == 64 and ready[0]["height"] == 64
    wait_until(lambda: sorted(spy.closed) == sorted(spy.opened) and spy.server.in_use == 0, "slots not given back")


def test_offers_from_foreign_origins_and_malformed_offers_are_refused(rtc_server, hub):
    spy = hub()
    url = rtc_server(spy)
    status, body = post(url, b'{"type": "offer", "sdp": "v=0"}', origin="http://evil.example")
    assert status == 403 and "origin 'http://evil.example' may not use this server" in body["error"]
    assert spy.opened == []  # refused before any slot was taken
    for bad in [b"not json", b'{"type": "answer", "sdp": "v=0"}', b"[1]"]:
        status, body = post(url, bad)
        assert status == 400 and "expected a JSON object" in body["error"], body
    status, body = post(url, json.dumps({"type": "offer", "sdp": "v=0\r\nthis is not SDP\r\n"}).encode())
    assert status == 400 and "could not use this offer" in body["error"], body
    wait_until(lambda: spy.closed == spy.opened and spy.server.in_use == 0, "the slot of a bad offer was kept")
    stats, _ = asyncio.run(rtc.run(load_args(url, seconds=2.0)))  # the server keeps serving
    assert stats[0].status == "served" and stats[0].results >= 2 and stats[0].errors == 0, stats[0]


def test_serve_load_webrtc_reports_per_client_latency_and_drops(rtc_server, hub, capsys):
    url = rtc_server(hub())
    argv = ["--webrtc", "--url", url, "--clients", "2", "--seconds", "2", "--warmup", "1.5", "--fps", "10"]
    assert serve_load.main(argv) == 0
    out = capsys.readouterr().out
    assert "serve_load --webrtc" in out and "p99 ms" in out and "2 served, 0 refused" in out, out
    with pytest.raises(SystemExit) as exited:  # the WebSocket's address is not the offer's
        serve_load.main(["--webrtc", "--url", "ws://127.0.0.1:1/ws"])
    assert exited.value.code == 2 and "give the server's http(s)://HOST:PORT" in capsys.readouterr().err


class Talker(rtc.Client):
    """A client that sends `messages` on its data channel once ready and keeps every message it is sent."""

    def __init__(self, messages: list[str], *args) -> None:
        super().__init__(0, *args)
        self.messages, self.heard = messages, []

    def on_message(self, text: str) -> None:
        super().on_message(text)
        self.heard.append(json.loads(text))
        if self.heard[-1]["type"] == "ready":
            for m in self.messages:
                self.channel.send(m)


def test_data_channel_messages_are_the_websocket_protocol(rtc_server, hub):
    spy = hub()
    url = rtc_server(spy)
    messages = [
        "{not json",
        json.dumps({"type": "prompt", "prompt": "x" * 1001}),
        b"\x00binary",  # a binary message: answered as text that is not JSON
        json.dumps({"type": "prompt", "prompt": "a watercolor"}),
        json.dumps({"type": "stamp", "rows": 99}),
    ]

    async def talk():
        t0 = time.perf_counter()
        client = Talker(messages, load_args(url), rtc.Window(t0 + 1.0, t0 + 3.0), [])
        return client, await client.run()

    client, stats = asyncio.run(talk())
    replies = [m for m in client.heard if m["type"] in ("error", "prompt") and "seq" not in m]
    assert [m["type"] for m in replies] == ["error", "error", "error", "prompt", "error"], replies
    assert "malformed message" in replies[0]["message"]
    assert "prompt must be a string of at most 1000 characters" in replies[1]["message"]
    assert "stamp rows must be a whole number from 0 to 16" in replies[4]["message"]
    assert spy.streams[0].prompt == "a watercolor"
    assert stats.results >= 2, stats  # the session went on: frames came back after the errors
    assert any(m["type"] == "result" for m in client.heard)


class Vanishing(rtc.StampedTrack):
    """Stops sending after `frames` frames without closing anything, as a page whose machine went away."""

    frames = 10

    async def recv(self):
        if self.n >= self.frames:
            await asyncio.Event().wait()
        return await super().recv()


def test_a_peer_that_disappears_frees_its_slot_within_the_idle_timeout(rtc_server, hub, monkeypatch):
    spy = hub()
    url = rtc_server(spy, Limits(idle_timeout_s=1.0))
    monkeypatch.setattr(rtc, "StampedTrack", Vanishing)

    async def vanish():
        t0 = time.perf_counter()
        client = rtc.Client(0, load_args(url), rtc.Window(t0, t0 + 5.0), [])
        run = asyncio.create_task(client.run())
        await asyncio.sleep(1.0)
        assert spy.server.in_use == 1
        while spy.server.in_use and time.perf_counter() < t0 + 4.5:
            await asyncio.sleep(0.05)
        freed_while_open = not run.done()  # the client still holds its connection: nothing was closed by it
        return freed_while_open, await run

    freed_while_open, stats = asyncio.run(vanish())
    assert freed_while_open and spy.closed == spy.opened and spy.server.in_use == 0
    assert any("no frame for 1 s" in n for n in stats.notes), stats.notes  # told on the data channel


@needs_chromium
@pytest.mark.parametrize("transport", ["webrtc", "websocket"])
def test_browser_latency_pattern_over_both_transports(rtc_server, hub, transport):
    """The page streams its test pattern with a frame counter stamped on, reads the counter back from the
    returned frames, and shows p50/p99 latency and dropped frames; the counters come back in order."""
    url = rtc_server(hub())
    with chromium_page(f"{url}/?source=pattern&transport={transport}") as page:
        page.wait_for_function("window.streamStats && window.streamStats.stamped >= 8", timeout=60_000)
        got = page.evaluate("window.streamStats")
        assert got["transport"] == transport and got["outOfOrder"] == 0 and got["errors"] == 0, got
        assert 0 < got["p50Ms"] <= got["p99Ms"] < 10_000, got
        text = page.inner_text("#stats")
        assert "p50" in text and "p99" in text and "lost" in text, text


@needs_chromium
def test_browser_camera_over_webrtc(rtc_server, hub):
    """The fake camera's frames go over WebRTC and come back on the server's track (no stamp: a camera's picture
    is left as it is)."""
    with chromium_page(f"{rtc_server(hub())}/?transport=webrtc") as page:
        page.wait_for_function("window.streamStats && window.streamStats.received >= 5", timeout=60_000)
        got = page.evaluate("[window.streamStats.source, window.streamStats.errors, window.streamStats.stamped]")
        assert got == ["camera", 0, 0]
        assert page.evaluate("document.getElementById('output-video').videoWidth") == 64


@needs_chromium
def test_browser_asking_webrtc_of_a_server_without_it_says_so(rtc_server, hub):
    with chromium_page(f"{rtc_server(hub(), webrtc=None)}/?transport=webrtc&source=pattern") as page:
        page.wait_for_function("window.streamStats.errors > 0", timeout=20_000)
        assert "start serve with --webrtc" in page.evaluate("window.streamStats.lastError")


def test_ice_servers_reach_aiortc_and_the_page(rtc_server, hub):
    server = webrtc.ice_server("turn:me:s%40cret@turn.example.com:3478?transport=udp")
    assert (server.urls, server.username, server.credential) == ("turn:turn.example.com:3478?transport=udp", "me",
                                                                 "s@cret")  # fmt: skip
    assert webrtc.ice_server("stun:stun.example.com").username is None
    with pytest.raises(ValueError, match="not a stun:, turn: or turns: URL"):
        webrtc.ice_server("https://stun.example.com")
    url = rtc_server(hub())
    with urllib.request.urlopen(url + "/webrtc/ice", timeout=10) as r:
        assert json.loads(r.read()) == {"iceServers": []}  # none by default


def test_serve_webrtc_flags_are_checked_before_loading(capsys):
    for argv, message in [
        (["--ice-server", "stun:stun.example.com"], "error: --ice-server is for WebRTC sessions: add --webrtc"),
        (["--webrtc", "--ice-server", "http://x"], "error: --ice-server: ICE server 'http://x' is not a stun:"),
        (["--webrtc", "--ray"], "error: --webrtc is not supported with --ray yet"),
    ]:
        assert serve.run(serve_args(*argv)) == 1
        assert capsys.readouterr().err.startswith(message)


def test_the_app_without_webrtc_does_not_import_aiortc():
    code = ("import sys; from streamv2v_trt.web import create_app; from streamv2v_trt.cli import serve; "
            "create_app(None); assert 'aiortc' not in sys.modules, 'aiortc imported'")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)
