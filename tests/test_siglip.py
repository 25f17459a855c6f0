"""The contrastive SigLIP model against transformers' SiglipModel: features, logits, loss and gradients of tiny
random models in several shapes; save/load both ways; strict loading and bad inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from siglip_reference import CONFIGS, hf_model, inputs
from transformers import SiglipModel

from nanopali import SigLIP
from nanopali.errors import CheckpointError, ConfigError, UsageError
from nanopali.models.paligemma import PaliGemma
from nanopali.nn.contrastive import SIGLIP_INIT
from nanopali.siglip_config import SigLIPConfig


def assert_close(ours, ref, rel=1e-5, floor=1e-6):
    """Within rel of ref's largest magnitude (or of `floor`, for tensors that are all near zero)."""
    scale = max(ref.abs().max().item(), floor)
    diff = (ours - ref).abs().max().item()
    assert diff <= rel * scale, f"max abs difference {diff:.3g} exceeds {rel} x scale {scale:.3g}"


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    hf = hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, SigLIP.from_pretrained(path).eval(), path


def test_features_and_logits_match_transformers(pair):
    name, hf, ours, _ = pair
    batch = inputs(name)
    with torch.no_grad():
        ref = hf(**batch)
        out = ours(**batch)
        assert_close(ours.get_image_features(batch["pixel_values"]), hf.get_image_features(batch["pixel_values"]).pooler_output)
        assert_close(ours.get_text_features(batch["input_ids"]), hf.get_text_features(batch["input_ids"]).pooler_output)
    assert out.logits_per_image.shape == (3, 4)
    assert_close(out.logits_per_image, ref.logits_per_image)
    assert_close(out.logits_per_text, ref.logits_per_text)
    assert_close(out.image_embeds, ref.image_embeds)
    assert_close(out.text_embeds, ref.text_embeds)


def test_text_attention_mask_matches_transformers(pair):
    """With an attention mask (what transformers' processor returns in 5.x) both keep queries off the pads."""
    name, hf, ours, _ = pair
    ids = inputs(name)["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, 3:], mask[2, 5:] = 0, 0
    with torch.no_grad():
        ref = hf.get_text_features(ids, attention_mask=mask).pooler_output
        assert_close(ours.get_text_features(ids, mask), ref)
        assert (ours.get_text_features(ids, mask) - ours.get_text_features(ids)).abs().max() > 1e-3  # the mask bites


def test_loss_and_gradients_match_transformers(pair):
    name, hf, ours, _ = pair
    batch = inputs(name, n_images=4, n_texts=4, seed=1)
    hf.zero_grad(), ours.zero_grad()
    ref = hf(**batch, return_loss=True).loss
    loss = ours(**batch, return_loss=True).loss
    assert_close(loss, ref)
    ref.backward(), loss.backward()
    ours_grads = dict(ours.named_parameters())
    largest = max(p.grad.abs().max().item() for p in hf.parameters())
    for key, p in hf.named_parameters():
        assert_close(ours_grads[key].grad, p.grad, rel=1e-4, floor=1e-3 * largest)


def test_save_then_transformers_loads_equal_outputs(pair, tmp_path):
    name, _, ours, _ = pair
    ours.save_pretrained(tmp_path)
    back = SiglipModel.from_pretrained(tmp_path).eval()
    batch = inputs(name, seed=2)
    with torch.no_grad():
        assert_close(back(**batch).logits_per_image, ours(**batch).logits_per_image)
    assert json.loads((tmp_path / "config.json").read_text())["objective"] == "siglip"
    assert SigLIP.from_pretrained(tmp_path).config == ours.config


def test_bf16_load_is_close(pair):
    name, _, ours, path = pair
    low = SigLIP.from_pretrained(path, dtype="bf16").eval()
    assert low.logit_scale.dtype == torch.bfloat16
    batch = inputs(name)
    with torch.no_grad():
        assert_close(low(**batch).logits_per_image, ours(**batch).logits_per_image, rel=0.1)


def test_strict_loading_names_every_problem(pair, tmp_path):
    _, _, _, path = pair
    state = load_file(path / "model.safetensors")
    state.pop("vision_model.head.probe")
    state["text_model.head.weight"] = state["text_model.head.weight"][:, :-1].contiguous()
    state["extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError) as e:
        SigLIP.from_pretrained(tmp_path)
    for expected in ("missing tensors (1)", "vision_model.head.probe", "unexpected tensors (1)", "extra.weight",
                     "text_model.head.weight"):
        assert expected in str(e.value)


def test_configs_of_the_other_model_are_refused(pair, tmp_path):
    _, _, _, path = pair
    with pytest.raises(ConfigError, match="expected 'paligemma'"):
        PaliGemma.from_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["vision_config"]["vision_use_head"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="attention-pooling head"):
        SigLIPConfig.from_pretrained(tmp_path)
    config["vision_config"]["vision_use_head"] = True
    config["text_config"]["projection_size"] = 7
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="projection_size 7 must equal vision_config.hidden_size"):
        SigLIPConfig.from_pretrained(tmp_path)


def test_bad_inputs_are_named(pair):
    name, _, ours, _ = pair
    batch = inputs(name)
    ids = batch["input_ids"]
    with pytest.raises(UsageError, match=f"padded to exactly {ids.shape[1]} tokens"):
        ours.get_text_features(ids[:, :-1])
    bad = ids.clone()
    bad[1, 2] = CONFIGS[name][0]["vocab_size"]
    with pytest.raises(UsageError, match="row 1, position 2"):
        ours.get_text_features(bad)
    with pytest.raises(UsageError, match="integer tensor"):
        ours.get_text_features(ids.float())
    px = batch["pixel_values"].clone()
    px[0, 0, 0, 0] = float("nan")
    with pytest.raises(UsageError, match="NaN"):
        ours.get_image_features(px)
    with pytest.raises(UsageError, match="3 images and 4 texts"):
        ours(**batch, return_loss=True)


def test_init_weights_starts_where_the_paper_does():
    config = SigLIPConfig.from_hf_dict({"model_type": "siglip", "text_config": dict(CONFIGS["proj"][0]),
                                        "vision_config": dict(CONFIGS["proj"][1])})
    torch.manual_seed(0)
    model = SigLIP(config).init_weights()
    assert model.logit_scale.item() == pytest.approx(SIGLIP_INIT[0]) and model.logit_bias.item() == -10.0
    assert model.logit_scale.exp().item() == pytest.approx(10.0)
    for n in (4, 16, 64):  # ~10 (the positives' -log σ(-10 + 10 cos)) whatever B; zeros would start at ~0.69 * B
        batch = inputs("proj", n_images=n, n_texts=n)
        assert 8.0 < model(**batch, return_loss=True).loss.item() < 12.5


def test_init_weights_draws_every_tensor_as_big_vision_does():
    """Each tensor's from-scratch distribution (mean, std, largest magnitude) equals transformers' SiglipModel init,
    which copies big_vision's initializers, except (1) the temperature and bias, which start where the paper's do,
    and (2) the LeCun-normal weights (the Linears outside attention and MLPs, the patch Conv): flax draws those
    from N(0, 1/fan_in) truncated at 2 sigma, while transformers passes torch's trunc_normal_ absolute bounds (+-2)
    and so draws an untruncated normal 1/0.88 wider; ours are checked against flax's definition."""
    text = dict(vocab_size=500, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=32, projection_size=64, pad_token_id=1, bos_token_id=None, eos_token_id=1)
    vision = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    from transformers import SiglipConfig as HFConfig

    torch.manual_seed(0)
    ref = SiglipModel(HFConfig(text_config=text, vision_config=vision)).state_dict()
    torch.manual_seed(1)
    ours = SigLIP(SigLIPConfig.from_hf_dict({"model_type": "siglip", "text_config": text,
                                             "vision_config": vision})).init_weights().state_dict()
    assert set(ours) == set(ref)
    lecun = ("text_model.head.weight", "vision_model.embeddings.patch_embedding.weight",
             "vision_model.head.attention.out_proj.weight")
    for name, r in ref.items():
        o = ours[name]
        if name in ("logit_scale", "logit_bias") or not r.is_floating_point():
            continue
        if name in lecun:
            std = o[0].numel() ** -0.5
            assert o.std().item() == pytest.approx(std, rel=0.05), name
            assert o.abs().max().item() <= 2 * std / 0.87962566103423978, name
            continue
        if r.std() < 1e-4:  # biases and LayerNorms: constants (transformers draws the MLP biases from N(0, 1e-6))
            assert torch.allclose(o, r, atol=1e-4), name
            continue
        small = r.numel() < 500  # the pooling probe: 64 draws
        assert o.std().item() == pytest.approx(r.std().item(), rel=0.3 if small else 0.1), name
        assert abs(o.mean().item() - r.mean().item()) < (0.3 if small else 0.1) * r.std().item(), name
        assert o.abs().max().item() == pytest.approx(r.abs().max().item(), rel=0.5 if small else 0.25), name


# The published sizes (the config.json of google/siglip-base-patch16-224 and google/siglip-so400m-patch14-384;
# SigLIP 2's base-patch16-224 differs from the first in its 256000-id Gemma vocabulary), built by transformers and
# by nanopali on the meta device: the same tensor names and shapes, so the real checkpoints load unchanged.
PUBLISHED = {
    "siglip-base-patch16-224": (dict(), dict()),
    "siglip-so400m-patch14-384": (dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16),
                                  dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                       num_attention_heads=16, image_size=384, patch_size=14)),
    "siglip2-base-patch16-224": (dict(vocab_size=256000), dict()),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_sizes_have_transformers_tensor_names_and_shapes(name):
    from transformers import SiglipConfig as HFConfig

    text, vision = PUBLISHED[name]
    hf_config = HFConfig(text_config=dict(text, bos_token_id=None, eos_token_id=1), vision_config=vision)
    with torch.device("meta"):
        hf = SiglipModel(hf_config)
    config = SigLIPConfig.from_hf_dict(hf_config.to_dict())
    with torch.device("meta"):
        ours = SigLIP(config)
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs
