"""GraphCache: CUDA graphs by key, with one capture policy and one memory pool (docs/RUNTIME.md, "CUDA graphs").

`CudaGraphStream` keys whole frames by the stream's `FramePlan`; `MultiStream` keys the phases of a tick (encode,
UNet, decode, and the per-slot work batched over runs of slots, `multistream.py`). Both run every piece of work
as `cache.run(key, fn)`:

- the first `capture_after` runs of a key are eager: they warm up what capture cannot do (cuBLAS/cuDNN
  workspaces and autotuning, Triton compilation, AOTInductor's constant setup), and a key that comes once (a
  rare plan) never costs a capture;
- the next run captures `fn` into a graph (recorded, not run) and replays it: that replay is this run;
- every later run replays. What `fn` returned during capture (tensors, a dict of them, or None) is kept with the
  graph and returned by every replay, which overwrites it in place.

All graphs of one cache share one memory pool: they replay one at a time on one stream, so memory a graph only
needs while it runs serves every graph. A graph's outputs stay alive with it, so no later capture is handed their
memory; an output may sit where an earlier-captured graph keeps scratch, so read a graph's outputs before any
graph captured before it runs again (a frame reads its output before the next frame; a MultiStream tick runs its
phases in one fixed order and captures the three network phases on its second tick, see `multistream.py`).

The capture itself is a parameter (`capture=`): `cuda_capture(device)` records into `torch.cuda.CUDAGraph`s;
tests pass a stand-in, so the policy (when to capture, reuse, counters) is checked without a GPU.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Protocol

import torch

log = logging.getLogger(__name__)


class Graph(Protocol):
    def replay(self) -> None: ...


# capture(fn) -> (graph, what fn returned while being recorded); the graph's replay redoes fn's device work.
Capture = Callable[[Callable[[], Any]], tuple[Graph, Any]]


def cuda_capture(device: torch.device, stream: torch.cuda.Stream | None = None) -> Capture:
    """The real capture: `fn` recorded into a `torch.cuda.CUDAGraph`, every graph in one new memory pool, on
    `stream` (None: torch's capture side stream)."""
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, this runs on {device}")
    pool = torch.cuda.graph_pool_handle()

    def capture(fn: Callable[[], Any]) -> tuple[Graph, Any]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            outputs = fn()  # recorded, not run
        return graph, outputs

    return capture


class GraphCache:
    """`run(key, fn)`: eager for a key's first `capture_after` runs, then captured once and replayed.

    `len(cache)`, `key in cache` and iteration are over the captured keys; `seen[key]` counts a key's eager runs,
    `replays` every graph launch (a MultiStream tick's launches are the difference across it).
    """

    def __init__(self, capture: Capture, *, capture_after: int = 1) -> None:
        if capture_after < 1:
            raise ValueError(f"capture_after must be >= 1 (eager runs before capture, as warm-up), got {capture_after}")
        self.capture, self.capture_after = capture, capture_after
        self._graphs: dict[Hashable, tuple[Graph, Any]] = {}  # key -> (graph, outputs)
        self.seen: Counter[Hashable] = Counter()
        self.replays = 0

    def run(self, key: Hashable, fn: Callable[[], Any]) -> Any:
        """Run `fn`'s device work for `key`: eagerly, or replayed from the key's graph (returning its outputs)."""
        captured = self._graphs.get(key)
        if captured is None and self.seen[key] >= self.capture_after:
            captured = self._graphs[key] = self.capture(fn)
            log.info("captured a CUDA graph for %s (%d graphs)", key, len(self._graphs))
        if captured is None:
            self.seen[key] += 1
            return fn()
        captured[0].replay()
        self.replays += 1
        return captured[1]

    def __len__(self) -> int:
        return len(self._graphs)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._graphs)

    def __contains__(self, key: object) -> bool:
        return key in self._graphs
