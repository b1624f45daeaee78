"""`serve --ray`: the live demo as a Ray Serve application, its streams on N replica processes (one GPU each).

    browser --ws--> Serve HTTP proxy --> ingress: create_app(RayHub) --Serve handle calls--> streams-0 .. streams-{N-1}
                    (--host, --port)     (page, WebSocket protocol,      (one frame a call)   StreamReplica: K slots,
                                          JPEG decode and encode)                             the model (ray_replica.py)

The page and protocol are `create_app`'s (app.py), unchanged: it serves from a `Hub`, and `RayHub` is one whose
slots live in other processes. A session's stream (its bank) lives in one replica's memory, so a session is
pinned to one replica for its life: each stream replica is its own Serve deployment of one replica
(`streams-i`), and the hub calls the deployment it chose. (One deployment of N replicas would load-balance
every call over them; Serve's model multiplexing and session-hash routing are preferences that move a session
when a replica is busy or restarts.) A new session goes to the replica with the fewest sessions that answers;
when every slot of every replica is taken, `open` returns None and the app says busy (close 1013).

Faults: the hub asks Ray every second whether each replica process that holds sessions is alive (and renews its
lease there, ray_replica.py). When one has died (or a call to it fails because it died), its sessions are lost:
their frames are answered `SlotLost`, on which the app closes their WebSockets (an error message, then close
1011: the page shows why, a reload reconnects); other replicas' sessions go on. Serve starts the replica again;
the hub routes new sessions to it once it answers. Until some replica answers (at start, while the models load)
a new connection is told the server is starting (close 1013), not busy.

Frames cross to the replicas as the uint8 arrays the app decoded, not JPEG (measured in docs/SCALING.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from ray import serve

from ..client_limits import Limits
from .access import Access
from .app import MAX_IN_WORK, create_app
from .ray_hub import RayHub
from .ray_replica import LEASE_S, ReplicaStreams, StreamReplica

APP_NAME = "streamv2v"
BURST = 32  # connections the ingress takes beyond the slots (page loads, busy answers) before Serve refuses more


@dataclass(frozen=True)
class RayServeConfig:
    """Everything `build_application` needs; plain and picklable (Ray ships it to the replicas)."""

    slots: ReplicaStreams  # what each stream replica opens in its process: Source + StreamConfig, K slots
    replicas: int = 1  # N
    gpus_per_replica: float = 0.0  # 1: a GPU each; 0: CPU replicas
    cpus_per_replica: float = 1.0
    ingress_cpus: float = 1.0
    limits: Limits = Limits()
    access: Access = Access()
    health_check_period_s: float = 2.0  # how soon Serve notices a dead replica and starts another
    lease_s: float = LEASE_S


def build_application(config: RayServeConfig) -> serve.Application:
    """The ingress and N stream deployments, ready for `serve.run(app, name=APP_NAME, route_prefix="/")`."""
    K, names = config.slots.streams, [f"streams-{i}" for i in range(config.replicas)]
    stream = serve.deployment(
        StreamReplica,
        num_replicas=1,  # one per deployment: the hub picks the deployment, so it picks the replica
        max_ongoing_requests=K * (MAX_IN_WORK + 1) + 8,  # every session's frames in work, a text message, control
        max_queued_requests=K * (MAX_IN_WORK + 1) + 8,  # bounded while a restarting replica takes nothing
        health_check_period_s=config.health_check_period_s,
        graceful_shutdown_timeout_s=5,
        max_constructor_retry_count=3,  # a replica that cannot load fails the deploy, not 20 loads later
        logging_config={"enable_access_log": False},  # a line per frame otherwise
        ray_actor_options={"num_cpus": config.cpus_per_replica, "num_gpus": config.gpus_per_replica},
    )
    replicas = [stream.options(name=name).bind(config.slots, config.lease_s) for name in names]
    limits, access = config.limits, config.access

    def asgi_app():  # runs in the ingress replica's process; the app stops the hub when Serve stops the ingress
        hub = RayHub([serve.get_deployment_handle(name, APP_NAME) for name in names])
        return create_app(hub, limits, access, on_shutdown=hub.stop)

    ingress = serve.deployment(
        serve.ingress(asgi_app)(),
        name="ingress",
        num_replicas=1,  # it holds the sessions' routing (which replica has which session)
        max_ongoing_requests=config.replicas * K + BURST,  # a WebSocket is one request for its whole life
        max_queued_requests=BURST,  # beyond that Serve answers 503 at once instead of queueing connections
        graceful_shutdown_timeout_s=5,
        ray_actor_options={"num_cpus": config.ingress_cpus},
    )
    return ingress.bind(*replicas)  # binding them makes them part of the application
