"""Where a stream's networks come from and how they run: `Source`, and `open_networks`, which opens them.

    Source(engines="engines/sd-turbo-512x512-b1-dyme1-taesd-fp16-aoti", cuda_graphs=True)
    Source(model="sd-turbo", device="cuda", compile=True)

A `Source` is plain, frozen and picklable (the Ray replicas receive one with their `StreamConfig`). Streams are
opened from it by `opening.open_stream` / `open_multistream`, which are `StreamV2V.from_source` /
`MultiStream.from_source` (`open_networks`, then the class); `from_pretrained / from_engines` are spellings.
What each backend can do (files, CUDA graphs, default device) is the table in `flavours.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from .config import StreamConfig
from .flags import flag
from .flavours import CAPTURABLE_BACKENDS, ENGINE_BACKENDS, BackendKind, backend_of
from .spec import EngineSpec, LoraSpec, Precision

if TYPE_CHECKING:
    from .backends import Backend
    from .prompt import PromptEncoder

DEFAULT_MODEL = "tiny"  # the test model: runs anywhere, random weights


@dataclass(frozen=True)
class Source:
    """Where a stream's networks come from and how they run; `StreamConfig` says what they run.

    model: eager only, a preset, local diffusers folder or hub id (None: the config's model, else `tiny`).
    engines: a build folder (python -m build_engines) instead of a model. Only folders you built: engines and
      packages are native code that runs when loaded (docs/RUNTIME.md).
    backend: eager for a model; for a folder onnxruntime, tensorrt or aoti (None: what it was built for).
    device: "cpu", "cuda", "cuda:1", ... (None: the backend's default, flavours.BACKENDS; eager: cuda if present).
    threads: CPU intra-op threads of torch (set process-wide when the stream opens) and ONNX Runtime (None: leave
      torch's, ONNX Runtime's default).
    compile: eager, torch.compile the UNet and VAE forwards (the first frames compile: a minute or more).
    channels_last: eager, NHWC convolution layout (None: on for CUDA).
    cuda_graphs: replay whole frames (`CudaGraphStream`) or MultiStream phases from CUDA graphs (a GPU, and a
      backend whose calls can be captured).
    loras: LoRA files and scales (None: the config's). A model fuses them; a folder needs the very files it was
      built with (their text-encoder layers run in PyTorch).
    verify_hashes: a folder, hash its files and the weights against its manifest (False: faster opens).
    """

    model: str | None = None
    engines: Path | None = field(
        default=None, metadata=flag("a build folder (python -m build_engines)", metavar="DIR", parse=Path)
    )
    backend: BackendKind | None = field(
        default=None,
        metadata=flag(
            f"eager runs the PyTorch weights; a build folder runs on {', '.join(ENGINE_BACKENDS)} (its ONNX, TensorRT "
            "engines or AOTInductor packages)",
            choices=tuple(k.value for k in BackendKind),
            default_text="eager, or what the build folder was built for (onnxruntime on a CPU)",
        ),
    )
    device: str | None = field(default=None, metadata=flag("cpu, cuda, cuda:1, ... or auto (cuda if available)"))
    threads: int | None = field(
        default=None,
        metadata=flag(
            "CPU intra-op threads of torch and ONNX Runtime alike",
            parse=int,
            default_text="1 when the stream runs on "
            "the CPU (two thread pools on a small CPU stall each other), torch's on a GPU",
        ),
    )
    compile: bool = field(default=False, metadata=flag("eager: torch.compile the UNet and VAE (slow first frames)"))
    channels_last: bool | None = None
    cuda_graphs: bool = field(
        default=False,
        metadata=flag(
            f"replay whole frames from CUDA graphs (a GPU; the {', '.join(CAPTURABLE_BACKENDS)} backends; no "
            "similar-frame filter)"
        ),
    )
    loras: tuple[LoraSpec, ...] | None = None
    verify_hashes: bool = True

    def __post_init__(self) -> None:
        if self.engines is not None:
            object.__setattr__(self, "engines", Path(self.engines))
        if self.backend is not None:
            object.__setattr__(self, "backend", backend_of(self.backend))
        if self.device is not None:
            object.__setattr__(self, "device", str(torch.device(self.device)))  # "cuda:0", "cpu"; refuses "gpu"
        if self.loras is not None:
            object.__setattr__(self, "loras", tuple(self.loras))
        if self.model is not None and self.engines is not None:
            raise ValueError("a Source is a model (eager) or a build folder (engines), not both")
        folder = self.engines is not None
        if folder and self.backend is BackendKind.EAGER:
            raise ValueError("the eager backend runs the PyTorch weights, not a build folder: drop engines, or pick "
                             "onnxruntime, tensorrt or aoti")  # fmt: skip
        if not folder and self.backend not in (None, BackendKind.EAGER):
            model = self.model or DEFAULT_MODEL
            raise ValueError(f"the {self.backend} backend runs a build folder: give Source(engines=DIR) (python -m "
                             f"build_engines --model {model} builds one), or use the eager backend")  # fmt: skip
        if folder and self.compile:
            raise ValueError("compile applies to the eager backend: a build folder runs compiled networks already")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    @property
    def kind(self) -> BackendKind | None:
        """The backend, when known before a folder's manifest is read."""
        return BackendKind.EAGER if self.engines is None else self.backend

    def resolved_device(self) -> torch.device | None:
        """The device the streams run on, when it does not depend on a build folder's manifest."""
        if self.device is not None:
            return torch.device(self.device)
        if self.engines is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        default = self.backend.info.device if self.backend is not None else None
        return None if default is None else torch.device(default)


def pretrained(model: str | EngineSpec | StreamConfig, **source) -> tuple[Source, StreamConfig | None]:
    """The `from_pretrained` spelling: `model` is a name (the Source's) or a spec / config to run (the config)."""
    if isinstance(model, str):
        return Source(model=model, **source), None
    return Source(**source), model if isinstance(model, StreamConfig) else StreamConfig(spec=model)


class Networks(NamedTuple):
    """What a `StreamV2V` or a `MultiStream` is made of: `StreamV2V(*networks)`."""

    backend: Backend
    prompt_encoder: PromptEncoder
    scheduler: object  # the model's LCMScheduler
    cfg: StreamConfig


def open_networks(source: Source, cfg: StreamConfig | None, runtime: dict | None = None) -> Networks:
    """The networks of `source` for `cfg` (default: the model preset's spec, or the folder's own, with the
    `runtime` settings). Checks what it can (CUDA graphs, device) before anything loads."""
    if cfg is not None and runtime:
        raise TypeError(f"pass runtime settings {sorted(runtime)} inside cfg, or drop cfg")
    device = source.resolved_device()
    if source.cuda_graphs:
        if device is not None and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA GPU, the streams run on {device}")
        if source.kind is not None and not source.kind.info.capturable:
            raise ValueError(f"the {source.kind} backend cannot be captured into a CUDA graph (its calls synchronise)")
    if source.threads is not None:
        torch.set_num_threads(source.threads)
    if source.engines is None:
        from .backends.eager import open_eager

        cfg = _eager_config(source, cfg, device, runtime or {})
        return Networks(*open_eager(cfg, device, compile=source.compile, channels_last=source.channels_last))
    from .build_folder import open_build_folder

    opened = open_build_folder(
        source.engines, source.backend, cfg, device=source.device, loras=source.loras,
        verify_hashes=source.verify_hashes, threads=source.threads, runtime=runtime,
    )  # fmt: skip
    return Networks(opened.backend, opened.prompt_encoder, opened.scheduler, opened.cfg)


def _eager_config(source: Source, cfg: StreamConfig | None, device: torch.device, runtime: dict) -> StreamConfig:
    """The eager stream's config: `cfg`, or the model preset's spec (fp16 on a GPU, fp32 on the CPU), with the
    source's LoRAs."""
    if cfg is None:
        precision = Precision.FP16 if device.type == "cuda" else Precision.FP32
        spec = EngineSpec.resolve(source.model or DEFAULT_MODEL, precision=precision)
        cfg = StreamConfig.from_spec(spec, **runtime)
    elif source.model is not None and source.model != cfg.spec.model:
        raise ValueError(f"Source(model={source.model!r}) but the config runs {cfg.spec.model!r}: give one of them")
    return cfg if source.loras is None else cfg.with_spec(loras=source.loras)
