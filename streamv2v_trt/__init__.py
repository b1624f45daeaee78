"""StreamV2V-TRT: real-time video-to-video translation with fixed-size feature banks.

    stream = open_stream(Source(engines="engines/sd-turbo-512x512-b1-dyme1-taesd-fp16-aoti"), prompt="a cat")
    stream = open_stream(Source(model="sd-turbo", device="cuda"))      # eager PyTorch, same pipeline
    out = stream(frame)                                                  # uint8 HxWx3 in, uint8 HxWx3 out
    multi = open_multistream(Source(model="sd-turbo"), streams=4)       # 4 streams batched per network call

Importing the package loads no model library (diffusers, transformers): they load when a model or a build
folder is opened.
"""

from .config import BankConfig, SimilarFilterConfig, StreamConfig
from .flavours import BackendKind, Builder
from .frames import FrameError
from .multistream import MultiStream
from .opening import open_multistream, open_stream
from .pipeline import StreamV2V
from .source import Source
from .spec import BankKind, CfgType, EngineSpec, LoraSpec, Precision, VaeKind, t_index_list_from_strength
from .stream import Stream

__all__ = [
    "BackendKind",
    "BankConfig",
    "BankKind",
    "Builder",
    "CfgType",
    "EngineSpec",
    "FrameError",
    "LoraSpec",
    "MultiStream",
    "Precision",
    "SimilarFilterConfig",
    "Source",
    "Stream",
    "StreamConfig",
    "StreamV2V",
    "VaeKind",
    "open_multistream",
    "open_stream",
    "t_index_list_from_strength",
]
