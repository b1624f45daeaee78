"""`python -m streamv2v_trt serve`: the live camera demo in the browser (http://127.0.0.1:7860).

Loads the model once; every browser connection gets its own stream (own bank) on the shared backend.
Browsers give the camera only to localhost or HTTPS pages: to serve another machine, pass --ssl-certfile
and --ssl-keyfile, or reach it through an SSH tunnel (ssh -L 7860:127.0.0.1:7860 host).
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..pipeline import StreamV2V
from .stream_args import CliError, add_stream_args, build_stream

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="live camera demo in the browser", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--prompt", default="", help="initial prompt (the page can change it live)")
    p.add_argument("--max-frame-bytes", type=int, default=2 * 1024 * 1024, help="largest frame message accepted")
    p.add_argument("--max-connections", type=int, default=8, help="cameras served at once (one bank each)")
    p.add_argument("--ssl-certfile", help="serve HTTPS (needed for cameras on non-localhost pages)")
    p.add_argument("--ssl-keyfile")
    add_stream_args(p, live=True)  # a camera: priming and the similar-frame filter on by default
    p.set_defaults(func=run)


def stream_factory_from(template: StreamV2V, prompt: str):
    """A factory of fresh streams (own bank, own noise state) sharing `template`'s loaded backend, with its
    config (guidance, priming, similar-frame filter) and negative prompt."""

    def make() -> StreamV2V:
        stream = StreamV2V(template.backend, template.prompt_encoder, template.scheduler, template.cfg)
        stream.update_prompt(prompt, negative_prompt=template.negative_prompt)
        return stream

    return make


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..web import Limits, create_app
    except ModuleNotFoundError as e:
        print(
            f"error: serve needs the web extra ({e.name} is missing): pip install 'streamv2v-trt[web]'", file=sys.stderr
        )
        return 1
    try:
        template = build_stream(args, prompt=args.prompt)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding to %s: anyone who can reach this address can use the model", args.host)
    limits = Limits(max_frame_bytes=args.max_frame_bytes, max_connections=args.max_connections)
    app = create_app(stream_factory_from(template, args.prompt), limits)
    scheme = "https" if args.ssl_certfile else "http"
    log.info("open %s://%s:%d in a browser", scheme, args.host, args.port)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        ws_max_size=args.max_frame_bytes + 1024 * 1024,  # larger messages close the socket (memory bound)
        log_level="info" if args.verbose else "warning",
    )
    return 0
