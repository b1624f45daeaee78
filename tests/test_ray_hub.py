"""RayHub against fake replicas (no Ray cluster): what Serve's handles do when a replica process dies, restarts or
cancels a call, and what the hub then tells the app. End to end with real Ray in test_ray_serve.py."""

from __future__ import annotations

import asyncio
import itertools
import queue
import time
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import wait_until

pytest.importorskip("ray")
from ray.exceptions import ActorDiedError  # noqa: E402

from streamv2v_trt.hub import NotReady, Result, SizeUnavailable, SlotLost  # noqa: E402
from streamv2v_trt.web.ray_hub import RayHub  # noqa: E402
from streamv2v_trt.web.ray_replica import ReplicaStatus  # noqa: E402

HEARTBEAT_S = 0.02
FRAME = np.zeros((8, 8, 3), np.uint8)
pids = itertools.count(1000)


class Remote:
    """`handle.method.remote(*args)`: what a Serve handle (or a Ray actor handle) gives, an awaitable call."""

    def __init__(self, method) -> None:
        self.method = method

    def remote(self, *args):
        return self.method(*args)


class Process:
    """One life of a replica process, as Ray's actor handle: `__ray_ready__` raises ActorDiedError once it died."""

    def __init__(self) -> None:
        self.pid, self.alive = next(pids), True
        self.__ray_ready__ = Remote(self.ready)

    async def ready(self) -> None:
        if not self.alive:
            raise ActorDiedError()


class FakeReplica:
    """A stream replica behind a Serve handle (`handle`): one slot, sessions that live as long as its process.
    `kill()` ends the process (calls to it fail as Serve's do); `restart()` starts a fresh one that knows no
    session. `status_errors`: raised, in turn, by the next status calls (what Serve raises while it restarts one);
    `status_s`: how long a status call takes."""

    def __init__(self, capacity: int = 1) -> None:
        self.capacity, self.process = capacity, Process()
        self.sessions: set[str] = set()
        self.status_errors: list[BaseException] = []
        self.answering = True  # status answers (False: a replica still loading its model)
        self.status_s = 0.0
        self.push_errors: list[BaseException] = []
        self.handle = SimpleNamespace(**{m: Remote(getattr(self, m)) for m in ("status", "open", "close", "push")})

    def kill(self) -> None:
        self.process.alive = False
        self.sessions.clear()

    def restart(self) -> None:
        self.process = Process()

    async def status(self, _owner: str) -> ReplicaStatus:
        if self.status_errors:
            raise self.status_errors.pop(0)
        await asyncio.sleep(self.status_s)
        while not self.process.alive or not self.answering:  # Serve holds the call until a replica takes it
            await asyncio.sleep(0.01)
        p = self.process
        return ReplicaStatus(str(p.pid), p, p.pid, self.capacity, len(self.sessions), 8, 8, "a photo")

    async def open(self, _owner: str, session: str) -> str | None:
        if len(self.sessions) >= self.capacity:
            return None
        self.sessions.add(session)
        return str(self.process.pid)

    async def close(self, session: str) -> None:
        self.sessions.discard(session)

    async def push(self, session: str, _order: int, frame) -> Result:
        if self.push_errors:
            raise self.push_errors.pop(0)
        if not self.process.alive:
            raise ActorDiedError()
        if session not in self.sessions:
            return Result(-1, error=SlotLost(f"its replica process was restarted (now pid {self.process.pid})"))
        return Result(-1, frame=frame)


@pytest.fixture
def hub():
    """`hub(*replicas, timeout_s=2.0) -> RayHub` over fake replicas, checking them every 20 ms; stopped after."""
    hubs: list[RayHub] = []

    def make(*replicas: FakeReplica, timeout_s: float = 2.0) -> RayHub:
        hubs.append(RayHub([r.handle for r in replicas], heartbeat_s=HEARTBEAT_S, timeout_s=timeout_s))
        return hubs[-1]

    yield make
    for h in hubs:
        h.stop()


def push(hub: RayHub, slot) -> Result:
    answers: queue.Queue[Result] = queue.Queue()
    hub.push(slot, FRAME, answers.put)
    return answers.get(timeout=5)


def open_on(hub: RayHub, replica: int, seconds: float):
    """A new session on `replica` within `seconds` (the others are full: until it answers, open says busy)."""
    opened = []

    def try_open() -> bool:
        slot = hub.open()
        if slot is not None:
            opened.append(slot)
        return slot is not None

    wait_until(try_open, f"a new session on streams-{replica}", seconds)
    assert opened[0].replica == replica
    return opened[0]


# Serve raises CancelledError from a call it cancelled (a replica that died or restarted while the call ran). It is
# a BaseException: the hub's checks of that replica once ended on it, and its slots never came back.
@pytest.mark.parametrize("error", [asyncio.CancelledError(), RuntimeError("the replica is not reachable")],
                         ids=["cancelled", "error"])  # fmt: skip
def test_a_restarted_replica_takes_sessions_again_after_a_failed_status_call(hub, error):
    replicas = [FakeReplica(), FakeReplica()]
    h = hub(*replicas)
    first, second = h.open(), h.open()
    assert sorted([first.replica, second.replica]) == [0, 1]  # least loaded first: one on each
    assert push(h, first).frame is not None
    victim = replicas[first.replica]
    victim.kill()
    victim.status_errors = [error]  # while Serve restarts it, a status call fails
    lost = push(h, first)
    assert isinstance(lost.error, SlotLost), lost
    assert str(lost.error).startswith("stream lost: ") and "reconnect for a fresh stream" in str(lost.error)
    assert isinstance(push(h, first).error, SlotLost)  # every later frame of the slot too
    assert push(h, second).frame is not None  # the other replica's session goes on
    h.close(first)
    wait_until(lambda: not victim.status_errors, "the failing status call was made", 5)
    assert h.open() is None  # busy: the other replica is full, this one is not back yet
    victim.restart()
    fresh = open_on(h, first.replica, 5)
    assert push(h, fresh).frame is not None


def test_a_replica_that_dies_during_a_slow_status_call_is_noticed_at_once(hub):
    """The status call in flight then hangs (Serve holds it for the next replica) until the hub's call timeout;
    whether the process is alive is checked beside it, so its sessions are lost within a heartbeat or two."""
    replica = FakeReplica()
    replica.status_s = 0.5  # a loaded machine: a status call is under way most of the time
    h = hub(replica, timeout_s=10.0)
    slot = h.open()
    time.sleep(0.2)  # the next status call is under way
    replica.kill()
    wait_until(lambda: slot.lost is not None, "the session was lost", 2)
    assert "stopped" in slot.lost and isinstance(push(h, slot).error, SlotLost)


def test_an_old_session_on_a_restarted_replica_is_lost(hub):
    """Restarted between two checks, before Ray could say the old process died: the next status names a new
    process (incarnation), and the sessions of the old one are lost."""
    replica = FakeReplica()
    h = hub(replica)
    slot = h.open()
    replica.sessions.clear()
    replica.restart()
    wait_until(lambda: slot.lost is not None, "the session was lost", 5)
    assert "restarted" in slot.lost
    result = push(h, slot)
    assert isinstance(result.error, SlotLost) and "restarted" in str(result.error)
    with pytest.raises(SlotLost, match="stream lost"):
        h.update_prompt(slot, "a cat").result(5)
    h.close(slot)
    assert push(h, open_on(h, 0, 5)).frame is not None


def test_a_push_that_serve_cancels_fails_that_frame_only(hub):
    replica = FakeReplica()
    h = hub(replica)
    slot = h.open()
    replica.push_errors = [asyncio.CancelledError()]
    failed = push(h, slot)
    assert failed.frame is None and "cancelled" in str(failed.error) and not isinstance(failed.error, SlotLost)
    assert push(h, slot).frame is not None  # the session goes on
    assert slot.lost is None


def test_open_says_not_ready_until_a_replica_answers_not_busy(hub):
    replica = FakeReplica()
    replica.answering = False  # loading its model
    h = hub(replica, timeout_s=0.3)
    with pytest.raises(NotReady, match="no stream replica is ready yet"):
        h.open()
    assert h.capacity == 0
    replica.answering = True
    wait_until(lambda: h.capacity == 1, "the replica answered", 5)
    slot = h.open()
    assert slot is not None and h.open() is None  # then full is busy (None), not "starting"


def test_stop_gives_every_open_slot_back(hub):
    replicas = [FakeReplica(), FakeReplica()]
    h = hub(*replicas)
    h.open(), h.open()
    assert all(r.sessions for r in replicas)
    h.stop()
    assert not any(r.sessions for r in replicas)
    assert not h._thread.is_alive()


def test_serves_its_replicas_size_only(hub):
    """Ray serving runs one size (the replicas'): `sizes` says so, `resize` to it is a no-op, another is refused."""
    h = hub(FakeReplica())
    slot = h.open()
    assert h.sizes == ((8, 8),)
    assert h.resize(slot, 8, 8).result(5) is None
    with pytest.raises(SizeUnavailable, match="16x8 is not served here: the Ray replicas run 8x8 only"):
        h.resize(slot, 8, 16).result(5)
    assert push(h, slot).frame is not None  # the slot goes on
