"""What a server of many clients and the thing that runs their streams agree on: the `Hub` protocol, the `Result`
a frame turns into, the two ways a hub can fail a client (`SlotLost`, `NotReady`), and `Latest`, the one rule
for frames that wait (the newest wins).

`StreamServer` (serving.py) is a hub on this process; `RayHub` (web/ray_hub.py) one over replicas in other
processes. The web app (web/app.py) uses only this module's names, so it does not import the model to serve.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar


@dataclass(frozen=True)
class Result:
    """What a push turns into: the output frame, or why there is none."""

    seq: int  # the number push() returned
    frame: Any = None  # the output frame (the input's type); None when dropped or failed
    error: BaseException | None = None  # FrameError: the client's frame; SlotLost: the stream is gone; else a fault
    dropped: bool = False  # replaced by a newer frame, or past its slot's deadline (serving.py), before it ran
    latency_s: float = 0.0  # push to result
    tick_s: float = 0.0  # the batched tick that produced it (model time, shared by the tick's frames)


Deliver = Callable[[Result], None]


class SlotLost(RuntimeError):
    """The slot's stream is gone with the process that held it (its bank too), so nothing the client sends can
    reach it again: the client must reconnect for a fresh stream. A hub answers every frame of a lost slot with a
    `Result` carrying this error and raises it from `update_prompt`/`reset`; the text is what the client is told."""


class SizeUnavailable(RuntimeError):
    """`Hub.resize` cannot give the slot that size: not one the hub serves, or every stream of that size is taken.
    The slot keeps its size and stays usable; the text is what the client is told."""


class NotReady(RuntimeError):
    """`Hub.open` before any of the hub's streams can take a client (replicas still loading the model, or all
    restarting): not busy, so the client is told to come back shortly, with this text."""


class Hub(Protocol):
    """What a server of many clients needs: slots of streams, one per client. `StreamServer` is one on this
    process's networks; a Ray Serve ingress implements it over replicas on other processes and machines.

    Blocking methods (`open`) must not be called from an event loop; futures resolve on another thread."""

    capacity: int  # slots in all
    width: int  # the frame size a slot opens at
    height: int
    sizes: tuple[tuple[int, int], ...]  # (height, width) of every size a slot may `resize` to, the opening one first
    prompt: str  # the prompt a freshly opened slot starts with
    controls: tuple[tuple[str, float], ...]  # each ControlNet's (control kind, scale) in a fresh slot; (): none

    def open(self) -> Any | None:
        """A free slot (fresh stream: empty bank, `prompt`), or None when every slot is taken; `NotReady` when
        the hub has no stream that could take one yet."""
        ...

    def close(self, slot: Any) -> None: ...

    def push(self, slot: Any, frame: Any, deliver: Deliver) -> int:
        """Queue a uint8 HxWx3 frame; `deliver(Result)` is called once for it, from any thread. A frame that
        waits is replaced by a newer one (`Latest`): the replaced one is delivered as dropped."""
        ...

    def update_prompt(self, slot: Any, prompt: str) -> Future: ...

    def reset(self, slot: Any) -> Future: ...

    def update_control(self, slot: Any, scales: tuple[float, ...]) -> Future:
        """The slot's ControlNet scales (one per `controls`) from its next frame on; the other slots keep theirs."""
        ...

    def control_image(self, slot: Any, index: int) -> Future:
        """ControlNet `index`'s control image of the slot's newest frame: uint8 HxWx3 (to show it, now and then)."""
        ...

    def resize(self, slot: Any, height: int, width: int) -> Future:
        """The slot's stream at that size from its next frame on, a new scene (prompt kept, bank empty); frames of
        the old size still waiting are delivered as dropped. The future fails with `SizeUnavailable` (the slot
        keeps its size) for a size not in `sizes` or one whose streams are all taken."""
        ...


T = TypeVar("T")


class Latest(Generic[T]):
    """Latest frame wins: at most one item waits, and a newer one replaces it, so a slow consumer drops frames
    instead of queueing them. Items are ordered by their sender's count (`order`, increasing per sender): an item
    that arrives after a newer one was put (requests may overtake each other between processes) loses at once.

    Not thread-safe: its owner's lock or event loop guards it."""

    def __init__(self) -> None:
        self.item: T | None = None  # the waiting item
        self.newest = -1  # the order of the newest item put

    def put(self, order: int, item: T) -> T | None:
        """Make `item` the waiting one; returns the item that lost, for its sender to answer `dropped`: the one
        it replaced, or `item` itself when something newer was put before it. None when nothing lost."""
        if order <= self.newest:
            return item
        self.newest = order
        replaced, self.item = self.item, item
        return replaced

    def take(self) -> T | None:
        """The waiting item (now no longer waiting), or None."""
        item, self.item = self.item, None
        return item
