"""The live camera demo (FastAPI app + single page): `create_app(hub, limits, access)`; `serve --ray` in ray_*.py."""

from ..client_limits import Limits
from .access import LOCAL_HOSTS, Access
from .app import create_app

__all__ = ["LOCAL_HOSTS", "Access", "Limits", "create_app"]
