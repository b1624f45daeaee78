"""CLIP scores of a translated video, with a transformers CLIPModel from a local folder.

- `text`: mean over frames of 100 * cos(image embedding, prompt embedding) (prompt alignment; CLIPScore
  without the 2.5 weight and clipping, as torchmetrics reports it).
- `consistency`: mean over consecutive frame pairs of 100 * cos(image_t, image_{t+1}): what the StreamV2V
  paper's table calls "CLIP score" (its tools/clip_score.py), a temporal-consistency measure.

Images are preprocessed by hand, as CLIPImageProcessor does: resize the short side to `size` (bicubic,
antialiased), center crop `crop` x `crop`, normalise with the folder's mean/std (OpenAI's by default).
Tokens come from the package's offline CLIP tokenizer (the same BPE as every CLIP).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPModel

from ..models.tokenizer import clip_tokenizer

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipScores:
    text: float
    consistency: float  # nan for a single frame
    frames: int


def _size(value, default: int) -> int:
    """preprocessor_config sizes come as an int or a dict (shortest_edge / height)."""
    if isinstance(value, dict):
        return int(value.get("shortest_edge") or value.get("height") or default)
    return int(value or default)


class ClipScorer:
    def __init__(self, folder: str | Path, device: torch.device | str = "cpu") -> None:
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{folder} is not a CLIP model folder (no config.json); save one with CLIPModel.save_pretrained, "
                "e.g. openai/clip-vit-base-patch32 from a machine with the hub"
            )
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(self.device).eval()
        image_size = self.model.config.vision_config.image_size
        pre = folder / "preprocessor_config.json"
        pcfg = json.loads(pre.read_text()) if pre.is_file() else {}
        self.size = _size(pcfg.get("size"), image_size)
        self.crop = _size(pcfg.get("crop_size"), image_size)
        self.mean = torch.tensor(pcfg.get("image_mean", OPENAI_MEAN), device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(pcfg.get("image_std", OPENAI_STD), device=self.device).view(1, 3, 1, 1)
        self.tokenizer = clip_tokenizer()
        self.tokenizer.model_max_length = min(77, self.model.config.text_config.max_position_embeddings)

    def preprocess(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """RGB uint8 [H, W, 3] frames -> pixel_values [N, 3, crop, crop]."""
        x = torch.from_numpy(np.stack(frames)).to(self.device).permute(0, 3, 1, 2).float() / 255  # [N, 3, H, W]
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        x = F.interpolate(
            x, size=(max(self.size, int(h * scale)), max(self.size, int(w * scale))), mode="bicubic",
            align_corners=False, antialias=True,
        ).clamp(0, 1)  # fmt: skip
        top, left = (x.shape[-2] - self.crop) // 2, (x.shape[-1] - self.crop) // 2
        x = x[..., top : top + self.crop, left : left + self.crop]
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def image_embeds(self, frames: Sequence[np.ndarray], batch: int = 16) -> torch.Tensor:
        """L2-normalised image embeddings [N, D]."""
        out = [self._features(self.model.get_image_features(pixel_values=self.preprocess(frames[i : i + batch])))
               for i in range(0, len(frames), batch)]  # fmt: skip
        return F.normalize(torch.cat(out), dim=-1)

    @torch.inference_mode()
    def text_embeds(self, prompt: str) -> torch.Tensor:
        """L2-normalised prompt embedding [1, D]."""
        ids = self.tokenizer(
            prompt, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)  # fmt: skip
        return F.normalize(self._features(self.model.get_text_features(input_ids=ids)), dim=-1)

    @staticmethod
    def _features(out) -> torch.Tensor:
        # transformers >= 5 returns a model output whose pooler_output holds the projected features.
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def score(self, frames: Sequence[np.ndarray], prompt: str) -> ClipScores:
        if not frames:
            raise ValueError("clip score needs at least one frame")
        img = self.image_embeds(frames)  # [N, D]
        text = self.text_embeds(prompt)  # [1, D]
        text_score = float((img @ text.T).mean() * 100)
        consistency = float((img[:-1] * img[1:]).sum(-1).mean() * 100) if len(frames) > 1 else float("nan")
        return ClipScores(text_score, consistency, len(frames))
