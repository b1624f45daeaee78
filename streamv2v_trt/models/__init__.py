from .loader import Models, VaeKind, load_models
from .presets import PRESETS, ModelPreset

__all__ = ["Models", "VaeKind", "load_models", "PRESETS", "ModelPreset"]
