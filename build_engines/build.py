"""`build(cfg)`: export -> cleanup -> engine build -> manifest, reusing what a previous build left intact.

The cache is the manifest: a network's ONNX is reused when the old manifest's configuration matches `cfg`
(weights hash included) and its files still hash to what the manifest says; its engine is reused when the
builder flavour matches too. `cfg.force` rebuilds everything.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from streamv2v_trt.engine.manifest import (
    NETWORKS,
    EngineMismatch,
    Manifest,
    NetworkEntry,
    load_manifest,
    sha256_file,
)
from streamv2v_trt.engine.trt import import_tensorrt, tensorrt_version
from streamv2v_trt.models import Models, load_models
from streamv2v_trt.models.lora import fuse_loras, lora_record

from .cleanup import cleanup, save_onnx
from .compile import build_engine
from .config import BuildConfig
from .export import export_unet, export_vae, exporter_name, tensor_entries

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Artifact:
    """One file of the build, for the summary: what, where, how big, how long, built or reused."""

    network: str
    kind: str  # "onnx" or "engine"
    path: Path
    bytes: int
    seconds: float  # export+cleanup+save for onnx, build for engine; 0 when reused
    reused: bool
    nodes: int | None = None  # ONNX nodes after cleanup


@dataclass(frozen=True)
class BuildResult:
    out: Path
    manifest: Manifest
    artifacts: tuple[Artifact, ...]
    seconds: float

    @property
    def reused(self) -> bool:
        """True when nothing had to be rebuilt."""
        return all(a.reused for a in self.artifacts)


Progress = Callable[[str], None]  # called once per finished stage with its description


def stages(cfg: BuildConfig) -> list[str]:
    names = [f"{s} {n}" for n in NETWORKS for s in ("export", "cleanup")]
    if not cfg.onnx_only:
        names += [f"build {n}" for n in NETWORKS]
    return names


def _previous(cfg: BuildConfig, weights_hash: str) -> Manifest | None:
    """The old manifest if its configuration matches cfg (files are checked per network by the caller)."""
    if cfg.force:
        return None
    try:
        old = load_manifest(cfg.out)
    except EngineMismatch as e:
        if (cfg.out / "manifest.json").exists():
            log.warning("ignoring the previous build: %s", e)
        return None
    diffs = old.differences(replace(cfg.request(weights_hash), need="onnx", builder=None))
    if diffs:
        log.info("previous build in %s differs (%s): rebuilding", cfg.out, "; ".join(diffs))
        return None
    return old


def _intact(out: Path, files: list[tuple[str, str | None]]) -> bool:
    return all((out / f).is_file() and sha256_file(out / f) == digest for f, digest in files)


def _reusable_engines(
    cfg: BuildConfig, old: Manifest | None, onnx_reused: dict[str, bool], flavour: str | None, version: str | None
) -> dict[str, NetworkEntry]:
    """Old network entries whose engine can stay: built from the reused ONNX, by the same builder, file intact."""
    if old is None or old.builder is None:
        return {}
    if not cfg.onnx_only and (old.builder, old.builder_version) != (flavour, version):
        return {}
    keep = {}
    for name, reused in onnx_reused.items():
        prev = old.networks[name] if reused else None
        if prev is not None and prev.engine and _intact(cfg.out, [(prev.engine, prev.engine_sha256)]):
            keep[name] = prev
    return keep


def _export(models: Models, cfg: BuildConfig, name: str):
    if name == "unet":
        model, layout, specs = export_unet(models, cfg)
        return model, specs, tuple(layer.name for layer in layout.layers if layer.fuse)
    model, specs = export_vae(models, cfg, name)
    return model, specs, None


def build(cfg: BuildConfig, progress: Progress | None = None) -> BuildResult:
    """Build (or reuse) the three networks of `cfg` into `cfg.out` and write `manifest.json`.

    Raises `TensorRTUnavailable` before any export when engines are asked but no TensorRT is installed.
    """
    t_start = time.perf_counter()
    step = progress or (lambda _desc: None)
    flavour = version = None
    if not cfg.onnx_only:
        trt, flavour = import_tensorrt(cfg.builder.value)  # fail before minutes of export, not after
        version = tensorrt_version(trt)
    cfg.out.mkdir(parents=True, exist_ok=True)

    models = load_models(cfg.model, vae=cfg.vae, dtype=cfg.precision.torch_dtype, seed=cfg.seed)
    weights_hash, random_weights = models.weights_hash(), models.random_weights  # base weights, before LoRAs
    old = _previous(cfg, weights_hash)
    if old is not None and old.interval == cfg.bank.interval:  # interval is only recorded: a new one rewrites
        try:
            old.check(cfg.request(weights_hash), cfg.out)  # everything asked for is there and intact
            return _reused(cfg, old, step, time.perf_counter() - t_start)
        except EngineMismatch as e:
            log.info("rebuilding part of %s: %s", cfg.out, e)

    if cfg.loras:  # the engine carries them; the manifest records their fingerprint next to the base hash
        fuse_loras(models.unet, cfg.loras, text_encoder=models.text_encoder)
    entries: dict[str, NetworkEntry] = {}
    artifacts: list[Artifact] = []
    timings: dict[str, float] = {}
    ff_layers: tuple[str, ...] = ()
    onnx_reused: dict[str, bool] = {}
    for name in NETWORKS:
        prev = old.networks.get(name) if old else None
        if prev is not None and _intact(cfg.out, prev.files(with_engine=False)):
            entries[name] = replace(prev, engine=None, engine_sha256=None)
            onnx_reused[name] = True
            if name == "unet":
                ff_layers = old.ff_layers
            path = cfg.out / prev.onnx
            size = sum((cfg.out / f).stat().st_size for f, _ in prev.files(with_engine=False))
            artifacts.append(Artifact(name, "onnx", path, size, 0.0, True))
            step(f"export {name} (reused)")
            step(f"cleanup {name} (reused)")
            continue
        t0 = time.perf_counter()
        model, specs, ff = _export(models, cfg, name)
        timings[f"export {name}"] = time.perf_counter() - t0
        if ff is not None:
            ff_layers = ff
        step(f"export {name}")
        t1 = time.perf_counter()
        model, report = cleanup(model, name)
        tensors = tensor_entries(model, specs)
        path = cfg.out / f"{name}.onnx"
        data = save_onnx(model, path)
        del model
        gc.collect()
        timings[f"cleanup {name}"] = time.perf_counter() - t1
        entries[name] = NetworkEntry(
            onnx=path.name,
            onnx_sha256=sha256_file(path),
            tensors=tensors,
            onnx_data=data.name if data else None,
            onnx_data_sha256=sha256_file(data) if data else None,
        )
        onnx_reused[name] = False
        size = path.stat().st_size + (data.stat().st_size if data else 0)
        seconds = timings[f"export {name}"] + timings[f"cleanup {name}"]
        artifacts.append(Artifact(name, "onnx", path, size, seconds, False, report.nodes))
        step(f"cleanup {name}")
    del models  # free the torch weights before TensorRT needs its memory
    gc.collect()

    keep = _reusable_engines(cfg, old, onnx_reused, flavour, version)
    if cfg.onnx_only and len(keep) == len(NETWORKS):  # --onnx-only over a complete build keeps its engines
        flavour, version = old.builder, old.builder_version
    for name in NETWORKS:
        engine = cfg.out / f"{name}.engine"
        if name in keep and (not cfg.onnx_only or flavour is not None):
            entries[name] = replace(entries[name], engine=keep[name].engine, engine_sha256=keep[name].engine_sha256)
            artifacts.append(Artifact(name, "engine", engine, engine.stat().st_size, 0.0, True))
            if not cfg.onnx_only:
                step(f"build {name} (reused)")
            continue
        if cfg.onnx_only:
            continue
        seconds = build_engine(cfg.out / entries[name].onnx, engine, flavour=flavour, workspace_gib=cfg.workspace_gib)
        timings[f"build {name}"] = seconds
        entries[name] = replace(entries[name], engine=engine.name, engine_sha256=sha256_file(engine))
        artifacts.append(Artifact(name, "engine", engine, engine.stat().st_size, seconds, False))
        step(f"build {name}")

    for name in NETWORKS:  # engines of an earlier build that this manifest does not list would mislead
        stale = cfg.out / f"{name}.engine"
        if entries[name].engine is None and stale.exists():
            log.info("removing %s: not part of this build", stale)
            stale.unlink()
    reused_all = all(a.reused for a in artifacts)
    manifest = Manifest(
        model=cfg.model,
        weights_hash=weights_hash,
        random_weights=random_weights,
        height=cfg.height,
        width=cfg.width,
        t_index_list=cfg.t_index_list,
        cfg_type=cfg.cfg_type.value,
        loras=lora_record(cfg.loras),
        bank_kind=cfg.bank.kind.value,
        bank_frames=cfg.bank.frames,
        interval=cfg.bank.interval,
        ff_layers=ff_layers,
        ff_threshold=cfg.bank.ff_threshold,
        ff_strength=cfg.bank.ff_strength,
        vae=cfg.vae.value,
        precision=cfg.precision.value,
        builder=flavour,
        builder_version=version,
        exporter=old.exporter if old and all(onnx_reused.values()) else exporter_name(),
        created=old.created if old and reused_all else datetime.now(timezone.utc).isoformat(timespec="seconds"),
        build_command=cfg.request().command(cfg.out),
        networks=entries,
        # this run's stage times over the previous build's for what was reused
        timings_s={**(old.timings_s if old else {}), **{k: round(v, 3) for k, v in timings.items()}},
    )
    if not (old and reused_all and old == manifest):
        manifest.save(cfg.out)
    return BuildResult(cfg.out, manifest, tuple(artifacts), time.perf_counter() - t_start)


def _reused(cfg: BuildConfig, manifest: Manifest, step: Progress, seconds: float) -> BuildResult:
    """A cache hit: `manifest` already describes intact files for everything `cfg` asks."""
    artifacts = []
    for name, net in manifest.networks.items():
        files = [("onnx", net.onnx)] + ([("engine", net.engine)] if net.engine else [])
        for kind, file in files:
            path = cfg.out / file
            size = path.stat().st_size + (
                (cfg.out / net.onnx_data).stat().st_size if kind == "onnx" and net.onnx_data else 0
            )
            artifacts.append(Artifact(name, kind, path, size, 0.0, True))
    for desc in stages(cfg):
        step(f"{desc} (reused)")
    log.info("reusing the build in %s (same configuration, files intact); --force rebuilds", cfg.out)
    return BuildResult(cfg.out, manifest, tuple(artifacts), seconds)
