"""`manifest.json` beside the engines: what was built, from what, and the check that refuses a mismatch.

The build (`python -m build_engines`) writes it; the runtime reads it, binds tensors by the names, shapes and
dtypes it lists (never by position), and calls `load_checked(dir, request)` first, which raises `EngineMismatch`
naming every difference and the exact command that rebuilds what was asked for.

Layout of a build folder (file names are in the manifest, these are the defaults):

    manifest.json
    unet.onnx         [unet.onnx.data when the weights exceed 2 GB]   unet.engine
    vae_encoder.onnx  vae_encoder.engine
    vae_decoder.onnx  vae_decoder.engine
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import BankKind, CfgType, StreamConfig
from ..models.lora import LoraSpec, lora_mismatch

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
NETWORKS = ("unet", "vae_encoder", "vae_decoder")
# VAE engine I/O: images [1, 3, H, W] in [-1, 1] <-> latents [1, 4, H/8, W/8] scaled for the UNet.
VAE_IO = {"vae_encoder": (("images",), ("latents",)), "vae_decoder": (("latents",), ("images",))}
PRECISIONS = ("fp16", "fp32")
_TORCH_DTYPES = {
    "float16": torch.float16,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}


class EngineMismatch(RuntimeError):
    """Engines on disk do not match what the runtime is asked to run (or are missing, corrupt, altered)."""


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class TensorEntry:
    """One engine I/O tensor. role: "input", "bank" (inputs); "output", "current" (outputs)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "float16", "float32", "int64", ...
    role: str
    layer: str | None = None  # qualified attn1 module name for bank/current tensors

    @property
    def is_input(self) -> bool:
        return self.role in ("input", "bank")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.dtype]

    @classmethod
    def from_json(cls, d: dict) -> TensorEntry:
        return cls(d["name"], tuple(int(s) for s in d["shape"]), d["dtype"], d["role"], d.get("layer"))


@dataclass(frozen=True)
class NetworkEntry:
    """One network's files (names relative to the manifest's folder, with sha256) and its I/O tensors."""

    onnx: str
    onnx_sha256: str
    tensors: tuple[TensorEntry, ...]
    onnx_data: str | None = None  # external weights file, present when the ONNX weights exceed 2 GB
    onnx_data_sha256: str | None = None
    engine: str | None = None  # None for an --onnx-only build
    engine_sha256: str | None = None

    def inputs(self) -> list[TensorEntry]:
        return [t for t in self.tensors if t.is_input]

    def outputs(self) -> list[TensorEntry]:
        return [t for t in self.tensors if not t.is_input]

    def tensor(self, name: str) -> TensorEntry:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"no tensor {name!r} in this network; it has {[t.name for t in self.tensors]}")

    def files(self, with_engine: bool) -> list[tuple[str, str | None]]:
        """(file name, sha256) pairs that must be present and intact."""
        out = [(self.onnx, self.onnx_sha256)]
        if self.onnx_data:
            out.append((self.onnx_data, self.onnx_data_sha256))
        if with_engine and self.engine:
            out.append((self.engine, self.engine_sha256))
        return out

    @classmethod
    def from_json(cls, d: dict) -> NetworkEntry:
        tensors = tuple(TensorEntry.from_json(t) for t in d["tensors"])
        return cls(**{**d, "tensors": tensors})


@dataclass(frozen=True)
class EngineRequest:
    """What the runtime (or a build) asks for; `Manifest.check` compares a manifest against it.

    Only what changes the engines is compared: the UNet batch (steps, + 1 for RCFG initialize, x 2 for full CFG)
    is; the bank `interval` and the t_index_list values are runtime inputs, recorded but never refused.
    weights_hash None skips the weights check; need "onnx" accepts an --onnx-only build.
    """

    model: str
    height: int
    width: int
    t_index_list: tuple[int, ...]
    bank_kind: BankKind
    bank_frames: int = 1
    vae: str = "taesd"
    precision: str = "fp16"
    ff_threshold: float = 0.98
    ff_strength: float = 0.8
    weights_hash: str | None = None
    need: str = "engine"
    builder: str | None = None  # "tensorrt" / "tensorrt-rtx"; None accepts either
    loras: tuple[LoraSpec, ...] = ()  # fused into the UNet before export; compared by file contents and scale
    cfg_type: CfgType = CfgType.NONE  # guidance: decides the UNet batch together with the step count

    def __post_init__(self) -> None:
        object.__setattr__(self, "bank_kind", BankKind(self.bank_kind))
        object.__setattr__(self, "cfg_type", CfgType(self.cfg_type))
        object.__setattr__(self, "loras", tuple(self.loras))
        object.__setattr__(self, "t_index_list", tuple(int(t) for t in self.t_index_list))
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.need not in ("engine", "onnx"):
            raise ValueError(f"need must be 'engine' or 'onnx', got {self.need!r}")

    @property
    def steps(self) -> int:
        return len(self.t_index_list)

    @property
    def unet_batch(self) -> int:
        return self.cfg_type.unet_batch(self.steps)

    @classmethod
    def from_stream(
        cls,
        model: str,
        cfg: StreamConfig,
        *,
        vae: str = "taesd",
        precision: str = "fp16",
        weights_hash: str | None = None,
        need: str = "engine",
        builder: str | None = None,
        loras: tuple[LoraSpec, ...] = (),
    ) -> EngineRequest:
        b = cfg.bank
        return cls(
            model, cfg.height, cfg.width, cfg.t_index_list, b.kind, b.frames, str(getattr(vae, "value", vae)),
            precision, b.ff_threshold, b.ff_strength, weights_hash, need, builder, tuple(loras), cfg.cfg_type,
        )  # fmt: skip

    def command(self, out: Path | str) -> str:
        """The exact `python -m build_engines` command that builds this request into `out`."""
        args = ["python", "-m", "build_engines", "--model", self.model, "--height", str(self.height)]
        args += ["--width", str(self.width), "--t-index-list", ",".join(map(str, self.t_index_list))]
        if self.cfg_type is not CfgType.NONE:
            args += ["--cfg-type", self.cfg_type.value]
        args += ["--bank", self.bank_kind.value]
        if self.bank_kind is BankKind.FIFO:
            args += ["--bank-frames", str(self.bank_frames)]
        args += ["--vae", self.vae, "--precision", self.precision]
        if self.ff_threshold != 0.98:
            args += ["--ff-threshold", repr(self.ff_threshold)]
        if self.ff_strength != 0.8:
            args += ["--ff-strength", repr(self.ff_strength)]
        if self.builder:
            args += ["--builder", self.builder]
        for spec in self.loras:
            args += ["--lora", spec.cli_arg()]
        if self.need == "onnx":
            args.append("--onnx-only")
        args += ["--out", str(out)]
        return shlex.join(args)


@dataclass(frozen=True)
class Manifest:
    """Everything `build_engines` produced, and from what. Saved as JSON beside the files it lists."""

    model: str
    weights_hash: str
    random_weights: bool
    height: int
    width: int
    t_index_list: tuple[int, ...]
    bank_kind: str
    bank_frames: int
    interval: int
    ff_layers: tuple[str, ...]  # qualified attn1 names with feature fusion
    ff_threshold: float
    ff_strength: float
    vae: str
    precision: str
    builder: str | None  # "tensorrt" / "tensorrt-rtx"; None for an --onnx-only build
    builder_version: str | None
    exporter: str  # e.g. "torch 2.13.0 dynamo, opset 18"
    created: str  # ISO 8601 UTC
    build_command: str
    networks: dict[str, NetworkEntry]
    timings_s: dict[str, float] = field(default_factory=dict)  # informational, never compared
    # models.lora.lora_record(loras): fingerprint + per-file name/sha256/scale; absent in older manifests = none
    loras: dict = field(default_factory=lambda: {"fingerprint": "none", "files": []})
    cfg_type: str = "none"  # guidance the UNet batch was sized for (none and self share a batch)
    format_version: int = FORMAT_VERSION

    @property
    def steps(self) -> int:
        return len(self.t_index_list)

    @property
    def unet_batch(self) -> int:
        """Batch of every UNet tensor (and of the bank): steps, + 1 for RCFG initialize, x 2 for full CFG."""
        return CfgType(self.cfg_type).unet_batch(self.steps)

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // 8, self.width // 8

    def network(self, name: str) -> NetworkEntry:
        if name not in self.networks:
            raise KeyError(f"manifest has no network {name!r}; it has {sorted(self.networks)}")
        return self.networks[name]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Manifest:
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {d.get('format_version')!r}, this runtime reads {FORMAT_VERSION}")
        networks = {k: NetworkEntry.from_json(v) for k, v in d["networks"].items()}
        tuples = {k: tuple(d[k]) for k in ("t_index_list", "ff_layers")}
        return cls(**{**d, **tuples, "networks": networks})

    def save(self, directory: Path | str) -> Path:
        """Write `manifest.json` (atomically: a crash mid-write never leaves a half manifest)."""
        path = Path(directory) / MANIFEST_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        tmp.replace(path)
        return path

    def differences(self, req: EngineRequest) -> list[str]:
        """Human-readable differences between this manifest and `req` (configuration only, no files)."""
        pairs = [
            ("model", self.model, req.model),
            ("height", self.height, req.height),
            ("width", self.width, req.width),
            ("bank", f"{self.bank_kind} x{self.bank_frames}", f"{req.bank_kind.value} x{req.bank_frames}"),
            ("vae", self.vae, req.vae),
            ("precision", self.precision, req.precision),
            ("ff threshold", self.ff_threshold, req.ff_threshold),
            ("ff strength", self.ff_strength, req.ff_strength),
        ]
        if req.weights_hash is not None:
            pairs.append(("weights hash", self.weights_hash, req.weights_hash))
        diffs = [f"{what}: engines have {have}, asked {want}" for what, have, want in pairs if have != want]
        if self.unet_batch != req.unet_batch:  # none and self share a batch, so compare the number, not the name
            diffs.insert(
                3,
                f"UNet batch: engines have {self.unet_batch} ({self.steps} step(s), guidance {self.cfg_type}), "
                f"asked {req.unet_batch} ({req.steps} step(s), guidance {req.cfg_type.value})",
            )
        lora_diff = lora_mismatch(self.loras, req.loras)  # hashes the LoRA files (small next to engines)
        if lora_diff:
            diffs.append(f"loras: {lora_diff}")
        if req.need == "engine" and self.builder is None:
            diffs.append("engines: this is an --onnx-only build, asked TensorRT engines")
        elif req.need == "engine" and req.builder and self.builder != req.builder:
            diffs.append(f"builder: engines built by {self.builder}, asked {req.builder}")
        missing = [n for n in NETWORKS if n not in self.networks]
        if missing:
            diffs.append(f"networks missing from the manifest: {', '.join(missing)}")
        return diffs

    def file_problems(self, directory: Path | str, *, with_engine: bool, verify_hashes: bool = True) -> list[str]:
        """Listed files that are missing or whose sha256 differs from the manifest's."""
        directory = Path(directory)
        problems = []
        for name, net in self.networks.items():
            if with_engine and not net.engine:
                problems.append(f"{name}: the manifest lists no engine file")
            for file, digest in net.files(with_engine):
                path = directory / file
                if not path.is_file():
                    problems.append(f"{name}: file {path} is missing")
                elif verify_hashes and sha256_file(path) != digest:
                    problems.append(f"{name}: file {path} was altered or truncated (sha256 differs from the manifest)")
        return problems

    def check(self, req: EngineRequest, directory: Path | str, *, verify_hashes: bool = True) -> None:
        """Raise `EngineMismatch` listing every difference from `req` and every missing/altered file."""
        problems = self.differences(req)
        if not problems:  # files only matter once the configuration matches
            problems = self.file_problems(directory, with_engine=req.need == "engine", verify_hashes=verify_hashes)
        if problems:
            raise EngineMismatch(_message(directory, problems, req))


def _message(directory: Path | str, problems: list[str], req: EngineRequest | None) -> str:
    rebuild = req.command(directory) if req else f"python -m build_engines --model ... --out {directory}"
    return f"engines in {directory} do not match: " + "; ".join(problems) + f". Rebuild: {rebuild}"


def load_manifest(directory: Path | str, req: EngineRequest | None = None) -> Manifest:
    """Read `directory/manifest.json`. A missing, unreadable or malformed manifest raises `EngineMismatch`
    (with the rebuild command for `req` when given). This does not compare anything: see `load_checked`."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise EngineMismatch(_message(directory, [f"no {MANIFEST_FILE} (not built, or not a build folder)"], req))
    try:
        return Manifest.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        problem = f"{path} is corrupt or unreadable ({type(e).__name__}: {e})"
        raise EngineMismatch(_message(directory, [problem], req)) from e


def load_checked(directory: Path | str, req: EngineRequest, *, verify_hashes: bool = True) -> Manifest:
    """Load the manifest in `directory` and check it against `req`: what the runtime calls before binding.

    verify_hashes=False skips hashing the files (seconds for GB-sized engines) but still requires them present.
    """
    manifest = load_manifest(directory, req)
    manifest.check(req, directory, verify_hashes=verify_hashes)
    return manifest
