"""PaliGemma's mask VQ-VAE (16 `<seg>` tokens <-> a 64x64 mask) and the pasting of a mask into its box.

Follows big_vision, which this was checked against (../shared/reference/vqvae/, tests/test_segmentation.py):
the decoder of `evaluators/proj/paligemma/transfers/segmentation.py` (`get_reconstruct_masks`, `Decoder`,
the pasting lines of `Evaluator.run`) and the encoder of `pp/proj/paligemma/segmentation.py`
(`encode_to_codebook_indices`, `refcoco_mask2str`). The encoder widths and D are not fixed by big_vision;
they are read from the checkpoint (the real `vae-oid.npz`: K=128 codes of D=512).

    encode: mask (B, 64, 64) in [0, 1] -> 2m-1 -> 4 x [4x4 conv stride 2, ReLU] -> (B, 128, 4, 4)
            -> 2 ResBlocks -> 1x1 conv -> (B, D, 4, 4) -> nearest codebook row per cell -> int64[B, 16]
    decode: int64[B, 16] -> codebook rows, row-major 4x4 -> (B, D, 4, 4) -> 1x1 conv, ReLU -> 2 ResBlocks
            -> 4 x [4x4 transpose conv stride 2, ReLU] -> (B, 16, 64, 64) -> 1x1 conv -> (B, 64, 64) logits
    ResBlock: y = x + conv1x1(relu(conv3x3(relu(conv3x3(x)))))  (no ReLU before or after)

Parameter names are the npz keys (`encoder.0.weight`, `decoder.2.net.4.bias`, `_vq_vae._embedding`…), so
loading is a strict state-dict load. The EMA statistics a VQ-VAE trainer may have saved next to the
codebook (`_vq_vae._ema_cluster_size`, `_vq_vae._ema_w`) are not used by big_vision and are skipped; any
other difference between the file and the model is an error naming the key.

Pasting (`paste_mask`) is big_vision's: the 64x64 logits are resized to the box with PIL's BILINEAR on a
float32 ('F') image, which is a triangle filter antialiased when shrinking, then thresholded at > 0.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from nanopali.errors import CheckpointError, MissingFileError

CHECKPOINT_NAME = "vae-oid.npz"
CHECKPOINT_URL = "gs://big_vision/paligemma/vae-oid.npz"
NUM_TOKENS = 16  # seg tokens per mask: a 4x4 grid of codes
MASK_SIZE = 64
_SKIPPED_KEYS = re.compile(r"^_vq_vae\._ema_")


class ResBlock(nn.Module):
    """y = x + conv1x1(relu(conv3x3(relu(conv3x3(x))))); `net.{0,2,4}` are the checkpoint's names."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class Codebook(nn.Module):
    """The K x D codebook, stored as `_vq_vae._embedding`."""

    def __init__(self, num_codes: int, dim: int):
        super().__init__()
        self._embedding = nn.Parameter(torch.zeros(num_codes, dim))

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> int64[N]: argmin of |x|^2 + |e|^2 - 2 x.e, the distance big_vision computes."""
        e = self._embedding
        d = (x * x).sum(1, keepdim=True) + (e * e).sum(1)[None] - 2 * x @ e.T  # (N, K)
        return d.argmin(1)


class SegmentationVAE(nn.Module):
    """The mask VQ-VAE. `decode` turns seg indices into 64x64 logits, `encode` turns 64x64 masks into indices."""

    def __init__(self, num_codes: int = 128, dim: int = 512, encoder_channels: Sequence[int] = (16, 32, 64, 128)):
        super().__init__()
        self.num_codes, self.dim = num_codes, dim
        c = [1, *encoder_channels]
        layers: list[nn.Module] = []
        for cin, cout in zip(c[:-1], c[1:]):  # encoder.0, .2, .4, .6 (ReLUs at the odd indices)
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.ReLU()]  # TF 'SAME' on even sizes
        layers += [ResBlock(c[-1]), ResBlock(c[-1]), nn.Conv2d(c[-1], dim, 1)]  # encoder.8, .9, .10
        self.encoder = nn.Sequential(*layers)
        # big_vision's flax Decoder hard-codes 128 channels, halved after each transpose conv but the first;
        # its ConvTranspose(padding=2, transpose_kernel=True) is torch's padding=1 (flax pad = k - 1 - p).
        widths = [128, 128, 64, 32, 16]
        layers = [nn.Conv2d(dim, 128, 1), nn.ReLU(), ResBlock(128), ResBlock(128)]  # decoder.0 .. .3
        for cin, cout in zip(widths[:-1], widths[1:]):  # decoder.4, .6, .8, .10: 4 -> 8 -> 16 -> 32 -> 64
            layers += [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.ReLU()]
        layers += [nn.Conv2d(16, 1, 1)]  # decoder.12
        self.decoder = nn.Sequential(*layers)
        self._vq_vae = Codebook(num_codes, dim)

    @torch.no_grad()
    def decode(self, indices) -> torch.Tensor:
        """int[B, 16] codebook indices -> float32 (B, 64, 64) mask logits, before any threshold."""
        indices = torch.as_tensor(indices, device=self._vq_vae._embedding.device)
        if indices.ndim != 2 or indices.shape[1] != NUM_TOKENS:
            raise ValueError(f"decode takes seg indices of shape (B, {NUM_TOKENS}), got {tuple(indices.shape)}")
        if indices.is_floating_point() or indices.is_complex():
            raise ValueError(f"seg indices must be integers, got dtype {indices.dtype}")
        if indices.numel() and not 0 <= int(indices.min()) <= int(indices.max()) < self.num_codes:
            raise ValueError(f"seg indices must be in 0..{self.num_codes - 1}, got values from "
                             f"{int(indices.min())} to {int(indices.max())}")
        return self.decode_cells(self._vq_vae._embedding[indices.long()])  # token k is grid cell (k // 4, k % 4)

    def decode_cells(self, cells: torch.Tensor) -> torch.Tensor:
        """(B, 16, D) cell vectors, row by row -> (B, 64, 64) mask logits (differentiable; train/vqvae.py)."""
        x = cells.reshape(cells.shape[0], 4, 4, self.dim).permute(0, 3, 1, 2)  # (B, D, 4, 4)
        return self.decoder(x)[:, 0]

    def encode_cells(self, masks) -> torch.Tensor:
        """float (B, 64, 64) masks in [0, 1] -> (B, 16, D) encoder outputs before quantization, row by row
        (differentiable; train/vqvae.py)."""
        masks = torch.as_tensor(masks, device=self._vq_vae._embedding.device)
        if masks.ndim != 3 or masks.shape[1:] != (MASK_SIZE, MASK_SIZE):
            raise ValueError(f"encode takes masks of shape (B, {MASK_SIZE}, {MASK_SIZE}), got {tuple(masks.shape)}")
        z = self.encoder(2.0 * (masks.float()[:, None] - 0.5))  # (B, D, 4, 4) from inputs in [-1, 1]
        return z.permute(0, 2, 3, 1).reshape(len(masks), NUM_TOKENS, self.dim)

    @torch.no_grad()
    def encode(self, masks) -> torch.Tensor:
        """float (B, 64, 64) masks in [0, 1] -> int64[B, 16] codebook indices, row by row."""
        return self._vq_vae.nearest(self.encode_cells(masks).flatten(0, 1)).view(-1, NUM_TOKENS)

    @classmethod
    def from_npz(cls, path: str | Path, device: str | torch.device = "cpu") -> "SegmentationVAE":
        """Load a checkpoint in big_vision's `vae-oid.npz` layout (PyTorch weight layouts, float32)."""
        arrays = read_npz(path)
        for key in ("_vq_vae._embedding", "encoder.0.weight", "encoder.2.weight", "encoder.4.weight",
                    "encoder.6.weight"):
            if key not in arrays:
                raise CheckpointError(f"{path} is not a mask VQ-VAE checkpoint: it has no {key!r}")
            if arrays[key].ndim != (2 if key.startswith("_vq") else 4):
                raise CheckpointError(f"{path}: {key} has shape {arrays[key].shape}, which no mask VQ-VAE has")
        num_codes, dim = arrays["_vq_vae._embedding"].shape  # (K, D)
        widths = [arrays[f"encoder.{i}.weight"].shape[0] for i in (0, 2, 4, 6)]  # (out, in, 4, 4) each
        with torch.device("meta"):
            vae = cls(num_codes, dim, widths)
        expected = vae.state_dict()
        state = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()
                 if not _SKIPPED_KEYS.match(k)}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{path} does not match the mask VQ-VAE: missing keys {missing}, unexpected keys "
                                  f"{unexpected}")
        for key, value in state.items():
            if value.shape != expected[key].shape:
                raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)}, the model needs "
                                      f"{tuple(expected[key].shape)}")
        vae.load_state_dict(state, strict=True, assign=True)
        return vae.to(device).eval()

    def save_npz(self, path: str | Path) -> Path:
        """Write the checkpoint in the `vae-oid.npz` layout that `from_npz` (and big_vision's decoder) reads."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{k: v.detach().cpu().float().numpy() for k, v in self.state_dict().items()})
        return path


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz file, with errors that say what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no mask VQ-VAE checkpoint at {path}; download {CHECKPOINT_NAME} from "
                               f"{CHECKPOINT_URL} and pass its path")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path} is not a readable .npz checkpoint ({e})") from None


def find_checkpoint(vae_path: str | Path | None = None, model_dir: str | Path | None = None) -> Path:
    """The VQ-VAE checkpoint to use: `vae_path` if given, else `vae-oid.npz` next to the model; else an error."""
    if vae_path is not None:
        if not Path(vae_path).is_file():
            raise MissingFileError(f"no mask VQ-VAE checkpoint at {vae_path}")
        return Path(vae_path)
    if model_dir is not None and (Path(model_dir) / CHECKPOINT_NAME).is_file():
        return Path(model_dir) / CHECKPOINT_NAME
    where = f"none was given and {model_dir}/{CHECKPOINT_NAME} does not exist" if model_dir else "none was given"
    raise MissingFileError(f"segmentation needs the mask VQ-VAE checkpoint {CHECKPOINT_NAME}, but {where}; "
                           f"download it from {CHECKPOINT_URL} and pass its path (or put it next to the model)")


def _check_box(box: Sequence[int], image_hw: Sequence[int]) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (int(v) for v in box)
    h, w = image_hw
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(f"box (x0, y0, x1, y1) = {tuple(box)} is empty or outside the {w}x{h} image")
    return x0, y0, x1, y1


def _as_map(mask64) -> np.ndarray:
    m = mask64.detach().cpu().numpy() if isinstance(mask64, torch.Tensor) else np.asarray(mask64)
    if m.shape != (MASK_SIZE, MASK_SIZE):
        raise ValueError(f"expected one ({MASK_SIZE}, {MASK_SIZE}) mask, got shape {m.shape}")
    return m.astype(np.float32)


def resize_logits(mask64, size_wh: tuple[int, int]) -> np.ndarray:
    """(64, 64) logits -> float32 (h, w) with PIL BILINEAR in 'F' mode, as big_vision's evaluator does."""
    return np.asarray(Image.fromarray(_as_map(mask64)).resize(size_wh, Image.BILINEAR), dtype=np.float32)


def paste_mask(mask64, box: Sequence[int], image_hw: Sequence[int]) -> np.ndarray:
    """(64, 64) logits -> bool (H, W) mask: resized into `box` = (x0, y0, x1, y1) px (ends exclusive), > 0."""
    x0, y0, x1, y1 = _check_box(box, image_hw)
    full = np.zeros(tuple(image_hw), dtype=bool)
    full[y0:y1, x0:x1] = resize_logits(mask64, (x1 - x0, y1 - y0)) > 0.0
    return full


def paste_soft_mask(mask64, box: Sequence[int], image_hw: Sequence[int]) -> np.ndarray:
    """(64, 64) logits -> float (H, W) in [0, 1]: the Hugging Face Space's soft mask (not big_vision's).

    `uint8(clip(m * 0.5 + 0.5, 0, 1) * 255)` (truncated), PIL-resized in 'L' mode into the box, / 255. The
    Space calls `resize` without a filter, which is BICUBIC for 'L' images since Pillow 7; its outputs
    (hfspace_paste_ref.npz) match BICUBIC exactly and not BILINEAR.
    """
    x0, y0, x1, y1 = _check_box(box, image_hw)
    u8 = (np.clip(_as_map(mask64) * 0.5 + 0.5, 0, 1) * 255).astype(np.uint8)
    full = np.zeros(tuple(image_hw), dtype=np.float64)
    full[y0:y1, x0:x1] = np.asarray(Image.fromarray(u8).resize((x1 - x0, y1 - y0), Image.BICUBIC)) / 255.0
    return full


def crop_to_64(mask, box_normalized: Sequence[float]) -> np.ndarray:
    """Full (H, W) mask + (ymin, xmin, ymax, xmax) in [0, 1] -> float32 (64, 64) in [0, 1], as refcoco_mask2str.

    Crop at round-half-even(float32(H) * ymin) etc., then an antialiased bilinear resize of the 0/255 crop.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D (H, W) mask, got shape {m.shape}")
    m = m.astype(np.float32) * 255.0 if m.dtype == bool or m.max(initial=0) <= 1 else m.astype(np.float32)
    h, w = m.shape
    b = np.asarray(box_normalized, dtype=np.float32)
    y0, x0, y1, x1 = (int(v) for v in np.round(b * np.array([h, w, h, w], dtype=np.float32)))
    if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
        raise ValueError(f"box (ymin, xmin, ymax, xmax) = {tuple(b.tolist())} gives an empty or out-of-image "
                         f"crop [{y0}:{y1}, {x0}:{x1}] of the {w}x{h} mask")
    crop = torch.from_numpy(np.ascontiguousarray(m[y0:y1, x0:x1]))[None, None]  # (1, 1, h', w')
    out = F.interpolate(crop, size=(MASK_SIZE, MASK_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return out[0, 0].numpy() / np.float32(255.0)
