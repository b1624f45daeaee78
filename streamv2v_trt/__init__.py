"""StreamV2V-TRT: real-time video-to-video translation with fixed-size feature banks."""

from .config import BankConfig, BankKind, CfgType, SimilarFilterConfig, StreamConfig, t_index_list_from_strength
from .frames import FrameError
from .pipeline import StreamV2V

__all__ = [
    "BankConfig",
    "BankKind",
    "CfgType",
    "SimilarFilterConfig",
    "StreamConfig",
    "StreamV2V",
    "FrameError",
    "t_index_list_from_strength",
]
