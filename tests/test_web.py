"""The live demo: WebSocket protocol with TestClient, and the real page in headless Chromium (fake camera)."""

from __future__ import annotations

import io
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from streamv2v_trt import StreamConfig, StreamV2V  # noqa: E402
from streamv2v_trt.cli.serve import stream_factory_from  # noqa: E402
from streamv2v_trt.web import Limits, create_app  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def template() -> StreamV2V:
    return StreamV2V.from_pretrained("tiny", StreamConfig(height=64, width=64), prompt="")


class Recorder:
    """Factory that remembers every stream it made, so tests can look at the server side."""

    def __init__(self, template: StreamV2V, delay_s: float = 0.0) -> None:
        self.make = stream_factory_from(template, "a photo")
        self.delay_s = delay_s
        self.streams: list[StreamV2V] = []

    def __call__(self) -> StreamV2V:
        stream = self.make()
        if self.delay_s:  # a slow model: the server must drop frames rather than queue them
            stream = SlowStream(stream, self.delay_s)
        self.streams.append(stream)
        return stream


class SlowStream:
    """The real stream, with `delay` seconds added per frame (a model slower than the camera)."""

    def __init__(self, stream: StreamV2V, delay: float) -> None:
        self.stream, self.delay = stream, delay
        self.cfg = stream.cfg

    @property
    def prompt(self) -> str:
        return self.stream.prompt

    def update_prompt(self, text: str) -> None:
        self.stream.update_prompt(text)

    def reset(self) -> None:
        self.stream.reset()

    def __call__(self, frame):
        time.sleep(self.delay)
        return self.stream(frame)


def jpeg(h: int = 48, w: int = 80, seed: int = 0) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG")
    return buf.getvalue()


def receive_result(ws) -> tuple[dict, np.ndarray]:
    msg = ws.receive_json()
    assert msg["type"] == "result", msg
    return msg, np.asarray(Image.open(io.BytesIO(ws.receive_bytes())))


def test_page_and_ready_message(template):
    with TestClient(create_app(Recorder(template))) as client:
        page = client.get("/")
        assert page.status_code == 200 and "getUserMedia" in page.text
        with client.websocket_connect("/ws") as ws:
            assert ws.receive_json() == {
                "type": "ready", "width": 64, "height": 64, "prompt": "a photo", "max_frame_bytes": 2 * 1024 * 1024,
            }  # fmt: skip


def test_bad_frames_get_an_error_and_the_socket_keeps_working(template):
    with TestClient(create_app(Recorder(template), Limits(max_frame_bytes=10_000))) as client:
        with client.websocket_connect("/ws") as ws:
            ws.receive_json()
            ws.send_bytes(b"\xff\xd8 not really a jpeg")
            err = ws.receive_json()
            assert err["type"] == "error" and err["seq"] == 0 and "not an image" in err["message"]
            ws.send_bytes(b"\x00" * 20_000)
            err = ws.receive_json()
            assert err["seq"] == 1 and "over the limit of 10000 bytes" in err["message"]
            ws.send_text("{not json")
            assert "malformed message" in ws.receive_json()["message"]
            ws.send_text('{"type": "launch"}')
            assert "unknown message type" in ws.receive_json()["message"]
            ws.send_bytes(jpeg())  # 48x80: cropped and resized to the stream's 64x64
            msg, out = receive_result(ws)
            assert msg["seq"] == 2 and out.shape == (64, 64, 3)


def test_prompt_change_reaches_this_connections_stream_only(template):
    recorder = Recorder(template)
    with TestClient(create_app(recorder)) as client:
        with client.websocket_connect("/ws") as a, client.websocket_connect("/ws") as b:
            a.receive_json(), b.receive_json()
            a.send_text('{"type": "prompt", "prompt": "a watercolor"}')
            assert a.receive_json() == {"type": "prompt", "prompt": "a watercolor"}
            a.send_bytes(jpeg())
            receive_result(a)
            assert len(recorder.streams) == 2 and recorder.streams[0] is not recorder.streams[1]
            assert recorder.streams[0].bank is not recorder.streams[1].bank  # one bank per connection
            assert recorder.streams[0].prompt == "a watercolor" and recorder.streams[1].prompt == "a photo"


def test_slow_model_drops_frames_latest_wins(template):
    recorder = Recorder(template, delay_s=0.3)
    with TestClient(create_app(recorder)) as client:
        with client.websocket_connect("/ws") as ws:
            ws.receive_json()
            n = 8
            for i in range(n):
                ws.send_bytes(jpeg(seed=i))
            results, dropped = [], []
            while len(results) + len(dropped) < n:
                msg = ws.receive_json()
                if msg["type"] == "result":
                    ws.receive_bytes()
                    results.append(msg["seq"])
                else:
                    assert msg["type"] == "dropped", msg
                    dropped.append(msg["seq"])
            assert sorted(results + dropped) == list(range(n))  # every frame answered exactly once
            assert dropped and len(results) < n
            assert results[-1] == n - 1  # the newest frame is never dropped
            assert recorder.streams[0].stream.frame_id == len(results)  # dropped frames never reached the model


def test_connection_limit(template):
    with TestClient(create_app(Recorder(template), Limits(max_connections=1))) as client:
        with client.websocket_connect("/ws") as a:
            a.receive_json()
            with client.websocket_connect("/ws") as b:
                assert "server busy" in b.receive_json()["message"]
            a.send_bytes(jpeg())
            receive_result(a)  # the first camera is still served


@pytest.fixture
def live_server(template):
    import uvicorn

    recorder = Recorder(template)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held until uvicorn takes the socket over
    server = uvicorn.Server(uvicorn.Config(create_app(recorder), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", recorder
    server.should_exit = True
    thread.join(10)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_browser_camera_round_trip(live_server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    url, recorder = live_server
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.wait_for_function("window.streamStats && window.streamStats.received >= 3", timeout=60_000)
            size = page.evaluate("[document.getElementById('output').naturalWidth, window.streamStats.errors]")
            assert size == [64, 0]
            page.fill("#prompt", "a watercolor painting")
            page.click("button[type=submit]")
            page.wait_for_function("window.streamStats.prompt === 'a watercolor painting'", timeout=30_000)
            assert recorder.streams[0].prompt == "a watercolor painting"
            received = page.evaluate("window.streamStats.received")
            page.wait_for_function(f"window.streamStats.received >= {received + 2}", timeout=30_000)
            assert "latency" in page.inner_text("#stats")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "web_demo.png"))
            assert not errors, errors
        finally:
            browser.close()
    assert (ARTIFACTS / "web_demo.png").stat().st_size > 1000


def test_serve_command_serves_the_page(tmp_path):
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as s:  # a free port (released just before the server binds it)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "streamv2v_trt", "serve", "--port", str(port), "--height", "64", "--width", "64"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    assert r.status == 200 and "getUserMedia" in r.read().decode()
                    break
            except OSError:
                assert time.monotonic() < deadline, "serve did not answer within 90 s"
                time.sleep(0.25)
    finally:
        proc.terminate()
        proc.wait(10)
