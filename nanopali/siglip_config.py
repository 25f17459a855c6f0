"""Configuration of the contrastive SigLIP model (two towers), read from and written to Hugging Face `config.json`.

A SigLIP checkpoint's config.json has model_type `siglip` and two sections: `text_config` (model_type
`siglip_text_model`) and `vision_config` (`siglip_vision_model`, the same tower PaliGemma uses, here with its
attention-pooling head: `vision_use_head` defaults to true in these files). Missing fields take the defaults of
transformers' SiglipTextConfig / SiglipVisionConfig, as transformers does. SigLIP 2's fixed-resolution
checkpoints are the same model (model_type `siglip`, a Gemma tokenizer), so they read the same way.

One field is nanopali's own: `objective`, "siglip" (sigmoid loss; zero-shot probabilities are sigmoids, the
default, and what every Google checkpoint is) or "clip" (softmax loss; probabilities are a softmax over the
labels). nanopali writes it for the models it trains; transformers keeps it as an unused attribute.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from nanopali.config import (ConfigFile, VisionConfig, check_activation, check_fields, is_int, pick, vision_from_hf,
                             warn_unknown)
from nanopali.errors import ConfigError
from nanopali.json_files import json_kind

OBJECTIVES = ("siglip", "clip")

# transformers 5.x SiglipTextConfig defaults, applied to fields a file leaves out.
_TEXT_DEFAULTS = dict(
    vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=64, layer_norm_eps=1e-6, projection_size=None, pad_token_id=1, bos_token_id=49406,
    eos_token_id=49407,
)


@dataclass
class SiglipTextConfig:
    """SigLIP's text tower: a bidirectional pre-LayerNorm encoder over a fixed-length text, the last position
    pooled and projected to `projection_size` (None: hidden_size)."""

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 64  # the fixed text length SigLIP was trained with
    layer_norm_eps: float = 1e-6
    projection_size: int | None = None
    # Written back to config.json as read; the model itself never looks at them (the processor's tokenizer does).
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407

    def __post_init__(self):
        if self.projection_size is None:
            self.projection_size = self.hidden_size
        check_fields(self, "text_config", ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "max_position_embeddings", "projection_size"),
                     ("layer_norm_eps",))
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"text hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                              f"{self.num_attention_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class SigLIPConfig(ConfigFile):
    text_config: SiglipTextConfig = field(default_factory=SiglipTextConfig)
    vision_config: VisionConfig = field(default_factory=lambda: VisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16,
        vision_use_head=True))
    objective: str = "siglip"  # "siglip": sigmoid probabilities; "clip": softmax over the labels

    def __post_init__(self):
        if isinstance(self.text_config, dict):
            self.text_config = SiglipTextConfig(**self.text_config)
        if isinstance(self.vision_config, dict):
            self.vision_config = VisionConfig(**{"vision_use_head": True, **self.vision_config})
        if not self.vision_config.vision_use_head:
            raise ConfigError("vision_config.vision_use_head is false; the contrastive SigLIP pools its image "
                              "features with the attention-pooling head")
        if self.text_config.projection_size != self.vision_config.hidden_size:
            raise ConfigError(
                f"text_config.projection_size {self.text_config.projection_size} must equal vision_config.hidden_size "
                f"{self.vision_config.hidden_size}: image and text features are compared by cosine similarity")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")

    @property
    def embed_dim(self) -> int:
        """Width of the image and text features."""
        return self.vision_config.hidden_size

    @property
    def max_length(self) -> int:
        """The fixed text length: every text is padded (or cut) to it."""
        return self.text_config.max_position_embeddings

    # ------------------------------------------------------------------ Hugging Face config.json

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "SigLIPConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: config.json must hold a JSON object, found {json_kind(d)}")
        if d.get("model_type") != "siglip":
            hint = " (a PaliGemma checkpoint: load it with nanopali.load / PaliGemma)" if d.get("model_type") == "paligemma" else ""
            raise ConfigError(f"{source}: model_type is {d.get('model_type')!r}, expected 'siglip'{hint}")
        for key in ("vision_config", "text_config"):
            if not isinstance(d.get(key, {}), dict):
                raise ConfigError(f"{source}: {key} must be an object, found {json_kind(d[key])}")
        warn_unknown(d, source, "", known={"initializer_factor", "objective"})
        vision = vision_from_hf(d.get("vision_config", {}), source, use_head=True)
        text = _text_from_hf(d.get("text_config", {}), source)
        try:
            return cls(text_config=text, vision_config=vision, objective=d.get("objective", "siglip"))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict:
        text = {"model_type": "siglip_text_model", **asdict(self.text_config), "hidden_act": "gelu_pytorch_tanh"}
        vision = {"model_type": "siglip_vision_model", **asdict(self.vision_config), "hidden_act": "gelu_pytorch_tanh"}
        return {"architectures": ["SiglipModel"], "model_type": "siglip", "objective": self.objective,
                "text_config": text, "vision_config": vision}



def _text_from_hf(d: dict, source: str) -> SiglipTextConfig:
    model_type = d.get("model_type", "siglip_text_model")
    if model_type != "siglip_text_model":
        raise ConfigError(f"{source}: text_config.model_type is {model_type!r}, expected 'siglip_text_model'")
    check_activation(d, source, "text_config")
    warn_unknown(d, source, "text_config ", known={f.name for f in fields(SiglipTextConfig)})
    kw = pick(d, _TEXT_DEFAULTS)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if kw[key] is not None and not is_int(kw[key]):
            raise ConfigError(f"{source}: text_config.{key} must be a token id or null, got {kw[key]!r}")
    try:
        return SiglipTextConfig(**kw)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
