"""Model configuration: small dataclasses, read from and written to Hugging Face `config.json`.

A PaliGemma checkpoint's config.json has a top-level `paligemma` section with two sub-configs:
`vision_config` (model_type `siglip_vision_model`) and `text_config` (model_type `gemma` for
PaliGemma 1, `gemma2` for PaliGemma 2). Fields missing from a file take the defaults of the
transformers class for that model_type (GemmaConfig, Gemma2Config, SiglipVisionConfig), exactly as
transformers does, so real checkpoints (whose files omit many fields) load with the same shapes.
Nothing is ever inferred from a model's name or path.

Named published sizes live in `nanopali/registry.py`.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from nanopali.errors import ConfigError, MissingFileError
from nanopali.json_files import json_kind, read_json

# Defaults of the transformers config classes (transformers 5.x `configuration_gemma.py`,
# `configuration_gemma2.py`, `configuration_siglip.py`), applied to fields a file leaves out.
_GEMMA_DEFAULTS = dict(
    vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
    num_attention_heads=16, num_key_value_heads=16, head_dim=256, rms_norm_eps=1e-6,
    rope_theta=10000.0, max_position_embeddings=8192,
)
_GEMMA2_DEFAULTS = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
    rope_theta=10000.0, max_position_embeddings=8192, query_pre_attn_scalar=256,
    sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
)
_SIGLIP_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    num_channels=3, image_size=224, patch_size=16, layer_norm_eps=1e-6,
)

# Keys that real config files carry but that do not change the computation (bookkeeping, training
# knobs, generation defaults). They are accepted silently; anything else unknown gets a warning.
_IGNORED_KEYS = {
    "architectures", "_name_or_path", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "initializer_range", "attention_dropout", "ignore_index", "is_encoder_decoder", "model_type",
    "num_image_tokens", "projection_dim", "projector_hidden_act", "cache_implementation",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_factor", "output_attentions",
    "output_hidden_states", "return_dict", "tie_word_embeddings", "use_bidirectional_attention",
    "attention_bias", "hidden_act", "hidden_activation", "rope_parameters", "rope_scaling",
    "vision_use_head", "layer_types", "hidden_size", "vocab_size", "text_config", "vision_config",
    "image_token_index", "image_token_id", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
    "tokenizer_class", "prefix", "task_specific_params", "max_length", "min_length",
    "use_sliding_window", "sliding_window_pattern", "head_dim_override", "boi_token_index",
    "eoi_token_index", "mm_tokens_per_image", "keys_to_ignore_at_inference", "num_positions",
}
# The mixture-of-experts fields of TextConfig, read from and written to text_config (only when num_local_experts > 0).
MOE_FIELDS = ("num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
              "router_aux_loss_coef", "router_z_loss_coef", "router_jitter_noise", "router_noisy_topk",
              "shared_expert_intermediate_size", "moe_layers")
_GELU_TANH = {"gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu"}  # "gelu" is Gemma's legacy spelling of tanh-gelu


@dataclass
class VisionConfig:
    """SigLIP vision tower; with `vision_use_head` also its attention-pooling head (the contrastive SigLIP's;
    PaliGemma uses the tower without it)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = False

    def __post_init__(self):
        check_fields(self, "vision_config", ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "image_size", "patch_size"), ("layer_norm_eps",))
        if self.num_channels != 3 or isinstance(self.num_channels, bool):
            raise ConfigError(f"vision_config.num_channels is {self.num_channels!r}; PaliGemma takes RGB images (3 channels)")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if not isinstance(self.vision_use_head, bool):
            raise ConfigError(f"vision_config.vision_use_head must be true or false, got {self.vision_use_head!r}")

    @property
    def num_patches(self) -> int:
        """Patches the stride-patch_size convolution makes: a remainder of the image (SigLIP so400m-patch14-384's
        6 pixels) is not seen, as in transformers and big_vision."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class TextConfig:
    """Gemma decoder. The Gemma 2 features are flags; all off is Gemma 1."""

    vocab_size: int = 257216          # embedding rows (real checkpoints: 257152 real tokens + padding rows)
    hidden_size: int = 2048
    intermediate_size: int = 16384
    num_hidden_layers: int = 18
    num_attention_heads: int = 8
    num_key_value_heads: int = 1
    head_dim: int = 256               # independent of hidden_size / num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    # --- Gemma 2 flags ---
    post_norms: bool = False                      # RMSNorm after attention and after the MLP too
    query_pre_attn_scalar: float | None = None    # attention scale = this ** -0.5 (None: head_dim)
    attn_logit_softcapping: float | None = None   # tanh(s / c) * c on attention logits, before the mask
    final_logit_softcapping: float | None = None  # the same on the output logits
    sliding_window: int | None = None             # window of the "sliding_attention" layers
    layer_types: list[str] = field(default_factory=list)  # per layer: "full_attention" | "sliding_attention"
    # Runtime switch, never written to config.json: False makes every layer global, as in big_vision
    # (where PaliGemma 2 was trained without a window). Only matters past `sliding_window` tokens.
    use_sliding_window: bool = True
    # --- mixture of experts (transformers' Mixtral / Qwen2-MoE names); num_local_experts 0 = the dense MLP ---
    num_local_experts: int = 0                    # E experts in each sparse layer
    num_experts_per_tok: int = 2                  # k experts per token
    moe_intermediate_size: int | None = None      # width of each expert (None: intermediate_size, as Mixtral)
    norm_topk_prob: bool = True                   # renormalize the k routing weights to sum 1 (Mixtral)
    router_aux_loss_coef: float = 0.001           # weight of the load-balancing loss in the training loss
    router_z_loss_coef: float = 0.0               # weight of the router z-loss (0: off)
    router_jitter_noise: float = 0.0              # training only: layer input x U(1 - j, 1 + j), as Mixtral
    router_noisy_topk: bool = False               # training only: logits + N(0, 1) softplus(W_noise x) (nn/moe.py)
    shared_expert_intermediate_size: int | None = None  # Qwen2-MoE's sigmoid-gated shared expert (None: none)
    moe_layers: list[int] | None = None           # the sparse layers (None: every layer)
    model_type: str = "gemma"
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int = 1

    def __post_init__(self):
        check_fields(self, "text_config", ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "num_key_value_heads", "head_dim",
                                            "max_position_embeddings"), ("rms_norm_eps", "rope_theta"),
                      optional_ints=("sliding_window",),
                      optional_numbers=("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"))
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if not is_int(value) or not 0 <= value < self.vocab_size:
                raise ConfigError(f"text_config.{name} must be a token id in 0..{self.vocab_size - 1} "
                                  f"(vocab_size {self.vocab_size}), got {value!r}")
        if not isinstance(self.layer_types, (list, tuple)):
            raise ConfigError(f"text_config.layer_types must be a list, found {json_kind(self.layer_types)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads {self.num_key_value_heads}")
        if not self.layer_types:
            # transformers' Gemma2Config default: sliding on even layers (layer_idx % 2 == 0).
            self.layer_types = [
                "sliding_attention" if (self.sliding_window and i % 2 == 0) else "full_attention"
                for i in range(self.num_hidden_layers)
            ]
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        bad = set(self.layer_types) - {"full_attention", "sliding_attention"}
        if bad:
            raise ConfigError(f"unknown layer_types {sorted(bad)}; expected full_attention / sliding_attention")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ConfigError("layer_types has sliding_attention layers but sliding_window is not set")
        _check_moe(self)

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` has the sparse mixture-of-experts MLP (nn/moe.py) instead of the dense one."""
        return self.num_local_experts > 0 and (self.moe_layers is None or layer_idx in self.moe_layers)

    def window(self, layer_idx: int) -> int | None:
        """Sliding window of layer `layer_idx`, or None for a global layer (or with the switch off)."""
        if self.use_sliding_window and self.layer_types[layer_idx] == "sliding_attention":
            return self.sliding_window
        return None


class ConfigFile:
    """config.json in and out, for a config class with from_hf_dict / to_hf_dict (PaliGemma's, SigLIP's)."""

    @classmethod
    def from_pretrained(cls, path: str | Path):
        """The config.json of a checkpoint directory (or a config file's own path)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise MissingFileError(f"no config.json in {path}" if path.is_dir() else f"config file {path} does not exist")
        return cls.from_hf_dict(read_json(file, ConfigError), source=str(file))

    def save_pretrained(self, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "config.json").write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")


@dataclass
class PaliGemmaConfig(ConfigFile):
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    text_config: TextConfig = field(default_factory=TextConfig)
    image_token_index: int = 257152

    def __post_init__(self):
        if isinstance(self.vision_config, dict):
            self.vision_config = VisionConfig(**self.vision_config)
        if isinstance(self.text_config, dict):
            self.text_config = TextConfig(**self.text_config)
        if not is_int(self.image_token_index) or self.image_token_index < 0:
            raise ConfigError(f"image_token_index must be a token id (an integer >= 0), got {self.image_token_index!r}")
        if self.vision_config.vision_use_head:
            raise ConfigError("vision_config.vision_use_head is true; PaliGemma's SigLIP tower has no pooling head")
        v = self.vision_config
        if v.image_size % v.patch_size:  # every PaliGemma resolution is a multiple: anything else is a typo
            raise ConfigError(f"vision image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")

    @property
    def num_image_tokens(self) -> int:
        return self.vision_config.num_patches

    @property
    def is_gemma2(self) -> bool:
        return self.text_config.model_type == "gemma2"

    def replace(self, **text_changes) -> "PaliGemmaConfig":
        """A copy with some text_config fields changed, e.g. `cfg.replace(use_sliding_window=False)`."""
        return replace(self, text_config=replace(self.text_config, **text_changes))

    # ------------------------------------------------------------------ Hugging Face config.json

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "PaliGemmaConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: config.json must hold a JSON object, found {json_kind(d)}")
        if d.get("model_type") != "paligemma":
            raise ConfigError(f"{source}: model_type is {d.get('model_type')!r}, expected 'paligemma'")
        for key in ("vision_config", "text_config"):
            if not isinstance(d.get(key), dict):
                raise ConfigError(f"{source}: missing the {key} section")
        warn_unknown(d, source, "")
        vision = vision_from_hf(d["vision_config"], source)
        text = _text_from_hf(d["text_config"], source)
        top_vocab = d.get("vocab_size")
        if top_vocab is not None and top_vocab != text.vocab_size and "vocab_size" in d["text_config"]:
            raise ConfigError(f"{source}: vocab_size {top_vocab} contradicts text_config.vocab_size {text.vocab_size}")
        # The top-level hidden_size is unused by transformers (PaliGemma 2 files carry a stale 2048);
        # projection_dim is the projector's output width and must be the decoder's width.
        if "projection_dim" in d and d["projection_dim"] != text.hidden_size:
            raise ConfigError(f"{source}: projection_dim {d['projection_dim']} must equal text_config.hidden_size {text.hidden_size} (the projector maps vision to text width)")
        vis_proj = d["vision_config"].get("projection_dim")
        if vis_proj is not None and vis_proj != text.hidden_size:
            raise ConfigError(f"{source}: vision_config.projection_dim {vis_proj} must equal text_config.hidden_size {text.hidden_size}")
        for sub in ("text_config", "vision_config"):
            n = d[sub].get("num_image_tokens")
            if n is not None and n != vision.num_patches:
                raise ConfigError(f"{source}: {sub}.num_image_tokens {n} contradicts (image_size / patch_size)^2 = {vision.num_patches}")
        if d.get("tie_word_embeddings", True) is False or d["text_config"].get("tie_word_embeddings", True) is False:
            raise ConfigError(f"{source}: tie_word_embeddings is false; PaliGemma ties lm_head to the token embedding")
        image_token = d.get("image_token_index", d.get("image_token_id", 256000))  # 256000: transformers' default
        try:
            return cls(vision_config=vision, text_config=text, image_token_index=image_token)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict:
        v, t = self.vision_config, self.text_config
        text = {
            "model_type": t.model_type, "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim, "rms_norm_eps": t.rms_norm_eps, "hidden_activation": "gelu_pytorch_tanh",
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
            "max_position_embeddings": t.max_position_embeddings, "num_image_tokens": self.num_image_tokens,
            "pad_token_id": t.pad_token_id, "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id,
            "tie_word_embeddings": True,
        }
        if t.model_type == "gemma":
            text["hidden_act"] = "gelu_pytorch_tanh"
        else:
            text.update(
                query_pre_attn_scalar=t.query_pre_attn_scalar, attn_logit_softcapping=t.attn_logit_softcapping,
                final_logit_softcapping=t.final_logit_softcapping, sliding_window=t.sliding_window,
                layer_types=list(t.layer_types),
            )
        if t.num_local_experts:
            text.update({name: getattr(t, name) for name in MOE_FIELDS if getattr(t, name) is not None})
        vision = {"model_type": "siglip_vision_model", **asdict(v), "hidden_act": "gelu_pytorch_tanh",
                  "projection_dim": t.hidden_size, "num_image_tokens": self.num_image_tokens}
        return {
            "architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
            "image_token_index": self.image_token_index, "hidden_size": t.hidden_size,
            "projection_dim": t.hidden_size, "vocab_size": t.vocab_size, "tie_word_embeddings": True,
            "vision_config": vision, "text_config": text,
        }



def warn_unknown(d: dict, source: str, section: str, known: set[str] = frozenset()) -> None:
    """Warn once about keys nothing reads (a typo, or a feature nanopali does not have); `known` adds keys."""
    known = _IGNORED_KEYS | known | {f.name for f in fields(TextConfig)} | {f.name for f in fields(VisionConfig)}
    unknown = sorted(k for k in d if k not in known)
    if unknown:
        warnings.warn(f"{source}: ignoring unknown {section}keys {unknown}", stacklevel=3)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_fields(config, section: str, ints=(), numbers=(), optional_ints=(), optional_numbers=()) -> None:
    """Sizes are positive integers and eps/theta/scales positive finite numbers (None allowed for optional ones)."""
    for names, test, what, optional in ((ints, is_int, "a positive integer", False),
                                         (numbers, _is_number, "a positive number", False),
                                         (optional_ints, is_int, "a positive integer or null", True),
                                         (optional_numbers, _is_number, "a positive number or null", True)):
        for name in names:
            value = getattr(config, name)
            if optional and value is None:
                continue
            if not test(value) or value <= 0:
                raise ConfigError(f"{section}.{name} must be {what}, got {value!r}")


def _check_moe(t: TextConfig) -> None:
    """The mixture-of-experts fields: sizes, k <= E, coefficients >= 0, layers that exist; none of them set
    without experts (num_local_experts 0), where they would silently do nothing."""
    experts = t.num_local_experts
    if not is_int(experts) or experts < 0:
        raise ConfigError(f"text_config.num_local_experts must be an integer >= 0 (0: dense), got {experts!r}")
    if not experts:
        given = [n for n in ("moe_intermediate_size", "shared_expert_intermediate_size", "moe_layers")
                 if getattr(t, n) is not None] + (["router_noisy_topk"] if t.router_noisy_topk is True else [])
        if given:
            raise ConfigError(f"text_config sets {', '.join(given)} but num_local_experts is 0 (a dense decoder)")
        return
    check_fields(t, "text_config", ("num_experts_per_tok",),
                 optional_ints=("moe_intermediate_size", "shared_expert_intermediate_size"))
    if t.num_experts_per_tok > experts:
        raise ConfigError(f"text_config.num_experts_per_tok {t.num_experts_per_tok} exceeds num_local_experts {experts}")
    for name in ("norm_topk_prob", "router_noisy_topk"):
        if not isinstance(getattr(t, name), bool):
            raise ConfigError(f"text_config.{name} must be true or false, got {getattr(t, name)!r}")
    for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_jitter_noise"):
        value = getattr(t, name)
        if not _is_number(value) or value < 0:
            raise ConfigError(f"text_config.{name} must be a number >= 0, got {value!r}")
    if t.router_jitter_noise >= 1:
        raise ConfigError(f"text_config.router_jitter_noise must be below 1 (inputs are scaled by U(1 - j, 1 + j)), "
                          f"got {t.router_jitter_noise!r}")
    if t.moe_layers is not None:
        layers = t.moe_layers
        if (not isinstance(layers, (list, tuple)) or not all(is_int(i) for i in layers)
                or len(set(layers)) != len(layers)):
            raise ConfigError(f"text_config.moe_layers must be a list of distinct layer indices, got {layers!r}")
        outside = [i for i in layers if not 0 <= i < t.num_hidden_layers]
        if outside:
            raise ConfigError(f"text_config.moe_layers {outside} are not layers of a {t.num_hidden_layers}-layer decoder")
        t.moe_layers = sorted(layers)


def pick(d: dict, defaults: dict) -> dict:
    return {k: d.get(k, default) for k, default in defaults.items()}


def vision_from_hf(d: dict, source: str, use_head: bool = False) -> VisionConfig:
    """The vision_config section; `use_head` is vision_use_head's default when the file leaves it out (False
    in PaliGemma files, True in SigLIP ones, as transformers' config classes have it)."""
    model_type = d.get("model_type", "siglip_vision_model")
    if model_type != "siglip_vision_model":
        raise ConfigError(f"{source}: vision_config.model_type is {model_type!r}, expected 'siglip_vision_model'")
    if not use_head and d.get("vision_use_head", False):
        raise ConfigError(f"{source}: vision_config.vision_use_head is true; PaliGemma's SigLIP tower has no pooling head")
    check_activation(d, source, "vision_config")
    warn_unknown(d, source, "vision_config ")
    try:
        return VisionConfig(**pick(d, _SIGLIP_DEFAULTS), vision_use_head=d.get("vision_use_head", use_head))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def check_activation(d: dict, source: str, section: str) -> None:
    """SigLIP's towers use the tanh-approximated gelu; another hidden_act is refused, never silently replaced."""
    act = d.get("hidden_act", "gelu_pytorch_tanh")
    if act not in _GELU_TANH:
        raise ConfigError(f"{source}: {section}.hidden_act {act!r} is not supported (SigLIP uses gelu_pytorch_tanh)")


def _text_from_hf(d: dict, source: str) -> TextConfig:
    model_type = d.get("model_type", "gemma")
    if model_type not in ("gemma", "gemma2"):
        raise ConfigError(f"{source}: text_config.model_type is {model_type!r}, expected 'gemma' or 'gemma2'")
    warn_unknown(d, source, "text_config ")
    defaults = _GEMMA_DEFAULTS if model_type == "gemma" else _GEMMA2_DEFAULTS
    kw = pick(d, defaults)
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{source}: text_config.rope_parameters must be an object, found {json_kind(rope)}")
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(f"{source}: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported (Gemma uses default RoPE)")
    theta = rope.get("rope_theta", d.get("rope_theta", kw["rope_theta"]))
    kw["rope_theta"] = float(theta) if _is_number(theta) else theta  # anything else: TextConfig names it
    for key in ("hidden_activation", "hidden_act"):
        if d.get(key) is not None and d[key] not in _GELU_TANH:
            raise ConfigError(f"{source}: text_config.{key} {d[key]!r} is not supported (Gemma uses tanh-approximated GELU)")
    if d.get("attention_bias"):
        raise ConfigError(f"{source}: text_config.attention_bias is true; Gemma's attention has no biases")
    if model_type == "gemma2":
        kw.update(post_norms=True)
        if d.get("layer_types"):
            kw["layer_types"] = d["layer_types"]  # TextConfig checks it is a list of known names
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(d.get(key), int):
            kw[key] = d[key]
    kw.update({name: d[name] for name in MOE_FIELDS if name in d})  # TextConfig checks them
    try:
        return TextConfig(model_type=model_type, **kw)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
