"""nanopali.tasks.segmentation against outputs of Google's big_vision code on a random checkpoint in the real
vae-oid.npz key layout (tests/fixtures/vqvae/, whose README describes every array).

decoder_ref.npz: decoder outputs <= 1e-5 and the set-0 intermediates; encoder_ref.npz/.json: identical indices
and token strings, the 64x64 encoder input to 1e-5; paste_ref.npz: identical pasted masks and boxes;
hfspace_paste_ref.npz: the Hugging Face Space's soft masks, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nanopali.tasks import SegmentationVAE, encode_segmentation, find_checkpoint, parse_objects, paste_mask
from nanopali.tasks.vqvae import crop_to_64, paste_soft_mask, read_npz, resize_logits

REF = Path(__file__).resolve().parent / "fixtures" / "vqvae"


@pytest.fixture(scope="module")
def vae():
    return SegmentationVAE.from_npz(REF / "vae-random.npz")


def ref(name):
    return np.load(REF / name)


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).numpy()


def test_decoder_matches_big_vision(vae):
    r = ref("decoder_ref.npz")
    out = vae.decode(torch.from_numpy(r["indices"]))
    assert out.dtype == torch.float32 and out.shape == (8, 64, 64)
    err = np.abs(out.numpy() - r["decoder_output"]).max(axis=(1, 2))
    assert (err <= 1e-5).all(), f"decoder differs from big_vision by {err} per index set"


def test_decoder_intermediates_match_big_vision(vae):
    """Set 0, layer by layer: conv0 and convT* before their ReLU, resblocks after the residual add."""
    r = ref("decoder_ref.npz")
    seen = {}
    names = {0: "conv0", 2: "resblock0", 3: "resblock1", 4: "convT0", 6: "convT1", 8: "convT2"}
    hooks = [vae.decoder[i].register_forward_hook(lambda m, a, out, n=n: seen.__setitem__(n, out))
             for i, n in names.items()]
    try:
        vae.decode(torch.from_numpy(r["indices"][:1]))
    finally:
        for h in hooks:
            h.remove()
    quantized = vae._vq_vae._embedding[torch.from_numpy(r["indices"][0]).long()].view(1, 4, 4, -1)
    np.testing.assert_array_equal(quantized.detach().numpy(), r["quantized_set0"])  # row-major 4x4 layout
    for name in names.values():
        ours, theirs = nhwc(seen[name]), r[f"inter_set0_{name}"]
        assert ours.shape == theirs.shape, name
        assert np.abs(ours - theirs).max() <= 1e-5, f"{name} differs by {np.abs(ours - theirs).max()}"


@pytest.mark.parametrize("case", range(6))
def test_encoder_matches_big_vision(vae, case):
    r, meta = ref("encoder_ref.npz"), json.loads((REF / "encoder_ref.json").read_text())[case]
    mask64 = crop_to_64(r[f"case{case}_mask_full"], r[f"case{case}_bbox"])
    # TF's float32 resize kernel and ours round differently in the last bits (README: <= 5.8e-6).
    assert np.abs(mask64 - r[f"case{case}_mask64"]).max() <= 1e-5, "crop + antialiased resize differs"
    features = nhwc(vae.encoder(2 * (torch.from_numpy(r[f"case{case}_mask64"])[None, None] - 0.5)).detach())[0]
    assert np.abs(features - r[f"case{case}_features"]).max() <= 1e-4
    want = r[f"case{case}_indices"].tolist()
    assert vae.encode(torch.from_numpy(r[f"case{case}_mask64"])[None])[0].tolist() == want
    assert vae.encode(torch.from_numpy(mask64)[None])[0].tolist() == want
    assert encode_segmentation(r[f"case{case}_mask_full"], r[f"case{case}_bbox"], vae) == meta["suffix"]


@pytest.mark.parametrize("case", range(4))
def test_paste_matches_big_vision(vae, case):
    r, meta = ref("paste_ref.npz"), json.loads((REF / "paste_ref.json").read_text())[case]
    h, w = (int(v) for v in r[f"case{case}_image_hw"])
    y0, x0, y1, x1 = (int(v) for v in r[f"case{case}_box_px"])
    box_float = resize_logits(r[f"case{case}_mask64"], (x1 - x0, y1 - y0))
    np.testing.assert_allclose(box_float, r[f"case{case}_box_float"], rtol=0, atol=1e-6)
    pasted = paste_mask(r[f"case{case}_mask64"], (x0, y0, x1, y1), (h, w))
    np.testing.assert_array_equal(pasted, r[f"case{case}_mask_full"])

    # End to end from the model's string: our decoder, our parser, our paste.
    objs = parse_objects(str(r["strings"][case]), image_size=(w, h), vae=vae)
    assert len(objs) == 1 and not objs.dropped
    obj = objs[0]
    assert obj.box == (x0, y0, x1, y1) and obj.locs == tuple(r[f"case{case}_tokens"][:4].tolist())
    assert obj.box_normalized == tuple(r[f"case{case}_box_norm"].tolist())
    assert obj.seg == r[f"case{case}_tokens"][4:].tolist()
    flipped = obj.mask != r[f"case{case}_mask_full"]
    near_zero = np.zeros((h, w), bool)
    near_zero[y0:y1, x0:x1] = np.abs(r[f"case{case}_box_float"]) < 1e-4
    assert not (flipped & ~near_zero).any(), f"{flipped.sum()} pixels differ from big_vision's mask"
    assert flipped.sum() <= meta["near_zero_box_pixels"]


@pytest.mark.parametrize("case", [0, 2, 3])
def test_soft_paste_matches_hf_space(case):
    r, hf = ref("paste_ref.npz"), ref("hfspace_paste_ref.npz")
    y0, x0, y1, x1 = (int(v) for v in hf[f"case{case}_box_px"])
    soft = paste_soft_mask(r[f"case{case}_mask64"], (x0, y0, x1, y1), tuple(r[f"case{case}_image_hw"]))
    np.testing.assert_array_equal(np.round(soft * 255).astype(np.uint8), hf[f"case{case}_soft_mask_u8"])


@pytest.mark.parametrize("case", range(4))
def test_hfspace_boxes_of_paste_cases(case):
    r, hf = ref("paste_ref.npz"), ref("hfspace_paste_ref.npz")
    h, w = (int(v) for v in r[f"case{case}_image_hw"])
    (obj,) = parse_objects(str(r["strings"][case]), image_size=(w, h), convention="hfspace")
    y0, x0, y1, x1 = hf[f"case{case}_box_px"].tolist()
    assert obj.box == (x0, y0, x1, y1)


def test_checkpoint_errors_name_the_problem(tmp_path):
    arrays = read_npz(REF / "vae-random.npz")
    with pytest.raises(FileNotFoundError, match="no mask VQ-VAE checkpoint at .*nope.npz"):
        SegmentationVAE.from_npz(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="junk.npz is not a readable .npz"):
        SegmentationVAE.from_npz(tmp_path / "junk.npz")

    def save(name, **changes):
        d = {k: v for k, v in {**arrays, **changes}.items() if v is not None}
        np.savez(tmp_path / name, **d)
        return tmp_path / name

    with pytest.raises(ValueError, match=r"missing keys \['decoder.6.bias'\]"):
        SegmentationVAE.from_npz(save("missing.npz", **{"decoder.6.bias": None}))
    with pytest.raises(ValueError, match=r"decoder.2.net.0.weight has shape \(128, 128, 1, 1\)"):
        SegmentationVAE.from_npz(save("shape.npz", **{"decoder.2.net.0.weight": np.zeros((128, 128, 1, 1))}))
    with pytest.raises(ValueError, match=r"unexpected keys \['decoder.14.weight'\]"):
        SegmentationVAE.from_npz(save("extra.npz", **{"decoder.14.weight": np.zeros(1, np.float32)}))
    with pytest.raises(ValueError, match="no '_vq_vae._embedding'"):
        SegmentationVAE.from_npz(save("nocodebook.npz", **{"_vq_vae._embedding": None}))
    # A quantizer's EMA statistics, which the real file may carry, are skipped.
    ema = save("ema.npz", **{"_vq_vae._ema_cluster_size": np.ones(128, np.float32),
                             "_vq_vae._ema_w": np.ones((128, 512), np.float32)})
    assert SegmentationVAE.from_npz(ema).decode(torch.zeros(1, 16, dtype=torch.long)).shape == (1, 64, 64)


def test_bad_inputs_are_clear_errors(vae):
    with pytest.raises(ValueError, match=r"shape \(B, 16\), got \(16,\)"):
        vae.decode(torch.zeros(16, dtype=torch.long))
    with pytest.raises(ValueError, match="must be in 0..127, got values from 128 to 128"):
        vae.decode(torch.full((1, 16), 128))
    with pytest.raises(ValueError, match="must be integers, got dtype torch.float32"):
        vae.decode(torch.zeros(1, 16))
    with pytest.raises(ValueError, match=r"shape \(B, 64, 64\), got \(1, 32, 32\)"):
        vae.encode(torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match="empty or outside the 64x48 image"):
        paste_mask(np.zeros((64, 64), np.float32), (10, 10, 10, 20), (48, 64))
    with pytest.raises(ValueError, match="needs the mask VQ-VAE"):
        encode_segmentation(np.ones((8, 8), bool), (0, 0, 1, 1), None)


def test_find_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="segmentation needs the mask VQ-VAE checkpoint vae-oid.npz"):
        find_checkpoint(model_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="none was given"):
        find_checkpoint()
    (tmp_path / "vae-oid.npz").write_bytes(b"")
    assert find_checkpoint(model_dir=tmp_path) == tmp_path / "vae-oid.npz"
    assert find_checkpoint(vae_path=REF / "vae-random.npz", model_dir=tmp_path) == REF / "vae-random.npz"


def test_without_a_vae_masks_are_none_but_seg_tokens_are_kept():
    text = str(ref("paste_ref.npz")["strings"][0])
    (obj,) = parse_objects(text, image_size=(224, 224))
    assert obj.mask is None and len(obj.seg) == 16
