"""A complete tiny checkpoint directory (weights, config, tokenizer, preprocessor) for end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import _spm
import torch

from nanopali import PaliGemma, PaliGemmaConfig, Tokenizer
from nanopali.config import TextConfig, VisionConfig


def tiny_config(vocab_size: int, image_token_index: int, generation: int = 2, vision: dict | None = None,
                **text) -> PaliGemmaConfig:
    """A tiny PaliGemma 1 or 2 config (Gemma 2: soft-caps and a sliding window of 8); `vision` / `text`
    override single fields."""
    gemma2 = dict(model_type="gemma2", post_norms=True, query_pre_attn_scalar=16, sliding_window=8,
                  attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, model_type="gemma") | (gemma2 if generation == 2 else {}) | text
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=7) | (vision or {})
    return PaliGemmaConfig(vision_config=VisionConfig(**vision), text_config=TextConfig(**text),
                           image_token_index=image_token_index)


def write_tiny_checkpoint(folder: Path, generation: int = 2, seed: int = 0, **text) -> Path:
    """Random weights sized to a SentencePiece tokenizer trained here (image 28 px, 16 image tokens); `text`
    overrides text_config fields (e.g. num_local_experts=4 for a mixture-of-experts decoder)."""
    _spm.write_checkpoint(folder, "baked", image_size=28, num_image_tokens=16)
    tokenizer = Tokenizer.from_pretrained(folder)
    config = tiny_config(len(tokenizer) + 6, tokenizer.image_token_id, generation, **text)
    torch.manual_seed(seed)
    model = PaliGemma(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    return folder
