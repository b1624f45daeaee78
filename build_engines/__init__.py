"""`python -m build_engines`: the UNet (feature bank as explicit I/O) and the VAE encoder/decoder, compiled.

Builders: TensorRT / TensorRT-RTX engines from a cleaned ONNX export, or AOTInductor packages (`torch.export`
of the same modules), plus `manifest.json`. Library use (what `python -m streamv2v_trt demo` calls):

    from build_engines import BuildConfig, build
    from streamv2v_trt import EngineSpec

    result = build(BuildConfig(EngineSpec("tiny", height=64, width=64, precision="fp32"), onnx_only=True))
    result.out, result.manifest, result.reused   # engines/tiny-64x64-b1-dyme1-taesd-fp32; True when nothing rebuilt
"""

from .build import Artifact, BuildResult, build, stages
from .config import BuildConfig, Builder, choose_builder

__all__ = ["Artifact", "BuildConfig", "BuildResult", "Builder", "build", "choose_builder", "stages"]
