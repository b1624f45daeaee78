"""`build(cfg)`: plan what can be reused, run the stages that remain, write the manifest.

Stages per network and frame size: ONNX export + cleanup, then (TensorRT builders) the engine build; or
(AOTInductor) one compile to a `.pt2` package. A build for several sizes (`EngineSpec.sizes`) runs them for every
size into the one folder, each file named with its size (`manifest.network_file`); with `--shapes dynamic`, once
per network: one ONNX with symbolic height and width, one engine with an optimisation profile spanning the sizes.

The cache is the manifest: a file is reused when the previous build was for the
same spec and weights, the file still hashes to what the manifest says, and (engines, packages) the same
builder, version and target made it. `cfg.force` rebuilds everything.
"""

from __future__ import annotations

import gc
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from streamv2v_trt.backends.tensorrt_import import FLAVOURS, import_tensorrt, tensorrt_version
from streamv2v_trt.build_folder import controlnet_records
from streamv2v_trt.flavours import Builder
from streamv2v_trt.frame_sizes import size_text
from streamv2v_trt.layout import NETWORKS, bank_layout, network_names
from streamv2v_trt.manifest import (
    MANIFEST_FILE,
    EngineMismatch,
    FileEntry,
    Manifest,
    NetworkEntry,
    load_manifest,
    network_file,
)
from streamv2v_trt.spec import EngineSpec, show_sizes

from .config import BuildConfig, choose_builder

if TYPE_CHECKING:
    from streamv2v_trt.models.loader import Models

    from .compile import Profile

log = logging.getLogger(__name__)

Progress = Callable[[str], None]  # called once per finished stage with its description
Size = tuple[int, int]  # (height, width)


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
    size: str = ""  # WIDTHxHEIGHT in a build for several sizes


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
            network = f"{a.network} {a.size}".strip()
            rows.append((network, a.path.name, f"{a.bytes / 1e6:.1f}", f"{a.seconds:.1f}", nodes, _status(a)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        builder = f"{m.builder} {m.builder_version}" if m.builder else "none"
        target = " ".join(str(m.target[k]) for k in ("device", "capability") if k in m.target)
        sizes = f" (sizes {show_sizes(spec.served_sizes)})" if spec.sizes else ""
        head = (
            f"{spec.model} {spec.width}x{spec.height}{sizes}, {spec.steps} step(s), {spec.max_streams} stream(s), "
            f"UNet batch {spec.unet_batch}, "
            f"bank {spec.bank.value} x{spec.bank_frames}, vae {spec.vae.value}, {spec.precision.value}, "
            f"builder {builder}{' for ' + target if target else ''} ({self.why}), "
            f"weights {m.weights_hash}{' (random)' if m.random_weights else ''}"
        )
        if m.controlnets:
            head += ", ControlNets " + ", ".join(f"{c.name} {c.weights_hash}" for c in m.controlnets)
        return "\n".join([head, *lines, f"total {self.seconds:.1f} s -> {self.out / MANIFEST_FILE}"])


def _status(a: Artifact) -> str:
    return "reused" if a.reused else "built"


def stages(builder: str | None, sizes: tuple[Size, ...] = (), names: tuple[str, ...] = NETWORKS) -> list[str]:
    """The stages a build runs, in order (for a progress bar); for a build of several `sizes`, named per size:
    every size's export and cleanup (or compile), then every size's engine builds. `names`: the build's networks
    (`layout.network_names(spec)`: the ControlNets after the three)."""
    ats = [f" {size_text(size)}" for size in sizes] if len(sizes) > 1 else [""]
    if builder == Builder.AOTI:
        return [f"compile {n}{at}" for at in ats for n in names]
    exports = [f"{s} {n}{at}" for at in ats for n in names for s in ("export", "cleanup")]
    return exports + ([f"build {n}{at}" for at in ats for n in names] if builder else [])


@dataclass
class _Plan:
    """What the previous build in the folder leaves usable: per (size, network), file kind -> entry."""

    old: Manifest | None
    keep: dict[tuple[Size, str], dict[str, FileEntry]] = field(default_factory=dict)

    def kept(self, size: Size, name: str, kind: str) -> FileEntry | None:
        return self.keep.get((size, name), {}).get(kind)


def _facts(builder: str | None, cfg: BuildConfig) -> tuple[str | None, dict, dict]:
    """(builder version, target, options) recorded in the manifest and compared for reuse."""
    if builder in FLAVOURS:
        trt, _ = import_tensorrt(builder)
        refit = {"refit": True} if cfg.swappable(builder) else {}  # a frozen build's options as before: caches stay
        return tensorrt_version(trt), {}, {"workspace_gib": cfg.workspace_gib, **refit}
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
    # Sizes are compared per file below: a size the previous build has is kept, one it lacks is built.
    same_sizes = replace(cfg.spec, height=old.spec.height, width=old.spec.width, sizes=old.spec.sizes)
    diffs = old.differences(same_sizes, weights, controlnet_records(cfg.spec))
    if old.shapes != cfg.shapes:
        diffs.append(f"shapes: the folder has {old.shapes}, asked {cfg.shapes}")
    elif cfg.dynamic and (old.spec.height, old.spec.width, old.spec.sizes) != (
        cfg.spec.height, cfg.spec.width, cfg.spec.sizes
    ):  # fmt: skip
        # one file serves every size, and its profile spans them (tuned at the start size): another set is new files
        diffs.append(f"sizes of a dynamic-shape build: the folder has {show_sizes(old.spec.served_sizes)}, asked "
                     f"{show_sizes(cfg.spec.served_sizes)}")  # fmt: skip
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
    kind = "package" if builder == Builder.AOTI else "engine"
    for size, networks in old.sized_networks().items():
        if size not in cfg.spec.served_sizes:
            continue
        for name, net in networks.items():
            keep = plan.keep.setdefault((size, name), {})
            if (
                _named(cfg, name, size, net.files.get("onnx"), ".onnx")
                and _intact(out, net.files["onnx"])
                and ("onnx_data" not in net.files or _intact(out, net.files["onnx_data"]))
            ):
                keep.update({k: net.files[k] for k in ("onnx", "onnx_data") if k in net.files})
            compiled = net.files.get(kind)
            suffix = ".pt2" if kind == "package" else ".engine"
            if compiled_ok and (kind == "package" or "onnx" in keep) and _named(cfg, name, size, compiled, suffix):
                if _intact(out, compiled):
                    keep[kind] = compiled
    return plan


def _named(cfg: BuildConfig, name: str, size: Size, entry: FileEntry | None, suffix: str) -> bool:
    """The file follows this build's naming rule (a single-size build's `unet.onnx` is not a sized build's)."""
    return entry is not None and entry.name == network_file(cfg.spec, name, size, suffix, cfg.dynamic)


def build(cfg: BuildConfig, progress: Progress | None = None) -> BuildResult:
    """Build (or reuse) the three networks of `cfg.spec` and write `manifest.json`.

    Raises `TensorRTUnavailable` before any export when the asked builder cannot run here.
    """
    from streamv2v_trt.models.controlnets import load_controlnets
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
    # The ONNX is the same either way; an --onnx-only rerun over an engine build keeps that build's weights unless
    # --weights asks otherwise.
    kept = builder is None and plan.old is not None and plan.old.builder is not None and cfg.weights is None
    if _complete(plan, builder, cfg.spec) and (plan.old.swappable == swappable or kept):
        log.info("reusing the build in %s (same spec, weights and builder, files intact); --force rebuilds", out)
        for desc in stages(builder, cfg.stage_sizes, network_names(cfg.spec)):
            step(f"{desc} (reused)")
        return _reused(out, plan.old, time.perf_counter() - t_start, why)

    run = _Run(cfg, out, plan, step)
    sizes = cfg.spec.served_sizes
    if builder != Builder.AOTI and all(plan.kept(s, n, "onnx") for s in sizes for n in network_names(cfg.spec)):
        run.reuse_onnx()  # only engines to build: no model to load (GBs for sd-turbo)
    else:
        device = cfg.aoti_device if builder == Builder.AOTI else torch.device("cpu")
        models = load_models(cfg.spec, device=device)
        if cfg.spec.loras:  # the networks carry them; the manifest records their hashes beside the base weights'
            fuse_loras(models.unet, cfg.spec.loras, text_encoder=models.text_encoder)
        controlnets = load_controlnets(cfg.spec, models.unet.config, device) if cfg.spec.controlnets else []
        if cfg.dynamic:
            run.export_onnx_dynamic(models, controlnets)
        for size in () if cfg.dynamic else sizes:  # one size's networks after the other, from the one model
            if builder == Builder.AOTI:
                run.compile_packages(models, controlnets, options, size)
            else:
                run.export_onnx(models, controlnets, size)
        del models, controlnets  # free the torch weights before TensorRT needs its memory
        gc.collect()
    ff_layers = run.ff_layers
    if builder in FLAVOURS and cfg.dynamic:
        run.build_dynamic_engines(builder, profiles(cfg.spec, weights, run.entries), refit=swappable)
    elif builder in FLAVOURS:
        for size in sizes:
            run.build_engines(builder, size, refit=swappable)
    run.remove_stale()
    old = plan.old
    start = (cfg.spec.height, cfg.spec.width)
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
        build_command=cfg.spec.build_command(out, builder=builder, onnx_only=builder is None)
        + (" --shapes dynamic" if cfg.dynamic else ""),
        networks=run.entries[start],
        size_networks={size_text(s): run.entries[s] for s in sizes if s != start},
        # this run's stage times over the previous build's for what was reused
        timings_s={**(old.timings_s if old else {}), **{k: round(v, 3) for k, v in run.timings.items()}},
        weights="swappable" if swappable else "frozen",
        controlnets=controlnet_records(cfg.spec),
        shapes=cfg.shapes,
    )
    manifest.save(out)
    return BuildResult(out, manifest, tuple(run.artifacts), time.perf_counter() - t_start, why)


def _complete(plan: _Plan, builder: str | None, spec: EngineSpec) -> bool:
    """Everything `builder` needs is in the previous build, intact. An --onnx-only build over a TensorRT build
    keeps its engines (the manifest stays as it was)."""
    if plan.old is None:
        return False
    kinds = {None: ("onnx",), Builder.AOTI: ("package",)}.get(builder, ("onnx", "engine"))
    return all(plan.kept(s, n, k) for s in spec.served_sizes for n in network_names(spec) for k in kinds)


def profiles(spec: EngineSpec, weights, entries: dict[Size, dict[str, NetworkEntry]]) -> dict[str, Profile]:
    """Each network's optimisation profile for `--shapes dynamic`: every input's shapes at the smallest height and
    width of the sizes (min), at the start size (opt: TensorRT tunes its kernels there) and at the largest (max).
    The corners, not each dimension's extremes: a bank's token count is the latent height times width, and a profile
    whose max pairs one size's height with another's token count is not self-consistent (TensorRT-RTX says so).
    The layout comes from the UNet's structure alone, so an engine build over a reused ONNX loads no weights."""
    from streamv2v_trt.models.loader import unet_skeleton  # diffusers: seconds to import

    start = (spec.height, spec.width)
    text = next(t.shape[1:] for t in entries[start]["unet"].tensors if t.name == "encoder_hidden_states")
    skeleton = unet_skeleton(spec, weights)
    corner = {}
    for label, pick in (("min", min), ("max", max)):
        h, w = pick(h for h, _ in entries), pick(w for _, w in entries)
        at = replace(spec, height=h, width=w, sizes=())
        corner[label] = bank_layout(skeleton, at).network_specs(at, tuple(text))
    result = {}
    for name, net in entries[start].items():
        shape = {label: {t.name: t.shape for t in corner[label][name]} for label in corner}
        result[name] = {t.name: (shape["min"][t.name], t.shape, shape["max"][t.name]) for t in net.inputs()}
    return result


class _Run:
    """The stages of one build, collecting manifest entries (per size), artifacts and timings as they go."""

    def __init__(self, cfg: BuildConfig, out: Path, plan: _Plan, step: Progress) -> None:
        self.cfg, self.out, self.plan, self.step = cfg, out, plan, step
        self.entries: dict[Size, dict[str, NetworkEntry]] = {s: {} for s in cfg.spec.served_sizes}
        self.artifacts: list[Artifact] = []
        self.timings: dict[str, float] = {}
        self.ff_layers: tuple[str, ...] = ()
        self.exporter: str | None = None
        self.sized = bool(cfg.spec.sizes)
        self.names = network_names(cfg.spec)  # the three, then one per ControlNet

    def _at(self, size: Size) -> str:
        """' 768x512' in a build for several sizes (stage names, timings), '' in a single-size one."""
        return f" {size_text(size)}" if self.sized else ""

    def _file(self, name: str, size: Size, suffix: str) -> Path:
        return self.out / network_file(self.cfg.spec, name, size, suffix, self.cfg.dynamic)

    def _spec(self, size: Size) -> EngineSpec:
        return replace(self.cfg.spec, height=size[0], width=size[1])

    def _artifact(self, name: str, kind: str, path: Path, size: Size, seconds: float, reused: bool, **kw) -> None:
        nbytes = path.stat().st_size
        if kind == "onnx" and path.with_name(path.name + ".data").is_file():
            nbytes += path.with_name(path.name + ".data").stat().st_size
        at = size_text(size) if self.sized and not self.cfg.dynamic else ""  # dynamic: one file for every size
        if any(a.path == path for a in self.artifacts):
            return
        self.artifacts.append(Artifact(name, kind, path, nbytes, seconds, reused, size=at, **kw))

    def _reuse(self, size: Size, name: str, kind: str, tensors) -> bool:
        entry = self.plan.kept(size, name, kind)
        if entry is None:
            return False
        wanted = ("onnx", "onnx_data") if kind == "onnx" else (kind,)
        files = {k: v for k, v in self.plan.keep[(size, name)].items() if k in wanted}
        entries = self.entries[size]
        entries[name] = NetworkEntry(tensors, {**entries.get(name, NetworkEntry(())).files, **files})
        self._artifact(name, kind, self.out / entry.name, size, 0.0, True)
        return True

    def reuse_onnx(self) -> None:
        old = self.plan.old
        self.ff_layers = old.ff_layers
        for size in self.entries:
            for name in self.names:
                self._reuse(size, name, "onnx", old.network(name, size).tensors)
        for size in self.cfg.stage_sizes or [None]:  # a dynamic-shape build: one file per network for every size
            for name in self.names:
                at = self._at(size) if size else ""
                self.step(f"export {name}{at} (reused)")
                self.step(f"cleanup {name}{at} (reused)")

    def export_onnx(self, models: Models, controlnets: list, size: Size) -> None:
        from .export import network_modules

        modules, specs = network_modules(models, self._spec(size), controlnets)
        self.ff_layers = tuple(layer.name for layer in modules["unet"].layout.layers if layer.fuse)
        at = self._at(size)
        for name in self.names:
            old = self.plan.old.sized_networks().get(size, {}).get(name) if self.plan.old else None
            if old is not None and self._reuse(size, name, "onnx", old.tensors):
                self.step(f"export {name}{at} (reused)")
                self.step(f"cleanup {name}{at} (reused)")
                continue
            self._export(name, modules[name], {size: specs[name]}, at)

    def export_onnx_dynamic(self, models: Models, controlnets: list) -> None:
        """`--shapes dynamic`: one ONNX per network for every size, traced at the start size with every dimension
        the sizes change symbolic; each size's manifest entry names that file with the size's own shapes."""
        from .export import network_modules

        start = (self.cfg.spec.height, self.cfg.spec.width)
        # Every size's I/O; the start size's modules last: each installs the bank processors of its size on the one
        # UNet, and the export traces the start size's.
        others = [size for size in self.entries if size != start]
        specs = {size: network_modules(models, self._spec(size), controlnets)[1] for size in others}
        modules, specs[start] = network_modules(models, self._spec(start), controlnets)
        self.ff_layers = tuple(layer.name for layer in modules["unet"].layout.layers if layer.fuse)
        old = self.plan.old
        for name in self.names:
            if old is not None and all(self.plan.kept(size, name, "onnx") for size in self.entries):
                for size in self.entries:
                    self._reuse(size, name, "onnx", old.network(name, size).tensors)
                self.step(f"export {name} (reused)")
                self.step(f"cleanup {name} (reused)")
                continue
            self._export(name, modules[name], {start: specs[start][name], **{s: specs[s][name] for s in others}}, "")

    def _export(self, name: str, module, specs: dict[Size, list], at: str) -> None:
        """Export, clean up and save network `name`, traced at the first size of `specs` (size -> its I/O) and
        symbolic in every dimension the sizes' I/O differ in (none for one size); the file is every size's entry."""
        from .cleanup import cleanup, save_onnx
        from .export import dynamic_dims, export_network, exporter_name, tensor_entries, varying_dims

        first, by_size = next(iter(specs)), list(specs.values())
        t0 = time.perf_counter()
        model = export_network(module, specs[first], self.cfg.spec.weights_seed, dynamic_dims(by_size))
        self.exporter = exporter_name()
        self.timings[f"export {name}{at}"] = time.perf_counter() - t0
        self.step(f"export {name}{at}")
        t1 = time.perf_counter()
        model, report = cleanup(model, name)
        varying = varying_dims(by_size)
        tensors = {size: tensor_entries(model, io, varying) for size, io in specs.items()}
        path = self._file(name, first, ".onnx")
        data = save_onnx(model, path)
        del model
        gc.collect()
        self.timings[f"cleanup {name}{at}"] = time.perf_counter() - t1
        files = {"onnx": FileEntry.of(path)} | ({"onnx_data": FileEntry.of(data)} if data else {})
        for size in specs:
            self.entries[size][name] = NetworkEntry(tensors[size], files)
        seconds = self.timings[f"export {name}{at}"] + self.timings[f"cleanup {name}{at}"]
        self._artifact(name, "onnx", path, first, seconds, False, nodes=report.nodes)
        self.step(f"cleanup {name}{at}")

    def build_dynamic_engines(self, builder: str, profiles: dict[str, Profile], refit: bool = False) -> None:
        """`--shapes dynamic`: one engine per network, its optimisation profile spanning the sizes (`profiles`)."""
        from .compile import build_engine

        start = (self.cfg.spec.height, self.cfg.spec.width)
        for name in self.names:
            net = self.entries[start][name]
            if all(self.plan.kept(s, name, "onnx") and self.plan.kept(s, name, "engine") for s in self.entries):
                for size in self.entries:
                    self._reuse(size, name, "engine", self.entries[size][name].tensors)
                self.step(f"build {name} (reused)")
                continue
            engine = self._file(name, start, ".engine")
            onnx_path = self.out / net.files["onnx"].name
            seconds = build_engine(onnx_path, engine, flavour=builder, workspace_gib=self.cfg.workspace_gib,
                                   refit=refit, profile=profiles[name])  # fmt: skip
            self.timings[f"build {name}"] = seconds
            entry = FileEntry.of(engine)
            for entries in self.entries.values():
                entries[name] = NetworkEntry(entries[name].tensors, {**entries[name].files, "engine": entry})
            self._artifact(name, "engine", engine, start, seconds, False)
            self.step(f"build {name}")

    def build_engines(self, builder: str, size: Size, refit: bool = False) -> None:
        from .compile import build_engine

        at = self._at(size)
        for name in self.names:
            net = self.entries[size][name]
            if self.plan.kept(size, name, "onnx") and self._reuse(size, name, "engine", net.tensors):
                self.step(f"build {name}{at} (reused)")
                continue
            engine = self._file(name, size, ".engine")
            onnx_path = self.out / net.files["onnx"].name
            seconds = build_engine(
                onnx_path, engine, flavour=builder, workspace_gib=self.cfg.workspace_gib, refit=refit
            )
            self.timings[f"build {name}{at}"] = seconds
            self.entries[size][name] = NetworkEntry(net.tensors, {**net.files, "engine": FileEntry.of(engine)})
            self._artifact(name, "engine", engine, size, seconds, False)
            self.step(f"build {name}{at}")

    def compile_packages(self, models: Models, controlnets: list, options: dict, size: Size) -> None:
        from .aoti import compile_aoti
        from .export import example_inputs, network_modules

        modules, specs = network_modules(models, self._spec(size), controlnets)
        self.ff_layers = tuple(layer.name for layer in modules["unet"].layout.layers if layer.fuse)
        self.exporter = f"torch {torch.__version__} torch.export + AOTInductor"
        device, at = self.cfg.aoti_device, self._at(size)
        for name in self.names:
            tensors = tuple(specs[name])
            if self._reuse(size, name, "package", tensors):
                self.step(f"compile {name}{at} (reused)")
                continue
            path = self._file(name, size, ".pt2")
            inputs = {k: v.to(device) for k, v in example_inputs(specs[name], seed=self.cfg.spec.weights_seed).items()}
            names_in = [s.name for s in specs[name] if s.is_input]
            names_out = [s.name for s in specs[name] if not s.is_input]
            result = compile_aoti(modules[name], inputs, names_in, names_out, path, device, options=options)
            self.timings[f"compile {name}{at}"] = result.seconds
            self.entries[size][name] = NetworkEntry(tensors, {"package": FileEntry.of(path)})
            self._artifact(name, "package", path, size, result.seconds, False)
            self.step(f"compile {name}{at}")

    def remove_stale(self) -> None:
        """Files of an earlier build, named by the naming rule, that this manifest does not list would mislead
        (compiled files) or waste space (another size's ONNX): remove them."""
        listed = {f.name for nets in self.entries.values() for net in nets.values() for f in net.files.values()}
        names = "|".join((*NETWORKS, r"controlnet_\d+"))  # another build's ControlNets too
        ours = re.compile(rf"({names})(-\d+x\d+)?\.(engine|pt2)")
        sized_onnx = re.compile(rf"({names})-\d+x\d+\.onnx(\.data)?")
        # a build with more ControlNets, or a dynamic-shape build's (or a single size's) before a static multi-size one
        plain_onnx = re.compile(rf"({names})\.onnx(\.data)?")
        for stale in self.out.iterdir():
            named = (ours, sized_onnx, plain_onnx)
            if any(p.fullmatch(stale.name) for p in named) and stale.name not in listed:
                log.info("removing %s: not part of this build", stale)
                stale.unlink()


def _reused(out: Path, manifest: Manifest, seconds: float, why: str) -> BuildResult:
    """A cache hit: `manifest` already describes intact files for everything asked."""
    artifacts = []
    sized = manifest.sized_networks()
    for at, networks in sized.items():
        for name, net in networks.items():
            for kind in ("onnx", "engine", "package"):
                entry = net.files.get(kind)
                if entry is None:
                    continue
                size = (out / entry.name).stat().st_size
                if kind == "onnx" and "onnx_data" in net.files:
                    size += (out / net.files["onnx_data"].name).stat().st_size
                text = size_text(at) if len(sized) > 1 else ""
                artifacts.append(Artifact(name, kind, out / entry.name, size, 0.0, True, size=text))
    return BuildResult(out, manifest, tuple(artifacts), seconds, why)
