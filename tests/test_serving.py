"""StreamServer: slots of one MultiStream behind a loop thread (open/close, latest frame wins, jobs and LoRA swaps
between ticks, errors that reach only their own frames, stop). The web app over it is tested in test_web.py."""

from __future__ import annotations

import argparse
import queue
import threading
import time

import numpy as np
import pytest
from conftest import tiny_spec
from test_lora_swap import files  # noqa: F401  (files: two LoRA files for the tiny model)

from streamv2v_trt import StreamConfig, StreamV2V
from streamv2v_trt.frames import FrameError
from streamv2v_trt.hub import SizeUnavailable
from streamv2v_trt.lora_set import lora_specs
from streamv2v_trt.multistream import MultiStream
from streamv2v_trt.serving import Result, StreamServer

pytestmark = pytest.mark.usefixtures("one_thread")

TIMEOUT = 10  # seconds: generous, the tiny model's tick takes tens of milliseconds


@pytest.fixture(scope="module")
def multi() -> MultiStream:
    return MultiStream.from_pretrained(StreamConfig(tiny_spec()), streams=2, prompt="a photo")  # 64x64, fp32


def frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)


class Inbox:
    """A `deliver` callback that keeps the results, for the test thread to take in order."""

    def __init__(self) -> None:
        self.results: queue.Queue[Result] = queue.Queue()

    def __call__(self, result: Result) -> None:
        self.results.put(result)

    def get(self) -> Result:
        return self.results.get(timeout=TIMEOUT)


class Gated:
    """A MultiStream whose ticks wait while `go` is clear, telling `started` each tick's slots as it begins; a fault
    in `faults[i]` is raised by tick i (after its work). Everything else is the real MultiStream."""

    def __init__(self, multi: MultiStream) -> None:
        self.multi, self.streams, self.cfg, self.slots = multi, multi.streams, multi.cfg, multi.slots
        self.sizes = multi.sizes
        self.go = threading.Event()
        self.go.set()
        self.started: queue.Queue[list[int]] = queue.Queue()
        self.faults: dict[int, Exception] = {}
        self.events: list[tuple] = []  # ("tick", slots) as ticks begin; jobs append their own
        self.began: list[float] = []  # perf_counter time each tick began
        self._staged: list[int] = []
        self.ticks = 0

    def submit(self, slot: int, frame) -> None:
        self.multi.submit(slot, frame)
        self._staged.append(slot)

    def tick(self):
        slots, self._staged = sorted(self._staged), []
        self.events.append(("tick", slots))
        self.began.append(time.perf_counter())
        self.started.put(slots)
        assert self.go.wait(TIMEOUT)
        out = self.multi.tick()
        fault = self.faults.pop(self.ticks, None)
        self.ticks += 1
        if fault is not None:
            raise fault
        return out

    def set_loras(self, loras, *, reset: bool = False) -> None:
        self.events.append(("set_loras", len(loras)))
        self.multi.set_loras(loras, reset=reset)

    def hold(self) -> None:
        self.go.clear()

    def release(self) -> None:
        self.go.set()


def hold(server: StreamServer, slot: int) -> threading.Event:
    """Block the loop thread with a job on `slot` until the returned event is set: what is pushed meanwhile waits,
    and goes into one tick."""
    release, running = threading.Event(), threading.Event()
    server.run(slot, lambda _stream: running.set() or release.wait(TIMEOUT))
    assert running.wait(TIMEOUT)
    return release


def test_open_close_capacity_and_a_reopened_slot_is_fresh(multi):
    with StreamServer(multi, prompt="a photo") as server:
        assert (server.capacity, server.width, server.height, server.prompt) == (2, 64, 64, "a photo")
        a, b = server.open(), server.open()
        assert {a, b} == {0, 1} and server.open() is None and server.in_use == 2
        server.update_prompt(a, "a sketch").result(TIMEOUT)
        inbox = Inbox()
        server.push(a, frame(0), inbox)
        assert inbox.get().frame.shape == (64, 64, 3)
        assert multi.slots[a].frame_id == 1 and multi.slots[a].prompt == "a sketch"
        server.close(a)
        server.close(a)  # closing twice is harmless
        assert server.in_use == 1
        with pytest.raises(KeyError, match="not open"):
            server.push(a, frame(1), inbox)
        with pytest.raises(KeyError, match="not open"):
            server.reset(a)
        assert server.open() == a  # the slot came back: its bank empty, its prompt the server's again
        assert multi.slots[a].frame_id == 0 and multi.slots[a].prompt == "a photo"
        assert server.in_use == 2


def test_every_slot_gets_what_its_stream_alone_gives(multi):
    """Frames of both slots batched into one tick each equal a StreamV2V fed the same frames (prompts differ)."""
    gated = Gated(multi)
    alone = {"a photo": StreamV2V.from_pretrained(multi.cfg, prompt="a photo")}
    alone["a watercolor"] = StreamV2V.from_pretrained(multi.cfg, prompt="a watercolor")
    with StreamServer(gated, prompt="a photo") as server:
        slots = {"a photo": server.open(), "a watercolor": server.open()}
        server.update_prompt(slots["a watercolor"], "a watercolor").result(TIMEOUT)
        inboxes = {p: Inbox() for p in slots}
        for i in range(6):  # the bank stores at frames 0 and 4 and merges at 4 (DyMe, interval 4)
            release = hold(server, slots["a photo"])
            for k, (prompt, slot) in enumerate(slots.items()):
                server.push(slot, frame(10 * k + i), inboxes[prompt])
            release.set()
            assert gated.started.get(timeout=TIMEOUT) == sorted(slots.values())  # one tick, both slots
            for k, (prompt, inbox) in enumerate(inboxes.items()):
                got, want = inbox.get().frame, alone[prompt](frame(10 * k + i))
                assert np.abs(got.astype(int) - want).max() <= 1, (prompt, i)
        assert server.ticks == 6


def test_a_newer_push_replaces_the_waiting_frame(multi):
    gated = Gated(multi)
    with StreamServer(gated, prompt="a photo") as server:
        slot, inbox = server.open(), Inbox()
        gated.hold()
        first = server.push(slot, frame(0), inbox)
        assert gated.started.get(timeout=TIMEOUT) == [slot]  # in a tick: the next frames wait
        second = server.push(slot, frame(1), inbox)
        third = server.push(slot, frame(2), inbox)
        assert inbox.get() == Result(second, dropped=True)  # at once, while the tick still runs
        gated.release()
        results = [inbox.get(), inbox.get()]
        assert [r.seq for r in results] == [first, third] and all(r.frame is not None for r in results)
        assert all(r.latency_s >= r.tick_s > 0 for r in results)
        assert multi.slots[slot].frame_id == 2  # the dropped frame never reached the model


def test_jobs_run_in_order_between_ticks(multi):
    gated = Gated(multi)
    with StreamServer(gated, prompt="a photo") as server:
        a, b = server.open(), server.open()
        inbox = Inbox()
        other = Inbox()
        server.push(b, frame(9), other)  # b has a frame in its bank: a's reset must not touch it
        assert gated.started.get(timeout=TIMEOUT) == [b] and other.get().frame is not None
        gated.hold()
        server.push(a, frame(0), inbox)
        assert gated.started.get(timeout=TIMEOUT) == [a]
        prompt = server.update_prompt(a, "a sketch")
        seen = server.run(a, lambda stream: gated.events.append(("job", stream.prompt, stream.frame_id)))
        server.push(a, frame(1), inbox)
        reset = server.reset(a)
        time.sleep(0.1)
        assert not (prompt.done() or seen.done() or reset.done())  # the running tick is never interrupted
        gated.release()
        inbox.get(), inbox.get()
        assert reset.result(TIMEOUT) is None and prompt.result(TIMEOUT) is None
        # Jobs in the order asked, all before the frame that waited behind them, which ran with the new prompt.
        assert gated.events[-3:] == [("tick", [a]), ("job", "a sketch", 1), ("tick", [a])]
        assert multi.slots[a].frame_id == 1 and multi.slots[a].prompt == "a sketch"
        assert multi.slots[b].frame_id == 1 and multi.slots[b].prompt == "a photo"


def test_a_bad_frame_is_reported_to_its_slot_only(multi):
    gated = Gated(multi)
    with StreamServer(gated, prompt="a photo") as server:
        a, b = server.open(), server.open()
        inbox_a, inbox_b = Inbox(), Inbox()
        release = hold(server, a)
        server.push(a, np.zeros((10, 10, 3), np.uint8), inbox_a)  # the wrong size: FrameError
        server.push(b, frame(1), inbox_b)
        release.set()
        error = inbox_a.get().error
        assert isinstance(error, FrameError) and "10x10" in str(error)
        assert inbox_b.get().frame.shape == (64, 64, 3)
        assert gated.started.get(timeout=TIMEOUT) == [b]  # the tick ran without it
        server.push(a, frame(2), inbox_a)  # the slot goes on
        assert inbox_a.get().frame.shape == (64, 64, 3)
        assert multi.slots[a].frame_id == 1 and multi.slots[b].frame_id == 1


def test_a_fault_in_a_tick_reaches_that_ticks_frames_and_the_loop_goes_on(multi, caplog):
    gated = Gated(multi)
    gated.faults[0] = RuntimeError("the device fell over")
    with StreamServer(gated, prompt="a photo") as server:
        a, b = server.open(), server.open()
        inbox_a, inbox_b = Inbox(), Inbox()
        release = hold(server, a)
        server.push(a, frame(0), inbox_a)
        server.push(b, frame(1), inbox_b)
        release.set()
        for inbox in (inbox_a, inbox_b):
            result = inbox.get()
            assert result.frame is None and str(result.error) == "the device fell over"
        assert "tick failed" in caplog.text
        server.push(b, frame(2), inbox_b)
        assert inbox_b.get().frame.shape == (64, 64, 3)


def test_a_failing_deliver_callback_does_not_stop_the_loop(multi, caplog):
    def broken(result: Result) -> None:
        raise RuntimeError("the client is gone")

    with StreamServer(multi, prompt="a photo") as server:
        a, b = server.open(), server.open()
        server.push(a, frame(0), broken)
        inbox = Inbox()
        server.push(b, frame(1), inbox)
        assert inbox.get().frame is not None
        assert "delivering a result of slot" in caplog.text


def test_stop_answers_everything_it_will_not_run(multi):
    gated = Gated(multi)
    server = StreamServer(gated, name="test-serving-stop")
    slot, inbox = server.open(), Inbox()
    gated.hold()
    running = server.push(slot, frame(0), inbox)
    assert gated.started.get(timeout=TIMEOUT) == [slot]
    waiting = server.push(slot, frame(1), inbox)
    job = server.reset(slot)
    server.stop(timeout=0.1)  # the tick in progress still holds the loop
    stopped = inbox.get()
    assert stopped.seq == waiting and "stopped" in str(stopped.error)
    with pytest.raises(RuntimeError, match="stopped"):
        job.result(TIMEOUT)
    assert server.open() is None
    with pytest.raises(RuntimeError, match="stopped"):
        server.push(slot, frame(2), inbox)
    gated.release()
    done = inbox.get()  # the tick in progress finishes and is delivered
    assert done.seq == running and done.frame is not None
    server.stop()
    assert "test-serving-stop" not in [t.name for t in threading.enumerate()]


def wide(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (48, 80, 3), dtype=np.uint8)


def test_a_slot_moves_to_another_size_as_a_fresh_stream_of_it(multi):
    """`resize`: the slot's stream at another size (its own MultiStream, opened on first use) is a fresh one with
    the slot's prompt and seed: its frames equal a StreamV2V built for that size. The frame waiting at the old size
    is dropped; a size not offered fails with SizeUnavailable and the slot goes on; the other slot is untouched."""
    with pytest.raises(ValueError, match="50x64 cannot be served"):
        StreamServer(multi, sizes=[(64, 50)])
    with StreamServer(multi, prompt="a photo", sizes=[(48, 80), (64, 64)]) as server:
        assert server.sizes == ((64, 64), (48, 80)) and (server.height, server.width) == (64, 64)
        a, b = server.open(), server.open()
        inbox, other = Inbox(), Inbox()
        server.update_prompt(a, "a sketch").result(TIMEOUT)
        server.push(a, frame(0), inbox)
        server.push(b, frame(1), other)
        assert inbox.get().frame.shape == other.get().frame.shape == (64, 64, 3)
        release = hold(server, a)
        waiting = server.push(a, frame(2), inbox)
        moved = server.resize(a, 48, 80)
        release.set()
        assert moved.result(TIMEOUT) is None and inbox.get() == Result(waiting, dropped=True)
        assert set(server.multis) == {(64, 64), (48, 80)}
        alone = StreamV2V(multi.backend.at_size(48, 80), multi.slots[0].prompt_encoder, multi.slots[0].scheduler,
                          multi.cfg.with_spec(height=48, width=80))  # fmt: skip
        alone.update_prompt("a sketch")
        for i in range(5):  # the bank stores at 0 and 4, merges at 4
            server.push(a, wide(i), inbox)
            got = inbox.get().frame
            # batched with another slot (K = 2) vs alone: GEMMs sum in another order, a rounding step at most
            assert got.shape == (48, 80, 3) and np.abs(got.astype(int) - alone(wide(i))).max() <= 1, i
        server.push(b, frame(3), other)
        assert other.get().frame.shape == (64, 64, 3) and multi.slots[b].frame_id == 2  # b stayed where it was
        with pytest.raises(SizeUnavailable, match="40x40 is not served here; pick one of 64x64, 80x48"):
            server.resize(a, 40, 40).result(TIMEOUT)
        server.push(a, wide(5), inbox)
        assert inbox.get().frame.shape == (48, 80, 3)  # still at its size
        server.resize(a, 64, 64).result(TIMEOUT)
        server.push(a, frame(4), inbox)
        assert inbox.get().frame.shape == (64, 64, 3)


def test_a_lora_swap_runs_between_ticks_for_every_slot_and_drops_nothing(multi, files):  # noqa: F811
    """`set_loras` while a tick runs: that tick finishes on the old weights, the swap runs next, and the frames that
    waited meanwhile are all answered, on the new weights, in every slot (the slots share the networks)."""
    gated = Gated(multi)
    lora = [(files["a"], 0.8)]
    plain = StreamV2V.from_pretrained(StreamConfig(tiny_spec()), prompt="a photo")
    fused = StreamV2V.from_pretrained(StreamConfig(tiny_spec(loras=lora_specs(lora))), prompt="a photo")
    with StreamServer(gated, prompt="a photo") as server:
        a, b = server.open(), server.open()
        inbox_a, inbox_b = Inbox(), Inbox()
        gated.hold()
        server.push(a, frame(0), inbox_a)
        assert gated.started.get(timeout=TIMEOUT) == [a]
        swap = server.set_loras(lora)
        server.push(a, frame(1), inbox_a)
        server.push(b, frame(2), inbox_b)
        time.sleep(0.1)
        assert not swap.done()  # the running tick is never interrupted
        gated.release()
        results = [inbox_a.get(), inbox_a.get(), inbox_b.get()]
        assert swap.result(TIMEOUT) is None
        assert not any(r.dropped or r.error for r in results)
        assert gated.events[-3:] == [("tick", [a]), ("set_loras", 1), ("tick", [a, b])]
        # Within 1 of 255: a batch of two may round differently from a stream alone (test_web.py's bound).
        want_a0 = plain(frame(0))
        plain.set_loras(lora)  # slot a: the old weights, then the new ones with its bank kept
        for got, want in ((results[0], want_a0), (results[1], plain(frame(1))), (results[2], fused(frame(2)))):
            assert np.abs(got.frame.astype(int) - want).max() <= 1
        assert multi.cfg.spec.loras == lora_specs(lora) and all(s.cfg == multi.cfg for s in multi.slots)
        server.set_loras([]).result(TIMEOUT)
    assert multi.cfg.spec.loras == ()


def test_a_lora_swap_reaches_every_size_a_slot_runs(multi, files):  # noqa: F811
    """The MultiStreams of two sizes share the networks: a swap after a slot moved changes the weights once and both
    sizes' configs; the moved slot's frames are what a stream of that size with the LoRA fused gives."""
    lora = [(files["a"], 0.8)]
    fused = StreamV2V.from_pretrained(StreamConfig(tiny_spec(height=48, width=80, loras=lora_specs(lora))))
    fused.update_prompt("a photo")
    with StreamServer(multi, prompt="a photo", sizes=[(48, 80)]) as server:
        a = server.open()
        server.resize(a, 48, 80).result(TIMEOUT)
        server.set_loras(lora).result(TIMEOUT)
        assert all(m.cfg.spec.loras == lora_specs(lora) for m in server.multis.values())
        inbox = Inbox()
        for i in range(3):
            server.push(a, wide(i), inbox)
            # batched (K = 2 rows, one used) vs alone: GEMMs sum in another order, a rounding step at most
            assert np.abs(inbox.get().frame.astype(int) - fused(wide(i))).max() <= 1, i
        server.set_loras([]).result(TIMEOUT)
    assert all(m.cfg.spec.loras == () for m in server.multis.values())


# -- deadlines (a slot's latency budget) ---------------------------------------------------------------------------


def slow_tick(server: StreamServer, gated: Gated, slot: int, seconds: float) -> None:
    """Run one tick of `slot` that takes `seconds`: the server's gather window is then min(gather_s, seconds / 2)."""
    inbox = Inbox()
    gated.hold()
    server.push(slot, frame(99), inbox)
    assert gated.started.get(timeout=TIMEOUT) == [slot]
    time.sleep(seconds)
    gated.release()
    assert inbox.get().frame is not None


def test_a_frame_past_its_deadline_is_dropped_not_run_and_reported(multi):
    with StreamServer(multi, prompt="a photo", frame_budget_s=0.05) as server:
        a, b = server.open(), server.open(budget_s=0)  # b: no deadline, whatever the server's
        inbox_a, inbox_b = Inbox(), Inbox()
        release = hold(server, a)  # the loop is busy: both frames age past 50 ms
        late = server.push(a, frame(0), inbox_a)
        kept = server.push(b, frame(1), inbox_b)
        time.sleep(0.2)
        release.set()
        dropped = inbox_a.get()
        assert dropped.seq == late and dropped.dropped and dropped.frame is None and dropped.latency_s > 0.2
        result = inbox_b.get()
        assert result.seq == kept and result.frame is not None and result.latency_s > 0.2  # ran, however late
        assert multi.slots[a].frame_id == 0 and multi.slots[b].frame_id == 1  # the late frame never ran
        server.push(a, frame(2), inbox_a)  # a fresh frame of the same slot runs
        assert inbox_a.get().frame is not None and multi.slots[a].frame_id == 1
    with pytest.raises(ValueError, match="frame_budget_s must be >= 0"):
        StreamServer(multi, frame_budget_s=-1)


@pytest.mark.parametrize("budget_s", [0.05, None, 0])
def test_a_tick_waits_for_an_absent_client_no_longer_than_the_deadline(multi, budget_s):
    """Slot b is open and sends nothing. With a budget, a's frame starts its tick by its deadline; without one
    (0 or None: today's rule) the tick waits the whole gather window for b, min(gather_s, last tick / 2)."""
    gated = Gated(multi)
    with StreamServer(gated, prompt="a photo", gather_s=10, frame_budget_s=budget_s) as server:
        a, b = server.open(), server.open()
        slow_tick(server, gated, a, 1.2)  # the window is now >= 0.6 s
        inbox = Inbox()
        t0 = time.perf_counter()
        seq = server.push(a, frame(0), inbox)
        assert gated.started.get(timeout=TIMEOUT) == [a]
        waited = gated.began[-1] - t0
        result = inbox.get()
        assert result.seq == seq and result.frame is not None  # never dropped: the wait ends at its deadline
        if budget_s:
            assert waited < 0.4, waited  # 50 ms, and slack for a loaded machine; far from the 0.6 s window
        else:
            assert waited >= 0.6 - 0.01, waited  # 10 ms: perf_counter against the condition's own clock
        assert multi.slots[b].frame_id == 0


def test_a_half_rate_client_does_not_stall_the_full_rate_one(multi):
    """Slot a sends a frame when its last result arrives, b every other time: a's ticks without b start by a's
    deadline, not at the end of the 0.8 s gather window; b's frames, when they come, join a's tick and run."""
    gated = Gated(multi)
    with StreamServer(gated, prompt="a photo", gather_s=10, frame_budget_s=0.15) as server:
        a, b = server.open(), server.open()
        slow_tick(server, gated, a, 1.6)  # the window is now >= 0.8 s
        inbox_a, inbox_b = Inbox(), Inbox()
        for i in range(6):
            if i % 2 == 0:
                server.push(b, frame(50 + i), inbox_b)
            t0 = time.perf_counter()
            server.push(a, frame(i), inbox_a)
            assert gated.started.get(timeout=TIMEOUT) == ([a, b] if i % 2 == 0 else [a]), i
            assert gated.began[-1] - t0 < 0.5, i  # 150 ms, and slack for a loaded machine
            assert inbox_a.get().frame is not None
            if i % 2 == 0:
                assert inbox_b.get().frame is not None
        assert multi.slots[a].frame_id == 7 and multi.slots[b].frame_id == 3  # nothing dropped


def test_serve_takes_a_frame_budget_and_refuses_bad_ones(capsys):
    from streamv2v_trt.cli import serve

    parser = argparse.ArgumentParser()
    serve.add_parser(parser.add_subparsers())

    def args(*flags: str) -> argparse.Namespace:
        return parser.parse_args(["serve", *flags])

    assert serve.limits_of(args()).frame_budget_ms == 0  # today's rule unless asked
    assert serve.limits_of(args("--frame-budget-ms", "40")).frame_budget_ms == 40
    for flags, message in [
        (["--frame-budget-ms", "-1"], "error: --frame-budget-ms must be a number of milliseconds >= 0 (0: never)"),
        (["--frame-budget-ms", "40", "--ray"], "error: --frame-budget-ms is not supported with --ray yet"),
    ]:
        assert serve.run(args(*flags)) == 1  # before the model loads
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
