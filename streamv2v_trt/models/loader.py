"""One loader for the packaged presets, a local diffusers folder, or a hub id.

Presets (`tiny`, `sd-turbo`, `sd15`) build the exact architecture from the JSON configs shipped in the
package. Real weights are used when they are on disk (a local folder, or the preset's hub id already in
the Hugging Face cache); otherwise the weights are seeded random and a warning says so. Weights load only
from safetensors.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, LCMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .presets import PRESETS, ModelPreset
from .tokenizer import clip_tokenizer

log = logging.getLogger(__name__)


class VaeKind(str, enum.Enum):
    TAESD = "taesd"
    FULL = "full"


@dataclass
class Models:
    """Everything a StreamV2V pipeline needs, on one device and dtype."""

    name: str
    unet: UNet2DConditionModel
    vae: AutoencoderTiny | AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: LCMScheduler
    random_weights: bool
    default_size: tuple[int, int]  # (height, width)
    default_t_index_list: tuple[int, ...]
    recipe: str | None = None  # for seeded random weights: what determines them (configs, seed, VAE kind)

    @property
    def vae_kind(self) -> VaeKind:
        return VaeKind.TAESD if isinstance(self.vae, AutoencoderTiny) else VaeKind.FULL

    @property
    def vae_scale(self) -> int:
        return 8  # both TAESD and the SD KL autoencoder downsample by 8

    def weights_hash(self) -> str:
        """Hash of the UNet and VAE weights: engines built from other weights are refused.

        Seeded random weights are identified by their recipe: the random VAE calibration runs convolutions whose
        last bits depend on the CPU thread count, so hashing their values would refuse a valid engine.
        """
        h = hashlib.sha256()
        if self.recipe is not None:
            h.update(self.recipe.encode())
            return h.hexdigest()[:16]
        for module in (self.unet, self.vae):
            for name, tensor in sorted(module.state_dict().items()):
                t = tensor.detach().float().cpu().contiguous().view(-1)
                h.update(f"{name}:{tuple(tensor.shape)}".encode())
                h.update(t[:: max(1, t.numel() // 4096)].numpy().tobytes())  # a strided sample: fast for 1B params
        return h.hexdigest()[:16]


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
    hook = enc_conv.register_forward_hook(lambda mod, args, out: captured.__setitem__("enc", out))
    VaeEncoder(vae)(probe)
    hook.remove()
    _standardize_conv(enc_conv, captured["enc"], 0.0, 1.0 / vae.config.scaling_factor, 4)
    hook = dec_conv.register_forward_hook(lambda mod, args, out: captured.__setitem__("dec", out))
    VaeDecoder(vae)(VaeEncoder(vae)(probe))
    hook.remove()
    # TAESD's last conv outputs [0, 1] images (mapped to [-1, 1] after it); the KL decoder's outputs [-1, 1].
    _standardize_conv(dec_conv, captured["dec"], 0.5 if tiny else 0.0, 0.2 if tiny else 0.4, 3)


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _cached_snapshot(hub_id: str) -> Path | None:
    """The local Hugging Face cache copy of `hub_id`, never downloading."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:  # not cached (or hub client missing): the caller falls back to random weights
        return None


def _from_preset(preset: ModelPreset, vae_kind: VaeKind, seed: int) -> tuple:
    cfg = preset.config_dir
    folder = _cached_snapshot(preset.hub_id) if preset.hub_id else None
    if folder is not None:
        log.info("loading %s weights from the local cache: %s", preset.name, folder)
        return (*_from_folder(folder, vae_kind, preset), None)
    if (preset.name, seed) in _WARNED_RANDOM:
        log.debug("model %r: seeded random weights (seed %d)", preset.name, seed)
    else:
        _WARNED_RANDOM.add((preset.name, seed))
        log.warning(
            "model %r: no local weights found%s; using the %s architecture with seeded RANDOM weights (seed %d). "
            "Outputs are noise-like; pass a diffusers folder or hub id for real results.",
            preset.name,
            f" (looked for {preset.hub_id} in the Hugging Face cache)" if preset.hub_id else "",
            preset.name,
            seed,
        )
    unet = _random_init(lambda: UNet2DConditionModel.from_config(_load_json(cfg / "unet.json")), seed)
    vae_file, vae_cls = (
        ("vae_tiny.json", AutoencoderTiny) if vae_kind is VaeKind.TAESD else ("vae_kl.json", AutoencoderKL)
    )
    vae = _random_init(lambda: vae_cls.from_config(_load_json(cfg / vae_file)), seed + 1)
    _calibrate_random_vae(vae, seed)
    text_cfg = CLIPTextConfig(**{k: v for k, v in _load_json(cfg / "text_encoder.json").items() if k != "_class_name"})
    text_encoder = _random_init(lambda: CLIPTextModel(text_cfg), seed + 2)
    tokenizer = clip_tokenizer(preset.tokenizer_pad_token)
    scheduler = LCMScheduler.from_config(_load_json(cfg / "scheduler.json"))
    recipe = json.dumps(
        {
            "preset": preset.name,
            "seed": seed,
            "vae": vae_kind.value,
            "configs": {f: _load_json(cfg / f) for f in ("unet.json", vae_file, "text_encoder.json")},
            "calibration": RANDOM_VAE_CALIBRATION,
        },
        sort_keys=True,
    )
    return unet, vae, text_encoder, tokenizer, scheduler, recipe


def _from_folder(folder: Path, vae_kind: VaeKind, preset: ModelPreset | None = None) -> tuple:
    """Load a diffusers-format folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    missing = [d for d in ("unet", "text_encoder", "tokenizer", "scheduler") if not (folder / d).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a diffusers pipeline folder: missing {', '.join(missing)}/. "
            "Expected the layout of e.g. stabilityai/sd-turbo (unet/, vae/, text_encoder/, tokenizer/, scheduler/)."
        )
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", use_safetensors=True)
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    scheduler = LCMScheduler.from_config(LCMScheduler.load_config(folder, subfolder="scheduler"))
    if vae_kind is VaeKind.FULL:
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True)
    elif (folder / "vae_tiny").is_dir():
        vae = AutoencoderTiny.from_pretrained(folder, subfolder="vae_tiny", use_safetensors=True)
    else:
        taesd_id = preset.taesd_hub_id if preset else "madebyollin/taesd"
        taesd = _cached_snapshot(taesd_id)
        if taesd is None:
            raise FileNotFoundError(
                f"--vae taesd needs TAESD weights: put them in {folder / 'vae_tiny'} or the Hugging Face cache "
                f"(huggingface-cli download {taesd_id}), or use --vae full."
            )
        vae = AutoencoderTiny.from_pretrained(taesd, use_safetensors=True)
    return unet, vae, text_encoder, tokenizer, scheduler


def load_models(
    model: str,
    *,
    vae: VaeKind | str = VaeKind.TAESD,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Models:
    """Load `model`: a preset name (tiny, sd-turbo, sd15), a local diffusers folder, or a hub id."""
    vae_kind = VaeKind(vae)
    preset = PRESETS.get(model)
    if preset is not None:
        unet, vae_m, text_encoder, tokenizer, scheduler, recipe = _from_preset(preset, vae_kind, seed)
        size, t_index = (preset.height, preset.width), preset.t_index_list
    else:
        folder = Path(model)
        if not folder.exists():
            if "/" not in model or model.startswith((".", "/")):
                raise FileNotFoundError(
                    f"model {model!r} is neither a preset ({', '.join(PRESETS)}), a local folder, nor a hub id "
                    "(owner/name)."
                )
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
        unet, vae_m, text_encoder, tokenizer, scheduler = _from_folder(folder, vae_kind)
        recipe = None
        sample = unet.config.sample_size * 8
        size, t_index = (sample, sample), (32,)
    for m in (unet, vae_m, text_encoder):
        if next(m.parameters()).dtype != dtype:
            # nn.Module.to, not diffusers' override: that one warns about an empty list of fp32-only modules.
            torch.nn.Module.to(m, dtype=dtype)
        m.to(device=device).eval().requires_grad_(False)
    return Models(model, unet, vae_m, text_encoder, tokenizer, scheduler, recipe is not None, size, t_index, recipe)
