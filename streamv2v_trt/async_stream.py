"""Push frames, pull results: a stream on a worker thread, for products (camera loops, web sockets, asyncio).

The input side holds one frame: a frame pushed while another still waits replaces it (latest frame wins, the
replaced one counts as dropped), so a slow model never builds up latency. Results wait in a bounded queue;
when nobody pulls, the oldest result is dropped. `update_prompt` and `reset` run on the worker between two
frames, in the order they were called, so they never race a frame in flight.

    with AsyncStream(stream) as live:
        live.push(frame)                 # never blocks
        result = live.get(timeout=1.0)   # Result(seq, frame, latency_s); raises what the stream raised
    # asyncio: await live.aget(), or `async for result in live.results()`
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

log = logging.getLogger(__name__)


class Result(NamedTuple):
    seq: int  # the number push() returned for the input frame; -1 for a failed update_prompt/reset
    frame: Any  # the output frame (numpy or torch, as the stream returns it); None on error
    latency_s: float  # from push() to the result being ready
    error: BaseException | None = None


class AsyncStream:
    """Runs `stream(frame)` (any callable frame -> frame: StreamV2V, CudaGraphStream) on a worker thread."""

    def __init__(self, stream: Callable[[Any], Any], *, max_results: int = 8, name: str = "streamv2v") -> None:
        if max_results < 1:
            raise ValueError(f"max_results must be >= 1, got {max_results}")
        self.stream = stream
        self._cond = threading.Condition()
        self._pending: tuple[int, Any, float] | None = None  # (seq, frame, push time): the newest unprocessed frame
        self._commands: deque[Callable[[], None]] = deque()
        self._results: deque[Result] = deque(maxlen=max_results)
        self._seq = 0
        self._closed = False
        self._busy = False  # the worker is running a frame or command
        self.pushed = self.processed = self.dropped = self.results_dropped = 0
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self._worker.start()

    # -- producer side -------------------------------------------------------------------------------
    def push(self, frame: Any) -> int:
        """Queue `frame` (replacing a frame that still waits); returns its sequence number."""
        with self._cond:
            self._check_open()
            seq = self._seq
            self._seq += 1
            if self._pending is not None:
                self.dropped += 1
            self._pending = (seq, frame, time.perf_counter())
            self.pushed += 1
            self._cond.notify_all()
        return seq

    def update_prompt(self, *args, **kwargs) -> None:
        """`stream.update_prompt(...)` on the worker, before the next frame."""
        self._command(lambda: self.stream.update_prompt(*args, **kwargs))

    def reset(self) -> None:
        """`stream.reset()` on the worker, before the next frame; a frame still waiting is dropped."""
        with self._cond:
            if self._pending is not None:
                self._pending = None
                self.dropped += 1
        self._command(self.stream.reset)

    def _command(self, fn: Callable[[], None]) -> None:
        with self._cond:
            self._check_open()
            self._commands.append(fn)
            self._cond.notify_all()

    # -- consumer side -------------------------------------------------------------------------------
    def get(self, timeout: float | None = None) -> Result:
        """The oldest result not pulled yet; waits up to `timeout` seconds (None: forever).

        Raises TimeoutError when none came, and re-raises an error the stream raised on that frame.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._results or self._closed, timeout):
                raise TimeoutError(f"no result within {timeout} s ({self.pushed} frames pushed)")
            if not self._results:
                raise RuntimeError("the stream is closed and every result was pulled")
            result = self._results.popleft()
        if result.error is not None:
            raise result.error
        return result

    def latest(self) -> Result | None:
        """The newest result without waiting (older ones are discarded), or None."""
        with self._cond:
            if not self._results:
                return None
            result = self._results.pop()
            self._results.clear()
        if result.error is not None:
            raise result.error
        return result

    async def aget(self, timeout: float | None = None) -> Result:
        """`get` for asyncio code: waits in a thread, so the event loop keeps running."""
        return await asyncio.to_thread(self.get, timeout)

    async def results(self) -> AsyncIterator[Result]:
        """Every result as it comes, until the stream is closed."""
        while True:
            try:
                yield await self.aget()
            except RuntimeError:
                if self._closed:
                    return
                raise

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every pushed frame and command has been handled; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending is None and not self._commands and not self._busy, timeout)

    # -- lifecycle -----------------------------------------------------------------------------------
    def close(self, timeout: float | None = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout)

    def __enter__(self) -> AsyncStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this AsyncStream is closed; create a new one")

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._commands or self._pending is not None)
                if self._closed:
                    return
                if self._commands:
                    job, item = self._commands.popleft(), None
                else:
                    job, item, self._pending = None, self._pending, None
                self._busy = True
            try:
                if job is not None:
                    job()
                    result = None
                else:
                    seq, frame, t_push = item
                    try:
                        out = self.stream(frame)
                        result = Result(seq, out, time.perf_counter() - t_push)
                    except Exception as e:  # handed to the consumer by get(); the next frame still runs
                        log.debug("frame %d failed: %s", seq, e)
                        result = Result(seq, None, time.perf_counter() - t_push, e)
            except Exception as e:  # a failed command (a bad prompt): get() raises it; the old state stays
                result = Result(-1, None, 0.0, e)
            with self._cond:
                self._busy = False
                if result is not None:
                    if len(self._results) == self._results.maxlen:
                        self.results_dropped += 1
                    self._results.append(result)
                    self.processed += result.seq >= 0
                self._cond.notify_all()
