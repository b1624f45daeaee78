"""Prompt text -> CLIP text embeddings [1, 77, D]; runs in PyTorch for every backend (only on a prompt change)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import CLIPTextModel, CLIPTokenizer


def text_shape(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel) -> tuple[int, int]:
    """(tokens, dim) of the prompt embeddings: the UNet's `encoder_hidden_states` is [B, tokens, dim]."""
    return int(tokenizer.model_max_length), int(text_encoder.config.hidden_size)


class PromptEncoder:
    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.length, self.dim = text_shape(tokenizer, text_encoder)

    @torch.inference_mode()
    def __call__(self, text: str) -> torch.Tensor:
        if not isinstance(text, str):
            raise TypeError(f"prompt must be a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: the tokenizer would fail deep inside
            raise ValueError(f"prompt is not valid text ({e.reason} at position {e.start})") from e
        ids = self.tokenizer(
            text, padding="max_length", max_length=self.length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.text_encoder.device)
        return self.text_encoder(ids)[0]  # [1, 77, D]
