"""StreamV2V-TRT: real-time video-to-video translation with fixed-size feature banks.

    stream = StreamV2V.from_engines("engines/sd-turbo-512x512-b1-dyme1-taesd-fp16-aoti", backend="aoti")
    stream = StreamV2V.from_pretrained("sd-turbo", device="cuda")       # eager PyTorch, same pipeline
    out = stream(frame)                                                  # uint8 HxWx3 in, uint8 HxWx3 out

Importing the package loads no model library (diffusers, transformers): they load when a model or a build
folder is opened.
"""

from .config import BankConfig, SimilarFilterConfig, StreamConfig
from .frames import FrameError
from .pipeline import StreamV2V
from .spec import BankKind, CfgType, EngineSpec, LoraSpec, Precision, VaeKind, t_index_list_from_strength
from .stream import Stream

__all__ = [
    "BankConfig",
    "BankKind",
    "CfgType",
    "EngineSpec",
    "FrameError",
    "LoraSpec",
    "Precision",
    "SimilarFilterConfig",
    "Stream",
    "StreamConfig",
    "StreamV2V",
    "VaeKind",
    "t_index_list_from_strength",
]
