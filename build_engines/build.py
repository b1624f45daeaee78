"""`build(cfg)`: plan what can be reused, run the stages that remain, write the manifest.

Stages per network: ONNX export + cleanup, then (TensorRT builders) the engine build; or (AOTInductor) one
compile to a `.pt2` package. The cache is the manifest: a file is reused when the previous build was for the
same spec and weights, the file still hashes to what the manifest says, and (engines, packages) the same
builder, version and target made it. `cfg.force` rebuilds everything.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from streamv2v_trt.backends.tensorrt_import import FLAVOURS, import_tensorrt, tensorrt_version
from streamv2v_trt.flavours import Builder
from streamv2v_trt.layout import NETWORKS
from streamv2v_trt.manifest import MANIFEST_FILE, EngineMismatch, FileEntry, Manifest, NetworkEntry, load_manifest

from .config import BuildConfig, choose_builder

if TYPE_CHECKING:
    from streamv2v_trt.models.loader import Models

log = logging.getLogger(__name__)

Progress = Callable[[str], None]  # called once per finished stage with its description


@dataclass(frozen=True)
class Artifact:
    """One file of the build, for the summary: what, where, how big, how long, built or reused."""

    network: str
    kind: str  # "onnx", "engine" or "package"
    path: Path
    bytes: int
    seconds: float  # export+cleanup+save for onnx, build for an engine, compile for a package; 0 when reused
    reused: bool
    nodes: int | None = None  # ONNX nodes after cleanup


@dataclass(frozen=True)
class BuildResult:
    out: Path
    manifest: Manifest
    artifacts: tuple[Artifact, ...]
    seconds: float
    why: str = ""  # why this builder (what `--builder auto` decided)

    @property
    def reused(self) -> bool:
        """True when nothing had to be rebuilt."""
        return all(a.reused for a in self.artifacts)

    def summary(self) -> str:
        """A table of every file, under a line that says what was built."""
        m, spec = self.manifest, self.manifest.spec
        rows = [("network", "file", "size MB", "time s", "nodes", "status")]
        for a in self.artifacts:
            nodes = str(a.nodes) if a.nodes is not None else ""
            rows.append((a.network, a.path.name, f"{a.bytes / 1e6:.1f}", f"{a.seconds:.1f}", nodes, _status(a)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        builder = f"{m.builder} {m.builder_version}" if m.builder else "none"
        target = " ".join(str(m.target[k]) for k in ("device", "capability") if k in m.target)
        head = (
            f"{spec.model} {spec.width}x{spec.height}, {spec.steps} step(s), {spec.max_streams} stream(s), "
            f"UNet batch {spec.unet_batch}, "
            f"bank {spec.bank.value} x{spec.bank_frames}, vae {spec.vae.value}, {spec.precision.value}, "
            f"builder {builder}{' for ' + target if target else ''} ({self.why}), "
            f"weights {m.weights_hash}{' (random)' if m.random_weights else ''}"
        )
        return "\n".join([head, *lines, f"total {self.seconds:.1f} s -> {self.out / MANIFEST_FILE}"])


def _status(a: Artifact) -> str:
    return "reused" if a.reused else "built"


def stages(builder: str | None) -> list[str]:
    """The stages a build runs, in order (for a progress bar)."""
    if builder == Builder.AOTI:
        return [f"compile {n}" for n in NETWORKS]
    names = [f"{s} {n}" for n in NETWORKS for s in ("export", "cleanup")]
    return names + ([f"build {n}" for n in NETWORKS] if builder else [])


@dataclass
class _Plan:
    """What the previous build in the folder leaves usable: per network, file kind -> entry."""

    old: Manifest | None
    keep: dict[str, dict[str, FileEntry]] = field(default_factory=dict)

    def kept(self, name: str, kind: str) -> FileEntry | None:
        return self.keep.get(name, {}).get(kind)


def _facts(builder: str | None, cfg: BuildConfig) -> tuple[str | None, dict, dict]:
    """(builder version, target, options) recorded in the manifest and compared for reuse."""
    if builder in FLAVOURS:
        trt, _ = import_tensorrt(builder)
        return tensorrt_version(trt), {}, {"workspace_gib": cfg.workspace_gib}
    if builder == Builder.AOTI:
        from .aoti import aoti_options

        device = cfg.aoti_device
        target = {"device": device.type, "torch": torch.__version__}
        if device.type == "cuda":
            target["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
            target["gpu"] = torch.cuda.get_device_name(device)
        return torch.__version__, target, aoti_options(device, max_autotune=cfg.max_autotune, weights=cfg.weights)
    return None, {}, {}


def _intact(out: Path, entry: FileEntry | None) -> bool:
    from streamv2v_trt.manifest import sha256_file

    return entry is not None and (out / entry.name).is_file() and sha256_file(out / entry.name) == entry.sha256


def plan_reuse(
    cfg: BuildConfig, out: Path, builder: str | None, facts: tuple[str | None, dict, dict], weights: str
) -> _Plan:
    """Which files of the previous build in `out` this build keeps (nothing with `force`)."""
    if cfg.force or not (out / MANIFEST_FILE).exists():
        return _Plan(None)
    try:
        old = load_manifest(out)
    except EngineMismatch as e:
        log.warning("ignoring the previous build: %s", e)
        return _Plan(None)
    diffs = old.differences(cfg.spec, weights)
    if diffs:
        log.info("previous build in %s differs (%s): rebuilding", out, "; ".join(diffs))
        return _Plan(None)
    plan = _Plan(old)
    version, target, options = facts
    # Engines and packages only from the same builder, version, target and options (e.g. --max-autotune).
    compiled_ok = (old.builder, old.builder_version, old.target, old.build_options) == (
        builder,
        version,
        target,
        options,
    )
    for name, net in old.networks.items():
        keep = plan.keep.setdefault(name, {})
        if _intact(out, net.files.get("onnx")) and (
            "onnx_data" not in net.files or _intact(out, net.files["onnx_data"])
        ):
            keep.update({k: net.files[k] for k in ("onnx", "onnx_data") if k in net.files})
        kind = "package" if builder == Builder.AOTI else "engine"
        if compiled_ok and (kind == "package" or "onnx" in keep) and _intact(out, net.files.get(kind)):
            keep[kind] = net.files[kind]
    return plan


def build(cfg: BuildConfig, progress: Progress | None = None) -> BuildResult:
    """Build (or reuse) the three networks of `cfg.spec` and write `manifest.json`.

    Raises `TensorRTUnavailable` before any export when the asked builder cannot run here.
    """
    from streamv2v_trt.models.loader import find_weights, load_models  # diffusers: seconds to import
    from streamv2v_trt.models.lora import fuse_loras

    t_start = time.perf_counter()
    step = progress or (lambda _desc: None)
    builder, why = choose_builder(cfg)
    log.info("builder: %s (%s)", builder or "none", why)
    swappable = cfg.swappable(builder)
    if swappable and cfg.spec.loras:
        flags = " ".join(f"--lora {lora.cli_arg()}" for lora in cfg.spec.loras)
        raise ValueError(
            "a build with swappable weights compiles no LoRA in: drop the --lora flags and open the folder with "
            f"them ({flags}; in Python Source(engines=..., loras=[...]) or stream.set_loras), or build with "
            "--weights frozen to compile them in"
        )
    out = cfg.folder(builder)
    out.mkdir(parents=True, exist_ok=True)
    version, target, options = facts = _facts(builder, cfg)
    weights = find_weights(cfg.spec)
    weights_hash = weights.hash(cfg.spec.vae)  # base weights, before LoRAs
    plan = plan_reuse(cfg, out, builder, facts, weights_hash)
    if _complete(plan, builder):
        log.info("reusing the build in %s (same spec, weights and builder, files intact); --force rebuilds", out)
        for desc in stages(builder):
            step(f"{desc} (reused)")
        return _reused(out, plan.old, time.perf_counter() - t_start, why)

    run = _Run(cfg, out, plan, step)
    if builder != Builder.AOTI and plan.old is not None and all(plan.kept(n, "onnx") for n in NETWORKS):
        run.reuse_onnx()  # only engines to build: no model to load (GBs for sd-turbo)
    else:
        device = cfg.aoti_device if builder == Builder.AOTI else torch.device("cpu")
        models = load_models(cfg.spec, device=device)
        if cfg.spec.loras:  # the networks carry them; the manifest records their hashes beside the base weights'
            fuse_loras(models.unet, cfg.spec.loras, text_encoder=models.text_encoder)
        if builder == Builder.AOTI:
            run.compile_packages(models, options)
        else:
            run.export_onnx(models)
        del models  # free the torch weights before TensorRT needs its memory
        gc.collect()
    ff_layers = run.ff_layers
    if builder in FLAVOURS:
        run.build_engines(builder)
    run.remove_stale()
    old = plan.old
    manifest = Manifest(
        spec=cfg.spec,
        weights_hash=weights_hash,
        random_weights=weights.random,
        ff_layers=ff_layers,
        builder=builder,
        builder_version=version,
        target=target,
        build_options=options,
        exporter=run.exporter or (old.exporter if old else ""),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        build_command=cfg.spec.build_command(out, builder=builder, onnx_only=builder is None),
        networks=run.entries,
        # this run's stage times over the previous build's for what was reused
        timings_s={**(old.timings_s if old else {}), **{k: round(v, 3) for k, v in run.timings.items()}},
        weights="swappable" if swappable else "frozen",
    )
    manifest.save(out)
    return BuildResult(out, manifest, tuple(run.artifacts), time.perf_counter() - t_start, why)


def _complete(plan: _Plan, builder: str | None) -> bool:
    """Everything `builder` needs is in the previous build, intact. An --onnx-only build over a TensorRT build
    keeps its engines (the manifest stays as it was)."""
    if plan.old is None:
        return False
    kinds = {None: ("onnx",), Builder.AOTI: ("package",)}.get(builder, ("onnx", "engine"))
    return all(plan.kept(n, k) for n in NETWORKS for k in kinds)


class _Run:
    """The stages of one build, collecting manifest entries, artifacts and timings as they go."""

    def __init__(self, cfg: BuildConfig, out: Path, plan: _Plan, step: Progress) -> None:
        self.cfg, self.out, self.plan, self.step = cfg, out, plan, step
        self.entries: dict[str, NetworkEntry] = {}
        self.artifacts: list[Artifact] = []
        self.timings: dict[str, float] = {}
        self.ff_layers: tuple[str, ...] = ()
        self.exporter: str | None = None

    def _reuse(self, name: str, kind: str, tensors) -> bool:
        entry = self.plan.kept(name, kind)
        if entry is None:
            return False
        wanted = ("onnx", "onnx_data") if kind == "onnx" else (kind,)
        files = {k: v for k, v in self.plan.keep[name].items() if k in wanted}
        self.entries[name] = NetworkEntry(tensors, {**self.entries.get(name, NetworkEntry(())).files, **files})
        size = sum((self.out / f.name).stat().st_size for f in files.values())
        self.artifacts.append(Artifact(name, kind, self.out / entry.name, size, 0.0, True))
        return True

    def reuse_onnx(self) -> None:
        old = self.plan.old
        self.ff_layers = old.ff_layers
        for name in NETWORKS:
            self._reuse(name, "onnx", old.networks[name].tensors)
            self.step(f"export {name} (reused)")
            self.step(f"cleanup {name} (reused)")

    def export_onnx(self, models: Models) -> None:
        from .cleanup import cleanup, save_onnx
        from .export import export_network, exporter_name, network_modules, tensor_entries

        modules, specs = network_modules(models, self.cfg.spec)
        self.ff_layers = tuple(layer.name for layer in modules["unet"].layout.layers if layer.fuse)
        for name in NETWORKS:
            old = self.plan.old.networks[name] if self.plan.old else None
            if old is not None and self._reuse(name, "onnx", old.tensors):
                self.step(f"export {name} (reused)")
                self.step(f"cleanup {name} (reused)")
                continue
            t0 = time.perf_counter()
            model = export_network(modules[name], specs[name], seed=self.cfg.spec.weights_seed)
            self.exporter = exporter_name()
            self.timings[f"export {name}"] = time.perf_counter() - t0
            self.step(f"export {name}")
            t1 = time.perf_counter()
            model, report = cleanup(model, name)
            tensors = tensor_entries(model, specs[name])
            path = self.out / f"{name}.onnx"
            data = save_onnx(model, path)
            del model
            gc.collect()
            self.timings[f"cleanup {name}"] = time.perf_counter() - t1
            files = {"onnx": FileEntry.of(path)} | ({"onnx_data": FileEntry.of(data)} if data else {})
            self.entries[name] = NetworkEntry(tensors, files)
            size = sum((self.out / f.name).stat().st_size for f in files.values())
            seconds = self.timings[f"export {name}"] + self.timings[f"cleanup {name}"]
            self.artifacts.append(Artifact(name, "onnx", path, size, seconds, False, report.nodes))
            self.step(f"cleanup {name}")

    def build_engines(self, builder: str) -> None:
        from .compile import build_engine

        for name in NETWORKS:
            net = self.entries[name]
            if self.plan.kept(name, "onnx") and self._reuse(name, "engine", net.tensors):
                self.step(f"build {name} (reused)")
                continue
            engine = self.out / f"{name}.engine"
            onnx_path = self.out / net.files["onnx"].name
            seconds = build_engine(onnx_path, engine, flavour=builder, workspace_gib=self.cfg.workspace_gib)
            self.timings[f"build {name}"] = seconds
            self.entries[name] = NetworkEntry(net.tensors, {**net.files, "engine": FileEntry.of(engine)})
            self.artifacts.append(Artifact(name, "engine", engine, engine.stat().st_size, seconds, False))
            self.step(f"build {name}")

    def compile_packages(self, models: Models, options: dict) -> None:
        from .aoti import compile_aoti
        from .export import example_inputs, network_modules

        modules, specs = network_modules(models, self.cfg.spec)
        self.ff_layers = tuple(layer.name for layer in modules["unet"].layout.layers if layer.fuse)
        self.exporter = f"torch {torch.__version__} torch.export + AOTInductor"
        device = self.cfg.aoti_device
        for name in NETWORKS:
            tensors = tuple(specs[name])
            if self._reuse(name, "package", tensors):
                self.step(f"compile {name} (reused)")
                continue
            path = self.out / f"{name}.pt2"
            inputs = {k: v.to(device) for k, v in example_inputs(specs[name], seed=self.cfg.spec.weights_seed).items()}
            names_in = [s.name for s in specs[name] if s.is_input]
            names_out = [s.name for s in specs[name] if not s.is_input]
            result = compile_aoti(modules[name], inputs, names_in, names_out, path, device, options=options)
            self.timings[f"compile {name}"] = result.seconds
            self.entries[name] = NetworkEntry(tensors, {"package": FileEntry.of(path)})
            self.artifacts.append(Artifact(name, "package", path, path.stat().st_size, result.seconds, False))
            self.step(f"compile {name}")

    def remove_stale(self) -> None:
        """Compiled files of an earlier build that this manifest does not list would mislead: remove them."""
        listed = {f.name for net in self.entries.values() for f in net.files.values()}
        for name in NETWORKS:
            for stale in (self.out / f"{name}.engine", self.out / f"{name}.pt2"):
                if stale.exists() and stale.name not in listed:
                    log.info("removing %s: not part of this build", stale)
                    stale.unlink()


def _reused(out: Path, manifest: Manifest, seconds: float, why: str) -> BuildResult:
    """A cache hit: `manifest` already describes intact files for everything asked."""
    artifacts = []
    for name, net in manifest.networks.items():
        for kind in ("onnx", "engine", "package"):
            entry = net.files.get(kind)
            if entry is None:
                continue
            size = (out / entry.name).stat().st_size
            if kind == "onnx" and "onnx_data" in net.files:
                size += (out / net.files["onnx_data"].name).stat().st_size
            artifacts.append(Artifact(name, kind, out / entry.name, size, 0.0, True))
    return BuildResult(out, manifest, tuple(artifacts), seconds, why)
