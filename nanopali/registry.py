"""Named published PaliGemma sizes, looked up exactly (litgpt-style config registry).

Sources: the config.json files of the Hugging Face repos google/paligemma-3b-pt-{224,448,896} and
google/paligemma2-{3b,10b,28b}-pt-{224,448,896}, and Table 1 of the PaliGemma 2 report
(arXiv:2412.03555). All share the SigLIP So400m/14 tower and a 257216-row embedding, of which
the first 257152 rows are real tokens (`<image>` = 257152 is the first padding row).
"""

from __future__ import annotations

from pathlib import Path

from nanopali.config import PaliGemmaConfig, TextConfig, VisionConfig
from nanopali.errors import ConfigError, MissingFileError, UsageError

SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14)
VOCAB_ROWS = 257216
IMAGE_TOKEN = 257152

_TEXT = {
    # Gemma 2B (PaliGemma 1)
    "paligemma-3b": dict(model_type="gemma", hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                         num_attention_heads=8, num_key_value_heads=1, head_dim=256),
    # Gemma 2 2B / 9B / 27B (PaliGemma 2). The 27B uses head_dim 128 and query_pre_attn_scalar 144.
    "paligemma2-3b": dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256),
    "paligemma2-10b": dict(model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                           num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256),
    "paligemma2-28b": dict(model_type="gemma2", hidden_size=4608, intermediate_size=36864, num_hidden_layers=46,
                           num_attention_heads=32, num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=144),
}
_GEMMA2_FLAGS = dict(post_norms=True, sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
RESOLUTIONS = (224, 448, 896)

NAMES = tuple(f"{family}-{res}" for family in _TEXT for res in RESOLUTIONS)


def named_config(name: str) -> PaliGemmaConfig:
    """The config of a published size, e.g. "paligemma-3b-224" or "paligemma2-28b-896"."""
    family, _, res = name.rpartition("-")
    if family not in _TEXT or not res.isdigit() or int(res) not in RESOLUTIONS:
        raise KeyError(f"unknown model size {name!r}; known sizes: {', '.join(NAMES)}")
    text = dict(_TEXT[family], vocab_size=VOCAB_ROWS)
    if text["model_type"] == "gemma2":
        text.update(_GEMMA2_FLAGS)
    return PaliGemmaConfig(vision_config=VisionConfig(image_size=int(res), **SO400M),
                           text_config=TextConfig(**text), image_token_index=IMAGE_TOKEN)


def resolve_config(config) -> PaliGemmaConfig:
    """The config of a checkpoint that does not carry one (a big_vision .npz), from what a user may give: a
    PaliGemmaConfig, a published size's name ("paligemma2-3b-448"), or a Hugging Face config.json (or its folder)."""
    if isinstance(config, PaliGemmaConfig):
        return config
    if config is None:
        raise UsageError("a big_vision .npz does not say its sizes: pass config= (--config on the command line): a "
                         "published size such as 'paligemma-3b-224', the path of a Hugging Face config.json, or a "
                         "PaliGemmaConfig")
    if not isinstance(config, (str, Path)):
        raise UsageError(f"config must be a size name, a config.json path or a PaliGemmaConfig, got a {type(config).__name__}")
    path = Path(config).expanduser()
    if path.exists():
        return PaliGemmaConfig.from_pretrained(path)
    if str(config) in NAMES:
        return named_config(str(config))
    if path.suffix == ".json" or len(path.parts) > 1:
        raise MissingFileError(f"config file {config} does not exist")
    raise ConfigError(f"unknown config {str(config)!r}: give a published size ({', '.join(NAMES)}), "
                      "the path of a config.json, or a PaliGemmaConfig")
