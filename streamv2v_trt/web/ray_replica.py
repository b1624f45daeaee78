"""One stream replica of `serve --ray`: a StreamServer (K slots of one MultiStream) inside a Ray Serve replica.

The ingress (`ray_hub.RayHub`) opens a slot for each WebSocket session under a session id it makes, and calls
`push`, `update_prompt`, `reset` and `close` with that id. A session id lives only in the replica process that
opened it: when the process dies, Serve starts a fresh one (the model loads again) that knows no session, so
every call for an old session answers `SlotLost` (hub.py) instead of reaching another client's slot.

Frames cross processes as the uint8 HxWx3 arrays the app decoded (docs/SCALING.md has the measurement against
JPEG bytes); a push waits for its own result, so one Serve request is one frame. Latest frame wins as in the
plain server, by the StreamServer's own rule: pushes carry the ingress's count of the session's frames, so one
that arrives after a newer one (requests may overtake each other) is answered `dropped` at once.

Slots are leased to their ingress: the ingress renews its lease with `status` every second, and the slots of an
ingress not heard from for `lease_s` are given back (an ingress that died, and Serve restarted, leaves none).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import ray

from ..config import StreamConfig
from ..frames import FrameError
from ..hub import Result, SlotLost
from ..opening import open_multistream
from ..serving import StreamServer
from ..source import Source

log = logging.getLogger(__name__)

LEASE_S = 30.0  # an ingress that did not call for this long has gone: its slots are given back


@dataclass(frozen=True)
class ReplicaStatus:
    """What one replica process reports to the ingress (every second: it is also the ingress's lease)."""

    incarnation: str  # this process's Ray actor id: a restarted replica has another
    actor: Any  # its Ray actor handle: the ingress asks Ray whether this very process is still alive
    pid: int
    capacity: int  # K slots
    in_use: int  # sessions open, of every ingress
    width: int
    height: int
    prompt: str  # what a fresh session starts with


@dataclass(frozen=True)
class ReplicaStreams:
    """What each stream replica opens in its own process: `streams` slots of `source` running `cfg`
    (`source.open_multistream`). Plain data: Ray pickles it to the replicas."""

    source: Source
    cfg: StreamConfig
    streams: int  # K slots
    prompt: str = ""  # what a fresh session starts with
    negative_prompt: str = ""


@dataclass(frozen=True)
class _Session:
    slot: int
    owner: str  # the ingress that opened it


class StreamReplica:
    """Serve replica class: opens `slots` (its MultiStream of K slots, the model loading in this process).

    Every method is `async`, so the session table is touched only by the replica's event loop thread; the
    StreamServer's loop thread runs the model and answers through `call_soon_threadsafe`."""

    def __init__(self, slots: ReplicaStreams, lease_s: float = LEASE_S) -> None:
        multi = open_multistream(slots.source, slots.cfg, slots.streams, prompt=slots.prompt,
                                 negative_prompt=slots.negative_prompt)  # fmt: skip
        self.server = StreamServer(multi, name="streamv2v-replica")
        self.lease_s = lease_s
        self.sessions: dict[str, _Session] = {}
        self.leases: dict[str, float] = {}  # ingress id -> when it last called
        self.closed_early: deque[str] = deque(maxlen=1024)  # sessions closed before their open arrived
        context = ray.get_runtime_context()
        self.incarnation, self.actor = context.get_actor_id(), context.current_actor
        log.info("stream replica ready: %d slots of %dx%d (pid %d)", self.server.capacity, self.server.width,
                 self.server.height, os.getpid())  # fmt: skip

    async def status(self, owner: str) -> ReplicaStatus:
        """Renews `owner`'s lease and gives back the slots of owners whose lease ran out."""
        now = time.monotonic()
        self.leases[owner] = now
        for gone in [o for o, seen in self.leases.items() if now - seen > self.lease_s]:
            del self.leases[gone]
            stale = [sid for sid, s in self.sessions.items() if s.owner == gone]
            log.warning("ingress %s has not called for %g s: closing its %d session(s)", gone, self.lease_s,
                        len(stale))  # fmt: skip
            for sid in stale:
                await self.close(sid)
        server = self.server
        return ReplicaStatus(self.incarnation, self.actor, os.getpid(), server.capacity, server.in_use,
                             server.width, server.height, server.prompt)  # fmt: skip

    async def open(self, owner: str, session: str) -> str | None:
        """A fresh slot for `session` (this process's incarnation, to check), or None when every slot is taken."""
        self.leases[owner] = time.monotonic()
        if session in self.closed_early:
            return None
        loop = asyncio.get_running_loop()
        slot = await loop.run_in_executor(None, self.server.open)  # blocks until the loop thread reset it
        if slot is None:
            return None
        if session in self.closed_early:  # closed by its ingress (a timed-out open) while it was opening
            self.server.close(slot)
            return None
        self.sessions[session] = _Session(slot, owner)
        return self.incarnation

    async def close(self, session: str) -> None:
        entry = self.sessions.pop(session, None)
        if entry is None:
            self.closed_early.append(session)
        else:
            self.server.close(entry.slot)

    async def push(self, session: str, order: int, frame: Any) -> Result:
        """`frame`'s result (or dropped, or the error) once its tick has run; `order` increases per session."""
        entry = self.sessions.get(session)
        if entry is None:
            return Result(-1, error=self._lost())
        if isinstance(frame, np.ndarray) and not frame.flags.writeable:  # Ray hands out read-only views; torch
            frame = frame.copy()  # warns on those (a copy of one frame costs microseconds beside the tick)
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Result] = loop.create_future()
        self.server.push(entry.slot, frame, lambda result: loop.call_soon_threadsafe(_settle, answer, result), order)
        return portable(await answer)

    async def update_prompt(self, session: str, prompt: str) -> None:
        await asyncio.wrap_future(self.server.update_prompt(self._slot(session), prompt))

    async def reset(self, session: str) -> None:
        await asyncio.wrap_future(self.server.reset(self._slot(session)))

    def _slot(self, session: str) -> int:
        entry = self.sessions.get(session)
        if entry is None:
            raise self._lost()
        return entry.slot

    def _lost(self) -> SlotLost:
        return SlotLost(f"its replica process was restarted (now pid {os.getpid()}), without its bank")

    def __del__(self) -> None:  # Serve calls it when it stops the replica
        server = getattr(self, "server", None)
        if server is not None:
            server.stop(timeout=5)


def _settle(future: asyncio.Future, result: Result) -> None:
    if not future.done():  # the waiting request may have been cancelled
        future.set_result(result)


def portable(result: Result) -> Result:
    """`result` safe to pickle to another process: a FrameError stays one (the page shows it as the client's
    mistake), any other error becomes a RuntimeError with its text (a model fault's exception may hold tensors
    or not unpickle)."""
    error = result.error
    if error is None or type(error) in (FrameError, SlotLost):
        return result
    if isinstance(error, FrameError):
        return replace(result, error=FrameError(str(error)))
    return replace(result, error=RuntimeError(f"{type(error).__name__}: {error}"))
