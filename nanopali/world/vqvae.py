"""Train the mask VQ-VAE (tasks/segmentation.py, the vae-oid architecture) on 64x64 object masks.

    vae = train_vae(masks, steps=3000)          # masks: float (N, 64, 64) in [0, 1], e.g. crop_to_64 of each object
    vae.save_npz("vae-oid.npz")                 # what SegmentationVAE.from_npz and the segment task read

A plain VQ-VAE (van den Oord et al. 2017): z = encoder(2m - 1), each of the 4x4 cells snaps to its nearest
codebook row, the decoder sees z + sg(e - z) (straight-through), and the loss is

    BCE(decoder logits, m) + |sg(z) - e|^2 (codebook) + beta |z - sg(e)|^2 (commitment)

The codebook starts from encoder outputs of the first batch and every `restart_every` steps the codes no
cell picked since the last restart are moved onto random encoder outputs, so all K codes stay in use.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nanopali.tasks.vqvae import MASK_SIZE, SegmentationVAE


def vae_loss(vae: SegmentationVAE, masks: torch.Tensor, beta: float = 0.25) -> tuple[torch.Tensor, dict]:
    """The training loss on a (B, 64, 64) batch in [0, 1], and the codes used (for restarts) and pixel accuracy."""
    z = vae.encode_cells(masks)  # (B, 16, D)
    codes = vae._vq_vae.nearest(z.detach().flatten(0, 1)).view(z.shape[:2])  # (B, 16)
    e = vae._vq_vae._embedding[codes]  # (B, 16, D)
    logits = vae.decode_cells(z + (e - z).detach())  # (B, 64, 64), straight-through
    loss = (F.binary_cross_entropy_with_logits(logits, masks) + F.mse_loss(e, z.detach())
            + beta * F.mse_loss(z, e.detach()))
    accuracy = ((logits > 0) == (masks > 0.5)).float().mean()
    return loss, {"codes": codes, "pixel_accuracy": accuracy.item()}


def train_vae(masks, steps: int = 3000, batch_size: int = 64, lr: float = 1e-3, num_codes: int = 128,
              dim: int = 512, beta: float = 0.25, restart_every: int = 200, seed: int = 0,
              progress: bool = True) -> SegmentationVAE:
    """A SegmentationVAE trained on `masks` (float (N, 64, 64) in [0, 1]); deterministic for a seed."""
    masks = torch.as_tensor(np.asarray(masks), dtype=torch.float32)
    if masks.ndim != 3 or masks.shape[1:] != (MASK_SIZE, MASK_SIZE):
        raise ValueError(f"train_vae needs masks of shape (N, {MASK_SIZE}, {MASK_SIZE}), got {tuple(masks.shape)}")
    if len(masks) < batch_size:
        raise ValueError(f"train_vae needs at least batch_size={batch_size} masks, got {len(masks)}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vae = SegmentationVAE(num_codes, dim)
    with torch.no_grad():  # codebook from encoder outputs, so every code starts where the data is
        z = vae.encode_cells(masks[torch.randperm(len(masks), generator=g)[:64]]).flatten(0, 1)
        vae._vq_vae._embedding.copy_(z[torch.randperm(len(z), generator=g)[:num_codes]])
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    used = torch.zeros(num_codes, dtype=torch.bool)
    bar = tqdm(range(steps), desc="vq-vae", disable=not progress, dynamic_ncols=True)
    for step in bar:
        lr_now = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr_now
        batch = masks[torch.randint(len(masks), (batch_size,), generator=g)]
        loss, info = vae_loss(vae, batch, beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        used[info["codes"]] = True
        if (step + 1) % restart_every == 0 and step + 1 < steps * 0.8:
            dead = (~used).nonzero().flatten()
            if len(dead):
                with torch.no_grad():
                    fresh = masks[torch.randint(len(masks), (len(dead),), generator=g)]
                    cells = torch.randint(16, (len(dead),), generator=g)
                    vae._vq_vae._embedding[dead] = vae.encode_cells(fresh)[torch.arange(len(dead)), cells]
            used.zero_()
        bar.set_postfix(loss=f"{loss.item():.4f}", acc=f"{info['pixel_accuracy']:.4f}")
    return vae.eval()
