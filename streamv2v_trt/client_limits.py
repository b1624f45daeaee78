"""`Limits`: what one client of a served stream may send and hold, and how its answers are encoded.

The web app (web/app.py, web/codec.py) enforces them; `serve` takes the flagged ones from its command line,
reading each flag's name, default and help from the field here, so they are stated once. This module imports
nothing, so a command's `--help` needs no web libraries.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def flag(name: str, help: str, **argparse_options) -> dict:
    """A field's command-line flag: `serve` adds it with the field's default (`argparse_options`: e.g. metavar)."""
    return {"flag": name, "help": help, **argparse_options}


@dataclass(frozen=True)
class Limits:
    max_frame_bytes: int = field(
        default=2 * 1024 * 1024,  # a 1080p JPEG is ~0.5 MB; the page sends stream-sized frames
        metadata=flag("--max-frame-bytes", "largest frame message accepted, in bytes", metavar="N"),
    )
    max_frame_pixels: int = field(
        default=2048 * 2048,  # checked from the header, before decoding; a 1080p frame fits
        metadata=flag(
            "--max-frame-pixels",
            "largest frame accepted, in pixels, read from the image header (default: %(default)s = 2048x2048)",
            metavar="N",
        ),
    )
    max_prompt_chars: int = 1000
    max_text_chars: int = 16 * 1024  # a text message, checked before parsing (a prompt with escapes fits)
    idle_timeout_s: float = field(
        default=60.0,
        metadata=flag(
            "--idle-timeout",
            "close a connection that sent no frame for this long, freeing its slot; 0 never (default: %(default)g)",
            metavar="SECONDS",
        ),
    )
    jpeg_quality: int = 85
    frame_budget_ms: float = field(
        default=0.0,  # the StreamServer's deadline of every slot (serving.py): a frame older is dropped, not run
        metadata=flag(
            "--frame-budget-ms",
            "a frame that waited longer than this for the model is dropped, not run (answered `dropped`), and a tick "
            "waits for other cameras' frames no longer than the first waiting frame's budget; 0 never drops "
            "(default: %(default)g)",
            metavar="MS",
        ),
    )
