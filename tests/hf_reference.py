"""Tiny random PaliGemma models built with Hugging Face transformers: the independent reference.

Tests build a transformers model, save it, load it with nanopali and compare. Every parameter is
redrawn from N(0, std) (norm weights and biases too, which transformers initialises to constants),
so that no weight can be silently ignored or mis-mapped without changing the outputs.
"""

from __future__ import annotations

import torch
from transformers import PaliGemmaConfig as HFConfig
from transformers import PaliGemmaForConditionalGeneration

IMAGE_SIZE, PATCH = 28, 7           # 16 image tokens
VOCAB, IMAGE_TOKEN = 300, 299        # the last row is <image>, as in real checkpoints
PAD, EOS, BOS = 0, 1, 2


def hf_config(generation: int = 2, kv_heads: int = 2, **text) -> HFConfig:
    """PaliGemma 1 (gemma) or 2 (gemma2) with GQA, head_dim != hidden/heads and small soft-caps."""
    text_config = dict(
        model_type="gemma" if generation == 1 else "gemma2", vocab_size=VOCAB, hidden_size=64,
        intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=kv_heads,
        head_dim=24, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    )
    if generation == 2:
        text_config.update(query_pre_attn_scalar=17, sliding_window=6, attn_logit_softcapping=4.0,
                           final_logit_softcapping=6.0, initializer_range=0.5)
    text_config.update(text)
    return HFConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False),
        text_config=text_config, image_token_index=IMAGE_TOKEN, projection_dim=64, hidden_size=64, vocab_size=VOCAB,
    )


def randomized(model_class, config, seed: int = 0, std: float = 0.2):
    """model_class(config) in eval mode, eager attention, every parameter redrawn from N(0, std) (norms and biases
    too, so that no weight can be ignored or mis-mapped without changing the outputs)."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = model_class(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def hf_model(config: HFConfig, seed: int = 0, std: float = 0.2) -> PaliGemmaForConditionalGeneration:
    return randomized(PaliGemmaForConditionalGeneration, config, seed, std)


def batch(config: HFConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Three rows: left-padded prompt only, prompt + suffix with right padding, and a full row with a suffix.

    Text lengths are chosen so that the sequence is longer than the Gemma 2 test window (6).
    """
    g = torch.Generator().manual_seed(seed)
    n_img = (IMAGE_SIZE // PATCH) ** 2
    rows = [(5, 0, "left"), (4, 5, "right"), (7, 6, None)]  # (prompt tokens, suffix tokens, padding)
    length = n_img + max(p + s for p, s, _ in rows) + 2
    ids, am, tt = [], [], []
    for prompt, suffix, side in rows:
        text = torch.randint(3, IMAGE_TOKEN, (prompt + suffix,), generator=g).tolist()
        seq = [IMAGE_TOKEN] * n_img + [BOS] + text + [EOS if suffix else 108]
        types = [0] * (n_img + 1 + prompt) + [1] * (suffix + 1) if suffix else [0] * len(seq)
        pad = length - len(seq)
        if side == "left":
            seq, types, mask = [PAD] * pad + seq, [0] * pad + types, [0] * pad + [1] * len(seq)
        else:
            seq, types, mask = seq + [PAD] * pad, types + [0] * pad, [1] * len(seq) + [0] * pad
        ids.append(seq), tt.append(types), am.append(mask)
    pixel_values = torch.rand(len(rows), 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 2 - 1
    return dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(am), token_type_ids=torch.tensor(tt),
                pixel_values=pixel_values)


def hf_logits(model: PaliGemmaForConditionalGeneration, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """transformers' logits with positions counted over real tokens (as its generate() does)."""
    with torch.no_grad():
        return model(**inputs, position_ids=inputs["attention_mask"].cumsum(-1)).logits


def hf_generation_model(config: HFConfig, eos_boost: float, seed: int = 0) -> PaliGemmaForConditionalGeneration:
    """A model whose greedy output is varied (not one repeated token) and sometimes ends in <eos>.

    With tied embeddings a random model tends to repeat its last input token; small embeddings
    let the layers decide instead, and a longer <eos> row makes <eos> a likely choice.
    """
    model = hf_model(config, seed, std=0.3)
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed.mul_(0.1)
        embed[EOS] *= eos_boost
    return model
