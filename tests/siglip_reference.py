"""Tiny random SigLIP models built with transformers' SiglipModel: the independent reference for the contrastive model.

Every parameter is redrawn from N(0, std) (LayerNorms, biases, the pooling probe, logit_scale and logit_bias too),
so that no weight can be silently ignored or mis-mapped without changing the outputs.
"""

from __future__ import annotations

import torch
from hf_reference import randomized
from transformers import SiglipConfig, SiglipModel

# name: (text config, vision config); widths, heads, patch sizes and text lengths all differ, and the first has a
# text projection_size different from the text width (it must equal the vision width).
CONFIGS = {
    "proj": (dict(vocab_size=99, hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=12, projection_size=32),
             dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                  patch_size=7)),
    "wide": (dict(vocab_size=120, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=3,
                  max_position_embeddings=8),
             dict(hidden_size=48, intermediate_size=40, num_hidden_layers=3, num_attention_heads=6, image_size=16,
                  patch_size=4)),
    "deep": (dict(vocab_size=64, hidden_size=24, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                  max_position_embeddings=16, projection_size=16),
             dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, image_size=30,
                  patch_size=10)),
}


def hf_config(name: str) -> SiglipConfig:
    text, vision = CONFIGS[name]
    text = dict(text, pad_token_id=1, bos_token_id=None, eos_token_id=1)
    return SiglipConfig(text_config=text, vision_config=vision)


def hf_model(name: str, seed: int = 0, std: float = 0.2) -> SiglipModel:
    return randomized(SiglipModel, hf_config(name), seed, std)


def inputs(name: str, n_images: int = 3, n_texts: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random pixel values in [-1, 1] and fixed-length token ids (the trained length)."""
    text, vision = CONFIGS[name]
    g = torch.Generator().manual_seed(seed)
    size = vision["image_size"]
    return dict(input_ids=torch.randint(0, text["vocab_size"], (n_texts, text["max_position_embeddings"]), generator=g),
                pixel_values=torch.rand(n_images, 3, size, size, generator=g) * 2 - 1)


PIPELINE = (dict(vocab_size=600, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=16),
            dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                 patch_size=8))


def write_checkpoint(folder, variant: str = "siglip", seed: int = 0):
    """A complete tiny SigLIP checkpoint directory (transformers' weights, a tokenizer trained here, the
    preprocessor config) for the pipeline and CLI tests; returns transformers' model."""
    import _spm

    CONFIGS["pipeline"] = PIPELINE
    try:
        model = hf_model("pipeline", seed=seed, std=0.2)
    finally:
        del CONFIGS["pipeline"]
    model.save_pretrained(folder)
    _spm.write_siglip_checkpoint(folder, variant, image_size=PIPELINE[1]["image_size"])
    return model
