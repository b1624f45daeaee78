"""The live page's LoRA picker (`serve --lora-dir DIR`): the LoRA files a server offers, and the one LoRA set all
of its clients share.

The server lists the .safetensors files directly in DIR once, when it starts (`LoraFolder`). A page picks by
NAME from that listing, with a strength; it never sends a path. A name that is not in the listing is refused:
"../x", an absolute path, a subfolder, a file added after the start, a symlink that leads out of DIR.

The rule for the shared networks: a server's slots share one set of networks (`MultiStream.set_loras`), so the
LoRA set is the server's, not a connection's. A change by any page applies to every client's stream from the
next tick on, and every connected page is told (a "loras" message); banks are kept (the style changes smoothly).
The swap runs on the hub's loop thread between two ticks (`StreamServer.set_loras`), so no frame is computed
with half-old weights and none is dropped. A file that fails to load (malformed, removed since the start) is
answered with an error and changes nothing.

Protocol (web/app.py): page -> server {"type": "loras", "loras": [{"name": "style.safetensors", "scale": 0.8}]}
([] for none); the "ready" message gains "lora_files" (the names) and "loras" (the set now); after a change,
every page gets {"type": "loras", "loras": [...]}.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from os import PathLike
from pathlib import Path
from typing import Any, Protocol

MAX_SCALE = 2.0  # |strength| a page may ask; LoRAs are trained for about 1, far beyond it they only break images
MAX_LORAS = 4  # LoRAs in one set (the page sends one; an API client may stack a few)

Send = Callable[[dict], Awaitable[None]]
Chosen = list[tuple[str, float]]  # (name, scale) in order


class LoraRefused(ValueError):
    """A LoRA message the server does not apply: a name not in the listing, a bad strength, a file that fails to
    load. Its text is what the page is told; nothing changed."""


class LoraHub(Protocol):
    """A hub that swaps the LoRA set of all its slots (`StreamServer`)."""

    def set_loras(self, loras: list[tuple[Path, float]]) -> Future: ...


class LoraFolder:
    """The .safetensors files directly in `directory`, listed once: {name: path}. Regular files only, and a
    symlink only when it stays inside the folder."""

    def __init__(self, directory: str | PathLike) -> None:
        self.root = Path(directory)
        if not self.root.is_dir():
            raise ValueError(f"{self.root} is not a folder: give the folder that holds the LoRA .safetensors files")
        real = self.root.resolve()
        self.files = {
            p.name: p
            for p in sorted(self.root.iterdir())
            if p.suffix == ".safetensors" and p.is_file() and p.resolve().is_relative_to(real)
        }

    @property
    def names(self) -> list[str]:
        return list(self.files)

    def resolve(self, name: Any) -> Path:
        """The file of a listed name; LoraRefused for anything else (the link is checked again: it may have been
        changed since the listing)."""
        path = self.files.get(name) if isinstance(name, str) else None
        if path is None or not path.resolve().is_relative_to(self.root.resolve()):
            listed = ", ".join(self.files) or "the folder has none"
            raise LoraRefused(f"unknown LoRA {repr(name)[:100]}: pick one of the server's files by name ({listed})")
        return path


def parse_loras(msg: dict) -> Chosen:
    """A "loras" message's set: [(name, scale)], each scale a finite number within MAX_SCALE; LoraRefused."""
    items = msg.get("loras")
    if not isinstance(items, list) or len(items) > MAX_LORAS:
        raise LoraRefused(f'"loras" must be a list of at most {MAX_LORAS} {{"name": ..., "scale": ...}} objects '
                          "([] for none)")  # fmt: skip
    chosen = []
    for item in items:
        if not isinstance(item, dict) or set(item) != {"name", "scale"}:
            raise LoraRefused('each LoRA is an object {"name": "<a listed file>", "scale": <number>}')
        scale = item["scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
                or abs(scale) > MAX_SCALE:  # fmt: skip
            raise LoraRefused(f"LoRA scale must be a number in [-{MAX_SCALE:g}, {MAX_SCALE:g}], got {scale!r:.40}")
        chosen.append((item["name"], float(scale)))
    return chosen


def described(chosen: Chosen) -> list[dict]:
    return [{"name": name, "scale": scale} for name, scale in chosen]


class LoraPicker:
    """The server's LoRA set as the pages see it: the listing, the set now, the pages to tell of a change. Lives
    on the app's event loop."""

    def __init__(self, folder: LoraFolder, current: Chosen = ()) -> None:
        self.folder = folder
        self.current: Chosen = list(current)  # what the streams run now
        self.pages: set[Send] = set()  # every connected page's `send`
        self._lock = asyncio.Lock()  # one change at a time, told in the order applied

    def ready(self) -> dict:
        """What the "ready" message adds."""
        return {"lora_files": self.folder.names, "loras": described(self.current)}

    async def apply(self, msg: dict, hub: LoraHub, sender: Send) -> dict:
        """Swap to the message's set on every slot of `hub` and tell the other pages; the sender's answer.
        LoraRefused, with nothing changed, for a refused name or strength or a file that fails to load."""
        from ..manifest import EngineMismatch
        from ..models.lora import LoraError

        chosen = parse_loras(msg)
        files = [(self.folder.resolve(name), scale) for name, scale in chosen]
        async with self._lock:
            try:
                await asyncio.wrap_future(hub.set_loras(files))
            except (LoraError, OSError, EngineMismatch) as e:  # malformed, removed, or weights compiled in
                now = ", ".join(f"{n}:{s:g}" for n, s in self.current) or "no LoRA"
                raise LoraRefused(f"LoRA set not applied, the streams keep {now}: {' '.join(str(e).split())}") from e
            self.current = chosen
            told = {"type": "loras", "loras": described(chosen)}
            for send in list(self.pages - {sender}):
                with contextlib.suppress(Exception):  # a page that is closing misses it; the others must not
                    await send(told)
        return told
