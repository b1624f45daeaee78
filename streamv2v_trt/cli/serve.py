"""`python -m streamv2v_trt serve`: the live camera demo in the browser (http://127.0.0.1:7860).

Loads the model once as --streams slots batched into one encode, UNet and decode per tick; every browser
connection holds one slot (its own stream and bank) while it is connected.
Browsers give the camera only to localhost or HTTPS pages: to serve another machine, pass --ssl-certfile
and --ssl-keyfile, or reach it through an SSH tunnel (ssh -L 7860:127.0.0.1:7860 host).
With --ray the same page is served by a Ray Serve application whose stream replicas run on several GPUs or
machines (streamv2v_trt/web/ray_app.py, docs/SCALING.md). With --lora-dir DIR the page offers the LoRA files in
DIR, by name, with a strength slider; the slots share their networks, so the LoRA set is the server's: a change by
one page applies to every client, and every page is told (streamv2v_trt/web/loras.py). With --webrtc the page
may also send its frames over WebRTC (?transport=webrtc; streamv2v_trt/web/webrtc.py), on the same slots.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import time
from dataclasses import fields
from pathlib import Path

from ..client_limits import Limits
from ..console import HelpFormatter
from ..opening import open_multistream
from .stream_args import CliError, add_stream_args, device_of, opening, stream_request

log = logging.getLogger(__name__)

# Slots when --streams is not given. Every tick runs all K slots (an idle slot still costs its share of the batch),
# so K trades one camera's frame time for total throughput. On a GPU a 512x512 batch of 1 leaves it idle between
# kernels and 4 streams cost far less than 4 frames; on the CPU work grows with the batch, so 2 (docs/SURFACES.md).
DEFAULT_STREAMS = {"cuda": 4, "cpu": 2}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="live camera demo in the browser",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, localhost only)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--prompt", default="", help="initial prompt (the page can change it live; default: empty)")
    p.add_argument(
        "--streams",
        type=int,
        metavar="K",
        help="stream slots, batched into one model call per tick; also the most cameras connected at once (each "
        "holds a slot and its bank; one more is told the server is busy). Default: 4 on a GPU, 2 on the CPU; with "
        "--engines the folder's (python -m build_engines --max-streams K), and another K is refused",
    )
    for limit in LIMIT_FLAGS:  # --max-frame-bytes, --max-frame-pixels, --idle-timeout, ...: stated in `Limits`
        options = {k: v for k, v in limit.metadata.items() if k != "flag"}
        p.add_argument(limit.metadata["flag"], dest=limit.name, type=type(limit.default), default=limit.default,
                       **options)  # fmt: skip
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also serve requests whose Host header names NAME (repeatable; default: only the --host address "
        "and localhost, 127.0.0.1, ::1)",
    )
    p.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        metavar="URL",
        help="also accept WebSockets from pages at this origin, e.g. https://demo.example.com (repeatable; "
        "default: none, only the page's own origin and clients that send no Origin)",
    )
    p.add_argument(
        "--lora-dir",
        type=Path,
        metavar="DIR",
        help="offer the LoRA .safetensors files directly in DIR on the page (listed at start; the page picks a name "
        "and a strength, never a path). The LoRA set is the server's: a change by one page applies to every "
        "client. Needs weights that swap: the eager backend, or a folder built with --weights swappable",
    )
    w = p.add_argument_group("WebRTC (pip install 'streamv2v-trt[webrtc]'; docs/SURFACES.md)")
    w.add_argument(
        "--webrtc",
        action="store_true",
        help="also take WebRTC sessions (POST /webrtc/offer; the page with ?transport=webrtc): a video track each "
        "way and the same messages on a data channel, on the same slots, busy rule and idle timeout",
    )
    w.add_argument(
        "--ice-server",
        action="append",
        default=[],
        metavar="URL",
        help="a STUN or TURN server for WebRTC: stun:HOST[:PORT] or turn:USER:PASSWORD@HOST[:PORT] (repeatable; "
        "default: none, host candidates only: loopback and LAN)",
    )
    p.add_argument("--ssl-certfile", help="serve HTTPS (needed for cameras on non-localhost pages)")
    p.add_argument("--ssl-keyfile", help="the private key of --ssl-certfile")
    r = p.add_argument_group("many GPUs and machines: Ray Serve (docs/SCALING.md; pip install 'streamv2v-trt[serve]')")
    r.add_argument(
        "--ray",
        action="store_true",
        help="serve the same page from a Ray Serve application: an ingress and --replicas stream replicas (one GPU "
        "each; CPU replicas when the cluster has no GPU), each --streams-per-replica slots; Serve's HTTP proxy "
        "listens on --host and --port",
    )
    r.add_argument("--replicas", type=int, metavar="N", help="stream replicas (default: one per GPU; 1 without GPUs)")
    r.add_argument(
        "--streams-per-replica",
        type=int,
        metavar="K",
        help="slots of each replica, batched per tick (default: as --streams: 4 on a GPU, 2 on the CPU, the build "
        "folder's with --engines)",
    )
    r.add_argument(
        "--address",
        metavar="ADDR",
        help="join a running Ray cluster: auto (started with ray start on this machine) or HOST:PORT (default: "
        "start a local Ray for this command, stopped when it ends)",
    )
    add_stream_args(p, live=True)  # a camera: priming and the similar-frame filter on by default
    p.set_defaults(func=run)


LIMIT_FLAGS = [f for f in fields(Limits) if "flag" in f.metadata]  # each parsed into args.<field name>


def limits_of(args: argparse.Namespace) -> Limits:
    """The connection limits the flags ask for; CliError for values that cannot work."""
    if not 0 <= args.port <= 65535:
        raise CliError(f"--port must be in 0..65535, got {args.port}")
    for limit in LIMIT_FLAGS:
        value = getattr(args, limit.name)
        if limit.name in ("idle_timeout_s", "frame_budget_ms"):
            if not (math.isfinite(value) and value >= 0):
                unit = "seconds" if limit.name == "idle_timeout_s" else "milliseconds"
                raise CliError(f"{limit.metadata['flag']} must be a number of {unit} >= 0 (0: never), got {value}")
        elif value < 1:
            raise CliError(f"{limit.metadata['flag']} must be >= 1, got {value}")
    return Limits(**{limit.name: getattr(args, limit.name) for limit in LIMIT_FLAGS})


def open_slots(args: argparse.Namespace):
    """The MultiStream `serve` runs: `--streams` slots (default: DEFAULT_STREAMS, or a build folder's count)."""
    streams = args.streams
    if streams is None and args.engines is None:
        streams = DEFAULT_STREAMS.get(device_of(args.device).type, 1)
    source, cfg = stream_request(args, streams)
    with opening(source.engines, cfg.spec.model):
        return open_multistream(source, cfg, streams, prompt=args.prompt, negative_prompt=args.negative_prompt or "")


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..web import LOCAL_HOSTS, Access, create_app
    except ModuleNotFoundError as e:
        print(
            f"error: serve needs the web extra ({e.name} is missing): pip install 'streamv2v-trt[web]'", file=sys.stderr
        )
        return 1
    try:  # checked before the model loads
        access = Access(LOCAL_HOSTS | {args.host, *args.allowed_host}, frozenset(args.allowed_origin))
    except ValueError as e:
        print(f"error: --allowed-origin: {e}", file=sys.stderr)
        return 1
    try:
        webrtc = webrtc_of(args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        limits = limits_of(args)
        ray_only = [f"--{k.replace('_', '-')}" for k in ("replicas", "streams_per_replica", "address")
                    if getattr(args, k) is not None]  # fmt: skip
        if ray_only and not args.ray:
            raise CliError(f"{', '.join(ray_only)} need --ray (serve from Ray Serve)")
        if args.ray and limits.frame_budget_ms:  # the replicas' StreamServers take no budget yet
            raise CliError("--frame-budget-ms is not supported with --ray yet; serve without --ray to use it")
        if args.ray and args.controlnet:  # the page's control messages would have to reach each replica
            raise CliError("--controlnet is not supported with --ray yet; serve without --ray to run ControlNets")
        folder = lora_folder(args)
        multi = None if args.ray else open_slots(args)
        picker = None if folder is None else lora_picker(multi, folder)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding to %s: anyone who can reach this address can use the model", args.host)
        if not args.allowed_host:  # a browser that reaches the server under another name is refused
            log.warning("serving only Host names %s: add the name browsers use with --allowed-host NAME",
                        ", ".join(sorted(access.allowed_hosts)))  # fmt: skip
    if args.ray:
        return run_ray(args, limits, access)
    from ..serving import StreamServer

    logging.getLogger("uvicorn.error").addFilter(ClientTextErrors())  # kept by uvicorn's logging set-up
    with StreamServer(multi, frame_budget_s=limits.frame_budget_ms / 1e3) as hub:
        log.info("%d stream slots (%s backend); open %s://%s:%d in a browser", hub.capacity, multi.backend.name,
                 "https" if args.ssl_certfile else "http", args.host, args.port)  # fmt: skip
        uvicorn.run(
            create_app(hub, limits, access, loras=picker, webrtc=webrtc),
            host=args.host,
            port=args.port,
            ssl_certfile=args.ssl_certfile,
            ssl_keyfile=args.ssl_keyfile,
            ws_max_size=args.max_frame_bytes + 1024 * 1024,  # larger messages close the socket (memory bound)
            log_level="info" if args.verbose else "warning",
        )
    return 0


def webrtc_of(args: argparse.Namespace) -> tuple[str, ...] | None:
    """The ICE server URLs of `--webrtc` (checked, aiortc imported, before the model loads); None without it."""
    if not args.webrtc:
        if args.ice_server:
            raise CliError("--ice-server is for WebRTC sessions: add --webrtc")
        return None
    if args.ray:
        raise CliError("--webrtc is not supported with --ray yet; serve without --ray for WebRTC sessions")
    try:
        from ..web.webrtc import ice_server
    except ModuleNotFoundError as e:
        raise CliError(
            f"--webrtc needs the webrtc extra ({e.name} is missing): pip install 'streamv2v-trt[webrtc]'"
        ) from e
    try:
        for url in args.ice_server:
            ice_server(url)
    except ValueError as e:
        raise CliError(f"--ice-server: {e}") from e
    return tuple(args.ice_server)


def lora_folder(args: argparse.Namespace):
    """The `--lora-dir` listing (`web.loras.LoraFolder`), checked before the model loads; None without it."""
    if args.lora_dir is None:
        return None
    if args.ray:  # each replica holds its own networks: one set across replicas is not built yet
        raise CliError("--lora-dir is not supported with --ray (every replica holds its own networks); serve "
                       "without --ray to offer LoRAs, or give the set at start with --lora FILE:SCALE")  # fmt: skip
    from ..web.loras import LoraFolder

    try:
        folder = LoraFolder(args.lora_dir)
    except ValueError as e:
        raise CliError(f"--lora-dir: {e}") from e
    log.info("offering %d LoRA file(s) from %s: %s", len(folder.files), folder.root, ", ".join(folder.names) or "none")
    return folder


def lora_picker(multi, folder):
    """The page's picker over `folder` for the slots `multi`, starting from their LoRA set. A build folder whose
    weights are compiled in is refused here, with the command that builds one that swaps."""
    from ..lora_set import swap_loras
    from ..manifest import EngineMismatch
    from ..web.loras import LoraPicker

    if multi.backend.lora_weights is None:
        try:  # swap_loras raises on such a backend, naming the rebuild; it changes nothing
            swap_loras(multi.backend, multi.cfg, multi.cfg.spec.loras)
        except EngineMismatch as e:
            raise CliError(f"--lora-dir: {' '.join(str(e).split())}") from e
    return LoraPicker(folder, [(lora.path.name, lora.scale) for lora in multi.cfg.spec.loras])


class ClientTextErrors(logging.Filter):
    """uvicorn answers a WebSocket text message that is not UTF-8 rightly (close 1007) but logs it at ERROR with
    a full traceback, as if the server had failed: the client's mistake gets one warning line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UnicodeDecodeError):
            record.msg, record.args = "closed a WebSocket (1007): its client sent a text message that is not UTF-8", ()
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
        return True


# -- serve --ray -----------------------------------------------------------------------------------------------

INGRESS_CPUS = 1.0  # the ingress decodes and encodes every frame's JPEG


def run_ray(args: argparse.Namespace, limits, access) -> int:
    """`serve --ray`: deploy the Ray Serve application (streamv2v_trt/web/ray_app.py) and wait for Ctrl-C or
    SIGTERM; then delete it (and stop the local Ray this command started)."""
    try:
        import ray
        from ray import serve as ray_serve

        from ..web.ray_app import APP_NAME, build_application
    except ModuleNotFoundError as e:
        print(f"error: serve --ray needs the serve extra ({e.name} is missing): pip install 'streamv2v-trt[serve]'",
              file=sys.stderr)  # fmt: skip
        return 1
    try:
        replicas = check_ray_flags(args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        if args.address is None:  # a Ray of our own, its dashboard off (docs/SCALING.md lists what listens)
            import torch

            cpus = (replicas or torch.cuda.device_count() or 1) * (args.threads or 1) + INGRESS_CPUS
            ray.init(address="local", include_dashboard=False, num_cpus=max(os.cpu_count() or 1, math.ceil(cpus)))
        else:
            ray.init(address=args.address)
    except ConnectionError as e:  # no cluster at --address
        print(f"error: --address {args.address}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    # SIGTERM stops it as Ctrl-C does: cleanly. Set after ray.init, which installs Ray's own SIGTERM handler (it
    # prints a stack trace and ends the process mid-shutdown, exit -6 measured, leaving the local Ray's processes
    # running for a minute or more); ours replaces it.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    serving = False
    try:
        config = ray_config(args, limits, access, replicas, ray.cluster_resources())
        http = {"host": args.host, "port": args.port}
        if args.ssl_certfile:
            http.update(ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)
        ray_serve.start(proxy_location="HeadOnly", http_options=http)
        serving = True
        try:
            ray_serve.run(build_application(config), name=APP_NAME, route_prefix="/")
        except RuntimeError as e:  # a replica failed to start: Serve's message ends with its traceback
            raise CliError(f"the application did not start (see the replica's log above): {str(e)[-2000:]}") from e
        log.info("%d stream replica(s) x %d slots on Ray Serve; open %s://%s:%d in a browser; Ctrl-C stops",
                 config.replicas, config.slots.streams, "https" if args.ssl_certfile else "http", args.host,
                 args.port)  # fmt: skip
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM
        pass
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        try:
            if serving:
                log.info("stopping the Ray Serve application")
                if args.address is None:
                    ray_serve.shutdown()
                else:  # the cluster is someone else's: take only our application down
                    ray_serve.delete(APP_NAME)
        finally:
            ours = ray_processes() if args.address is None else []  # the local Ray's, workers included
            ray.shutdown()
            stop_processes(ours)
    return 0


RAY_EXIT_S = 10.0  # how long the local Ray's processes get to exit after ray.shutdown before they are terminated


def ray_processes() -> list:
    """The processes of the local Ray this command started: all its descendants (psutil ships with Ray)."""
    import psutil

    return psutil.Process().children(recursive=True)


def stop_processes(processes: list) -> None:
    """Wait for `processes` to exit (ray.shutdown stops the GCS and the raylet, whose agents exit on their own a
    little later); terminate, then kill, any still running after RAY_EXIT_S, so none outlives the command."""
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=RAY_EXIT_S)
    if alive:
        log.warning("terminating %d Ray process(es) still running %g s after shutdown: %s", len(alive), RAY_EXIT_S,
                    ", ".join(f"{p.pid}" for p in alive))  # fmt: skip
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(alive, timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


def check_ray_flags(args: argparse.Namespace) -> int | None:
    """The --ray flags that need no cluster to check; the replicas asked (None: one per GPU)."""
    if args.streams is not None:
        raise CliError("--streams sets the slots of one process; with --ray give --streams-per-replica K")
    for flag, value in (("--replicas", args.replicas), ("--streams-per-replica", args.streams_per_replica)):
        if value is not None and value < 1:
            raise CliError(f"{flag} must be >= 1, got {value}")
    if args.device.startswith("cuda:") and args.device != "cuda:0":
        raise CliError(f"--device {args.device}: Ray gives each replica one GPU, its cuda:0; use --device cuda")
    return args.replicas


def ray_config(args: argparse.Namespace, limits, access, replicas: int | None, resources: dict):
    """What the application runs on this cluster, with every flag checked where a replica will run (a Ray task
    placed like one) before the model loads anywhere."""
    import ray

    from ..web.ray_app import RayServeConfig

    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    use_gpu = args.device.startswith("cuda") or (args.device == "auto" and gpus > 0)
    if use_gpu and gpus < 1:
        raise CliError(f"--device {args.device} asked, but the Ray cluster has no GPU; use --device cpu")
    replicas = replicas or (gpus if use_gpu else 1)
    if use_gpu and replicas > gpus:
        raise CliError(f"--replicas {replicas} needs a GPU each, the Ray cluster has {gpus}: use --replicas {gpus}")
    per_replica = float(args.threads or 1)
    if cpus < replicas * per_replica + INGRESS_CPUS:
        raise CliError(f"{replicas} replica(s) x {per_replica:g} CPU and the ingress's {INGRESS_CPUS:g} need "
                       f"{replicas * per_replica + INGRESS_CPUS:g} CPUs, the Ray cluster has {cpus:g}")  # fmt: skip
    device = "cuda" if use_gpu else "cpu"
    replica_args = argparse.Namespace(**{**vars(args), "device": device, "func": None})
    streams = args.streams_per_replica or (None if args.engines else DEFAULT_STREAMS[device])
    check = ray.remote(num_cpus=per_replica, num_gpus=1 if use_gpu else 0)(check_replica)
    try:
        slots = ray.get(check.remote(replica_args, streams))
    except ray.exceptions.RayTaskError as e:
        raise (e.cause if isinstance(e.cause, CliError) else e) from None
    return RayServeConfig(
        slots=slots,
        replicas=replicas,
        gpus_per_replica=1.0 if use_gpu else 0.0,
        cpus_per_replica=per_replica,
        ingress_cpus=INGRESS_CPUS,
        limits=limits,
        access=access,
    )


def check_replica(args: argparse.Namespace, streams: int | None):
    """Runs where a replica would: the flags, the spec and the build folder checked (nothing loaded) into what
    every replica opens, `ReplicaStreams` (Source + StreamConfig; a build folder's own count when `streams` is
    None)."""
    from ..web.ray_replica import ReplicaStreams

    source, cfg = stream_request(args, streams)
    return ReplicaStreams(source, cfg, streams or cfg.spec.max_streams, args.prompt, args.negative_prompt or "")
