"""One loader for the packaged presets, a local diffusers folder, or a hub id.

Presets (`tiny`, `sd-turbo`, `sd15`) build the exact architecture from the JSON configs shipped in the
package. Real weights are used when they are on disk (a local folder, or the preset's hub id already in
the Hugging Face cache); otherwise the weights are seeded random and a warning says so. Weights load only
from safetensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, LCMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..presets import PRESETS, ModelPreset, ModelUnavailable
from ..spec import EngineSpec, VaeKind
from .tokenizer import clip_tokenizer

log = logging.getLogger(__name__)


@dataclass
class Models:
    """Everything a StreamV2V pipeline needs, on one device and dtype."""

    name: str
    unet: UNet2DConditionModel
    vae: AutoencoderTiny | AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: LCMScheduler
    weights: Weights  # where the weights came from; `weights.hash()` identifies them


@dataclass(frozen=True)
class Weights:
    """Where a spec's UNet and VAE weights come from: a diffusers folder (real) or a preset's seeded recipe."""

    spec_model: str
    folder: Path | None  # diffusers folder with real weights; None: seeded random weights
    taesd: Path | None = None  # TAESD folder when the VAE is TAESD and `folder` has no vae_tiny/
    recipe: str | None = None  # random weights: what determines them (configs, seed, VAE kind, calibration)

    @property
    def random(self) -> bool:
        return self.folder is None

    def files(self, vae: VaeKind) -> list[Path]:
        """The safetensors files of the UNet and the VAE used."""
        vae_dir = self.taesd or (self.folder / ("vae" if vae is VaeKind.FULL else "vae_tiny"))
        return sorted((self.folder / "unet").glob("*.safetensors")) + sorted(vae_dir.glob("*.safetensors"))

    def hash(self, vae: VaeKind) -> str:
        """Identifies the UNet and VAE weights, so engines built from other weights are refused. Cheap: no model
        is built. Real weights: each file's safetensors header (names, shapes, dtypes) and 64 strided 64 KiB
        blocks of its data. Random weights: their recipe (the random VAE calibration runs convolutions whose
        last bits depend on the CPU thread count, so hashing the values would refuse a valid engine)."""
        h = hashlib.sha256()
        if self.recipe is not None:
            h.update(self.recipe.encode())
            return h.hexdigest()[:16]
        files = self.files(vae)
        if not files:
            raise FileNotFoundError(f"no .safetensors weights for the UNet and VAE under {self.folder}")
        hash_safetensors(h, files, lambda path: f"{path.parent.name}/{path.name}")
        return h.hexdigest()[:16]


def hash_safetensors(h, files: list[Path], label: Callable[[Path], str]) -> None:
    """Feed `h` each file's `label`, size, safetensors header (names, shapes, dtypes) and 64 strided 64 KiB blocks
    of its data: cheap, and a change of any weight's values is caught unless it falls between the blocks."""
    for path in files:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            h.update(f"{label(path)}:{size}:".encode() + f.read(min(header_len, size)))
            for i in range(64):
                f.seek(i * size // 64)
                h.update(f.read(1 << 16))


_WARNED_RANDOM: set[tuple[str, int]] = set()  # warn once per process and preset, not on every load
RANDOM_VAE_CALIBRATION = "v1"  # bump when _calibrate_random_vae changes: random-weight engines then rebuild


def _random_init(build, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


@torch.no_grad()
def _standardize_conv(conv: torch.nn.Conv2d, out: torch.Tensor, mean: float, std: float, channels: int) -> None:
    """Rescale the first `channels` outputs of `conv` (whose output on a probe was `out`) to mean/std per channel."""
    m = out[:, :channels].mean(dim=(0, 2, 3))
    s = out[:, :channels].std(dim=(0, 2, 3)).clamp_min(1e-8)
    conv.weight[:channels] *= (std / s).view(-1, 1, 1, 1)
    conv.bias[:channels] = (conv.bias[:channels] - m) * (std / s) + mean


@torch.no_grad()
def _calibrate_random_vae(vae: AutoencoderTiny | AutoencoderKL, seed: int) -> None:
    """Seeded random VAEs give near-constant images; rescale their last convolutions so latents have unit
    variance and decoded images span [-1, 1] as a trained VAE's do. The random structure is kept, so outputs
    still depend on the input (which tests need)."""
    from ..vae import VaeDecoder, VaeEncoder

    tiny = isinstance(vae, AutoencoderTiny)
    enc_conv = vae.encoder.layers[-1] if tiny else vae.quant_conv
    dec_conv = vae.decoder.layers[-1] if tiny else vae.decoder.conv_out
    probe = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    captured = {}
    hook = enc_conv.register_forward_hook(lambda _mod, _args, out: captured.__setitem__("enc", out))
    VaeEncoder(vae)(probe)
    hook.remove()
    _standardize_conv(enc_conv, captured["enc"], 0.0, 1.0 / vae.config.scaling_factor, 4)
    hook = dec_conv.register_forward_hook(lambda _mod, _args, out: captured.__setitem__("dec", out))
    VaeDecoder(vae)(VaeEncoder(vae)(probe))
    hook.remove()
    # TAESD's last conv outputs [0, 1] images (mapped to [-1, 1] after it); the KL decoder's outputs [-1, 1].
    _standardize_conv(dec_conv, captured["dec"], 0.5 if tiny else 0.0, 0.2 if tiny else 0.4, 3)


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _cached_snapshot(hub_id: str) -> Path | None:
    """The local Hugging Face cache copy of `hub_id`, never downloading; None when it is not cached.

    Only "not in the cache" means None: any other failure (a corrupt cache, a permission error) raises, so a
    broken copy of real weights never turns silently into random weights.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(hub_id, local_files_only=True))
    except LocalEntryNotFoundError:
        return None


LOCAL_LAYOUT = "unet/, vae/, text_encoder/, tokenizer/, scheduler/"  # what a diffusers pipeline folder holds


def _download(hub_id: str, what: str = "model", instead: str | None = None) -> Path:
    """`hub_id`'s configs and safetensors weights: from the local Hugging Face cache, else downloaded.

    The hub's failures arrive as chains of three exceptions (the connection error, the cache miss, ...), none saying
    how to run without the hub: they become one ModelUnavailable that does. `what` names the thing in the message
    ("model", "ControlNet"); `instead` says what to pass instead (default: a local pipeline folder or a preset)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    instead = instead or (
        f"Pass a local diffusers folder instead (--model PATH, with {LOCAL_LAYOUT}; where there is network, "
        f"`hf download {hub_id} --local-dir PATH` makes one)"
    )
    presets = ", ".join(PRESETS) if what == "model" else None
    what_to_do = f"{instead}, or run this once with network (the files are then cached)" + (
        f", or use a preset ({presets})." if presets else "."
    )
    try:
        return Path(snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:  # the hub answered: no such (visible) model
        raise ModelUnavailable(
            f"{what} {hub_id!r} is not on the Hugging Face hub, or is private or gated (log in with `hf auth login`). "
            f"{what_to_do}"
        ) from e
    # No network, offline mode or a refused connection, and the files are not in the cache (the hub falls back to
    # the cache on connection errors and raises LocalEntryNotFoundError when that misses too).
    except (LocalEntryNotFoundError, ConnectionError) as e:
        root: BaseException = e  # the first failure of the chain names the cause (e.g. a DNS error)
        while (earlier := root.__cause__ or root.__context__) is not None:
            root = earlier
        first_line = (str(root).strip().splitlines() or [""])[0]
        why = f"{type(root).__name__}: {first_line}"
        if constants.is_offline_mode():
            why = "offline mode: HF_HUB_OFFLINE is set"
        raise ModelUnavailable(
            f"{what} {hub_id!r}: the Hugging Face hub cannot be reached ({why}) and its files are not in the local "
            f"cache. {what_to_do}"
        ) from e


def _recipe(preset: ModelPreset, vae: VaeKind, seed: int) -> str:
    cfg = preset.config_dir
    return json.dumps(
        {
            "preset": preset.name,
            "seed": seed,
            "vae": vae.value,
            "configs": {f: _load_json(cfg / f) for f in ("unet.json", _VAE_CONFIGS[vae], "text_encoder.json")},
            "calibration": RANDOM_VAE_CALIBRATION,
        },
        sort_keys=True,
    )


_VAE_CONFIGS = {VaeKind.TAESD: "vae_tiny.json", VaeKind.FULL: "vae_kl.json"}


def find_weights(spec: EngineSpec) -> Weights:
    """Where `spec.model`'s weights are: a local diffusers folder, a hub id (downloaded), or a preset (its hub id
    when already in the Hugging Face cache, else seeded random weights). Nothing is loaded yet."""
    preset = PRESETS.get(spec.model)
    if preset is not None:
        folder = _cached_snapshot(preset.hub_id) if preset.hub_id else None
        if folder is None:
            return Weights(spec.model, None, recipe=_recipe(preset, spec.vae, spec.weights_seed))
        log.info("using %s weights from the local cache: %s", preset.name, folder)
    else:
        folder = Path(spec.model)
        if not folder.exists():
            if "/" not in spec.model or spec.model.startswith((".", "/")):
                raise ModelUnavailable(
                    f"model {spec.model!r} is neither a preset ({', '.join(PRESETS)}), a local folder, nor a hub id "
                    "(owner/name)."
                )
            folder = _download(spec.model)
    missing = [d for d in ("unet", "text_encoder", "tokenizer", "scheduler") if not (folder / d).is_dir()]
    if missing:
        raise ModelUnavailable(
            f"{folder} is not a diffusers pipeline folder: missing {', '.join(missing)}/. "
            f"Expected the layout of e.g. stabilityai/sd-turbo ({LOCAL_LAYOUT})."
        )
    taesd = None
    if spec.vae is VaeKind.TAESD and not (folder / "vae_tiny").is_dir():
        taesd_id = preset.taesd_hub_id if preset else "madebyollin/taesd"
        taesd = _cached_snapshot(taesd_id)
        if taesd is None:
            raise ModelUnavailable(
                f"--vae taesd needs TAESD weights: put them in {folder / 'vae_tiny'} or the Hugging Face cache "
                f"(hf download {taesd_id}), or use --vae full."
            )
    return Weights(spec.model, folder, taesd)


def _warn_random(spec: EngineSpec) -> None:
    key = (spec.model, spec.weights_seed)
    if key in _WARNED_RANDOM:
        return
    _WARNED_RANDOM.add(key)
    hub_id = PRESETS[spec.model].hub_id
    log.warning(
        "model %r: no local weights found%s; using the %s architecture with seeded RANDOM weights (seed %d). "
        "Outputs are noise-like; pass a diffusers folder or hub id for real results.",
        spec.model,
        f" (looked for {hub_id} in the Hugging Face cache)" if hub_id else "",
        spec.model,
        spec.weights_seed,
    )


def _prepare(m: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    if next(m.parameters()).dtype != dtype:
        # nn.Module.to, not diffusers' override: that one warns about an empty list of fp32-only modules.
        torch.nn.Module.to(m, dtype=dtype)
    m.to(device=device).eval().requires_grad_(False)


def load_text(
    spec: EngineSpec, weights: Weights, device: torch.device | str, dtype: torch.dtype
) -> tuple[CLIPTokenizer, CLIPTextModel, LCMScheduler]:
    """The tokenizer, text encoder and scheduler of `spec.model`: all an engine build folder still needs."""
    if weights.random:
        preset = PRESETS[spec.model]
        cfg = preset.config_dir
        text_cfg = {k: v for k, v in _load_json(cfg / "text_encoder.json").items() if k != "_class_name"}
        text_encoder = _random_init(lambda: CLIPTextModel(CLIPTextConfig(**text_cfg)), spec.weights_seed + 2)
        tokenizer = clip_tokenizer(preset.tokenizer_pad_token)
        scheduler = LCMScheduler.from_config(_load_json(cfg / "scheduler.json"))
    else:
        folder = weights.folder
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        scheduler = LCMScheduler.from_config(LCMScheduler.load_config(folder, subfolder="scheduler"))
    _prepare(text_encoder, device, dtype)
    return tokenizer, text_encoder, scheduler


def unet_skeleton(spec: EngineSpec, weights: Weights) -> UNet2DConditionModel:
    """The UNet's structure without weights (on the meta device): enough for its bank layout, in milliseconds."""
    if weights.random:
        config = _load_json(PRESETS[spec.model].config_dir / "unet.json")
    else:
        config = UNet2DConditionModel.load_config(weights.folder, subfolder="unet")
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def load_unet(spec: EngineSpec, weights: Weights, device: torch.device | str | None = None) -> UNet2DConditionModel:
    """The UNet alone (random weights seeded as `load_models` seeds them), in `spec.precision`; on `device` (eval,
    no grad) when given. A swappable AOTInductor folder keeps it on the CPU as the base of its LoRA swaps."""
    if weights.random:
        _warn_random(spec)
        config = _load_json(PRESETS[spec.model].config_dir / "unet.json")
        unet = _random_init(lambda: UNet2DConditionModel.from_config(config), spec.weights_seed)
    else:
        unet = UNet2DConditionModel.from_pretrained(weights.folder, subfolder="unet", use_safetensors=True)
    if device is not None:
        _prepare(unet, device, spec.precision.torch_dtype)
    return unet


def load_models(spec: EngineSpec, device: torch.device | str = "cpu") -> Models:
    """Load `spec.model` (a preset name, a local diffusers folder, or a hub id) in `spec.precision` with
    `spec.vae`; a preset without real weights on disk gets seeded random weights (`spec.weights_seed`).
    LoRAs are not fused here: the weights hash is of the base weights (callers fuse `spec.loras` after it)."""
    weights = find_weights(spec)
    dtype = spec.precision.torch_dtype
    seed = spec.weights_seed
    unet = load_unet(spec, weights)
    if weights.random:
        cfg = PRESETS[spec.model].config_dir
        vae_cls = AutoencoderTiny if spec.vae is VaeKind.TAESD else AutoencoderKL
        vae = _random_init(lambda: vae_cls.from_config(_load_json(cfg / _VAE_CONFIGS[spec.vae])), seed + 1)
        _calibrate_random_vae(vae, seed)
    else:
        if spec.vae is VaeKind.FULL:
            vae = AutoencoderKL.from_pretrained(weights.folder, subfolder="vae", use_safetensors=True)
        elif weights.taesd is None:
            vae = AutoencoderTiny.from_pretrained(weights.folder, subfolder="vae_tiny", use_safetensors=True)
        else:
            vae = AutoencoderTiny.from_pretrained(weights.taesd, use_safetensors=True)
    for m in (unet, vae):
        _prepare(m, device, dtype)
    tokenizer, text_encoder, scheduler = load_text(spec, weights, device, dtype)
    return Models(spec.model, unet, vae, text_encoder, tokenizer, scheduler, weights)
