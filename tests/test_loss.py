"""The training loss and its gradients against transformers' PaliGemmaForConditionalGeneration."""

import pytest
import torch
import torch.nn.functional as F
from hf_reference import batch, hf_config, hf_model

from nanopali import PaliGemma
from nanopali.io.hf_checkpoint import canonical_key


def with_labels(inputs):
    suffix = (inputs["token_type_ids"] == 1) & inputs["attention_mask"].bool()
    return {**inputs, "labels": inputs["input_ids"].masked_fill(~suffix, -100)}


@pytest.fixture(scope="module", params=[(1, 1), (2, 2)], ids=["pg1", "pg2"])
def pair(request, tmp_path_factory):
    cfg = hf_config(*request.param)
    hf = hf_model(cfg, std=0.1)
    path = tmp_path_factory.mktemp("m")
    hf.save_pretrained(path)
    return hf, PaliGemma.from_pretrained(path), cfg


def test_loss_and_every_gradient_equal_transformers(pair):
    hf, ours, cfg = pair
    inputs = with_labels(batch(cfg))
    assert (inputs["labels"] != -100).sum() > 5
    hf.zero_grad(), ours.zero_grad()
    ref = hf(**inputs, position_ids=inputs["attention_mask"].cumsum(-1)).loss
    loss = ours(**inputs).loss
    ref.backward(), loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    ours_grads = {k: p.grad for k, p in ours.named_parameters()}
    largest = max(p.grad.abs().max().item() for p in hf.parameters())
    checked = 0
    for name, p in hf.named_parameters():
        key = canonical_key(name)
        g, ref_g = ours_grads[key], p.grad
        # relative to the parameter's own gradient; gradients that are zero in exact arithmetic
        # (attention key biases: softmax ignores a constant shift) are held to 1e-8 of the largest
        scale = max(ref_g.abs().max().item(), 1e-3 * largest)
        assert (g - ref_g).abs().max().item() <= 1e-5 * scale, f"gradient of {key} differs"
        checked += 1
    assert checked == len(ours_grads)


def test_example_mean_reduction_and_label_smoothing(pair):
    _, ours, cfg = pair
    inputs = with_labels(batch(cfg))
    with torch.no_grad():
        logits = ours(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        per_row = []
        for r in range(logits.shape[0]):
            lab = inputs["labels"][r, 1:]
            if (lab != -100).any():
                per_row.append(F.cross_entropy(logits[r, :-1], lab, ignore_index=-100))
        expected = torch.stack(per_row).mean()
        got = ours(**inputs, reduction="example").loss
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
        smooth = F.cross_entropy(logits[:, :-1].flatten(0, 1), inputs["labels"][:, 1:].flatten(), ignore_index=-100,
                                 label_smoothing=0.1)
        torch.testing.assert_close(ours(**inputs, label_smoothing=0.1).loss, smooth, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="unknown loss reduction 'sum'"):
        ours(**inputs, reduction="sum")
