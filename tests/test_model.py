"""The model against transformers: vision tower, projector and logits of tiny random PaliGemma 1 and 2."""

import pytest
import torch
from hf_reference import batch, hf_config, hf_logits, hf_model

from nanopali import PaliGemma

CASES = {  # name: (generation, kv heads)
    "pg1-mqa": (1, 1), "pg1-gqa": (1, 2), "pg2-mqa": (2, 1), "pg2-gqa": (2, 2),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    generation, kv = CASES[request.param]
    hf = hf_model(hf_config(generation, kv))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, PaliGemma.from_pretrained(path), hf_config(generation, kv)


def assert_close(ours, ref, rel=1e-4):
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= rel * scale, f"max abs difference {diff:.3g} exceeds {rel} x scale {scale:.3g}"


def test_vision_tower_and_projector(pair):
    hf, ours, cfg = pair
    px = batch(cfg)["pixel_values"]
    with torch.no_grad():
        ref_vision = hf.model.vision_tower(px).last_hidden_state
        ref_proj = hf.model.get_image_features(px).pooler_output
        assert_close(ours.vision(px), ref_vision)
        assert_close(ours.image_features(px), ref_proj)


def test_logits_match_transformers_with_padding_and_suffix(pair):
    hf, ours, cfg = pair
    inputs = batch(cfg)
    ref = hf_logits(hf, inputs)
    with torch.no_grad():
        logits = ours(**inputs).logits
    valid = inputs["attention_mask"].bool()
    assert logits.shape == ref.shape
    assert_close(logits[valid], ref[valid])


def test_padding_does_not_change_a_row(pair):
    """The left-padded row equals the same row run alone without padding."""
    _, ours, cfg = pair
    inputs = batch(cfg)
    keep = inputs["attention_mask"][0].bool()
    alone = {k: v[:1, keep] if k != "pixel_values" else v[:1] for k, v in inputs.items()}
    with torch.no_grad():
        padded = ours(**inputs).logits[0, keep]
        single = ours(**alone).logits[0]
    assert_close(padded, single, rel=1e-5)


@pytest.fixture(scope="module")
def gemma2_pair(tmp_path_factory):
    cfg = hf_config(2, 2)
    hf = hf_model(cfg)
    path = tmp_path_factory.mktemp("pg2")
    hf.save_pretrained(path)
    return hf, PaliGemma.from_pretrained(path), cfg


@pytest.mark.parametrize("change", ["no attention soft-cap", "no final soft-cap", "no sliding window", "causal prefix"])
def test_the_reference_comparison_is_sensitive(gemma2_pair, change):
    """Each Gemma 2 feature (and the bidirectional prefix) changes the test model's logits, so the
    parity tests above really check them."""
    hf, ours, cfg = gemma2_pair
    inputs = batch(cfg)
    cfg_before = ours.config
    try:
        if change == "no attention soft-cap":
            for layer in ours.decoder.layers:
                layer.self_attn.softcap = None
        elif change == "no final soft-cap":
            ours.decoder.config = ours.config.replace(final_logit_softcapping=None).text_config
        elif change == "no sliding window":
            ours.decoder.config = ours.config.replace(use_sliding_window=False).text_config
        elif change == "causal prefix":
            inputs["token_type_ids"] = torch.ones_like(inputs["token_type_ids"])
        with torch.no_grad():
            changed = ours(**inputs).logits
    finally:
        ours.decoder.config = cfg_before.text_config
        for layer in ours.decoder.layers:
            layer.self_attn.softcap = cfg_before.text_config.attn_logit_softcapping
    ref = hf_logits(hf, batch(cfg))
    valid = inputs["attention_mask"].bool()
    diff = (changed[valid] - ref[valid]).abs().max().item()
    assert diff > 1e-2 * ref.abs().max().item(), f"{change} left the logits unchanged (diff {diff:.3g})"


@pytest.mark.parametrize("kv", [1, 2, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_attention_equals_sdpa(kv, dtype):
    """A decode step's single query row on the CPU skips SDPA (slow there) for the explicit fp32 products: equal to
    SDPA computed in float64 on the same inputs (grouped-query, masked slots ignored), rounded once to the dtype."""
    import torch.nn.functional as F

    from nanopali.nn.attention import attention

    g = torch.Generator().manual_seed(kv)
    B, H, S, D = 2, 8, 37, 64
    q, k, v = (torch.randn(B, h, t, D, generator=g).to(dtype) for h, t in ((H, 1), (kv, S), (kv, S)))
    mask = torch.rand(B, 1, 1, S, generator=g) < 0.7
    mask[..., 0] = True
    got = attention(q, k, v, mask)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=kv != H)
    assert got.shape == (B, H, 1, D) and got.dtype == dtype
    tol = {torch.float32: 1e-6, torch.bfloat16: 2 ** -8}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    k2 = k.clone()
    k2[~mask[:, 0, 0, :].unsqueeze(1).expand_as(k2[..., 0])] = 1e4              # what masked slots hold is ignored
    torch.testing.assert_close(attention(q, k2, v, mask), got, rtol=0, atol=0)
