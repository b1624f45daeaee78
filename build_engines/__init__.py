"""`python -m build_engines`: ONNX export with the bank as explicit I/O, graph cleanup, TensorRT / TensorRT-RTX
engines and `manifest.json`.

Library use (what `python -m streamv2v_trt demo` calls):

    from build_engines import BuildConfig, build
    result = build(BuildConfig(out=Path("engines/tiny"), model="tiny", height=64, width=64, builder="tensorrt-rtx"))
    result.manifest  # streamv2v_trt.engine.Manifest; result.reused is True when nothing was rebuilt

    # or exactly what a stream config needs (size, UNet batch from steps and guidance, bank):
    build(BuildConfig.from_stream("tiny", stream_cfg, "engines/tiny", precision="fp32", onnx_only=True))
"""

from .build import Artifact, BuildResult, build, stages
from .config import BuildConfig, Builder, Precision

__all__ = ["Artifact", "BuildConfig", "BuildResult", "Builder", "Precision", "build", "stages"]
