"""Open a build folder for the runtime: load and check `manifest.json`, then run its files with the asked backend.

The manifest decides everything the engines were built for (model, resolution, UNet batch, bank, precision);
a stream config that asks something else is refused with `EngineMismatch` naming the differences and the
command that rebuilds them. The text encoder is not an engine: it runs in PyTorch (only on a prompt change),
loaded from the manifest's model id.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import torch

from ..config import BankConfig, StreamConfig
from ..engine.manifest import EngineMismatch, EngineRequest, Manifest, load_checked, load_manifest
from ..layout import BankLayout, bank_layout
from ..models.lora import LoraSpec, fuse_loras, lora_mismatch
from ..prompt import PromptEncoder
from . import Backend

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "tensorrt")
_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


@dataclass
class OpenedEngines:
    backend: Backend
    manifest: Manifest
    cfg: StreamConfig
    prompt_encoder: PromptEncoder
    scheduler: object  # the model's LCMScheduler


def stream_config(manifest: Manifest) -> StreamConfig:
    """The stream config the engines were built for (interval and t_index_list values are runtime choices)."""
    bank = BankConfig(
        kind=manifest.bank_kind,
        frames=manifest.bank_frames,
        interval=manifest.interval,
        ff_threshold=manifest.ff_threshold,
        ff_strength=manifest.ff_strength,
    )
    return StreamConfig(
        height=manifest.height,
        width=manifest.width,
        t_index_list=manifest.t_index_list,
        cfg_type=manifest.cfg_type,
        bank=bank,
    )


def _check_unet_tensors(
    manifest: Manifest, layout: BankLayout, cfg: StreamConfig, text: tuple[int, int], req: EngineRequest, where: Path
) -> None:
    """Every UNet tensor the manifest lists must have the name and shape this config's layout gives it."""
    want = {s.name: s.shape for s in layout.tensor_specs(cfg.unet_batch, (cfg.height // 8, cfg.width // 8), *text)}
    have = {t.name: t.shape for t in manifest.network("unet").tensors}
    if want == have:
        return
    diffs = [f"{n}: engines have {have.get(n, 'nothing')}, asked {s}" for n, s in want.items() if have.get(n) != s]
    diffs += [f"{n}: in the engines, not in this config's layout" for n in have.keys() - want.keys()]
    raise EngineMismatch(
        f"unet tensors in the manifest differ from this stream config (UNet batch {cfg.unet_batch}, "
        f"guidance {cfg.cfg_type.value}): {'; '.join(diffs[:6])}{' ...' if len(diffs) > 6 else ''}. "
        f"Rebuild: {req.command(where)}"
    )


def _lora_hint(manifest: Manifest, loras: Sequence[LoraSpec]) -> str | None:
    """When the LoRAs differ, the other way out: open the engines with the LoRAs they were built with."""
    built = (manifest.loras or {}).get("files", [])
    if not built or lora_mismatch(manifest.loras, loras) is None:
        return None
    flags = " ".join(f"--lora {f['name']}:{f['scale']:g}" for f in built)
    return (
        f"Or run them as built: pass the same LoRA file(s) and scale(s) when opening them ({flags}, with each "
        "file's path; in Python loras=[LoraSpec(path, scale), ...])."
    )


def open_engines(
    directory: str | PathLike,
    backend: str = "onnxruntime",
    cfg: StreamConfig | None = None,
    *,
    device: torch.device | str | None = None,
    precision: str | None = None,
    seed: int = 0,
    verify_hashes: bool = True,
    threads: int | None = None,
    loras: Sequence[LoraSpec] = (),
) -> OpenedEngines:
    """Check the build in `directory` against `cfg` (default: what it was built for) and build `backend` on it.

    precision: "fp16"/"fp32" to insist on one, None accepts the build's. seed: the random-weight seed the build
    used (weights are hashed and compared). verify_hashes=False skips hashing files and weights (faster loads).
    loras: the LoRAs the build fused (checked against the manifest); their text-encoder layers are fused here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {BACKENDS} (or use from_pretrained for eager)")
    from ..models import load_models

    directory = Path(directory)
    manifest = load_manifest(directory)
    cfg = cfg or stream_config(manifest)
    precision = precision or manifest.precision
    device = torch.device(device or ("cuda" if backend == "tensorrt" else "cpu"))
    # Weights in the build's dtype, on the CPU: the weights hash is computed the way the build computed it.
    models = load_models(manifest.model, vae=manifest.vae, dtype=_DTYPES[manifest.precision], seed=seed)
    req = EngineRequest.from_stream(
        manifest.model,
        cfg,
        vae=manifest.vae,
        precision=precision,
        weights_hash=models.weights_hash() if verify_hashes else None,
        need="onnx" if backend == "onnxruntime" else "engine",
        loras=tuple(loras),
    )
    try:
        manifest = load_checked(directory, req, verify_hashes=verify_hashes)
    except EngineMismatch as e:
        hint = _lora_hint(manifest, loras)
        if hint:
            raise EngineMismatch(f"{e} {hint}") from e
        raise
    latent_hw = (cfg.height // 8, cfg.width // 8)
    layout = bank_layout(models.unet, cfg.bank, latent_hw)
    text = (models.text_encoder.config.max_position_embeddings, models.unet.config.cross_attention_dim)
    _check_unet_tensors(manifest, layout, cfg, text, req, directory)

    files = {name: directory / manifest.network(name).onnx for name in ("unet", "vae_encoder", "vae_decoder")}
    if backend == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        runner = OnnxRuntimeBackend(
            files["unet"], files["vae_encoder"], files["vae_decoder"], layout, device=device, threads=threads
        )
    else:
        from .tensorrt import TensorRTBackend

        engines = {name: directory / manifest.network(name).engine for name in files}
        runner = TensorRTBackend(
            engines["unet"], engines["vae_encoder"], engines["vae_decoder"], layout, device=device,
            flavour=manifest.builder or "auto",
        )  # fmt: skip
    # The text encoder runs in PyTorch; on a CPU in fp32 (fp16 matmuls there are slow or missing).
    text_dtype = torch.float32 if device.type == "cpu" else runner.dtype
    if loras:  # the UNet's LoRA layers are in the engine; the text encoder's still run in PyTorch
        fuse_loras(None, loras, text_encoder=models.text_encoder)
    text_encoder = models.text_encoder.to(device=device, dtype=text_dtype)
    log.info("opened %s (%s, %s) with the %s backend on %s", directory, manifest.model, precision, backend, device)
    return OpenedEngines(runner, manifest, cfg, PromptEncoder(models.tokenizer, text_encoder), models.scheduler)
