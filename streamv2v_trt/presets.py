"""Named model presets: which architecture configs ship in the package and where real weights live.

Plain data in the spec layer: `EngineSpec.resolve` fills a preset's size and steps, the CLIs name the presets,
and `models/loader.py` builds them from `CONFIG_DIR` (the JSON configs under `models/configs/`). ControlNet presets
(`CONTROLNET_PRESETS`) name a model preset's `controlnet.json` and where real weights of that architecture live."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "models" / "configs"


class ModelUnavailable(FileNotFoundError):
    """`--model` names no weights this machine can load: no such preset or folder, a folder that is not a diffusers
    pipeline, or a hub id whose files are neither in the local Hugging Face cache nor downloadable. The message
    says which and what to do; the command line tools print it as one `error:` line. Defined here, beside the
    presets it names, so those tools can catch it without importing diffusers."""


@dataclass(frozen=True)
class ModelPreset:
    name: str
    hub_id: str | None  # real weights, used only when already in the local Hugging Face cache
    taesd_hub_id: str | None
    tokenizer_pad_token: str  # SD1.5 pads prompts with <|endoftext|>, SD2.x with "!"
    height: int
    width: int
    t_index_list: tuple[int, ...]

    @property
    def config_dir(self) -> Path:
        return CONFIG_DIR / self.name


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset("tiny", None, None, "<|endoftext|>", 128, 128, (32,)),
        ModelPreset("sd-turbo", "stabilityai/sd-turbo", "madebyollin/taesd", "!", 512, 512, (32,)),
        # The paper's setting: SD1.5 + LCM-LoRA, 4 steps from noise strength 0.4.
        ModelPreset(
            "sd15",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "madebyollin/taesd",
            "<|endoftext|>",
            512,
            512,
            (30, 35, 40, 45),
        ),
    )
}


@dataclass(frozen=True)
class ControlNetPreset:
    """A ControlNet architecture (the `controlnet.json` beside a model preset's UNet config) and its real weights."""

    name: str
    model: str  # the model preset whose UNet its residuals fit (its config folder)
    hub_id: str | None  # real weights, used only when already in the local Hugging Face cache

    @property
    def config(self) -> Path:
        return CONFIG_DIR / self.model / "controlnet.json"


CONTROLNET_PRESETS: dict[str, ControlNetPreset] = {
    p.name: p
    for p in (
        ControlNetPreset("tiny", "tiny", None),  # ControlNetModel.from_unet of the tiny UNet's config: tests
        ControlNetPreset("sd15-canny", "sd15", "lllyasviel/control_v11p_sd15_canny"),
        ControlNetPreset("sd-turbo-canny", "sd-turbo", "thibaud/controlnet-sd21-canny-diffusers"),  # SD2.1 family
    )
}
