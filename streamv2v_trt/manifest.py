"""`manifest.json` beside the compiled networks: the spec they were built for, from what, and every file.

The build (`python -m build_engines`) writes it; the runtime reads it (`build_folder.py`) and refuses a folder
whose spec, weights, target device, files or tensors differ from what it is asked to run, with
`EngineMismatch` naming every difference and the exact command that rebuilds it.

Layout of a build folder (file names are in the manifest, these are the defaults):

    manifest.json
    unet.onnx         [unet.onnx.data when the weights exceed 2 GB]   unet.engine      (TensorRT builds)
    vae_encoder.onnx  vae_encoder.engine
    vae_decoder.onnx  vae_decoder.engine
    unet.pt2  vae_encoder.pt2  vae_decoder.pt2                                          (AOTInductor builds)
    controlnet_0.onnx  controlnet_0.engine | controlnet_0.pt2  ...      (one network per ControlNet of the spec)

A build for several frame sizes (`EngineSpec.sizes`) holds every size's networks, each file named with its size
(`network_file`): unet-512x512.onnx, unet-768x512.onnx, unet-768x512.engine, ... The manifest lists the spec's
own size (height x width) under `networks` and the others under `size_networks`, by size (WIDTHxHEIGHT).
A build with dynamic shapes (`shapes: "dynamic"`, `build_engines --shapes dynamic`) has one file per network for
every size (unet.onnx with symbolic height and width, unet.engine with one optimisation profile): each size's
entry names the same files, with that size's tensor shapes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from .frame_sizes import size_text
from .layout import TensorSpec, network_names
from .spec import EngineSpec

FORMAT_VERSION = 2
MANIFEST_FILE = "manifest.json"
# The file kinds a network can have: ONNX (+ external weights), a TensorRT engine, an AOTInductor package.
FILE_KINDS = ("onnx", "onnx_data", "engine", "package")


def network_file(spec: EngineSpec, network: str, size: tuple[int, int], suffix: str, dynamic: bool = False) -> str:
    """The one naming rule of a network's file: `unet.onnx` in a single-size build and in a build with dynamic
    shapes (one file serves every size); `unet-768x512.onnx` for every size of a static multi-size build (so no
    size's file depends on which size a stream starts at)."""
    return f"{network}-{size_text(size)}{suffix}" if spec.sizes and not dynamic else f"{network}{suffix}"


class EngineMismatch(RuntimeError):
    """A build folder does not match what the runtime is asked to run (or is missing, corrupt, altered)."""


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    name: str  # relative to the manifest's folder
    sha256: str

    @classmethod
    def of(cls, path: Path) -> FileEntry:
        return cls(path.name, sha256_file(path))


@dataclass(frozen=True)
class NetworkEntry:
    """One network's I/O tensors (names, shapes, dtypes as the export produced them) and its files by kind."""

    tensors: tuple[TensorSpec, ...]
    files: dict[str, FileEntry] = field(default_factory=dict)

    def inputs(self) -> list[TensorSpec]:
        return [t for t in self.tensors if t.is_input]

    def outputs(self) -> list[TensorSpec]:
        return [t for t in self.tensors if not t.is_input]

    def to_json(self) -> dict:
        tensors = [{**vars(t), "shape": list(t.shape)} for t in self.tensors]
        return {"tensors": tensors, "files": {k: vars(f) for k, f in self.files.items()}}

    @classmethod
    def from_json(cls, d: dict) -> NetworkEntry:
        tensors = tuple(TensorSpec(**{**t, "shape": tuple(int(s) for s in t["shape"])}) for t in d["tensors"])
        unknown = set(d["files"]) - set(FILE_KINDS)
        if unknown:
            raise ValueError(f"unknown file kinds {sorted(unknown)}")
        return cls(tensors, {k: FileEntry(**f) for k, f in d["files"].items()})


@dataclass(frozen=True)
class ControlNetRecord:
    """One ControlNet of a build (`EngineSpec.controlnets`, in order; its network is `controlnet_<j>`)."""

    name: str  # as the spec names it: a preset, a folder or a hub id
    architecture: str  # the config that makes its residuals fit the UNet, in words
    weights_hash: str  # `models.controlnets.ControlNetWeights.hash`


@dataclass(frozen=True)
class Manifest:
    """Everything `build_engines` produced, and from what. Saved as JSON beside the files it lists."""

    spec: EngineSpec
    weights_hash: str
    random_weights: bool
    ff_layers: tuple[str, ...]  # qualified attn1 names with feature fusion
    builder: str | None  # a `flavours.BUILDERS` value; None for an --onnx-only build
    builder_version: str | None  # TensorRT's version, or torch's for AOTInductor
    # What the compiled files only run on: {"device": "cuda" | "cpu", "capability": "9.0", "torch": "2.11.0"}
    # for AOTInductor packages (compiled for one device, capability and torch); {} for ONNX / TensorRT builds.
    target: dict
    build_options: dict  # the builder's options (inductor settings, TensorRT workspace): informational
    exporter: str  # e.g. "torch 2.13.0 dynamo, opset 18"
    created: str  # ISO 8601 UTC
    build_command: str
    networks: dict[str, NetworkEntry]
    timings_s: dict[str, float] = field(default_factory=dict)  # informational, never compared
    # "swappable": the UNet's weights can be replaced at runtime (AOTInductor without freezing): the spec names no
    # LoRA, any LoRA set is applied when the folder is opened and by `set_loras`. "frozen": compiled into the
    # files; the spec names the LoRAs fused in, and another set is a rebuild. Older manifests: frozen.
    weights: str = "frozen"
    # A multi-size build: the networks of every size other than the spec's own (height x width), by size text
    # ("768x512"). Older manifests and single-size builds: {}.
    size_networks: dict[str, dict[str, NetworkEntry]] = field(default_factory=dict)
    # The ControlNets compiled beside the UNet (networks controlnet_0, ...), in the spec's order. Older manifests
    # and builds without ControlNets: ().
    controlnets: tuple[ControlNetRecord, ...] = ()
    # "dynamic": one file per network serves every size (symbolic height and width in the ONNX; a TensorRT engine
    # with one optimisation profile spanning the sizes, weights held once). "static": a file per size. Older: static.
    shapes: str = "static"
    format_version: int = FORMAT_VERSION

    def network(self, name: str, size: tuple[int, int] | None = None) -> NetworkEntry:
        """Network `name` at `size` (height, width; default: the spec's own)."""
        networks = self.networks_at(*size) if size else self.networks
        if name not in networks:
            raise KeyError(f"manifest has no network {name!r}; it has {sorted(networks)}")
        return networks[name]

    def networks_at(self, height: int, width: int) -> dict[str, NetworkEntry]:
        """The networks of one built size (KeyError for a size the manifest does not list)."""
        if (height, width) == (self.spec.height, self.spec.width):
            return self.networks
        text = size_text((height, width))
        if text not in self.size_networks:
            raise KeyError(f"manifest has no networks for {text}; it has {', '.join(self._size_texts())}")
        return self.size_networks[text]

    def sized_networks(self) -> dict[tuple[int, int], dict[str, NetworkEntry]]:
        """Every served size's networks, in the spec's size order (what files and tensors are checked over)."""
        return {size: self.networks_at(*size) for size in self.spec.served_sizes if self._lists(size)}

    def _lists(self, size: tuple[int, int]) -> bool:
        return size == (self.spec.height, self.spec.width) or size_text(size) in self.size_networks

    def _size_texts(self) -> list[str]:
        return [size_text((self.spec.height, self.spec.width)), *self.size_networks]

    def has(self, kind: str) -> bool:
        """Whether every network of every size has a file of `kind` ("onnx", "engine", "package")."""
        sized = self.sized_networks()
        return len(sized) == len(self.spec.served_sizes) and all(
            kind in networks.get(n, NetworkEntry(())).files
            for networks in sized.values()
            for n in network_names(self.spec)
        )

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["spec"] = self.spec.to_json()
        d["ff_layers"] = list(self.ff_layers)
        d["controlnets"] = [vars(c) for c in self.controlnets]
        d["networks"] = {name: net.to_json() for name, net in self.networks.items()}
        d["size_networks"] = {
            size: {name: net.to_json() for name, net in nets.items()} for size, nets in self.size_networks.items()
        }
        return d

    @classmethod
    def from_json(cls, d: dict) -> Manifest:
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"format_version {d.get('format_version')!r}, this runtime reads {FORMAT_VERSION} (the folder was "
                "written by another version of build_engines)"
            )
        networks = {k: NetworkEntry.from_json(v) for k, v in d["networks"].items()}
        sized = {
            size: {k: NetworkEntry.from_json(v) for k, v in nets.items()}
            for size, nets in d.get("size_networks", {}).items()
        }
        spec = EngineSpec.from_json(d["spec"])
        controlnets = tuple(ControlNetRecord(**c) for c in d.get("controlnets", ()))
        fields = {"spec": spec, "ff_layers": tuple(d["ff_layers"]), "networks": networks, "size_networks": sized}
        fields["controlnets"] = controlnets
        return cls(**{**d, **fields})

    def save(self, directory: Path | str) -> Path:
        """Write `manifest.json` (atomically: a crash mid-write never leaves a half manifest)."""
        path = Path(directory) / MANIFEST_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        tmp.replace(path)
        return path

    @property
    def swappable(self) -> bool:
        return self.weights == "swappable"

    @property
    def dynamic(self) -> bool:
        return self.shapes == "dynamic"

    def differences(
        self,
        asked: EngineSpec,
        weights_hash: str | None = None,
        controlnets: tuple[ControlNetRecord, ...] | None = None,
    ) -> list[str]:
        """Every difference between what was built and `asked` (spec field by field, then the weights; with
        `controlnets`, the asked ControlNets' records, by weights hash). The LoRAs of a swappable build are runtime
        state, not compared."""
        diffs = self.spec.differences(replace(asked, loras=self.spec.loras) if self.swappable else asked)
        if self.random_weights and self.spec.weights_seed != asked.weights_seed:  # also without hashing
            diffs.append(f"weights_seed: engines have {self.spec.weights_seed}, asked {asked.weights_seed}")
        if weights_hash is not None and weights_hash != self.weights_hash:
            diffs.append(f"weights hash: engines have {self.weights_hash}, asked {weights_hash}")
        if controlnets is not None and self.spec.controlnets == asked.controlnets:  # else the names differ already
            for j, (have, want) in enumerate(zip(self.controlnets, controlnets)):
                if have.weights_hash != want.weights_hash:
                    diffs.append(
                        f"ControlNet {j} ({want.name}) weights hash: engines have {have.weights_hash}, asked "
                        f"{want.weights_hash}"
                    )
            if len(self.controlnets) != len(controlnets):
                diffs.append(f"ControlNet records: the manifest has {len(self.controlnets)}, asked {len(controlnets)}")
        names = network_names(self.spec)
        missing = [n for n in names if n not in self.networks]
        if missing:
            diffs.append(f"networks missing from the manifest: {', '.join(missing)}")
        for size in self.spec.served_sizes:  # the runtime opens every size
            if size != (self.spec.height, self.spec.width):
                absent = [n for n in names if n not in self.size_networks.get(size_text(size), {})]
                if absent:
                    diffs.append(f"networks missing from the manifest at {size_text(size)}: {', '.join(absent)}")
        return diffs

    def file_problems(self, directory: Path | str, kinds: tuple[str, ...], *, verify_hashes: bool = True) -> list[str]:
        """Files of `kinds` that the manifest lacks, that are missing, or whose sha256 differs from the manifest's."""
        directory = Path(directory)
        problems: list[str] = []
        sized = self.sized_networks()
        checked: set[FileEntry] = set()  # a dynamic-shape build lists one file under every size: hashed once
        for size, networks in sized.items():
            at = f" at {size_text(size)}" if len(sized) > 1 else ""
            problems += self._file_problems(directory, networks, kinds, verify_hashes, at, checked)
        return problems

    @staticmethod
    def _file_problems(
        directory: Path, networks: dict[str, NetworkEntry], kinds: tuple[str, ...], verify_hashes: bool, at: str,
        checked: set[FileEntry],
    ) -> list[str]:  # fmt: skip
        problems = []
        for name, net in networks.items():
            for kind in kinds:
                entry = net.files.get(kind)
                if entry is None:
                    if kind != "onnx_data":  # external data exists only above 2 GB
                        problems.append(f"{name}{at}: the build has no {kind} file")
                    continue
                if entry in checked:
                    continue
                checked.add(entry)
                path = directory / entry.name
                if not path.is_file():
                    problems.append(f"{name}: file {path} is missing")
                elif verify_hashes and sha256_file(path) != entry.sha256:
                    problems.append(f"{name}: file {path} was altered or truncated (sha256 differs from the manifest)")
        return problems


def mismatch(directory: Path | str, problems: list[str], rebuild: str) -> EngineMismatch:
    return EngineMismatch(f"build folder {directory} does not match: " + "; ".join(problems) + f". Rebuild: {rebuild}")


def load_manifest(directory: Path | str) -> Manifest:
    """Read `directory/manifest.json`. A missing, unreadable, malformed or older-format manifest raises
    `EngineMismatch`. This compares nothing: `build_folder.open_build_folder` does."""
    path = Path(directory) / MANIFEST_FILE
    rebuild = f"python -m build_engines --model MODEL ... --out {directory}"
    if not path.is_file():
        raise mismatch(directory, [f"no {MANIFEST_FILE} (not built, or not a build folder)"], rebuild)
    try:
        d = json.loads(path.read_text())
        if isinstance(d, dict) and d.get("format_version") != FORMAT_VERSION:
            rebuild = f"{d['build_command']} --force" if isinstance(d.get("build_command"), str) else rebuild
            problem = (
                f"{path} has format {d.get('format_version')!r}, written by another version of build_engines; "
                f"this runtime reads format {FORMAT_VERSION}"
            )
            raise mismatch(directory, [problem], rebuild)
        return Manifest.from_json(d)
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise mismatch(directory, [f"{path} is corrupt or unreadable ({type(e).__name__}: {e})"], rebuild) from e
