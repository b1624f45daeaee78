"""StreamServer: a MultiStream behind one loop thread, for serving many clients (the web demo, Ray replicas).

Clients `open()` a slot (None when every slot is taken), `push(slot, frame, deliver)` frames and `close(slot)`.
Per slot one frame waits at most (`hub.Latest`): a newer push replaces it (latest frame wins, the replaced one is
reported as dropped), so a slow tick never builds up latency. The loop takes the waiting frame of every slot, runs
one batched `MultiStream` tick, and hands each slot its result through its `deliver` callback (on the loop thread:
a callback must be quick, e.g. `loop.call_soon_threadsafe`). `run(slot, fn)` runs `fn(stream)` on the loop
thread between ticks (prompt changes, resets), so a stream is never changed mid-frame; `set_loras` swaps the
LoRA set of every slot (they share networks) the same way. It is a `Hub` (hub.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from .frames import FrameError
from .hub import Deliver, Hub, Latest, Result
from .lora_set import LoraSet
from .multistream import MultiStream
from .pipeline import StreamV2V

__all__ = ["Deliver", "Hub", "Result", "StreamServer"]  # Hub, Result and Deliver live in hub.py

log = logging.getLogger(__name__)

Waiting = tuple[int, Any, float, Deliver]  # a pushed frame: (seq, frame, push time, deliver)


class StreamServer:
    """Slots of one MultiStream, served by a loop thread. `with StreamServer(multi) as server: ...`"""

    def __init__(
        self, multi: MultiStream, *, prompt: str | None = None, gather_s: float = 0.02, name: str = "streamv2v-serve"
    ) -> None:
        """`prompt`: what every opened slot starts with (default: slot 0's now, the one `MultiStream.from_*` gave
        every slot). `gather_s`: how long a tick may wait for the other open slots' frames once one is waiting
        (at most half the last tick's time), so clients that send a frame when their last result arrives share
        ticks instead of alternating between them; 0 ticks at once."""
        self.multi = multi
        self.gather_s = gather_s
        self._last_tick_s = 0.0
        self.prompt = multi.slots[0].prompt if prompt is None else prompt
        self._cond = threading.Condition()
        self._free = deque(range(multi.streams))
        self._waiting: dict[int, Latest[Waiting]] = {}  # the open slots, each with its waiting frame
        self._jobs: deque[tuple[int | None, Callable[[Any], Any], Future]] = deque()  # slot None: the MultiStream
        self._seq = 0
        self._closed = False
        self.ticks = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # -- clients (the Hub interface) ---------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.multi.streams

    @property
    def width(self) -> int:
        return self.multi.cfg.width

    @property
    def height(self) -> int:
        return self.multi.cfg.height

    @property
    def in_use(self) -> int:
        with self._cond:
            return len(self._waiting)

    def open(self) -> int | None:
        """A free slot, its stream reset to `prompt` and an empty bank, or None when every slot is taken.
        Blocks until the loop thread has reset it (at most one tick)."""
        with self._cond:
            if self._closed or not self._free:
                return None
            slot = self._free.popleft()
            self._waiting[slot] = Latest()
        try:
            self.run(slot, self._fresh).result()
        except BaseException:  # the slot must not leak: give it back, the caller hears why
            self.close(slot)
            raise
        return slot

    def _fresh(self, stream: StreamV2V) -> None:
        """A stream as a new client expects it: the starting prompt (the last client may have changed it), empty."""
        if stream.prompt != self.prompt:
            stream.update_prompt(self.prompt)
        stream.reset()

    def close(self, slot: int) -> None:
        """Give the slot back (its waiting frame is dropped); the next `open` resets it."""
        with self._cond:
            if slot not in self._waiting:
                return
            waiting = self._waiting.pop(slot).take()
            self._free.append(slot)
        if waiting is not None:
            waiting[3](Result(waiting[0], dropped=True))

    def push(self, slot: int, frame: Any, deliver: Deliver, order: int | None = None) -> int:
        """Queue `frame` for `slot`, replacing a frame still waiting, which is delivered as dropped. `order`: the
        client's count of this frame, where frames may arrive out of order (a frame older than one already pushed
        is delivered as dropped at once); default: the order of arrival."""
        with self._cond:
            self._check(slot)
            seq, self._seq = self._seq, self._seq + 1
            lost = self._waiting[slot].put(seq if order is None else order, (seq, frame, time.perf_counter(), deliver))
            self._cond.notify_all()
        if lost is not None:
            lost[3](Result(lost[0], dropped=True))
        return seq

    def run(self, slot: int | None, fn: Callable[[Any], Any]) -> Future:
        """`fn(slot's stream)` (slot None: `fn(the MultiStream)`) on the loop thread before the next tick; the
        future holds its result or error."""
        future: Future = Future()
        with self._cond:
            if slot is None:
                self._check_open()
            else:
                self._check(slot)
            self._jobs.append((slot, fn, future))
            self._cond.notify_all()
        return future

    def update_prompt(self, slot: int, prompt: str) -> Future:
        return self.run(slot, lambda stream: stream.update_prompt(prompt))

    def reset(self, slot: int) -> Future:
        return self.run(slot, lambda stream: stream.reset())

    def set_loras(self, loras: LoraSet, *, reset: bool = False) -> Future:
        """Every slot's LoRA set from the next tick on (the slots share networks: `MultiStream.set_loras`), swapped
        on the loop thread between two ticks: no frame runs with half-old weights, and frames that wait meanwhile
        stay waiting, none is dropped. A bad file fails the future and changes nothing."""
        return self.run(None, lambda multi: multi.set_loras(loras, reset=reset))

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the loop after the tick in progress. What it will not run is answered now, so nobody waits
        forever: waiting frames get an error result, queued `run` futures an exception."""
        with self._cond:
            self._closed = True
            jobs, self._jobs = self._jobs, deque()
            frames = [frame for waiting in self._waiting.values() if (frame := waiting.take()) is not None]
            self._cond.notify_all()
        stopped = RuntimeError("this StreamServer is stopped")
        for _, _, future in jobs:
            if future.set_running_or_notify_cancel():
                future.set_exception(stopped)
        for seq, _, t_push, deliver in frames:
            deliver(Result(seq, error=stopped, latency_s=time.perf_counter() - t_push))
        self._thread.join(timeout)

    def __enter__(self) -> StreamServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this StreamServer is stopped")

    def _check(self, slot: int) -> None:
        self._check_open()
        if slot not in self._waiting:
            raise KeyError(f"slot {slot} is not open: open() one first")

    # -- the loop ---------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        def frames_waiting() -> int:
            return sum(waiting.item is not None for waiting in self._waiting.values())

        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._jobs or frames_waiting())
                # A batch is worth a short wait: every open slot with a frame, a command, or the window's end.
                window = min(self.gather_s, self._last_tick_s / 2)
                self._cond.wait_for(
                    lambda: self._closed or self._jobs or frames_waiting() >= len(self._waiting), timeout=window
                )
                if self._closed:
                    return
                jobs, self._jobs = self._jobs, deque()
                frames = {}
                if not jobs:  # commands first; waiting frames stay waiting until the next turn
                    taken = {slot: waiting.take() for slot, waiting in self._waiting.items()}
                    frames = {slot: frame for slot, frame in taken.items() if frame is not None}
            for slot, fn, future in jobs:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(self.multi if slot is None else self.multi.slots[slot]))
                    except Exception as e:  # handed to the caller through the future
                        future.set_exception(e)
            if frames:
                self._tick(frames)

    def _tick(self, frames: dict[int, Waiting]) -> None:
        multi, results = self.multi, {}
        for slot, (seq, frame, t_push, _) in frames.items():
            try:
                multi.submit(slot, frame)
            except Exception as e:  # FrameError: the client's; anything else a fault. Either is this slot's only
                if not isinstance(e, FrameError):
                    log.exception("submitting a frame of slot %d failed", slot)
                results[slot] = Result(seq, error=e, latency_s=time.perf_counter() - t_push)
        t0 = time.perf_counter()
        try:
            outputs = multi.tick()
        except Exception as e:  # a fault of the model: every frame of the tick hears it, the server goes on
            log.exception("tick failed")
            outputs, fault = {}, e
        else:
            fault = None
        tick_s = time.perf_counter() - t0
        self._last_tick_s = tick_s
        self.ticks += 1
        for slot, (seq, _, t_push, deliver) in frames.items():
            result = results.get(slot)
            if result is None:
                latency = time.perf_counter() - t_push
                if slot in outputs:
                    result = Result(seq, outputs[slot], latency_s=latency, tick_s=tick_s)
                else:
                    result = Result(seq, error=fault or RuntimeError("no output"), latency_s=latency, tick_s=tick_s)
            try:
                deliver(result)
            except Exception:  # a client's callback must not stop the loop
                log.exception("delivering a result of slot %d failed", slot)
