"""Who may use the server: the Host and Origin policy of the page and its WebSocket (DNS rebinding, other sites)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Access:
    """Who may use the server. Every request's Host must name an allowed host (a page on another site that
    rebinds its DNS name to this machine reaches it under that name), and a WebSocket's or page request's
    Origin, when there is one, must be the page's own (same scheme, host and port as the request) or one of
    `allowed_origins`: otherwise any page the user opens could use the model and take every slot. Clients
    that send no Origin (scripts, not browsers) are allowed."""

    allowed_hosts: frozenset[str] = LOCAL_HOSTS  # names or addresses, without port
    allowed_origins: frozenset[str] = frozenset()  # "scheme://host[:port]", e.g. "https://demo.example.com"

    def __post_init__(self) -> None:
        for origin in self.allowed_origins:
            if split_origin(origin) is None:
                raise ValueError(f"allowed origin {origin!r} is not an origin: give scheme://host[:port], e.g. "
                                 "https://demo.example.com:8443 (http or https, no path)")  # fmt: skip

    def refusal(self, headers: Mapping[str, str], secure: bool) -> str | None:
        """Why a request with these headers is refused, or None when it is allowed."""
        host = headers.get("host", "")
        parsed = split_host(host)
        if parsed is None or parsed[0] not in {h.strip("[]").lower() for h in self.allowed_hosts}:
            return (f"host {host!r} is not served here (allowed: {', '.join(sorted(self.allowed_hosts))}); "
                    "start serve with --allowed-host NAME to serve it")  # fmt: skip
        origin = headers.get("origin")
        if origin is None:
            return None
        scheme = "https" if secure else "http"
        own = (scheme, parsed[0], parsed[1] or DEFAULT_PORTS[scheme])
        key = split_origin(origin)
        if key is not None and (key == own or key in {split_origin(o) for o in self.allowed_origins}):
            return None
        return (f"origin {origin[:200]!r} may not use this server (pages of other sites are refused); start serve "
                "with --allowed-origin URL to allow one")  # fmt: skip


def split_host(host: str) -> tuple[str, int | None] | None:
    """A Host header -> (lowercase name, port): 'Example.com:7860' -> ('example.com', 7860), '[::1]' -> ('::1',
    None); None when it is not a bare host[:port]."""
    try:
        u = urlsplit(f"//{host}")
        port = u.port
    except ValueError:
        return None
    if not u.hostname or u.path or u.query or u.fragment or "@" in u.netloc:
        return None
    return u.hostname, port


def split_origin(origin: str) -> tuple[str, str, int] | None:
    """An origin -> (scheme, lowercase host, port): 'http://LOCALHOST' -> ('http', 'localhost', 80); None when it
    is not an http(s) scheme://host[:port] (the browser's "null" origin included)."""
    try:
        u = urlsplit(origin)
        port = u.port
    except ValueError:
        return None
    if u.scheme not in DEFAULT_PORTS or not u.hostname or u.path not in ("", "/") or u.query or u.fragment:
        return None
    if "@" in u.netloc:
        return None
    return u.scheme, u.hostname, port or DEFAULT_PORTS[u.scheme]
