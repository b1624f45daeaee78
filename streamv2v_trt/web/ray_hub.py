"""RayHub: the `Hub` (streamv2v_trt/hub.py) the demo app serves from, over stream replicas in other processes
(ray_replica.py).

Every Ray call runs on the hub's own event loop thread, which also owns the hub's state (which replica holds
which session, and what each replica last said). A session's slot is a `RaySlot`: the replica's index, the
life of that replica process it was opened in (its Ray actor id) and a session id only that process knows.
Each second the hub checks every replica, in two loops: whether the process holding its sessions is still alive
(`_check_alive`), and its status through Serve (`_check_status`: load, a new life after a restart, the renewal of
the ingress's lease). Sessions of a replica process that is gone are lost: their frames are answered with a
`SlotLost` result (and their prompt changes and resets raise it), on which the app closes their connections.

A replica's checks never end while the hub runs: Serve raises `asyncio.CancelledError` from a call it cancelled
(a replica that died or restarted mid-call), which is not an `Exception`; `_ask` turns it into `CallCancelled`
so that it fails that call only, and the next check finds the restarted replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from ray.exceptions import ActorDiedError, RayTaskError

from ..frame_sizes import size_text
from ..hub import Deliver, NotReady, Result, SizeUnavailable, SlotLost
from .ray_replica import ReplicaStatus

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0  # how often the hub checks every replica (liveness, load, lease)
CALL_TIMEOUT_S = 10.0  # an open or status call that takes longer: that replica is skipped for now
STARTING = "no stream replica is ready yet (the model is loading, or every replica is restarting); try again shortly"


class CallCancelled(RuntimeError):
    """Ray Serve cancelled a call of the hub's (its replica stopped or restarted while the call ran)."""


class RaySlot:
    """A session's slot on one replica: which replica, which life of it, and the session id it knows."""

    def __init__(self, replica: int, incarnation: str) -> None:
        self.replica, self.incarnation = replica, incarnation
        self.session = uuid.uuid4().hex
        self.lost: str | None = None  # why the stream is gone, once it is
        self.pushed = 0  # pushes sent, in order (the replica drops one overtaken by a newer)
        self.pending: set[asyncio.Task] = set()  # pushes awaiting their result (hub loop)


@dataclass(eq=False)
class _Replica:
    index: int
    handle: Any  # DeploymentHandle of deployment streams-{index}
    status: ReplicaStatus | None = None  # its last answer; None until it answers
    up: bool = False  # answered the last check: new sessions may go to it
    opening: int = 0  # opens in flight
    slots: set[RaySlot] = field(default_factory=set)

    @property
    def load(self) -> int:
        return len(self.slots) + self.opening


class RayHub:
    """The `Hub` (streamv2v_trt/hub.py) over stream replicas. Every Ray call runs on the hub's own event
    loop thread, which also owns all its state; the Hub methods hand work to it (`open` waits for the answer)."""

    def __init__(self, handles: Sequence[Any], *, heartbeat_s: float = HEARTBEAT_S,
                 timeout_s: float = CALL_TIMEOUT_S) -> None:  # fmt: skip
        self.owner = uuid.uuid4().hex  # this ingress, for the replicas' leases
        self.replicas = [_Replica(i, handle) for i, handle in enumerate(handles)]
        self.heartbeat_s, self.timeout_s = heartbeat_s, timeout_s
        self._seq = itertools.count()
        self._up = threading.Event()  # some replica answers now: `open` may route to it
        self._first: ReplicaStatus | None = None  # the first answer: width, height and prompt
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="streamv2v-ray-hub", daemon=True)
        self._thread.start()
        self._watcher = asyncio.run_coroutine_threadsafe(self._watch(), self._loop)

    # -- the Hub interface (any thread) --------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Slots on the replicas that answer now."""
        return sum(r.status.capacity for r in self.replicas if r.up and r.status is not None)

    @property
    def in_use(self) -> int:
        return sum(len(r.slots) for r in self.replicas)

    @property
    def width(self) -> int:
        return self._some_status().width

    @property
    def height(self) -> int:
        return self._some_status().height

    @property
    def prompt(self) -> str:
        return self._some_status().prompt

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        """One size: the replicas' (a slot's size change would have to reach its replica's StreamServer; not yet)."""
        return ((self.height, self.width),)

    def open(self) -> RaySlot | None:
        """A slot on the least-loaded replica that answers, or None when all are full. While no replica answers
        (the models load, or all restart), waits up to `timeout_s` for one, then raises NotReady."""
        self._up.wait(self.timeout_s)
        return asyncio.run_coroutine_threadsafe(self._open(), self._loop).result()

    def close(self, slot: RaySlot) -> None:
        self._submit(self._close(slot))

    def push(self, slot: RaySlot, frame: Any, deliver: Deliver) -> int:
        seq = next(self._seq)
        self._submit(self._push(slot, seq, frame, deliver))
        return seq

    @property
    def controls(self) -> tuple[tuple[str, float], ...]:
        """None: `serve --ray` refuses --controlnet (the replicas' StreamServers would need the calls forwarded)."""
        return ()

    def update_control(self, slot: RaySlot, scales: tuple[float, ...]) -> Future:  # noqa: ARG002
        return _refused(RuntimeError("the Ray replicas run no ControlNet"))

    def control_image(self, slot: RaySlot, index: int) -> Future:  # noqa: ARG002
        return _refused(RuntimeError("the Ray replicas run no ControlNet"))

    def update_prompt(self, slot: RaySlot, prompt: str) -> Future:
        return asyncio.run_coroutine_threadsafe(self._call(slot, "update_prompt", prompt), self._loop)

    def reset(self, slot: RaySlot) -> Future:
        return asyncio.run_coroutine_threadsafe(self._call(slot, "reset"), self._loop)

    def resize(self, slot: RaySlot, height: int, width: int) -> Future:  # noqa: ARG002 (every slot: one size)
        """Only the replicas' own size (a no-op); another fails with `SizeUnavailable`."""
        done: Future = Future()
        if (height, width) == (self.height, self.width):
            done.set_result(None)
        else:
            here = size_text((self.height, self.width))
            done.set_exception(SizeUnavailable(f"size {size_text((height, width))} is not served here: the Ray "
                                               f"replicas run {here} only"))  # fmt: skip
        return done

    def stop(self) -> None:
        """Give every open slot back (best effort) and stop the hub's thread."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(self.timeout_s)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self.timeout_s)

    def _some_status(self) -> ReplicaStatus:
        if self._first is None:
            raise RuntimeError("no stream replica has answered yet")
        return self._first

    def _submit(self, work: Coroutine) -> None:
        def report(done: Future) -> None:
            if not done.cancelled() and done.exception() is not None:
                log.error("hub work failed", exc_info=done.exception())

        asyncio.run_coroutine_threadsafe(work, self._loop).add_done_callback(report)

    # -- the hub's loop ------------------------------------------------------------------------------------------
    async def _ask(self, call: Awaitable[Any], timeout_s: float | None) -> Any:
        """Await one Ray or Serve call, at most `timeout_s` (None: as long as it takes). A CancelledError that
        Serve raised, not a cancel of this task, is the call's failure: it becomes `CallCancelled`, an ordinary
        error (left a BaseException, it passed every `except Exception` and ended a replica's checks for good)."""
        try:
            return await asyncio.wait_for(call, timeout_s)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # this task was cancelled: the hub stops, or a slot is lost
                raise
            raise CallCancelled("Ray Serve cancelled the call (its replica stopped or restarted meanwhile)") from None

    async def _open(self) -> RaySlot | None:
        if not any(r.up for r in self.replicas):
            raise NotReady(STARTING)
        free = [r for r in self.replicas if r.up and r.status is not None and r.load < r.status.capacity]
        for replica in sorted(free, key=lambda r: (r.load, r.index)):
            slot = RaySlot(replica.index, "")
            replica.opening += 1
            try:
                incarnation = await self._ask(replica.handle.open.remote(self.owner, slot.session), self.timeout_s)
            except Exception as e:  # timed out or died: try the next; undo the open if it lands later
                log.warning("opening a slot on streams-%d failed (%s): trying another replica", replica.index,
                            _describe(e))  # fmt: skip
                self._submit(self._forget(replica, slot.session))
                if isinstance(e, ActorDiedError) and replica.status is not None:
                    self._lose_replica(replica, replica.status.incarnation, "its replica process stopped")
                continue
            finally:
                replica.opening -= 1
            if incarnation is not None:
                slot.incarnation = incarnation
                replica.slots.add(slot)
                return slot
        return None

    async def _forget(self, replica: _Replica, session: str) -> None:
        with contextlib.suppress(Exception):
            await self._ask(replica.handle.close.remote(session), self.timeout_s)

    async def _close(self, slot: RaySlot) -> None:
        replica = self.replicas[slot.replica]
        replica.slots.discard(slot)
        if slot.lost is None:
            slot.lost = "closed"
            try:
                await self._ask(replica.handle.close.remote(slot.session), self.timeout_s)
            except Exception as e:  # the replica's death or the lease frees it
                log.warning("closing a session on streams-%d failed: %s", replica.index, _describe(e))

    async def _push(self, slot: RaySlot, seq: int, frame: Any, deliver: Deliver) -> None:
        t0 = time.perf_counter()
        result = None
        if slot.lost is None:
            replica = self.replicas[slot.replica]
            slot.pushed += 1
            task = asyncio.current_task()
            slot.pending.add(task)
            try:
                result = await self._ask(replica.handle.push.remote(slot.session, slot.pushed, frame), None)
            except asyncio.CancelledError:  # the stream was lost while this frame waited (_lose_slot)
                pass
            except ActorDiedError:
                self._lose_replica(replica, slot.incarnation, "its replica process stopped")
            except Exception as e:  # not the replica's death: this frame's error only
                result = Result(seq, error=_unwrap(e))
            finally:
                slot.pending.discard(task)
        if result is None or isinstance(result.error, SlotLost):  # the app closes the session on this answer
            self._lose_slot(slot, str(result.error) if result is not None else slot.lost or "lost")
            result = Result(seq, error=_lost(slot))
        deliver(replace(result, seq=seq, latency_s=time.perf_counter() - t0))

    async def _call(self, slot: RaySlot, method: str, *args: Any) -> None:
        if slot.lost is not None:
            raise _lost(slot)
        replica = self.replicas[slot.replica]
        try:
            await self._ask(getattr(replica.handle, method).remote(slot.session, *args), None)
        except ActorDiedError as e:
            self._lose_replica(replica, slot.incarnation, "its replica process stopped")
            raise _lost(slot) from e
        except RayTaskError as e:
            error = _unwrap(e)
            if isinstance(error, SlotLost):
                self._lose_slot(slot, str(error))
                raise _lost(slot) from None
            raise error from None

    async def _watch(self) -> None:
        """Two checks of every replica, each in its own loop: a replica that hangs delays no other's checks, and a
        status call that hangs (Serve holds calls for a replica that died during them until a new one starts)
        does not delay noticing the death."""

        async def every_heartbeat(check: Callable[[_Replica], Awaitable[None]], replica: _Replica) -> None:
            while True:
                try:
                    await check(replica)
                except Exception:  # a fault here must not end the checks: the replica's slots would never return
                    log.exception("checking streams-%d failed", replica.index)
                await asyncio.sleep(self.heartbeat_s)

        checks = (self._check_alive, self._check_status)
        await asyncio.gather(*(every_heartbeat(check, r) for r in self.replicas for check in checks))

    async def _check_alive(self, replica: _Replica) -> None:
        """Is the process holding our sessions alive? Ray answers at once for a dead actor."""
        status = replica.status
        if status is None:  # no process of it known (yet, or since it died)
            return
        try:  # `__ray_ready__`: every Ray actor's built-in no-op method
            await self._ask(status.actor.__ray_ready__.remote(), self.timeout_s)
        except ActorDiedError:
            self._lose_replica(replica, status.incarnation, "its replica process stopped")
        except Exception:  # slow or unreachable for now: no proof of death, the sessions stay
            pass

    async def _check_status(self, replica: _Replica) -> None:
        """The replica's status through Serve: its load, a new life after a restart, the renewal of our lease."""
        try:
            status = await self._ask(replica.handle.status.remote(self.owner), self.timeout_s)
        except Exception as e:
            if replica.up:
                log.warning("streams-%d does not answer (%s): no new sessions go to it", replica.index,
                            _describe(e))  # fmt: skip
            self._set_up(replica, False)
            return
        stale = [s for s in replica.slots if s.incarnation != status.incarnation]
        for slot in stale:
            self._lose_slot(slot, "its replica process was restarted")
        if not replica.up:
            log.info("streams-%d is up: pid %d, %d/%d slots in use", replica.index, status.pid, status.in_use,
                     status.capacity)  # fmt: skip
        replica.status = status
        if self._first is None:
            self._first = status
        self._set_up(replica, True)

    def _set_up(self, replica: _Replica, up: bool) -> None:
        replica.up = up
        if any(r.up for r in self.replicas):
            self._up.set()
        else:
            self._up.clear()

    def _lose_replica(self, replica: _Replica, incarnation: str, why: str) -> None:
        """The replica process `incarnation` is gone: every session it held is lost."""
        if replica.status is not None and replica.status.incarnation == incarnation:
            log.error("streams-%d (pid %d) stopped: %s; its %d session(s) are closed", replica.index,
                      replica.status.pid, why, len(replica.slots))  # fmt: skip
            replica.status = None
            self._set_up(replica, False)
        for slot in [s for s in replica.slots if s.incarnation == incarnation]:
            self._lose_slot(slot, why)

    def _lose_slot(self, slot: RaySlot, why: str) -> None:
        """The slot's stream is gone: its frames waiting for a result are answered `SlotLost` now (cancelled), and
        so is every later frame of it, until the app closes the session."""
        if slot.lost is not None:
            return
        slot.lost = why
        self.replicas[slot.replica].slots.discard(slot)
        for task in list(slot.pending):
            task.cancel()

    async def _stop(self) -> None:
        self._watcher.cancel()
        await asyncio.gather(*(self._close(slot) for replica in self.replicas for slot in list(replica.slots)))


def _unwrap(error: BaseException) -> BaseException:
    """The exception a replica method raised, without Ray's wrapper (its text holds the remote traceback)."""
    cause = getattr(error, "cause", None) if isinstance(error, RayTaskError) else None
    return cause if isinstance(cause, BaseException) else error


def _lost(slot: RaySlot) -> SlotLost:
    """What the client is told about its lost stream."""
    return SlotLost(f"stream lost: {slot.lost}; reconnect for a fresh stream")


def _describe(error: BaseException) -> str:
    return type(error).__name__ if isinstance(error, asyncio.TimeoutError) else f"{type(error).__name__}: {error}"


def _refused(error: BaseException) -> Future:
    done: Future = Future()
    done.set_exception(error)
    return done
