"""Open a `python -m build_engines` folder for the runtime: every check, then the networks, in one place.

    manifest.json -> what was built (EngineSpec) vs what is asked: spec field by field, weights hash,
                     builder vs backend, target device / capability / torch (AOTInductor), files and hashes
                  -> the text encoder (PyTorch; runs only on a prompt change), LoRA text layers fused
                  -> one runner per network, and the one I/O check: names, shapes and dtypes of every tensor,
                     as the layout expects them, as the manifest records them, as each runner reports them
                     (a folder built for several frame sizes: every size's runners, each checked; with dynamic
                     shapes, every size's runner of a network shares its one session or engine)

Any difference raises `EngineMismatch` naming all of them and the exact command that rebuilds the folder.
A build folder is code: TensorRT engines and AOTInductor packages are native code that runs when loaded. Open
only folders you built, never a path taken from a client's request; the manifest's hashes guard against
files changed after the build, not against a folder made by someone else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from os import PathLike
from pathlib import Path

import torch

from .backends.named_io import NamedIOBackend, NetworkRunner
from .config import StreamConfig
from .flavours import ENGINE_BACKENDS, BackendKind, Builder, backend_of, build_for, folder_backend
from .frame_sizes import size_text
from .layout import BankLayout, TensorSpec, bank_layout, network_names
from .lora_set import AOTI_HINT
from .manifest import ControlNetRecord, EngineMismatch, Manifest, load_manifest, mismatch
from .prompt import PromptEncoder, text_shape
from .spec import EngineSpec, LoraSpec, show_sizes

log = logging.getLogger(__name__)


@dataclass
class OpenedBuild:
    backend: NamedIOBackend
    manifest: Manifest
    cfg: StreamConfig
    prompt_encoder: PromptEncoder
    scheduler: object  # the model's LCMScheduler


def folder_rebuild(spec: EngineSpec, directory: Path | str, backend: BackendKind, manifest: Manifest | None) -> str:
    """`EngineSpec.rebuild_command` for a folder: the same spec (files damaged, another GPU or torch) is rebuilt
    into `directory`, another spec into its own folder, with the folder's TensorRT flavour kept. A folder with
    swappable weights is rebuilt swappable by its own builder, naming no LoRA (they are runtime state there)."""
    swappable = manifest is not None and manifest.swappable
    if swappable:
        spec = replace(spec, loras=())
    same = manifest is not None and not manifest.spec.differences(spec)
    if same and manifest.spec.sizes:  # the folder serves it: rebuilt with all its sizes, not only those asked
        spec = replace(spec, sizes=manifest.spec.sizes)
    command = spec.rebuild_command(backend, directory if same or manifest is None else None, _built(manifest))
    own_builder = build_for(backend, _built(manifest))[0] == _built(manifest)
    if manifest is not None and manifest.dynamic and own_builder and spec.sizes:
        command = command.replace(_BUILD, f"{_BUILD} --shapes dynamic", 1)
    if swappable and own_builder:
        return command.replace(_BUILD, f"{_BUILD} --weights swappable", 1)
    return command


_BUILD = "python -m build_engines"


def _built(manifest: Manifest | None) -> Builder | None:
    return None if manifest is None or manifest.builder is None else Builder(manifest.builder)


def default_device(backend: BackendKind, manifest: Manifest) -> torch.device:
    return torch.device(backend.info.device or manifest.target.get("device", "cpu"))


def target_problems(manifest: Manifest, backend: BackendKind, device: torch.device) -> list[str]:
    """What keeps `backend` from running this folder's files on `device` (builder, device, GPU, torch)."""
    built, info = _built(manifest), backend.info
    if built not in info.opens or not manifest.has(info.files[0]):
        own = folder_backend(built, "cuda").value  # the backend that loads what its builder made
        return [f"no {info.what} in this folder (builder: {built.value if built else 'onnx only'}); open it with "
                f"--backend {own}"]  # fmt: skip
    if backend is not BackendKind.AOTI:
        return []
    target, problems = manifest.target, []
    if target.get("device") != device.type:
        problems.append(f"AOTInductor packages compiled for {target.get('device')}, asked to run on {device.type}")
    elif device.type == "cuda":
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
        if target.get("capability") != cap:
            problems.append(
                f"AOTInductor packages compiled for compute capability {target.get('capability')}, this GPU "
                f"({torch.cuda.get_device_name(device)}) is {cap}"
            )
    if target.get("torch") != torch.__version__:
        problems.append(
            f"AOTInductor packages compiled by torch {target.get('torch')}, this is torch {torch.__version__}"
        )
    return problems


def _asked_spec(manifest: Manifest, loras: tuple[LoraSpec, ...] | None) -> EngineSpec:
    return manifest.spec if loras is None else replace(manifest.spec, loras=tuple(loras))


def _lora_hint(manifest: Manifest) -> str:
    """When LoRAs differ or their files are missing: how to open the folder as it was built."""
    built = manifest.spec.loras
    if not built:
        return ""
    flags = " ".join(f"--lora {lora.path.name}:{lora.scale:g}" for lora in built)
    return (
        f" The folder was built with LoRA(s); pass the same file(s) and scale(s) when opening it ({flags}, with "
        "each file's path; in Python loras=[LoraSpec(path, scale), ...]): their text-encoder layers run here."
    )


def check_io(
    expected: dict[str, list[TensorSpec]],
    manifest: Manifest,
    runners: dict[str, NetworkRunner],
    directory: Path,
    rebuild: str,
    size: tuple[int, int] | None = None,
) -> None:
    """Every tensor of every network, three ways: the layout's contract, the manifest's record, and what the
    compiled file reports. Names, shapes, dtypes and direction must all agree. `size`: which of a multi-size
    folder's sizes (height, width) `expected` and `runners` are (default: the manifest spec's own)."""
    problems = []
    at = f" at {size_text(size)}" if size and manifest.spec.sizes else ""
    for name in expected:  # the three networks, and one per ControlNet
        want = {t.name: (t.shape, t.dtype, t.is_input) for t in expected[name]}
        recorded = {t.name: (t.shape, t.dtype, t.is_input) for t in manifest.network(name, size).tensors}
        runner = runners[name]
        reported = {
            n: (shape, str(dtype).removeprefix("torch."), is_input)
            for is_input, specs in ((True, runner.input_specs), (False, runner.output_specs))
            for n, (shape, dtype) in specs.items()
        }
        for source, have in (("manifest", recorded), (runner.path.name, reported)):
            for n in sorted(want.keys() | have.keys()):
                if want.get(n) != have.get(n):
                    problems.append(f"{name}{at} {n}: {source} has {_io(have.get(n))}, expected {_io(want.get(n))}")
    if problems:
        shown = problems[:8]
        if len(problems) > 8:
            shown[-1] += f" (and {len(problems) - 8} more)"
        raise mismatch(directory, shown, rebuild)


def _io(t: tuple | None) -> str:
    if t is None:
        return "nothing"
    shape, dtype, is_input = t
    return f"{'input' if is_input else 'output'} {list(shape)} {dtype}"


def _open_runners(
    backend: BackendKind,
    directory: Path,
    manifest: Manifest,
    device: torch.device,
    threads: int | None,
    size: tuple[int, int] | None = None,
    opened: dict[Path, NetworkRunner] | None = None,
) -> dict[str, NetworkRunner]:
    """The runners of one size. A file already opened for another size (`opened`, by file; filled here), which only
    a dynamic-shape folder has, gives a runner at this size's shapes on that runner's session or engine."""
    kind = backend.info.files[0]
    opened = {} if opened is None else opened
    runners = {}
    for name in network_names(manifest.spec):  # the three, and one per ControlNet
        entry = manifest.network(name, size)
        path = directory / entry.files[kind].name
        # a dynamic-shape file's shapes are symbolic: each size's come from the manifest
        shapes = {t.name: t.shape for t in entry.tensors} if manifest.dynamic else None
        if path in opened:
            runners[name] = opened[path].at_shapes(shapes)
        else:
            runners[name] = opened[path] = _open_runner(backend, path, device, threads, manifest.builder, shapes)
    return runners


def _open_runner(
    backend: BackendKind, path: Path, device: torch.device, threads: int | None, builder: str | None, shapes
) -> NetworkRunner:
    if backend is BackendKind.ONNXRUNTIME:
        from .backends.onnxruntime import OnnxRunner

        return OnnxRunner(path, device, threads, shapes)
    if backend is BackendKind.TENSORRT:
        from .backends.tensorrt import TrtRunner

        return TrtRunner(path, device, builder, shapes)
    from .backends.aoti import AotiRunner

    return AotiRunner(path, device)


def _open_size(
    backend: BackendKind, directory: Path, manifest: Manifest, spec: EngineSpec, size: tuple[int, int], skeleton,
    text: tuple[int, int], device: torch.device, threads: int | None, rebuild: str,
    opened: dict[Path, NetworkRunner] | None = None,
) -> tuple[dict[str, NetworkRunner], BankLayout]:  # fmt: skip
    """One built size's runners and bank layout, their I/O checked against the layout and the manifest."""
    at = replace(spec, height=size[0], width=size[1], sizes=manifest.spec.sizes)
    layout = bank_layout(skeleton, at)
    runners = _open_runners(backend, directory, manifest, device, threads, size, opened)
    check_io(layout.network_specs(at, text), manifest, runners, directory, rebuild, size)
    return runners, layout


def _package_loras(spec: EngineSpec, weights, skeleton, text_encoder: torch.nn.Module, runners: list[NetworkRunner]):
    """The swappable weights of an AOTInductor folder, holding `spec.loras`: the constants of every size's UNet
    package written from one UNet loaded on the CPU (the base weights; loaded with the first LoRA set, then kept
    while the folder is open). `skeleton`: the UNet's structure, which names the constants."""
    from .backends.aoti_loras import PackageLoraWeights
    from .models.loader import load_unet

    load = lambda: load_unet(spec, weights, "cpu")
    lora_weights = PackageLoraWeights(skeleton, text_encoder, runners, load=load)
    if spec.loras:
        lora_weights.set(spec.loras)
    return lora_weights


def _swappable_weights(
    backend: BackendKind, directory: Path, manifest: Manifest, spec: EngineSpec, weights, skeleton,
    text_encoder: torch.nn.Module, unets: dict[tuple[int, int], NetworkRunner],
):  # fmt: skip
    """The LoRA writer of a swappable folder: the AOTInductor packages' constants, or the UNet ONNX initializers
    (ONNX Runtime, TensorRT), of every size."""
    if backend is BackendKind.AOTI:
        return _package_loras(spec, weights, skeleton, text_encoder, list(unets.values()))
    onnx = [directory / manifest.network("unet", size).files["onnx"].name for size in unets]
    rebuild_with = lambda loras: replace(spec, loras=loras).rebuild_command(backend, None, _built(manifest))
    return _initializer_loras(spec, weights, skeleton, text_encoder, list(unets.values()), onnx, rebuild_with)


def _initializer_loras(
    spec: EngineSpec, weights, skeleton, text_encoder: torch.nn.Module, runners: list[NetworkRunner],
    onnx: list[Path], rebuild,
):  # fmt: skip
    """The swappable weights of an ONNX Runtime / TensorRT folder, holding `spec.loras`: every size's UNet ONNX
    initializers (a new ONNX Runtime session, or a TensorRT refit) from the UNet loaded on the CPU with the first
    LoRA set."""
    from .backends.onnx_loras import InitializerLoraWeights
    from .models.loader import load_unet

    load = lambda: load_unet(spec, weights, "cpu")
    lora_weights = InitializerLoraWeights(skeleton, text_encoder, runners, onnx, load, rebuild)
    if spec.loras:
        lora_weights.set(spec.loras)
    return lora_weights


def controlnet_records(spec: EngineSpec) -> tuple[ControlNetRecord, ...]:
    """What a manifest records of each of `spec.controlnets` (name, architecture, weights hash): the build writes
    it, opening a folder compares it. Loads no weights."""
    from .models.controlnets import controlnet_identities

    return tuple(ControlNetRecord(*identity) for identity in controlnet_identities(spec))


def open_build_folder(
    directory: str | PathLike,
    backend: str | BackendKind | None = None,
    cfg: StreamConfig | None = None,
    *,
    device: torch.device | str | None = None,
    loras: tuple[LoraSpec, ...] | None = None,
    verify_hashes: bool = True,
    threads: int | None = None,
    runtime: dict | None = None,
) -> OpenedBuild:
    """Check the folder against `cfg` (default: its own spec with the `runtime` settings) and open it with
    `backend` (default: what the folder was built for, `flavours.folder_backend`) on `device` (default: the
    backend's, `flavours.BACKENDS`: CPU for onnxruntime, CUDA for tensorrt, the packages' device for aoti).

    verify_hashes=False skips hashing files and weights (faster opens of large folders; files must still exist).
    loras: the LoRA files the folder was built with. threads: ONNX Runtime intra-op threads.
    """
    if backend is not None and backend_of(backend) not in ENGINE_BACKENDS:
        raise ValueError(
            f"the {backend} backend runs the PyTorch weights, not a build folder: open a folder with one of "
            f"{', '.join(k.value for k in ENGINE_BACKENDS)}"
        )
    from .models.loader import find_weights, load_text, unet_skeleton
    from .models.lora import fuse_loras

    directory = Path(directory)
    manifest = load_manifest(directory)
    if backend is None:
        here = torch.device(device).type if device is not None else "cuda" if torch.cuda.is_available() else "cpu"
        backend = folder_backend(manifest.builder, here)
    backend = backend_of(backend)
    if cfg is not None and runtime:
        raise TypeError(f"pass runtime settings {sorted(runtime)} inside cfg, or drop cfg")
    cfg = cfg or StreamConfig.from_spec(_asked_spec(manifest, loras), **(runtime or {}))
    spec = cfg.spec
    device = torch.device(device) if device is not None else default_device(backend, manifest)
    if loras is None and cfg.spec.loras is manifest.spec.loras and manifest.spec.loras:
        # The manifest knows the files by name and hash only; their text-encoder layers must come from real files.
        raise EngineMismatch(f"the LoRA files to open {directory} with were not given.{_lora_hint(manifest)}")
    missing_loras = [str(lora.path) for lora in spec.loras if not lora.path.is_file()]
    if missing_loras:
        raise EngineMismatch(f"LoRA file(s) {missing_loras} not found.{_lora_hint(manifest)}")

    rebuild = folder_rebuild(spec, directory, backend, manifest)  # after the LoRA checks: it hashes their files
    weights = find_weights(spec)
    problems = manifest.differences(
        spec, weights.hash(spec.vae) if verify_hashes else None, controlnet_records(spec) if verify_hashes else None
    )
    problems += target_problems(manifest, backend, device)
    if not problems:  # files only matter once the build is the right one
        problems = manifest.file_problems(directory, backend.info.files, verify_hashes=verify_hashes)
    if problems:
        lora_diff = any(p.startswith("loras:") for p in problems)
        error = mismatch(directory, problems, rebuild)
        aoti = AOTI_HINT if lora_diff and backend is BackendKind.AOTI else ""
        raise EngineMismatch(f"{error}{_lora_hint(manifest) if lora_diff else ''}{aoti}")

    if backend is BackendKind.TENSORRT:
        from .backends.tensorrt import check_device

        device = check_device(device, manifest.builder)  # a GPU, and one its flavour runs on
    # The text encoder runs in PyTorch; on a CPU in fp32 (fp16 matmuls there are slow or missing).
    text_dtype = torch.float32 if device.type == "cpu" else spec.precision.torch_dtype
    tokenizer, text_encoder, scheduler = load_text(spec, weights, device, text_dtype)
    if spec.loras and not manifest.swappable:  # the UNet's LoRA layers are compiled in; the text encoder's not
        fuse_loras(None, spec.loras, text_encoder=text_encoder)
    skeleton = unet_skeleton(spec, weights)
    text = text_shape(tokenizer, text_encoder)
    opened: dict[Path, NetworkRunner] = {}  # a dynamic-shape folder's runners by file: each opened once
    sized = {  # every built size: its runners and bank layout, each size checked three ways
        size: _open_size(backend, directory, manifest, spec, size, skeleton, text, device, threads, rebuild, opened)
        for size in manifest.spec.served_sizes
    }
    if len(sized) > 1:
        log.info("%s: frame sizes %s", directory, show_sizes(sized))
    runners, layout = sized[(spec.height, spec.width)]
    networks = NamedIOBackend(
        backend, runners, layout, device, builder=_built(manifest), spec=spec, sized=sized if len(sized) > 1 else None
    )
    networks.rebuild = lambda wanted: folder_rebuild(wanted, directory, backend, manifest)
    if manifest.swappable:  # LoRAs are runtime state: applied here and by set_loras, to every size's UNet
        unets = {size: runners["unet"] for size, (runners, _) in sized.items()}
        networks.lora_weights = _swappable_weights(backend, directory, manifest, spec, weights, skeleton,
                                                   text_encoder, unets)  # fmt: skip
    log.info("opened %s (%s, %s) with the %s backend on %s", directory, spec.model, spec.precision.value,
             backend.value, device)  # fmt: skip
    return OpenedBuild(networks, manifest, cfg, PromptEncoder(tokenizer, text_encoder), scheduler)
