"""StreamServer: a MultiStream behind one loop thread, for serving many clients (the web demo, Ray replicas).

Clients `open()` a slot (None when every slot is taken), `push(slot, frame, deliver)` frames and `close(slot)`.
Per slot one frame waits at most: a newer push replaces it (latest frame wins, the replaced one is reported as
dropped), so a slow tick never builds up latency. The loop takes the waiting frame of every slot, runs one
batched `MultiStream` tick, and hands each slot its result through its `deliver` callback (on the loop thread:
a callback must be quick, e.g. `loop.call_soon_threadsafe`). `run(slot, fn)` runs `fn(stream)` on the loop
thread between ticks (prompt changes, resets), so a stream is never changed mid-frame.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from .frames import FrameError
from .multistream import MultiStream
from .pipeline import StreamV2V

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    """What a push turns into: the output frame, or why there is none."""

    seq: int  # the number push() returned
    frame: Any = None  # the output frame (the input's type); None when dropped or failed
    error: BaseException | None = None  # FrameError for a bad frame; anything else is a server fault
    dropped: bool = False  # replaced by a newer frame before it ran
    latency_s: float = 0.0  # push to result
    tick_s: float = 0.0  # the batched tick that produced it (model time, shared by the tick's frames)


Deliver = Callable[[Result], None]


class Hub(Protocol):
    """What a server of many clients needs: slots of streams, one per client. `StreamServer` is one on this
    process's networks; a Ray Serve ingress implements it over replicas on other processes and machines.

    Blocking methods (`open`) must not be called from an event loop; futures resolve on another thread."""

    capacity: int  # slots in all
    width: int  # frame size every slot takes
    height: int
    prompt: str  # the prompt a freshly opened slot starts with

    def open(self) -> Any | None:
        """A free slot (fresh stream: empty bank, `prompt`), or None when every slot is taken."""
        ...

    def close(self, slot: Any) -> None: ...

    def push(self, slot: Any, frame: Any, deliver: Deliver) -> int:
        """Queue a uint8 HxWx3 frame; `deliver(Result)` is called once for it, from any thread."""
        ...

    def update_prompt(self, slot: Any, prompt: str) -> Future: ...

    def reset(self, slot: Any) -> Future: ...


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
        self._open: set[int] = set()
        self._pending: dict[int, tuple[int, Any, float, Deliver]] = {}  # slot -> (seq, frame, push time, deliver)
        self._jobs: deque[tuple[int, Callable[[StreamV2V], Any], Future]] = deque()
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
            return len(self._open)

    def open(self) -> int | None:
        """A free slot, its stream reset to `prompt` and an empty bank, or None when every slot is taken.
        Blocks until the loop thread has reset it (at most one tick)."""
        with self._cond:
            if self._closed or not self._free:
                return None
            slot = self._free.popleft()
            self._open.add(slot)
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
            if slot not in self._open:
                return
            self._open.discard(slot)
            waiting = self._pending.pop(slot, None)
            self._free.append(slot)
        if waiting is not None:
            waiting[3](Result(waiting[0], dropped=True))

    def push(self, slot: int, frame: Any, deliver: Deliver) -> int:
        """Queue `frame` for `slot` (replacing a frame still waiting, which is delivered as dropped)."""
        with self._cond:
            self._check(slot)
            seq, self._seq = self._seq, self._seq + 1
            replaced = self._pending.get(slot)
            self._pending[slot] = (seq, frame, time.perf_counter(), deliver)
            self._cond.notify_all()
        if replaced is not None:
            replaced[3](Result(replaced[0], dropped=True))
        return seq

    def run(self, slot: int, fn: Callable[[StreamV2V], Any]) -> Future:
        """`fn(slot's stream)` on the loop thread before the next tick; the future holds its result or error."""
        future: Future = Future()
        with self._cond:
            self._check(slot)
            self._jobs.append((slot, fn, future))
            self._cond.notify_all()
        return future

    def update_prompt(self, slot: int, prompt: str) -> Future:
        return self.run(slot, lambda stream: stream.update_prompt(prompt))

    def reset(self, slot: int) -> Future:
        return self.run(slot, lambda stream: stream.reset())

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the loop after the tick in progress. What it will not run is answered now, so nobody waits
        forever: waiting frames get an error result, queued `run` futures an exception."""
        with self._cond:
            self._closed = True
            jobs, self._jobs = self._jobs, deque()
            frames, self._pending = self._pending, {}
            self._cond.notify_all()
        stopped = RuntimeError("this StreamServer is stopped")
        for _, _, future in jobs:
            if future.set_running_or_notify_cancel():
                future.set_exception(stopped)
        for seq, _, t_push, deliver in frames.values():
            deliver(Result(seq, error=stopped, latency_s=time.perf_counter() - t_push))
        self._thread.join(timeout)

    def __enter__(self) -> StreamServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _check(self, slot: int) -> None:
        if self._closed:
            raise RuntimeError("this StreamServer is stopped")
        if slot not in self._open:
            raise KeyError(f"slot {slot} is not open: open() one first")

    # -- the loop ---------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._jobs or self._pending)
                # A batch is worth a short wait: every open slot with a frame, a command, or the window's end.
                window = min(self.gather_s, self._last_tick_s / 2)
                self._cond.wait_for(
                    lambda: self._closed or self._jobs or len(self._pending) >= len(self._open), timeout=window
                )
                if self._closed:
                    return
                jobs, self._jobs = self._jobs, deque()
                frames = {}
                if not jobs:  # commands first; waiting frames stay pending until the next turn
                    frames, self._pending = self._pending, {}
            for slot, fn, future in jobs:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(self.multi.slots[slot]))
                    except Exception as e:  # handed to the caller through the future
                        future.set_exception(e)
            if frames:
                self._tick(frames)

    def _tick(self, frames: dict[int, tuple[int, Any, float, Deliver]]) -> None:
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
