"""The live camera demo (FastAPI app + single page)."""

from .app import Limits, create_app

__all__ = ["Limits", "create_app"]
