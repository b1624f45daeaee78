"""The live demo over a Hub: WebSocket protocol with TestClient and a real server, and the real page in headless
Chromium (with a fake camera, and with none). The hub is a StreamServer on the slots `serve` makes; StreamServer
alone: test_serving.py."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import io
import json
import logging
import re
import shutil
import socket
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
import anyio  # noqa: E402  (starlette's own dependency)
from conftest import free_port, tiny_spec, wait_until  # noqa: E402
from fastapi import WebSocketDisconnect  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from streamv2v_trt import StreamV2V  # noqa: E402
from streamv2v_trt.cli import serve  # noqa: E402
from streamv2v_trt.cli.stream_args import CliError  # noqa: E402
from streamv2v_trt.control_images import ControlImages, control_to_uint8  # noqa: E402
from streamv2v_trt.frames import uint8_to_image  # noqa: E402
from streamv2v_trt.hub import NotReady, Result, SlotLost  # noqa: E402
from streamv2v_trt.images import fit_to_size  # noqa: E402
from streamv2v_trt.multistream import MultiStream  # noqa: E402
from streamv2v_trt.serving import StreamServer  # noqa: E402
from streamv2v_trt.web import (  # noqa: E402
    LOCAL_HOSTS,
    Access,
    Limits,
    codec,  # noqa: E402
    create_app,
)
from streamv2v_trt.web import app as web_app  # noqa: E402
from streamv2v_trt.web.loras import LoraFolder, LoraPicker  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FAKE_CAMERA = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
K = 3  # slots of the module's MultiStream
TIMEOUT = 10  # seconds to wait for a message


def serve_args(*argv: str) -> argparse.Namespace:
    """`serve`'s flags: the defaults, and `argv`."""
    parser = argparse.ArgumentParser()
    serve.add_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


@pytest.fixture(scope="module")
def multi() -> MultiStream:
    """What `serve --streams 3 --height 64 --width 64 --prompt "a photo"` serves on the CPU: the tiny model, fp32,
    with the live defaults (priming, similar-frame filter)."""
    args = serve_args("--streams", str(K), "--height", "64", "--width", "64", "--prompt", "a photo", "--device", "cpu")
    return serve.open_slots(args)


@pytest.fixture(scope="module")
def reference(multi) -> StreamV2V:
    """A stream by itself with the slots' settings and its own networks; `reference.sibling()` is a fresh one."""
    return StreamV2V.from_pretrained(multi.cfg, prompt="a photo")


class Paced:
    """A MultiStream whose every tick takes `delay_s` longer (a model slower than the camera)."""

    def __init__(self, multi: MultiStream, delay_s: float) -> None:
        self.multi, self.delay_s = multi, delay_s
        self.streams, self.cfg, self.slots = multi.streams, multi.cfg, multi.slots
        self.sizes, self.backend, self.graphs = multi.sizes, multi.backend, multi.graphs  # other sizes: unpaced

    def submit(self, slot: int, frame) -> None:
        self.multi.submit(slot, frame)

    def tick(self):
        time.sleep(self.delay_s)
        return self.multi.tick()

    def set_loras(self, loras, *, reset: bool = False) -> None:
        self.multi.set_loras(loras, reset=reset)


def fail(message: str):
    def job(stream) -> None:
        raise RuntimeError(message)

    return job


class SpyHub:
    """The Hub protocol (and `set_loras`, for the LoRA picker), and nothing more, over a real StreamServer: what the
    app may use. Records the slots opened
    and closed, the frames each slot's results carried (before JPEG) and the threads results came from; `broken`
    fails the prompt "boom" and every reset on the loop thread, as a failing text encoder or bank would."""

    def __init__(self, server: StreamServer, broken: bool = False) -> None:
        self.server, self.broken = server, broken
        self.capacity, self.width, self.height = server.capacity, server.width, server.height
        self.sizes = server.sizes
        self.prompt = server.prompt
        self.controls = server.controls
        self.opened: list[int] = []
        self.closed: list[int] = []
        self.outputs: dict[int, list[np.ndarray]] = defaultdict(list)
        self.threads: list[str] = []

    @property
    def streams(self) -> list[StreamV2V]:
        """The opened slots' streams, in the order connections opened them."""
        return [self.server.multi.slots[slot] for slot in self.opened]

    def open(self) -> int | None:
        slot = self.server.open()
        if slot is not None:
            self.opened.append(slot)
            self.outputs[slot] = []
        return slot

    def close(self, slot: int) -> None:
        self.closed.append(slot)
        self.server.close(slot)

    def push(self, slot: int, frame, deliver) -> int:
        def spy(result) -> None:
            if result.frame is not None:
                self.outputs[slot].append(result.frame)
                self.threads.append(threading.current_thread().name)
            deliver(result)

        return self.server.push(slot, frame, spy)

    def update_prompt(self, slot: int, prompt: str):
        if self.broken and prompt == "boom":
            return self.server.run(slot, fail("the text encoder failed"))
        return self.server.update_prompt(slot, prompt)

    def reset(self, slot: int):
        if self.broken:
            return self.server.run(slot, fail("the bank could not be reset"))
        return self.server.reset(slot)

    def resize(self, slot: int, height: int, width: int):
        return self.server.resize(slot, height, width)

    def update_control(self, slot: int, scales):
        return self.server.update_control(slot, scales)

    def control_image(self, slot: int, index: int):
        return self.server.control_image(slot, index)

    def set_loras(self, loras):
        return self.server.set_loras(loras)


@pytest.fixture
def hub(multi):
    """`hub(delay_s=0.0, broken=False) -> SpyHub` on a fresh StreamServer over the module's slots; stopped after."""
    servers: list[StreamServer] = []

    def make(delay_s: float = 0.0, broken: bool = False, sizes=None) -> SpyHub:
        servers.append(StreamServer(Paced(multi, delay_s), prompt="a photo", sizes=sizes))  # slots left by others
        return SpyHub(servers[-1], broken)

    yield make
    for server in servers:
        server.stop()


TEST_HOSTS = Access(LOCAL_HOSTS | {"testserver"})  # TestClient sends Host: testserver


def make_app(hub: SpyHub, limits: Limits | None = None, access: Access = TEST_HOSTS):
    return create_app(hub, limits or Limits(), access)


def jpeg(h: int = 48, w: int = 80, seed: int = 0) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG")
    return buf.getvalue()


def receive_result(ws) -> tuple[dict, np.ndarray]:
    msg = ws.receive_json()
    assert msg["type"] == "result", msg
    return msg, np.asarray(Image.open(io.BytesIO(ws.receive_bytes())))


def connect(client: TestClient, stack: contextlib.ExitStack, n: int) -> tuple[list, list[dict]]:
    """`n` sockets and their "ready" messages. Each "ready" is received before the next socket connects: slots
    open on worker threads, so only then is `spy.opened[k]` the k-th socket's slot."""
    sockets, readies = [], []
    for _ in range(n):
        sockets.append(stack.enter_context(client.websocket_connect("/ws")))
        readies.append(sockets[-1].receive_json())
    return sockets, readies


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    """The same frame, up to rounding (a batch of several streams may round differently from a batch of one)."""
    assert got.shape == want.shape and np.abs(got.astype(int) - want).max() <= 1


def exchange(spy: SpyHub, sockets: list, refs: list[StreamV2V], seeds: list[int]) -> None:
    """One frame on every socket at once, then every result: each is its own stream's (`refs[k]` fed the same
    frame), and the JPEG the page got is that frame's."""
    data = [jpeg(seed=seed) for seed in seeds]
    for ws, d in zip(sockets, data):
        ws.send_bytes(d)
    for ws, d, ref, slot in zip(sockets, data, refs, spy.opened):
        _, page = receive_result(ws)
        frame = spy.outputs[slot][-1]
        assert_same(frame, ref(codec.decode_frame(d, Limits(), 64, 64)))
        assert np.array_equal(page, np.asarray(Image.open(io.BytesIO(codec.encode_jpeg(frame, 85)))))


def test_page_and_ready_message(hub):
    with TestClient(make_app(hub())) as client:
        page = client.get("/")
        assert page.status_code == 200 and "getUserMedia" in page.text
        with client.websocket_connect("/ws") as ws:
            assert ws.receive_json() == {
                "type": "ready", "width": 64, "height": 64, "prompt": "a photo", "max_frame_bytes": 2 * 1024 * 1024,
                "sizes": ["64x64"], "controls": [],
            }  # fmt: skip


def test_bad_frames_get_an_error_and_the_socket_keeps_working(hub):
    with TestClient(make_app(hub(), Limits(max_frame_bytes=10_000))) as client:
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


def test_a_connection_picks_its_size_among_the_servers(hub, reference):
    """A size message moves the connection's stream to another size the server offers (a fresh stream of that size,
    its prompt kept); a size the server does not offer, or no size at all, is an error and the session goes on."""
    spy = hub(sizes=[(48, 80)])
    with TestClient(make_app(spy)) as client, client.websocket_connect("/ws") as ws:
        assert ws.receive_json()["sizes"] == ["64x64", "80x48"]
        ws.send_text('{"type": "prompt", "prompt": "a watercolor"}')
        ws.receive_json()
        ws.send_bytes(jpeg(seed=1))
        assert receive_result(ws)[1].shape == (64, 64, 3)
        ws.send_text('{"type": "size", "size": "80x48"}')
        assert ws.receive_json() == {"type": "size", "size": "80x48", "width": 80, "height": 48}
        ref = StreamV2V(reference.backend.at_size(48, 80), reference.prompt_encoder, reference.scheduler,
                        reference.cfg.with_spec(height=48, width=80))  # fmt: skip
        ref.update_prompt("a watercolor")
        for i, (text, message) in enumerate({
            '{"type": "size", "size": "40x40"}': "size 40x40 is not served here; pick one of 64x64, 80x48",
            '{"type": "size", "size": "big"}': "a frame size is WIDTHxHEIGHT, e.g. 768x512; got 'big'",
            '{"type": "size"}': "a frame size is WIDTHxHEIGHT",
        }.items()):  # fmt: skip
            ws.send_text(text)
            reply = ws.receive_json()
            assert reply["type"] == "error" and message in reply["message"], reply
            d = jpeg(96, 160, seed=10 + i)  # decoded to the connection's size now, 48x80
            ws.send_bytes(d)
            _, page = receive_result(ws)
            assert page.shape == (48, 80, 3)
            assert_same(spy.outputs[spy.opened[0]][-1], ref(codec.decode_frame(d, Limits(), 48, 80)))
        ws.send_text('{"type": "size", "size": "64x64"}')
        assert ws.receive_json()["size"] == "64x64"
        ws.send_bytes(jpeg())
        assert receive_result(ws)[1].shape == (64, 64, 3)


def test_connections_at_once_each_get_their_own_stream(hub, reference):
    """K cameras streaming at once: each one's frames equal its stream's alone; a prompt change or a reset of one
    touches no other."""
    spy = hub()
    with TestClient(make_app(spy)) as client, contextlib.ExitStack() as stack:
        sockets, readies = connect(client, stack, K)
        assert [r["type"] for r in readies] == ["ready"] * K and len(set(spy.opened)) == K
        refs = [reference.sibling() for _ in range(K)]
        sockets[0].send_text('{"type": "prompt", "prompt": "a watercolor"}')
        assert sockets[0].receive_json() == {"type": "prompt", "prompt": "a watercolor"}
        refs[0].update_prompt("a watercolor")
        for i in range(6):  # DyMe stores at frames 0 and 4, merges at 4
            if i == 3:
                sockets[1].send_text('{"type": "reset"}')
                assert sockets[1].receive_json() == {"type": "reset"}
                refs[1].reset()
            exchange(spy, sockets, refs, [100 * k + i for k in range(K)])
        assert [s.prompt for s in spy.streams] == ["a watercolor", "a photo", "a photo"]
        assert [s.frame_id for s in spy.streams] == [6, 3, 6]


def test_slow_model_drops_frames_latest_wins_per_connection(hub):
    spy = hub(delay_s=0.3)
    with TestClient(make_app(spy)) as client, contextlib.ExitStack() as stack:
        # One at a time: a slot is opened on a worker thread after the socket is accepted, so two sockets
        # connected together may open their slots in either order, and `spy.streams` is in opening order.
        a = stack.enter_context(client.websocket_connect("/ws"))
        a.receive_json()
        b = stack.enter_context(client.websocket_connect("/ws"))
        b.receive_json()
        n = 8
        for i in range(n):
            a.send_bytes(jpeg(seed=i))
            b.send_bytes(jpeg(seed=50 + i))
        for ws, stream in zip((a, b), spy.streams):
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
            assert stream.frame_id == len(results)  # dropped frames never reached the model


class Disconnecting:
    """A socket whose peer hangs up after `ticks` turns of the event loop."""

    def __init__(self, ticks: int) -> None:
        self.ticks = ticks

    async def receive(self) -> dict:
        for _ in range(self.ticks):
            await asyncio.sleep(0)
        return {"type": "websocket.disconnect", "code": 1000}

    async def send_text(self, text: str) -> None:
        pass


def test_a_session_cancelled_by_its_server_ends_with_the_servers_cancellation():
    """The server (uvicorn, TestClient) cancels the app's task through an anyio cancel scope when a connection
    closes, at any moment of the session's shutdown; the CancelledError that leaves the session must be the scope's
    own, or it escapes the scope (TestClient then raised CancelledError on leaving a socket)."""

    hub = argparse.Namespace(width=64, height=64, prompt="a photo", sizes=((64, 64),), controls=())  # all it reads

    async def session(hangup: int, cancel: int) -> bool:
        with anyio.CancelScope() as scope:

            async def cancel_later() -> None:
                for _ in range(cancel):
                    await asyncio.sleep(0)
                scope.cancel()

            canceller = asyncio.create_task(cancel_later())
            await web_app.Session(Disconnecting(hangup), hub, 0, None, Limits()).run()
        await canceller
        return scope.cancel_called

    async def every_interleaving() -> int:
        return sum([await session(hangup, cancel) for hangup in range(8) for cancel in range(12)])

    assert asyncio.run(every_interleaving()) > 0  # the scope did cancel sessions, and each ended quietly


def test_every_text_message_gets_an_answer_and_the_socket_keeps_working(hub, caplog):
    spy = hub(broken=True)
    with TestClient(make_app(spy)) as client:
        with client.websocket_connect("/ws") as ws:
            ws.receive_json()
            bad = {
                '{"type": "prompt", "prompt": "a\\ud800b"}': "lone surrogate",  # the tokenizer raises TypeError
                "[" * 5000: "malformed message",  # RecursionError in json.loads
                "[" * 100_000: "over the limit of 16384",  # refused before parsing
                "[1]": "malformed message",
                '"prompt"': "malformed message",
                "null": "malformed message",
                '{"type": 5}': "malformed message",
                '{"type": ["prompt"]}': "malformed message",
                '{"type": "prompt", "prompt": 7}': "prompt must be a string",
                '{"type": "prompt", "prompt": "boom"}': "internal error: the text encoder failed",
                '{"type": "reset"}': "internal error: the bank could not be reset",
            }
            for text, message in bad.items():
                ws.send_text(text)
                reply = ws.receive_json()
                assert reply["type"] == "error" and message in reply["message"], (text[:50], reply)
            ws.send_text('{"type": "prompt", "prompt": "a watercolor"}')
            assert ws.receive_json() == {"type": "prompt", "prompt": "a watercolor"}
            ws.send_bytes(jpeg())
            msg, out = receive_result(ws)
            assert msg["seq"] == 0 and out.shape == (64, 64, 3)
    assert spy.streams[0].prompt == "a watercolor"
    # Only the stream's own failures are server errors worth a traceback; bad client messages are not.
    errors = [str(r.exc_info[1]) for r in caplog.records if r.levelname == "ERROR"]
    assert errors == ["the text encoder failed", "the bank could not be reset"]


@pytest.mark.parametrize(
    "headers, refused",
    [
        ({"host": "localhost:7860"}, None),  # a script: no Origin
        ({"host": "127.0.0.1:7860", "origin": "http://127.0.0.1:7860"}, None),  # the page itself
        ({"host": "LOCALHOST", "origin": "http://localhost:80"}, None),  # default port, any case
        ({"host": "[::1]:7860", "origin": "http://[::1]:7860"}, None),
        ({"host": "box.lan:7860", "origin": "http://box.lan:7860"}, None),  # --allowed-host box.lan
        ({"host": "localhost:7860", "origin": "https://app.example.com"}, None),  # --allowed-origin
        ({"host": "localhost:7860", "origin": "https://app.example.com:8443"}, "origin"),
        ({"host": "localhost:7860", "origin": "http://evil.example"}, "origin"),  # any page the user opens
        ({"host": "localhost:7860", "origin": "null"}, "origin"),  # a file:// or sandboxed page
        ({"host": "localhost:7860", "origin": "https://localhost:7860"}, "origin"),  # another scheme
        ({"host": "localhost:7860", "origin": "http://localhost:7861"}, "origin"),  # another port
        ({"host": "evil.example:7860", "origin": "http://evil.example:7860"}, "host"),  # DNS rebinding
        ({"host": "evil.example"}, "host"),
        ({"host": "localhost@evil.example"}, "host"),
        ({}, "host"),
    ],
)
def test_access_policy(headers, refused):
    access = Access(LOCAL_HOSTS | {"box.lan"}, frozenset({"https://app.example.com"}))
    refusal = access.refusal(headers, secure=False)
    assert refusal is None if refused is None else refusal.startswith(refused), refusal


def test_foreign_hosts_and_origins_are_refused_before_any_slot(hub):
    with pytest.raises(ValueError, match="not an origin"):
        Access(allowed_origins=frozenset({"app.example.com"}))
    spy = hub()
    with TestClient(create_app(spy)) as client:  # the default Access: localhost names only
        assert client.get("/", headers={"host": "127.0.0.1:7860"}).status_code == 200
        page = client.get("/")  # Host: testserver
        assert page.status_code == 403 and "--allowed-host" in page.text
        assert client.get("/docs", headers={"host": "127.0.0.1"}).status_code == 404  # nothing else is served
        for headers in [{}, {"host": "localhost:7860", "origin": "http://evil.example"}]:
            with client.websocket_connect("/ws", headers=headers) as ws:
                err = ws.receive_json()
                assert err["type"] == "error" and ("host" in err["message"] or "origin" in err["message"]), err
                with pytest.raises(WebSocketDisconnect) as closed:
                    ws.receive_json()
                assert closed.value.code == 1008 and "not allowed" in closed.value.reason
        assert spy.opened == []  # refused before a slot (and its bank) was taken
        page_origin = {"host": "localhost:7860", "origin": "http://localhost:7860"}
        with client.websocket_connect("/ws", headers=page_origin) as ws:
            assert ws.receive_json()["type"] == "ready"


def test_busy_server_and_a_disconnect_frees_its_slot_for_a_fresh_stream(live_server, hub, reference):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    spy = hub()
    url = live_server(spy).replace("http", "ws") + "/ws"
    with contextlib.ExitStack() as stack:
        others = [stack.enter_context(connect(url)) for _ in range(K - 1)]
        with connect(url) as first:
            for ws in [*others, first]:
                assert json.loads(ws.recv(timeout=TIMEOUT))["type"] == "ready"
            first.send('{"type": "prompt", "prompt": "a sketch"}')
            assert json.loads(first.recv(timeout=TIMEOUT))["type"] == "prompt"
            first.send(jpeg())
            assert json.loads(first.recv(timeout=TIMEOUT))["type"] == "result"
            first.recv(timeout=TIMEOUT)
            asked = time.monotonic()
            with connect(url) as extra:  # one more than the slots
                err = json.loads(extra.recv(timeout=TIMEOUT))
                assert err["type"] == "error" and err["message"].startswith("server busy: all 3 streams"), err
                with pytest.raises(ConnectionClosed) as closed:
                    extra.recv(timeout=TIMEOUT)
                assert closed.value.rcvd.code == 1013
            assert time.monotonic() - asked < 1
        slot = spy.opened[-1]
        wait_until(lambda: spy.closed == [slot], "the disconnected slot was not given back")
        with connect(url) as again:
            assert json.loads(again.recv(timeout=TIMEOUT)) == {
                "type": "ready", "width": 64, "height": 64, "prompt": "a photo", "max_frame_bytes": 2 * 1024 * 1024,
                "sizes": ["64x64"], "controls": [],
            }  # fmt: skip
            # the server's prompt, not the last client's
            assert spy.opened[-1] == slot
            fresh = reference.sibling()  # an empty bank
            for i in range(5):
                data = jpeg(seed=200 + i)
                again.send(data)
                assert json.loads(again.recv(timeout=TIMEOUT))["type"] == "result"
                again.recv(timeout=TIMEOUT)
                assert_same(spy.outputs[slot][-1], fresh(codec.decode_frame(data, Limits(), 64, 64)))
        others[0].send(jpeg())  # the others were never disturbed
        assert json.loads(others[0].recv(timeout=TIMEOUT))["type"] == "result"


def test_idle_connection_is_closed_and_frees_its_slot(live_server, hub):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    # The model takes longer than the idle timeout: a frame in work keeps the connection alive.
    spy = hub(delay_s=0.6)
    url = live_server(spy, Limits(idle_timeout_s=0.4))
    with connect(url.replace("http", "ws") + "/ws") as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "ready"
        ws.send(jpeg())
        assert json.loads(ws.recv(timeout=10))["type"] == "result"
        ws.recv(timeout=10)
        answered = time.monotonic()
        ws.send('{"type": "prompt", "prompt": "a sketch"}')  # text messages hold no camera: they do not count
        assert json.loads(ws.recv(timeout=10))["type"] == "prompt"
        err = json.loads(ws.recv(timeout=10))
        assert err["type"] == "error" and "no frame for 0.4 s" in err["message"]
        assert time.monotonic() - answered > 0.3
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd.code == 1001
    wait_until(lambda: spy.closed == spy.opened and spy.server.in_use == 0, "the slot was not given back")
    with connect(url.replace("http", "ws") + "/ws") as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "ready"


class LosingHub(SpyHub):
    """A SpyHub whose slots are lost once `lost` is set, as a Ray replica's are when its process stops: every frame
    is then answered with a SlotLost result, and prompt changes raise it."""

    lost: SlotLost | None = None

    def push(self, slot: int, frame, deliver) -> int:
        if self.lost is None:
            return super().push(slot, frame, deliver)
        deliver(Result(0, error=self.lost))
        return 0

    def update_prompt(self, slot: int, prompt: str):
        if self.lost is None:
            return super().update_prompt(slot, prompt)
        future: Future = Future()
        future.set_exception(self.lost)
        return future


@pytest.mark.parametrize("message", ["frame", "prompt"])
def test_a_lost_stream_is_told_closed_1011_and_its_slot_given_back(multi, message):
    with StreamServer(multi, prompt="a photo") as server:
        spy = LosingHub(server)
        with TestClient(make_app(spy)) as client, client.websocket_connect("/ws") as ws:
            assert ws.receive_json()["type"] == "ready"
            ws.send_bytes(jpeg())
            receive_result(ws)
            spy.lost = SlotLost("stream lost: its replica process stopped; reconnect for a fresh stream")
            if message == "frame":
                ws.send_bytes(jpeg(seed=1))
            else:
                ws.send_text('{"type": "prompt", "prompt": "a sketch"}')
            assert ws.receive_json() == {"type": "error", "message": str(spy.lost)}
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
            assert closed.value.code == 1011 and closed.value.reason == "stream lost"
        assert spy.closed == spy.opened and server.in_use == 0


def test_a_hub_that_is_not_ready_says_starting_not_busy(hub):
    spy = hub()

    def starting():
        raise NotReady("no stream replica is ready yet")

    spy.open = starting
    with TestClient(make_app(spy)) as client, client.websocket_connect("/ws") as ws:
        assert ws.receive_json() == {"type": "error", "message": "server starting: no stream replica is ready yet"}
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 1013  # try again later


def test_a_text_message_that_is_not_utf8_closes_1007_with_one_warning_line(live_server, hub):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    url = live_server(hub()).replace("http", "ws") + "/ws"
    records: list[logging.LogRecord] = []
    uvicorn_log = logging.getLogger("uvicorn.error")
    keep = logging.Handler()
    keep.emit = records.append
    quiet = serve.ClientTextErrors()  # what `serve` installs before it runs uvicorn
    uvicorn_log.addFilter(quiet)
    uvicorn_log.addHandler(keep)
    try:
        with connect(url) as ws:
            assert json.loads(ws.recv(timeout=TIMEOUT))["type"] == "ready"
            ws.send(b"\xff\xfe not text", text=True)  # a text frame whose bytes are not UTF-8
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=TIMEOUT)
            assert closed.value.rcvd.code == 1007
        wait_until(lambda: records, "uvicorn logged the bad message", 5)
    finally:
        uvicorn_log.removeFilter(quiet)
        uvicorn_log.removeHandler(keep)
    assert [(r.levelname, r.getMessage(), r.exc_info) for r in records] == [
        ("WARNING", "closed a WebSocket (1007): its client sent a text message that is not UTF-8", None)
    ]
    with connect(url) as ws:  # the server goes on
        assert json.loads(ws.recv(timeout=TIMEOUT))["type"] == "ready"


def test_images_are_decoded_and_encoded_off_the_model_thread(hub, monkeypatch):
    threads: list[tuple[str, str]] = []

    def spy_on(name):
        module = codec if name == "fit_to_size" else web_app  # where the name is looked up when called
        fn = getattr(module, name)

        def wrapped(*args, **kwargs):
            threads.append((name, threading.current_thread().name))
            return fn(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)

    spy_on("fit_to_size")
    spy_on("encode_jpeg")
    spy = hub()
    with TestClient(make_app(spy)) as client:
        with client.websocket_connect("/ws") as ws:
            ws.receive_json()
            ws.send_bytes(jpeg())  # 48x80: needs a crop and a resize
            receive_result(ws)
    assert [name for name, _ in threads] == ["fit_to_size", "encode_jpeg"]
    assert all(thread.startswith("streamv2v-image") for _, thread in threads), threads
    assert spy.threads == ["streamv2v-serve"]  # the model ran on the hub's loop thread


def test_large_frames_decode_at_reduced_size(monkeypatch):
    y, x = np.mgrid[0:600, 0:800]
    smooth = np.stack([x * 255 // 799, y * 255 // 599, (x + y) * 255 // 1398], axis=-1).astype(np.uint8)
    fitted: list[tuple[int, ...]] = []
    monkeypatch.setattr(codec, "fit_to_size", lambda img, h, w: fitted.append(img.shape) or fit_to_size(img, h, w))
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        Image.fromarray(smooth).save(buf, format=fmt)
        out = codec.decode_frame(buf.getvalue(), Limits(), 64, 64)
        exact = fit_to_size(np.asarray(Image.open(buf).convert("RGB")), 64, 64)
        assert out.shape == (64, 64, 3) and np.abs(out.astype(int) - exact).mean() < 2, fmt
    assert all(64 <= h < 128 for h, _, _ in fitted), fitted  # reduced to under twice the output before the resize
    big = io.BytesIO()
    Image.new("RGB", (2049, 2048)).save(big, format="PNG")
    with pytest.raises(codec.BadFrame, match="2049x2048, over the limit of 4194304 pixels"):
        codec.decode_frame(big.getvalue(), Limits(), 64, 64)


@pytest.fixture
def live_server():
    """Starts uvicorn on a free port: `live_server(hub, limits=Limits(), loras=None)` -> its http URL."""
    import uvicorn

    servers = []

    def start(hub: SpyHub, limits: Limits | None = None, loras: LoraPicker | None = None) -> str:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))  # a free port, held until uvicorn takes the socket over
        server = uvicorn.Server(uvicorn.Config(create_app(hub, limits or Limits(), loras=loras), log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")


@contextlib.contextmanager
def chromium_page(url: str, camera: bool = True):
    """The page at `url` in headless Chromium, with a fake camera (`camera`) or with none; an uncaught error in
    the page fails the test."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS + (FAKE_CAMERA if camera else []))
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            yield page
            assert not errors, errors
        finally:
            browser.close()


def wait_for_output(page, frames: int) -> None:
    """Until the page got `frames` translated frames and shows the last one (a decoded 64x64 JPEG)."""
    page.wait_for_function(f"window.streamStats && window.streamStats.received >= {frames}", timeout=60_000)
    page.wait_for_function("document.getElementById('output').naturalWidth > 0", timeout=10_000)
    assert page.evaluate("document.getElementById('output').naturalWidth") == 64


@needs_chromium
def test_browser_camera_round_trip(live_server, hub):
    spy = hub()
    url = live_server(spy)  # the default Access: the page's own origin (127.0.0.1:port) must be allowed
    with chromium_page(url) as page:
        wait_for_output(page, 3)
        assert page.evaluate("[window.streamStats.source, window.streamStats.errors]") == ["camera", 0]
        page.fill("#prompt", "a watercolor painting")
        page.click("button[type=submit]")
        page.wait_for_function("window.streamStats.prompt === 'a watercolor painting'", timeout=30_000)
        assert spy.streams[0].prompt == "a watercolor painting"
        received = page.evaluate("window.streamStats.received")
        page.wait_for_function(f"window.streamStats.received >= {received + 2}", timeout=30_000)
        assert "latency" in page.inner_text("#stats")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web_demo.png"))
    assert (ARTIFACTS / "web_demo.png").stat().st_size > 1000


@needs_chromium
def test_browser_without_a_camera_streams_the_test_pattern(live_server, hub):
    """No camera: the page says so (not "permission"), falls back to its test pattern and streams it through the
    same capture loop; with a camera, ?source=pattern picks the pattern and leaves the camera closed."""
    url = live_server(hub())
    with chromium_page(url, camera=False) as page:
        page.wait_for_function("window.streamStats.source === 'pattern'", timeout=10_000)
        status = page.inner_text("#status")
        assert "no camera found" in status and "test pattern" in status and "permission" not in status, status
        wait_for_output(page, 3)
        panels = ["pattern", "output", "input-placeholder", "output-placeholder"]
        hidden = page.evaluate("(ids) => ids.map((id) => document.getElementById(id).hidden)", panels)
        assert hidden == [False, False, True, True]  # the pattern and a frame shown, no placeholder left
        assert page.input_value("#source") == "pattern" and page.evaluate("window.streamStats.errors") == 0
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web_demo_no_camera.png"))
    with chromium_page(url + "/?source=pattern") as page:
        wait_for_output(page, 2)
        used = page.evaluate("[window.streamStats.source, document.getElementById('input').srcObject]")
        assert used == ["pattern", None]  # the camera was never opened


@needs_chromium
def test_browser_size_picker(live_server, hub):
    """The picker lists the server's sizes (hidden when there is one); picking one streams at that size."""
    with chromium_page(live_server(hub()) + "/?source=pattern") as page:
        wait_for_output(page, 1)
        assert page.evaluate("document.getElementById('size').hidden") is True
    with chromium_page(live_server(hub(sizes=[(48, 80)])) + "/?source=pattern") as page:
        wait_for_output(page, 2)
        options = page.evaluate("[...document.getElementById('size').options].map((o) => o.value)")
        assert options == ["64x64", "80x48"] and page.input_value("#size") == "64x64"
        page.select_option("#size", "80x48")
        page.wait_for_function("window.streamStats.size === '80x48'", timeout=10_000)
        page.wait_for_function("document.getElementById('output').naturalWidth === 80", timeout=30_000)
        assert page.evaluate("document.getElementById('output').naturalHeight") == 48


def test_serve_refuses_bad_flags_in_one_line_before_loading(capsys):
    for argv, message in [
        (["--streams", "0"], "error: --streams must be >= 1, got 0"),
        (["--idle-timeout", "nan"], "error: --idle-timeout must be a number of seconds >= 0 (0: never), got nan"),
        (["--cuda-graphs", "--device", "cpu"], "error: --cuda-graphs needs a CUDA GPU, the streams run on cpu"),
        (["--backend", "tensorrt"], "error: --backend tensorrt runs a build folder: add --engines DIR"),
        (["--ray", "--controlnet", "tiny"], "error: --controlnet is not supported with --ray yet"),
        (["--controlnet", "tiny", "--control", "video"], "error: --control video: kind video takes its frames from"),
    ]:
        assert serve.run(serve_args(*argv)) == 1
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err


def test_serve_slots_keep_the_config_and_negative_prompt():
    args = serve_args("--cfg-type", "initialize", "--negative-prompt", "blurry", "--steps", "2", "--prompt", "a cat",
                      "--height", "64", "--width", "64", "--device", "cpu")  # fmt: skip
    multi = serve.open_slots(args)
    assert multi.streams == serve.DEFAULT_STREAMS["cpu"] and multi.backend.name == "eager"
    cfg = multi.cfg
    assert cfg.prime and cfg.similar_filter.enabled and cfg.steps == 2  # the live defaults, and the flags
    first, *others = multi.slots
    for stream in multi.slots:
        assert stream.cfg == cfg and stream.prompt == "a cat" and stream.negative_prompt == "blurry"
        assert stream.similar_filter is not None
        torch.testing.assert_close(stream.negative_embeds, first.negative_embeds)
    assert all(stream.bank is not first.bank for stream in others)  # one bank per slot


@pytest.mark.slow  # an ONNX export (shared with test_multistream.py in a full run)
def test_serve_opens_a_build_folder_for_as_many_streams_as_it_was_built_for(tiny_build):
    folder = tiny_build(tiny_spec(max_streams=2))
    multi = serve.open_slots(serve_args("--engines", str(folder), "--device", "cpu"))
    assert multi.streams == 2 and multi.backend.name == "onnxruntime" and multi.cfg.prime  # live defaults
    with pytest.raises(CliError, match=r"max_streams: engines have 2, asked 3.*--max-streams 3"):
        serve.open_slots(serve_args("--engines", str(folder), "--streams", "3", "--device", "cpu"))


def test_serve_command_serves_the_page(tmp_path):
    import subprocess
    import sys
    import urllib.request

    port = free_port()
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


# -- the LoRA picker (serve --lora-dir; web/loras.py) -------------------------------------------------------------

from test_lora_swap import files  # noqa: E402, F401  (files: two LoRA files for the tiny model)

from streamv2v_trt.lora_set import lora_specs  # noqa: E402

LISTED = ["a.safetensors", "b.safetensors", "bad.safetensors", "in.safetensors", "junk.safetensors"]


@pytest.fixture
def lora_dir(files, tmp_path):  # noqa: F811
    """A LoRA folder: two good files, a malformed one, one that is not safetensors at all, a symlink that stays
    inside; and what must not be offered: a symlink out of the folder, a file in a subfolder, a .bin."""
    from safetensors.torch import load_file
    from test_lora import save

    d = tmp_path / "loras"
    (d / "sub").mkdir(parents=True)
    for name in ("a", "b"):
        shutil.copy(files[name], d / f"{name}.safetensors")
    tensors = load_file(str(files["b"]))
    factor = next(iter(tensors.values()))
    save(d / "bad.safetensors", tensors | {f"lora_unet_no_such_layer.lora_{r}.weight": factor for r in ("down", "up")})
    (d / "junk.safetensors").write_bytes(b"not a safetensors file")
    (d / "in.safetensors").symlink_to(d / "a.safetensors")
    (d / "out.safetensors").symlink_to(files["a"])  # a real LoRA, outside the folder
    shutil.copy(files["a"], d / "sub" / "c.safetensors")
    (d / "a.bin").write_bytes(b"pickled")
    return d


@pytest.fixture
def lora_hub(hub, multi):
    """`lora_hub() -> SpyHub`; the module's slots are given back with no LoRA."""
    spies = []

    def make() -> SpyHub:
        spies.append(hub())
        return spies[-1]

    yield make
    for spy in spies:
        spy.set_loras([]).result(TIMEOUT)
    assert multi.cfg.spec.loras == ()


def send_loras(ws, *loras: tuple[str, float]) -> None:
    ws.send_text(json.dumps({"type": "loras", "loras": [{"name": n, "scale": s} for n, s in loras]}))


def test_a_lora_picked_on_one_page_runs_for_every_client_and_every_page_is_told(lora_hub, lora_dir, multi, reference):
    """The rule for the shared networks: the LoRA set is the server's. One page's change swaps every slot's
    weights between two ticks, every connected page gets a "loras" message, and a page that connects later is
    told the set in its "ready"."""
    spy = lora_hub()
    app = create_app(spy, Limits(), TEST_HOSTS, loras=LoraPicker(LoraFolder(lora_dir)))
    with TestClient(app) as client:
        with contextlib.ExitStack() as stack:
            (one, two), readies = connect(client, stack, 2)
            assert all(r["lora_files"] == LISTED and r["loras"] == [] for r in readies)
            send_loras(one, ("a.safetensors", 0.8))
            told = {"type": "loras", "loras": [{"name": "a.safetensors", "scale": 0.8}]}
            assert one.receive_json() == told and two.receive_json() == told
            assert multi.cfg.spec.loras == lora_specs([(lora_dir / "a.safetensors", 0.8)])
            assert all(stream.cfg == multi.cfg for stream in multi.slots)
            # Every client's frames are those of a stream opened with the LoRA fused, and differ from the base's.
            fused = StreamV2V.from_pretrained(multi.cfg, prompt="a photo")
            exchange(spy, [one, two], [fused, fused.sibling()], [1, 2])
            base = reference.sibling()
            base_out = base(codec.decode_frame(jpeg(seed=1), Limits(), 64, 64))
            assert np.abs(spy.outputs[spy.opened[0]][-1].astype(int) - base_out).max() > 1
            with client.websocket_connect("/ws") as three:
                assert three.receive_json()["loras"] == told["loras"]
                send_loras(three)  # none
                assert three.receive_json() == {"type": "loras", "loras": []}
            for ws in (one, two):
                assert ws.receive_json() == {"type": "loras", "loras": []}
            assert multi.cfg.spec.loras == ()


def test_the_picker_takes_only_listed_names_and_a_bad_file_changes_nothing(lora_hub, lora_dir, files, multi):  # noqa: F811
    spy = lora_hub()
    app = create_app(spy, Limits(), TEST_HOSTS, loras=LoraPicker(LoraFolder(lora_dir)))
    with TestClient(app) as client, client.websocket_connect("/ws") as one, client.websocket_connect("/ws") as two:
        one.receive_json(), two.receive_json()
        send_loras(one, ("in.safetensors", 1.0))  # a symlink inside the folder is a listed file
        one.receive_json(), two.receive_json()
        cfg = multi.cfg
        assert cfg.spec.loras == lora_specs([(lora_dir / "in.safetensors", 1.0)])
        # What changed since the listing counts too: the inside link now leads out of the folder.
        (lora_dir / "in2.safetensors").symlink_to(lora_dir / "a.safetensors")
        unknown = ["../a.safetensors", str(files["a"]), str(lora_dir / "a.safetensors"), "out.safetensors",
                   "sub/c.safetensors", "c.safetensors", "a.bin", "in2.safetensors", "", 3, None]  # fmt: skip
        refused = [({"loras": [{"name": name, "scale": 1}]}, "unknown LoRA") for name in unknown]
        refused += [
            ({"loras": [{"name": "a.safetensors", "scale": scale}]}, r"scale must be a number in \[-2, 2\]")
            for scale in (2.5, -3, "1", True, None, float("nan"), float("inf"))
        ]
        refused += [
            ({"loras": "a.safetensors"}, '"loras" must be a list'),
            ({}, '"loras" must be a list'),
            ({"loras": [{"name": "a.safetensors", "scale": 1}] * 5}, '"loras" must be a list of at most 4'),
            ({"loras": [{"name": "a.safetensors"}]}, 'each LoRA is an object {"name"'),
            ({"loras": [{"name": "a.safetensors", "scale": 1, "path": "/etc"}]}, "each LoRA is an object"),
            ({"loras": [{"name": "bad.safetensors", "scale": 1}]}, "keep in.safetensors:1: .*matches no Linear"),
            (
                {"loras": [{"name": "b.safetensors", "scale": 1}, {"name": "junk.safetensors", "scale": 1}]},
                "keep in.safetensors:1: .*not a readable .safetensors file",
            ),
        ]
        (lora_dir / "in.safetensors").unlink()
        (lora_dir / "in.safetensors").symlink_to(files["b"])
        refused.append(({"loras": [{"name": "in.safetensors", "scale": 1}]}, "unknown LoRA"))
        for msg, why in refused:
            one.send_text(json.dumps({"type": "loras", **msg}))
            reply = one.receive_json()
            assert reply["type"] == "error" and re.search(why, reply["message"]), (msg, reply)
            assert multi.cfg == cfg, msg  # nothing changed
        # The picker still swaps, and the other page's first message since is that swap: no refusal was told.
        send_loras(one, ("a.safetensors", 0.5))
        told = {"type": "loras", "loras": [{"name": "a.safetensors", "scale": 0.5}]}
        assert one.receive_json() == told and two.receive_json() == told
        assert multi.cfg.spec.loras == lora_specs([(lora_dir / "a.safetensors", 0.5)])
        for ws in (one, two):
            ws.send_text(json.dumps({"type": "prompt", "prompt": "a photo"}))
            assert ws.receive_json() == {"type": "prompt", "prompt": "a photo"}


def test_a_server_without_a_lora_folder_says_how_to_offer_loras(hub):
    with TestClient(make_app(hub())) as client, client.websocket_connect("/ws") as ws:
        assert "lora_files" not in ws.receive_json()
        send_loras(ws, ("a.safetensors", 1.0))
        assert ws.receive_json() == {"type": "error", "message": "this server offers no LoRAs: start it with serve "
                                     "--lora-dir DIR"}  # fmt: skip


def test_serve_refuses_a_bad_lora_dir_in_one_line_before_loading(tmp_path, capsys):
    for argv, message in [
        (["--lora-dir", str(tmp_path / "nope")], f"error: --lora-dir: {tmp_path / 'nope'} is not a folder"),
        (["--ray", "--lora-dir", str(tmp_path)], "error: --lora-dir is not supported with --ray"),
    ]:
        assert serve.run(serve_args(*argv)) == 1
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err


@needs_chromium
def test_browser_lora_picker(live_server, lora_hub, lora_dir, multi):
    spy = lora_hub()
    url = live_server(spy, loras=LoraPicker(LoraFolder(lora_dir)))
    with chromium_page(url + "/?source=pattern") as page:
        wait_for_output(page, 2)
        assert page.is_visible("#lora-controls")
        options = page.evaluate("[...document.getElementById('lora').options].map((o) => o.value)")
        assert options == ["", *LISTED]
        page.select_option("#lora", "b.safetensors")
        page.wait_for_function("window.streamStats.loras.length === 1", timeout=30_000)
        assert multi.cfg.spec.loras == lora_specs([(lora_dir / "b.safetensors", 1.0)])
        page.evaluate("(() => { const s = document.getElementById('lora-scale'); s.value = '0.5';"
                      " s.dispatchEvent(new Event('change')); })()")  # fmt: skip
        page.wait_for_function("window.streamStats.loras[0].scale === 0.5", timeout=30_000)
        assert multi.cfg.spec.loras == lora_specs([(lora_dir / "b.safetensors", 0.5)])
        assert page.inner_text("#lora-scale-value") == "0.50"
        page.select_option("#lora", "bad.safetensors")  # refused: the page says why and shows the set again
        page.wait_for_function("window.streamStats.errors === 1", timeout=30_000)
        assert "matches no Linear" in page.inner_text("#error") and page.input_value("#lora") == "b.safetensors"
        received = page.evaluate("window.streamStats.received")
        page.wait_for_function(f"window.streamStats.received >= {received + 2}", timeout=30_000)


# -- ControlNet: per-connection scales and a view of the control image ({"type": "control"}) -----------------------
@pytest.fixture(scope="module")
def control_multi() -> MultiStream:
    """`serve --controlnet tiny --control canny:0.5` on 2 slots of the tiny model, 64x64, on the CPU."""
    args = serve_args("--streams", "2", "--height", "64", "--width", "64", "--prompt", "a photo", "--device", "cpu",
                      "--controlnet", "tiny", "--control", "canny:0.5", "--no-similar-filter")  # fmt: skip
    return serve.open_slots(args)


@pytest.fixture
def control_hub(control_multi):
    servers: list[StreamServer] = []

    def make() -> SpyHub:
        servers.append(StreamServer(control_multi, prompt="a photo"))
        return SpyHub(servers[-1])

    yield make
    for server in servers:
        server.stop()


def test_each_connection_has_its_own_control_scale(control_hub, control_multi):
    spy = control_hub()
    # A stream by itself at scale 0: the first connection's frames after its scale message.
    zero = StreamV2V.from_pretrained(dataclasses.replace(control_multi.cfg, controlnet_scales=(0.0,)), prompt="a photo")
    with TestClient(make_app(spy)) as client:
        with contextlib.ExitStack() as stack:
            (a, _), readies = connect(client, stack, 2)
            assert all(r["controls"] == [{"kind": "canny", "scale": 0.5}] for r in readies)
            a.send_text('{"type": "control", "scales": [0]}')
            assert a.receive_json() == {"type": "control", "scales": [0.0], "show": False}
            first, second = (control_multi.slots[slot] for slot in spy.opened)
            assert first.cfg.controlnet_scales == (0.0,) and second.cfg.controlnet_scales == (0.5,)
            for seed in range(2):
                a.send_bytes(jpeg(seed=seed))
                receive_result(a)
                assert_same(spy.outputs[spy.opened[0]][-1], zero(codec.decode_frame(jpeg(seed=seed), Limits(), 64, 64)))
        wait_until(lambda: len(spy.closed) == 2, "the slots were not given back")
        # A slot opened again has the server's scale, not the last client's.
        with client.websocket_connect("/ws") as c, client.websocket_connect("/ws") as d:
            c.receive_json(), d.receive_json()
            assert all(control_multi.slots[s].cfg.controlnet_scales == (0.5,) for s in spy.opened[2:])


def test_the_control_image_is_shown_on_request(control_hub):
    spy = control_hub()
    with TestClient(make_app(spy)) as client, client.websocket_connect("/ws") as ws:
        ws.receive_json()
        ws.send_text('{"type": "control", "show": true}')
        assert ws.receive_json() == {"type": "control", "scales": [0.5], "show": True}
        ws.send_bytes(jpeg(seed=3))
        receive_result(ws)
        msg = ws.receive_json()
        assert msg["type"] == "control_image" and msg["index"] == 0
        shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(msg["jpeg"]))))
        # The canny edges of the frame the slot last took, as the server encodes them (same encoder, same quality).
        frame = codec.decode_frame(jpeg(seed=3), Limits(), 64, 64)
        edges = ControlImages("canny", 64, 64)(uint8_to_image(torch.from_numpy(frame), torch.float32))
        want = codec.encode_jpeg(control_to_uint8(edges), Limits().jpeg_quality)
        assert np.array_equal(shown, np.asarray(Image.open(io.BytesIO(want))))
        assert 0 < (control_to_uint8(edges) > 0).mean() < 0.5  # edges, not a blank or full image


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"type": "control"}', 'needs "scales"'),
        ('{"type": "control", "scales": [0.5, 0.5]}', "a list of 1 number(s) from 0 to 2"),
        ('{"type": "control", "scales": [3]}', "from 0 to 2"),
        ('{"type": "control", "scales": [true]}', "from 0 to 2"),
        ('{"type": "control", "scales": "0.5"}', "from 0 to 2"),
        ('{"type": "control", "scales": [NaN]}', "from 0 to 2"),
        ('{"type": "control", "show": 1}', '"show" must be true or false'),
    ],
)
def test_bad_control_messages_change_nothing_and_the_socket_keeps_working(control_hub, control_multi, text, message):
    spy = control_hub()
    with TestClient(make_app(spy)) as client, client.websocket_connect("/ws") as ws:
        ws.receive_json()
        ws.send_text(text)
        reply = ws.receive_json()
        assert reply["type"] == "error" and message in reply["message"], reply
        assert control_multi.slots[spy.opened[0]].cfg.controlnet_scales == (0.5,)
        ws.send_bytes(jpeg())
        assert receive_result(ws)[1].shape == (64, 64, 3)


def test_a_server_without_controlnets_says_how_to_run_them(hub):
    with TestClient(make_app(hub())) as client, client.websocket_connect("/ws") as ws:
        ws.receive_json()
        ws.send_text('{"type": "control", "scales": [1]}')
        reply = ws.receive_json()
        assert reply["type"] == "error" and "serve --controlnet" in reply["message"]


@needs_chromium
def test_browser_control_slider_and_view(live_server, hub, control_hub, control_multi):
    """The ControlNet section shows only on a server with ControlNets; its slider sets this connection's scale and
    the box shows the control image."""
    with chromium_page(live_server(hub()) + "/?source=pattern") as page:
        wait_for_output(page, 1)
        assert page.evaluate("document.getElementById('control-controls').hidden") is True
    spy = control_hub()
    with chromium_page(live_server(spy) + "/?source=pattern") as page:
        wait_for_output(page, 1)
        assert page.evaluate("document.getElementById('control-controls').hidden") is False
        page.fill("#control-scale-0", "1.5")  # a range input: sets the value and fires input and change
        page.wait_for_function("window.streamStats.controlScales[0] === 1.5", timeout=10_000)
        assert control_multi.slots[spy.opened[0]].cfg.controlnet_scales == (1.5,)
        page.check("#control-show")
        page.wait_for_function("window.streamStats.controlImages >= 1", timeout=30_000)
        page.wait_for_function("document.getElementById('control-image').naturalWidth === 64", timeout=10_000)
        assert page.evaluate("document.getElementById('control-view').hidden") is False
