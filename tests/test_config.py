"""Configs: published config.json files, the size registry, and transformers' reading of the same files."""

import json
import warnings

import pytest
import torch
from transformers import PaliGemmaConfig as HFConfig

from nanopali import ConfigError, PaliGemma, PaliGemmaConfig
from nanopali.registry import NAMES, named_config

# The config.json files of google/paligemma-3b-pt-224 and google/paligemma2-3b-pt-224 on the Hub,
# written by older transformers versions: most fields are left to the model-type defaults.
PALIGEMMA_3B_PT_224 = {
    "_name_or_path": "google/paligemma-3b-pt-224", "architectures": ["PaliGemmaForConditionalGeneration"],
    "bos_token_id": 2, "eos_token_id": 1, "hidden_size": 2048, "ignore_index": -100, "image_token_index": 257152,
    "model_type": "paligemma", "pad_token_id": 0, "projection_dim": 2048,
    "text_config": {"hidden_size": 2048, "intermediate_size": 16384, "model_type": "gemma", "num_attention_heads": 8,
                    "num_hidden_layers": 18, "num_image_tokens": 256, "num_key_value_heads": 1,
                    "torch_dtype": "float32", "vocab_size": 257216},
    "torch_dtype": "float32", "transformers_version": "4.41.0.dev0",
    "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256, "patch_size": 14,
                      "projection_dim": 2048, "projector_hidden_act": "gelu_fast", "vision_use_head": False},
    "vocab_size": 257216,
}
PALIGEMMA2_3B_PT_224 = {
    "architectures": ["PaliGemmaForConditionalGeneration"], "bos_token_id": 2, "eos_token_id": 1,
    "hidden_size": 2048, "image_token_index": 257152, "model_type": "paligemma", "pad_token_id": 0,
    "projection_dim": 2304,
    "text_config": {"final_logit_softcapping": 30.0, "hidden_act": "gelu_pytorch_tanh",
                    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "intermediate_size": 9216,
                    "model_type": "gemma2", "num_hidden_layers": 26, "num_image_tokens": 256,
                    "num_key_value_heads": 4, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                    "torch_dtype": "bfloat16", "vocab_size": 257216},
    "torch_dtype": "bfloat16", "transformers_version": "4.47.0.dev0",
    "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                      "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256,
                      "num_positions": 256, "patch_size": 14, "projection_dim": 2304, "torch_dtype": "bfloat16",
                      "vision_use_head": False},
}


def shapes_as_transformers_reads(d: dict) -> dict:
    hf = HFConfig(**json.loads(json.dumps(d)))
    t, v = hf.text_config, hf.vision_config
    return dict(
        text=(t.model_type, t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers,
              t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.rms_norm_eps, t.rope_parameters["rope_theta"],
              getattr(t, "query_pre_attn_scalar", None), getattr(t, "sliding_window", None),
              getattr(t, "attn_logit_softcapping", None), getattr(t, "final_logit_softcapping", None)),
        vision=(v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads, v.image_size,
                v.patch_size, v.layer_norm_eps),
        image_token=hf.image_token_index, num_image_tokens=t.num_image_tokens,
        layer_types=getattr(t, "layer_types", None),
    )


def shapes_as_nanopali_reads(c: PaliGemmaConfig) -> dict:
    t, v = c.text_config, c.vision_config
    return dict(
        text=(t.model_type, t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers,
              t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.rms_norm_eps, t.rope_theta,
              t.query_pre_attn_scalar, t.sliding_window, t.attn_logit_softcapping, t.final_logit_softcapping),
        vision=(v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads, v.image_size,
                v.patch_size, v.layer_norm_eps),
        image_token=c.image_token_index, num_image_tokens=c.num_image_tokens,
        layer_types=t.layer_types if t.model_type == "gemma2" else None,
    )


@pytest.mark.parametrize("published, name", [(PALIGEMMA_3B_PT_224, "paligemma-3b-224"),
                                             (PALIGEMMA2_3B_PT_224, "paligemma2-3b-224")])
def test_published_config_reads_like_transformers_and_the_registry(published, name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key of a real file is known
        ours = PaliGemmaConfig.from_hf_dict(published)
    assert shapes_as_nanopali_reads(ours) == shapes_as_transformers_reads(published)
    assert ours == named_config(name)


@pytest.mark.parametrize("name", NAMES)
def test_registry_config_written_for_transformers(name):
    """What nanopali writes for every published size, transformers reads back to the same shapes."""
    config = named_config(name)
    d = config.to_hf_dict()
    assert shapes_as_transformers_reads(d) == shapes_as_nanopali_reads(config)
    assert PaliGemmaConfig.from_hf_dict(d) == config


def test_registry_sizes():
    assert named_config("paligemma2-28b-448").text_config.head_dim == 128
    assert named_config("paligemma2-28b-448").text_config.query_pre_attn_scalar == 144
    assert named_config("paligemma-3b-896").num_image_tokens == 4096
    with torch.device("meta"):
        n = sum(p.numel() for p in PaliGemma(named_config("paligemma-3b-224")).parameters())
    assert abs(n - 2.923e9) < 1e6  # the published 2.92B parameters
    with pytest.raises(KeyError, match="known sizes: paligemma-3b-224"):
        named_config("paligemma-3b")


def edited(**changes):
    d = json.loads(json.dumps(PALIGEMMA2_3B_PT_224))
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = d
        for p in parents:
            node = node[p]
        node[leaf] = value
    return d


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="llava"), "model_type is 'llava', expected 'paligemma'"),
    (dict(text_config__model_type="llama"), "text_config.model_type is 'llama'"),
    (dict(text_config__num_image_tokens=100), "num_image_tokens 100 contradicts"),
    (dict(projection_dim=1000), "projection_dim 1000 must equal text_config.hidden_size 2304"),
    (dict(vision_config__vision_use_head=True), "no pooling head"),
    (dict(text_config__hidden_activation="relu"), "hidden_activation 'relu' is not supported"),
    (dict(text_config__rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope type 'linear' is not supported"),
    (dict(text_config__layer_types=["full_attention"] * 3), "layer_types has 3 entries for 26 layers"),
    (dict(text_config__num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
    (dict(vision_config__image_size=230), "not a multiple of patch_size 14"),
    (dict(tie_word_embeddings=False), "tie_word_embeddings is false"),
])
def test_contradictory_configs_are_errors(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PaliGemmaConfig.from_hf_dict(edited(**changes))


def test_unknown_keys_warn():
    with pytest.warns(UserWarning, match=r"ignoring unknown text_config keys \['mystery_flag'\]"):
        PaliGemmaConfig.from_hf_dict(edited(text_config__mystery_flag=True))


def test_sliding_window_switch():
    c = named_config("paligemma2-3b-896")
    assert [c.text_config.window(i) for i in range(3)] == [4096, None, 4096]
    off = c.replace(use_sliding_window=False)
    assert {off.text_config.window(i) for i in range(26)} == {None}
    assert "use_sliding_window" not in json.dumps(off.to_hf_dict())
