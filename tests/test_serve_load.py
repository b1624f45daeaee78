"""`python -m benchmarks.serve_load` against a real `serve` subprocess (tiny model, 64x64, CPU), and against a small
fake server for what a real one does rarely: closing mid-run, refusing with the busy protocol."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

pytest.importorskip("websockets")
pytest.importorskip("fastapi")
from websockets.sync.server import serve as ws_serve  # noqa: E402

from benchmarks.serve_load import main  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SLOTS = 2  # the server's connection limit
RUN = ["--seconds", "3", "--warmup", "1", "--timeout", "20"]


def serve_accepts(*flags: str) -> bool:
    """Whether `serve` takes these flags now (the server is changing; the test uses only stable ones)."""
    from streamv2v_trt.cli import serve

    parser = argparse.ArgumentParser()
    serve.add_parser(parser.add_subparsers())
    try:
        parser.parse_args(["serve", *flags])
    except SystemExit:
        return False
    return True


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """ws:// URL of a `serve` subprocess with SLOTS connection slots; its log is in the failure message."""
    port = free_port()
    # The connection limit's flag: --streams K (slots batched per tick) since MultiStream, --max-connections before.
    limit = next((f for f in (["--streams", str(SLOTS)], ["--max-connections", str(SLOTS)]) if serve_accepts(*f)), [])
    cmd = [sys.executable, "-m", "streamv2v_trt", "serve", "--model", "tiny", "--height", "64", "--width", "64",
           "--device", "cpu", "--port", str(port), *limit]  # fmt: skip
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"serve exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"serve did not answer in 120 s:\n{log_path.read_text()}")
            time.sleep(0.3)
        yield {"url": f"ws://127.0.0.1:{port}/ws", "limited": bool(limit), "log": log_path}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_load(tmp_path: Path, url: str, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "load.json"
    rc = main(["--url", url, *RUN, "--json", str(out), *extra])
    return rc, json.loads(out.read_text())


def test_clients_get_results(server, tmp_path):
    rc, report = run_load(tmp_path, server["url"], "--clients", "2")
    assert rc == 0
    assert report["machine"]["logical_cpus"] >= 1 and len(report["machine"]["load_avg_before"]) == 3
    assert report["frame_size"] == [64, 64] and report["args"]["clients"] == 2 and report["date"]
    clients = report["clients"]
    assert [c["status"] for c in clients] == ["served", "served"], clients
    for c in clients:
        assert c["results"] > 0 and c["sent"] >= c["results"] and c["fps"] > 0, c
        assert 0 < c["p50_ms"] <= c["p99_ms"], c
        assert c["model_ms_p50"] > 0, c
        assert c["errors"] == 0 and not c["notes"], c
    totals = report["totals"]
    assert totals["served"] == 2 and totals["refused"] == totals["failed"] == totals["errors"] == 0
    assert totals["fps"] == pytest.approx(sum(c["fps"] for c in clients))


def test_clients_over_the_limit_are_refused_not_errors(server, tmp_path):
    if not server["limited"]:
        pytest.skip("serve has neither --streams nor --max-connections now; the fake-server test covers busy")
    n = SLOTS + 2
    rc, report = run_load(tmp_path, server["url"], "--clients", str(n))
    assert rc == 0
    totals = report["totals"]
    # A slot of the previous test's clients may still be closing: at least SLOTS are refused, none fail.
    assert totals["served"] >= 1 and totals["refused"] >= n - SLOTS, report["clients"]
    assert totals["served"] + totals["refused"] == n and totals["errors"] == 0, report["clients"]
    for c in report["clients"]:
        if c["status"] == "refused":
            assert c["results"] == 0 and c["errors"] == 0 and c["close_code"] == 1013, c
        else:
            assert c["results"] > 0, c


class FakeServer:
    """The protocol's edge cases on demand, by path: /busy refuses as a full server does (busy error, 1013);
    /die answers three frames, then closes with 1011 (a crashed replica); /quiet answers nothing; /paced answers
    every frame 20 ms after it came (a model's tick)."""

    def __init__(self) -> None:
        self.server = ws_serve(self.handle, "127.0.0.1", 0)
        self.url = f"ws://127.0.0.1:{self.server.socket.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def handle(self, ws) -> None:
        path = ws.request.path
        if path == "/busy":
            ws.send(json.dumps({"type": "error", "message": "server busy: all 2 stream slots are taken"}))
            ws.close(1013)
            return
        ws.send(json.dumps({"type": "ready", "width": 16, "height": 16, "prompt": "", "max_frame_bytes": 1 << 20}))
        for seq in range(3 if path == "/die" else 10**6):
            ws.recv()
            if path == "/quiet":
                continue
            if path == "/paced":
                time.sleep(0.02)
            ws.send(
                json.dumps({"type": "result", "seq": seq, "model_ms": 1.0, "server_ms": 1.0, "fps": 0, "dropped": 0})
            )
            ws.send(b"\xff\xd8 not really a jpeg")
        ws.close(1011, "replica died")

    def close(self) -> None:
        self.server.shutdown()
        self.thread.join(5)


@pytest.fixture
def fake():
    server = FakeServer()
    yield server
    server.close()


def test_busy_protocol_counts_refused(fake, tmp_path):
    rc, report = run_load(tmp_path, fake.url + "/busy", "--clients", "3", "--seconds", "0.5", "--warmup", "0")
    assert rc == 0
    assert report["totals"]["refused"] == 3 and report["totals"]["errors"] == 0
    assert all(c["close_code"] == 1013 and "busy" in c["notes"][0] for c in report["clients"])


def test_server_closing_mid_run_is_counted(fake, tmp_path):
    rc, report = run_load(tmp_path, fake.url + "/die", "--clients", "2", "--seconds", "1", "--warmup", "0")
    assert rc == 0
    for c in report["clients"]:
        assert c["status"] == "served" and c["results_total"] == 3 and c["close_code"] == 1011, c
        assert c["errors"] == 1 and "mid-run" in c["notes"][0], c


def test_lost_answers_are_errors(fake, tmp_path):
    args = ["--clients", "1", "--seconds", "1.5", "--warmup", "0", "--timeout", "0.5"]
    rc, report = run_load(tmp_path, fake.url + "/quiet", *args)
    assert rc == 0
    (c,) = report["clients"]
    assert c["results"] == 0 and c["errors"] >= 2 and "no answer" in c["notes"][0], c


def test_unreachable_server_exits_1(tmp_path):
    out = tmp_path / "load.json"
    assert main(["--url", f"ws://127.0.0.1:{free_port()}/ws", "--seconds", "0.5", "--json", str(out)]) == 1
    assert json.loads(out.read_text())["totals"]["unreachable"] == 1


def test_help_names_the_module(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m benchmarks.serve_load")


def test_half_rate_clients_send_half_as_often(fake, tmp_path):
    """`--half-rate 1`: client 0 waits a round trip after each answer, so it sends about half what client 1 sends;
    each client's p99 and the spread between them are reported."""
    args = ["--clients", "2", "--half-rate", "1", "--seconds", "2", "--warmup", "0.5"]
    rc, report = run_load(tmp_path, fake.url + "/paced", *args)
    assert rc == 0
    half, full = report["clients"]
    assert (half["rate"], full["rate"]) == ("half", "full")
    assert half["errors"] == full["errors"] == 0 and full["sent"] > 20, report["clients"]
    # Half of the round trips are pauses: 0.5, give or take the scheduling of a loaded 2-core machine.
    assert 0.3 < half["sent"] / full["sent"] < 0.7, report["clients"]
    spread = report["totals"]["p99_spread"]
    assert spread == max(half["p99_ms"], full["p99_ms"]) / min(half["p99_ms"], full["p99_ms"])


def test_half_rate_beyond_the_clients_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--url", "ws://127.0.0.1:1/ws", "--clients", "2", "--half-rate", "3"])
    assert e.value.code == 2 and "--half-rate must be in 0..--clients (2), got 3" in capsys.readouterr().err
