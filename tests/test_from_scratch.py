"""Training from scratch: weight initialisation, the mask VQ-VAE trainer and the vision warm-up."""

import copy

import numpy as np
import pytest
import torch

from nanopali import PaliGemma, PaliGemmaConfig, TextConfig, VisionConfig
from nanopali.models.gemma import RMSNorm
from nanopali.tasks import SegmentationVAE
from nanopali.world.patch_warmup import warm_up_vision
from nanopali.world.scenes import shape_mask
from nanopali.world.vqvae import train_vae


def tiny_config():
    return PaliGemmaConfig(
        VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                     patch_size=8),
        TextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=16),
        image_token_index=49)


def test_init_weights_gives_each_kind_of_parameter_its_from_scratch_value():
    torch.manual_seed(0)
    model = PaliGemma(tiny_config()).init_weights(std=0.05)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0), name
        elif isinstance(module, RMSNorm):  # stored w of Gemma's (1 + w): zero is the identity scale
            assert torch.all(module.weight == 0), name
        elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)):
            assert abs(module.weight.std().item() - 0.05) < 0.015, name
            assert getattr(module, "bias", None) is None or torch.all(module.bias == 0), name
    ids = torch.randint(0, 49, (4, 12))
    logits = model(ids).logits  # near-uniform predictions: the loss of any next token is about ln(vocab)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert abs(loss.item() - np.log(50)) < 0.1 * np.log(50)


def _masks(n: int, seed: int) -> np.ndarray:
    """n 64x64 masks of circles and squares of random size and place."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        r = rng.uniform(8, 28)
        cx, cy = rng.uniform(r, 64 - r, 2)
        out.append(shape_mask(["circle", "square"][rng.integers(2)], (64, 64), cx, cy, r))
    return np.stack(out).astype(np.float32)


def test_vq_vae_trainer_learns_masks_and_round_trips_through_the_npz_layout(tmp_path):
    train = _masks(256, 0)
    vae = train_vae(train, steps=150, batch_size=32, lr=2e-3, num_codes=16, dim=32, seed=0, progress=False)
    held_out = _masks(64, 1)
    decoded = vae.decode(vae.encode(held_out)) > 0
    accuracy = (decoded.numpy() == (held_out > 0.5)).mean()
    assert accuracy > 0.9  # background alone is ~0.6 of the pixels: the shapes are really reconstructed
    path = vae.save_npz(tmp_path / "vae-oid.npz")
    loaded = SegmentationVAE.from_npz(path)
    codes = vae.encode(held_out)
    assert torch.equal(loaded.encode(held_out), codes)
    assert torch.equal(loaded.decode(codes), vae.decode(codes))
    with pytest.raises(ValueError, match="shape"):
        train_vae(train[:, :32, :32], steps=1)


def test_vision_warm_up_learns_per_patch_labels():
    torch.manual_seed(0)
    vision = PaliGemma(tiny_config()).init_weights().vision
    rng = np.random.default_rng(0)
    n = 64
    labels = rng.integers(0, 3, (n, 16, 1))  # each 8x8 patch is grey, red or blue: its label
    palette = np.array([[128, 128, 128], [220, 30, 30], [30, 30, 220]], dtype=np.uint8)
    pixels = palette[labels[..., 0]].reshape(n, 4, 4, 3).repeat(8, 1).repeat(8, 2)  # (n, 32, 32, 3)
    log = warm_up_vision(vision, torch.from_numpy(pixels), torch.from_numpy(labels), (3,), steps=100,
                         batch_size=16, lr=3e-3, warmup_steps=10, background_weight=0.5, bf16=False, progress=False)
    assert log[-1]["accuracy"][0] > 0.95 and log[-1]["loss"] < log[0]["loss"]
    assert log[-1]["labelled_accuracy"][0] > 0.95  # the red and blue patches themselves, not only the grey
    assert log[-1]["majority_baseline"][0] < 0.6  # three roughly equal classes: the heads beat the prior
    with pytest.raises(ValueError, match="patches"):
        warm_up_vision(vision, torch.from_numpy(pixels), torch.from_numpy(labels[:, :8]), (3,), steps=1)


def test_vision_warm_up_loss_is_the_background_weighted_mean():
    """The logged loss of a one-step warm-up equals, by hand on the same batch and heads, the mean of the
    per-patch cross-entropies weighted background_weight on class 0 and 1 elsewhere."""
    torch.manual_seed(0)
    vision = PaliGemma(tiny_config()).init_weights().vision
    rng = np.random.default_rng(1)
    n, seed, weight = 8, 5, 0.2
    labels = torch.from_numpy(rng.integers(0, 3, (n, 16, 1)))
    pixels = torch.from_numpy(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
    before = copy.deepcopy(vision)
    log = warm_up_vision(vision, pixels, labels, (3,), steps=1, batch_size=n, background_weight=weight, bf16=False,
                         seed=seed, progress=False)
    idx = torch.randint(n, (n,), generator=torch.Generator().manual_seed(seed))  # the warm-up's batch
    torch.manual_seed(seed)
    head = torch.nn.Linear(vision.config.hidden_size, 3)  # the warm-up's head, before its step
    with torch.no_grad():
        logp = head(before(pixels[idx].permute(0, 3, 1, 2).float() / 127.5 - 1.0)).log_softmax(-1)
    y = labels[idx][..., 0]
    nll = -logp.gather(-1, y[..., None])[..., 0]
    w = torch.where(y == 0, weight, 1.0)
    assert log[0]["loss"] == pytest.approx(((w * nll).sum() / w.sum()).item(), rel=1e-4)
    assert log[0]["loss"] != pytest.approx(nll.mean().item(), rel=1e-3)  # the weight changes the loss here
