"""StreamServer: a MultiStream behind one loop thread, for serving many clients (the web demo, Ray replicas).

Clients `open()` a slot (None when every slot is taken), `push(slot, frame, deliver)` frames and `close(slot)`.
Per slot one frame waits at most (`hub.Latest`): a newer push replaces it (latest frame wins, the replaced one is
reported as dropped), so a slow tick never builds up latency. The loop takes the waiting frame of every slot, runs
one batched `MultiStream` tick, and hands each slot its result through its `deliver` callback (on the loop thread:
a callback must be quick, e.g. `loop.call_soon_threadsafe`). `run(slot, fn)` runs `fn(stream)` on the loop
thread between ticks (prompt changes, resets, ControlNet scales, a control image to show), so a stream is never
changed mid-frame; `set_loras` swaps the LoRA set of every slot (they share networks) the same way. It is a
`Hub` (hub.py).

Deadlines: a slot may have a latency budget (`frame_budget_s`, the server's, or `open(budget_s=...)`; 0 or None:
none). The rule: when the loop turns to the waiting frames (after a tick or a job), a frame older than its slot's
budget is dropped, not run, and delivered as dropped; the tick runs with the frames that are left. The wait for
the other slots' frames (`gather_s`) ends at the earliest deadline of a waiting frame, so no frame outlives its
budget there (by more than the thread's wake-up delay), and a slow or absent client holds the others back by at
most the smallest budget. A frame pushed while the loop waits is fresh; one pushed during a tick is judged when
that tick ends. Frames of a second size (a moved slot) wait for the first size's tick and are not judged again.
Without budgets the loop is what it was: every waiting frame runs, and the wait lasts up to `gather_s`.

Sizes: a MultiStream batch is one size, so the server keeps one MultiStream per size, all on the same networks
(`backend.at_size`), each with the same K slots: the first one's size is where slots open, and another is opened on
the loop thread the first time a slot asks for its size (`resize`), then kept. The one loop thread ticks each size
that has frames in turn, so the networks run one call at a time. A slot keeps its number while it moves: its
stream at the new size is a fresh one (the old one's prompt, seed and negative prompt; an empty bank).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from .control_images import control_to_uint8
from .frame_sizes import size_text
from .frames import FrameError
from .hub import Deliver, Hub, Latest, Result, SizeUnavailable
from .lora_set import LoraSet
from .multistream import MultiStream
from .pipeline import StreamV2V

__all__ = ["Deliver", "Hub", "Result", "StreamServer"]  # Hub, Result and Deliver live in hub.py

log = logging.getLogger(__name__)

Waiting = tuple[int, Any, float, Deliver]  # a pushed frame: (seq, frame, push time, deliver)
Size = tuple[int, int]  # (height, width)


class StreamServer:
    """Slots of one MultiStream, served by a loop thread. `with StreamServer(multi) as server: ...`"""

    def __init__(
        self, multi: MultiStream, *, prompt: str | None = None, gather_s: float = 0.02, name: str = "streamv2v-serve",
        sizes: tuple[Size, ...] | None = None, frame_budget_s: float | None = None,
    ) -> None:  # fmt: skip
        """`prompt`: what every opened slot starts with (default: slot 0's now, the one `MultiStream.from_*` gave
        every slot). `gather_s`: how long a tick may wait for the other open slots' frames once one is waiting
        (at most half the last tick's time), so clients that send a frame when their last result arrives share
        ticks instead of alternating between them; 0 ticks at once. `sizes`: the sizes a slot may move to,
        (height, width) each, besides `multi`'s, where slots open (default: the networks' built sizes; eager
        networks run any multiple of 8, so only `multi`'s size unless given). `frame_budget_s`: every slot's latency
        budget unless `open` gives it one (module docstring; 0 or None: none)."""
        if frame_budget_s is not None and not frame_budget_s >= 0:
            raise ValueError(f"frame_budget_s must be >= 0 seconds (0 or None: no deadline), got {frame_budget_s}")
        self.multi = multi
        here, built = (multi.cfg.height, multi.cfg.width), multi.sizes
        offered = [tuple(s) for s in (sizes if sizes is not None else built or ())]
        wrong = [s for s in offered if not _runs(s, built)]
        if wrong:
            can = ", ".join(map(size_text, built)) if built is not None else "multiples of 8"
            raise ValueError(f"sizes {', '.join(map(size_text, wrong))} cannot be served: these networks run {can}")
        self.sizes = (here, *dict.fromkeys(s for s in offered if s != here))  # slots open at the streams' size
        self._multis: dict[Size, MultiStream] = {here: multi}  # one per size asked so far (the loop thread adds)
        self._free_at: dict[Size, deque[int]] = {}  # free stream indices per size (all K until a slot takes one)
        self._at: dict[int, tuple[Size, int]] = {}  # open slot -> (its size, its stream's index there)
        self.gather_s = gather_s
        self.frame_budget_s = frame_budget_s or None
        self._budget: dict[int, float | None] = {}  # open slot -> its latency budget, None: no deadline
        self._last_tick_s = 0.0
        self.prompt = multi.slots[0].prompt if prompt is None else prompt
        self._cond = threading.Condition()
        self._free = deque(range(multi.streams))  # slot numbers; a slot's stream index differs once it moved
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

    def open(self, *, budget_s: float | None = None) -> int | None:
        """A free slot, its stream reset to `prompt` and an empty bank, or None when every slot is taken.
        Blocks until the loop thread has reset it (at most one tick). `budget_s`: its frames' latency budget
        (module docstring; default: the server's `frame_budget_s`; 0: none)."""
        if budget_s is not None and not budget_s >= 0:
            raise ValueError(f"budget_s must be >= 0 seconds (0: no deadline), got {budget_s}")
        with self._cond:
            if self._closed or not self._free:
                return None
            slot = self._free.popleft()
            self._budget[slot] = self.frame_budget_s if budget_s is None else budget_s or None
            self._at[slot] = (self.sizes[0], self._free_index(self.sizes[0]).popleft())  # K indices: never empty
            self._waiting[slot] = Latest()
        try:
            self.run(slot, self._fresh).result()
        except BaseException:  # the slot must not leak: give it back, the caller hears why
            self.close(slot)
            raise
        return slot

    @property
    def controls(self) -> tuple[tuple[str, float], ...]:
        """Each ControlNet's (control kind, scale) in a freshly opened slot; () without ControlNets."""
        return tuple(zip(self.multi.cfg.control_kinds, self.multi.cfg.controlnet_scales))

    def _fresh(self, stream: StreamV2V) -> None:
        """A stream as a new client expects it: the starting prompt and ControlNet scales (the last client may have
        changed them), empty."""
        if stream.prompt != self.prompt:
            stream.update_prompt(self.prompt)
        if stream.cfg.controlnet_scales != self.multi.cfg.controlnet_scales:
            stream.update_control(scales=self.multi.cfg.controlnet_scales)
        stream.reset()

    def close(self, slot: int) -> None:
        """Give the slot back (its waiting frame is dropped); the next `open` resets it."""
        with self._cond:
            if slot not in self._waiting:
                return
            waiting = self._waiting.pop(slot).take()
            del self._budget[slot]
            size, index = self._at.pop(slot)
            self._free_at[size].append(index)
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

    def update_control(self, slot: int, scales: tuple[float, ...]) -> Future:
        return self.run(slot, lambda stream: stream.update_control(scales=scales))

    def control_image(self, slot: int, index: int) -> Future:
        """ControlNet `index`'s control image of the slot's newest frame, uint8 HxWx3 (a copy to the host: for a
        view, not per frame)."""
        return self.run(slot, lambda stream: control_to_uint8(stream.control_image(index)))

    def reset(self, slot: int) -> Future:
        return self.run(slot, lambda stream: stream.reset())

    # -- sizes ------------------------------------------------------------------------------------------------
    def resize(self, slot: int, height: int, width: int) -> Future:
        """Move `slot` to a stream of that size (module docstring), on the loop thread; the future fails with
        `SizeUnavailable` for a size not in `sizes`, or when all K streams of that size are taken (the slot keeps
        its stream). Its frame still waiting (of the old size) is delivered as dropped."""
        return self.run(slot, lambda stream: self._move(slot, (height, width), stream))

    @property
    def multis(self) -> dict[Size, MultiStream]:
        """The MultiStream of every size opened so far (a LoRA set must reach each; they share the networks)."""
        return dict(self._multis)

    def _free_index(self, size: Size) -> deque[int]:
        return self._free_at.setdefault(size, deque(range(self.multi.streams)))

    def _stream(self, slot: int) -> StreamV2V:
        with self._cond:
            size, index = self._at[slot]  # KeyError: closed since the job was queued
        return self._multis[size].slots[index]

    def _move(self, slot: int, size: Size, stream: StreamV2V) -> None:
        if size not in self.sizes:
            raise SizeUnavailable(
                f"size {size_text(size)} is not served here; pick one of {', '.join(map(size_text, self.sizes))}"
            )
        if (stream.cfg.height, stream.cfg.width) == size:
            return
        multi = self._multis.get(size)
        if multi is None:  # on the loop thread: allocating a size's buffers never races a tick
            s0 = self.multi.slots[0]
            cfg = self.multi.cfg.with_spec(height=size[0], width=size[1])
            multi = MultiStream(self.multi.backend.at_size(*size), s0.prompt_encoder, s0.scheduler, cfg,
                                streams=self.multi.streams, cuda_graphs=self.multi.graphs is not None)  # fmt: skip
            self._multis[size] = multi
        with self._cond:
            free = self._free_index(size)
            if not free:
                raise SizeUnavailable(f"all {self.multi.streams} streams of {size_text(size)} are in use; try later")
            index = free.popleft()
        moved = multi.slots[index]
        moved.update_prompt(stream.prompt, negative_prompt=stream.negative_prompt)
        moved.update_seed(stream.seed)
        moved.update_control(scales=stream.cfg.controlnet_scales, kinds=stream.cfg.control_kinds)
        moved.reset()
        with self._cond:
            if slot not in self._at:  # closed meanwhile: its old stream went back with it
                self._free_at[size].append(index)
                return
            old_size, old_index = self._at[slot]
            self._at[slot] = (size, index)
            self._free_at[old_size].append(old_index)
            waiting = self._waiting[slot].take()
        if waiting is not None:
            waiting[3](Result(waiting[0], dropped=True))

    def set_loras(self, loras: LoraSet, *, reset: bool = False) -> Future:
        """Every slot's LoRA set from the next tick on (the slots share networks: `MultiStream.set_loras`), swapped
        on the loop thread between two ticks: no frame runs with half-old weights, and frames that wait meanwhile
        stay waiting, none is dropped. A bad file fails the future and changes nothing."""
        return self.run(None, lambda _: self._set_loras(loras, reset))

    def _set_loras(self, loras: LoraSet, reset: bool) -> None:
        # Every size's MultiStream runs the same networks: the first swaps their weights, the others take the
        # new set into their config and prompt embeddings (`swap_loras` skips a set the weights already hold).
        first, *others = self._multis.values()
        first.set_loras(loras, reset=reset)
        for multi in others:
            multi.set_loras(first.cfg.spec.loras, reset=reset)

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
    def _frames_waiting(self) -> int:
        return sum(waiting.item is not None for waiting in self._waiting.values())

    def _late(self, now: float) -> list[Waiting]:
        """Take the waiting frames older than their slot's budget (the lock held)."""
        late = []
        for slot, waiting in self._waiting.items():
            budget = self._budget[slot]
            if budget is not None and waiting.item is not None and now - waiting.item[2] > budget:
                late.append(waiting.take())
        return late

    def _first_deadline(self) -> float:
        """The earliest deadline of a waiting frame, perf_counter time (inf: none has one; the lock held)."""
        return min((waiting.item[2] + budget for slot, waiting in self._waiting.items()
                    if waiting.item is not None and (budget := self._budget[slot]) is not None),
                   default=math.inf)  # fmt: skip

    def _gather(self) -> None:
        """Wait, when frames wait, for the other open slots' frames (the lock held): a batch is worth a short wait,
        until every open slot has a frame, a command, the window's end, or the first waiting frame's deadline."""
        if self._closed or self._jobs or not self._frames_waiting():
            return
        until = time.perf_counter() + min(self.gather_s, self._last_tick_s / 2)
        while not (self._closed or self._jobs) and self._frames_waiting() < len(self._waiting):
            left = min(until, self._first_deadline()) - time.perf_counter()
            if left <= 0:
                break
            self._cond.wait(left)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._jobs or self._frames_waiting())
                late = self._late(time.perf_counter())
            self._drop(late)  # answered before the wait: a client may send its next frame in time for this tick
            jobs: deque = deque()
            by_size: dict[Size, dict[int, Waiting]] = {}  # the waiting frames of each size, by stream index
            with self._cond:
                self._gather()
                if self._closed:  # stop() answers the frames still waiting
                    return
                jobs, self._jobs = self._jobs, deque()
                if not jobs:  # commands first; waiting frames stay waiting until the next turn
                    for slot, waiting in self._waiting.items():
                        frame = waiting.take()
                        if frame is not None:
                            size, index = self._at[slot]
                            by_size.setdefault(size, {})[index] = frame
            for slot, fn, future in jobs:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(None if slot is None else self._stream(slot)))
                    except Exception as e:  # handed to the caller through the future
                        future.set_exception(e)
            for size, frames in by_size.items():  # one tick per size with frames (a batch is one size)
                self._tick(self._multis[size], frames)

    @staticmethod
    def _drop(late: list[Waiting]) -> None:
        now = time.perf_counter()
        for seq, _, t_push, deliver in late:
            try:
                deliver(Result(seq, dropped=True, latency_s=now - t_push))
            except Exception:  # a client's callback must not stop the loop
                log.exception("delivering a dropped frame failed")

    def _tick(self, multi: MultiStream, frames: dict[int, Waiting]) -> None:
        results = {}
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


def _runs(size: Size, built: tuple[Size, ...] | None) -> bool:
    """Whether networks built for `built` (None: eager, any multiple of 8) run frames of `size`."""
    if built is not None:
        return size in built
    return all(n >= 8 and n % 8 == 0 for n in size)
