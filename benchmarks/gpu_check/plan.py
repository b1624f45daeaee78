"""The steps of the GPU check, what each mode measures (GPU, dry run), and the record of one step."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

STEPS = ("environment", "pytest", "build_main", "fps_main", "build_sd15", "fps_sd15", "soak", "profile", "summary")
CORE = ("build_main", "fps_main", "soak", "profile")  # later steps keep their `need` back from earlier ones

ENGINE_BASES = ("onnxruntime", "tensorrt", "aoti")  # backends that run a build folder (benchmarks.fps)


@dataclass(frozen=True)
class Plan:
    """What one mode measures: the GPU check, or its dry run on the CPU (tiny model, few frames)."""

    mode: str  # "gpu" or "dry-run"
    device: str
    precision: str
    model: str
    size: int
    backends: tuple[str, ...]  # fps_main; tensorrt(+graphs) are added where TensorRT imports and runs
    frames: int
    warmup: int  # enough for torch.compile and one CUDA graph per frame plan (prime, none, store, merge)
    sd15_model: str
    sd15_backends: tuple[str, ...] | None  # None: fps_main's
    sd15_frames: int
    sd15_warmup: int
    soak: int
    soak_frames: int
    profile_warmup: int
    profile_frames: int  # one DyMe interval: one bank update among them
    threads: int | None  # None: fps's default (all cores on a GPU machine)
    engines: Path
    need: dict = field(default_factory=dict)  # step -> seconds it needs to be worth starting
    cap: dict = field(default_factory=dict)  # step -> most seconds it may take


GPU = Plan(
    "gpu", "cuda", "fp16", "sd-turbo", 512, ("eager", "eager+graphs", "compiled+graphs", "aoti+graphs"),
    frames=300, warmup=30, sd15_model="sd15", sd15_backends=None, sd15_frames=100, sd15_warmup=20,
    soak=3000, soak_frames=60, profile_warmup=10, profile_frames=4, threads=None,
    engines=Path("/tmp/gpu_check_engines"),
    need={"environment": 15, "pytest": 30, "build_main": 60, "fps_main": 120, "build_sd15": 120, "fps_sd15": 90,
          "soak": 90, "profile": 60},
    cap={"environment": 90, "pytest": 150, "profile": 240},
)  # fmt: skip
DRY = Plan(
    "dry-run", "cpu", "fp32", "tiny", 64, ("eager", "onnxruntime", "aoti"),
    frames=6, warmup=2, sd15_model="tiny", sd15_backends=("eager", "onnxruntime"), sd15_frames=6, sd15_warmup=2,
    soak=20, soak_frames=6, profile_warmup=2, profile_frames=4, threads=1, engines=Path("engines/gpu_check"),
    need={"environment": 5, "pytest": 10, "build_main": 10, "fps_main": 15, "build_sd15": 10, "fps_sd15": 10,
          "soak": 10, "profile": 10},
    cap={"pytest": 180},
)  # fmt: skip


@dataclass
class Step:
    name: str
    status: str = "pending"  # ok, failed, timed_out, skipped
    seconds: float = 0.0
    reason: str = ""
    commands: list[str] = field(default_factory=list)
    result: dict = field(default_factory=dict)


def base(backend: str) -> str:
    """The backend without its modifiers: "aoti+graphs" -> "aoti"."""
    return backend.partition("+")[0]


def split(text: str) -> list[str]:
    """A comma list (--backends, --skip) as its items."""
    return [b.strip() for b in text.split(",") if b.strip()]
