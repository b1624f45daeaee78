"""Prompt text -> CLIP text embeddings [1, 77, D]; runs in PyTorch for every backend (only on a prompt change)."""

from __future__ import annotations

import torch
from transformers import CLIPTextModel, CLIPTokenizer


class PromptEncoder:
    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder

    @property
    def dim(self) -> int:
        return self.text_encoder.config.hidden_size

    @property
    def length(self) -> int:
        return self.tokenizer.model_max_length

    @torch.inference_mode()
    def __call__(self, text: str) -> torch.Tensor:
        if not isinstance(text, str):
            raise TypeError(f"prompt must be a str, got {type(text).__name__}")
        ids = self.tokenizer(
            text, padding="max_length", max_length=self.length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids)[0]  # [1, 77, D]
