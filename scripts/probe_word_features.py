"""How well a checkpoint's image tokens still tell which word is written: a linear probe.

    python scripts/probe_word_features.py runs/default/warm runs/default/run3/checkpoint-003000

For the first 6000 training scenes that show a word (WORK/data-train.npz of make_default_model.py), the image
tokens (`PaliGemma.image_features`, after the projector) are averaged over the patches the word touches
(world/scenes.patch_labels), and a logistic regression (full batch, Adam, small L2) learns the word from the
first 5000; the printed accuracy is on the other 1000. A model that reads needs this information in its image
tokens; the model card uses the probe to show that decoder training wore it away, and that the auxiliary
per-patch loss of the later cycles (world/patch_warmup.PatchLoss) brought it back.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nanopali import PaliGemma
from nanopali.inputs.images import preprocess
from nanopali.world.scenes import WORDS


def word_features(model: PaliGemma, images: np.ndarray, labels: np.ndarray, batch: int = 250) -> torch.Tensor:
    """(N, D): the image tokens averaged over each scene's word patches."""
    out = []
    with torch.no_grad():
        for a in range(0, len(images), batch):
            pixels = preprocess(images[a:a + batch], images.shape[1])                          # the processor's pixels
            tokens = model.image_features(pixels)                                               # (B, P, D)
            on_word = torch.from_numpy(labels[a:a + batch, :, 2] > 0).float()[..., None]        # (B, P, 1)
            out.append((tokens * on_word).sum(1) / on_word.sum(1))
    return torch.cat(out)


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, n_fit: int, steps: int = 500) -> float:
    """Held-out accuracy of a logistic regression fitted on the first n_fit rows (features standardized on those)."""
    mean, std = x[:n_fit].mean(0), x[:n_fit].std(0) + 1e-6
    x = (x - mean) / std
    w = torch.zeros(x.shape[1], len(WORDS), requires_grad=True)
    b = torch.zeros(len(WORDS), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(x[:n_fit] @ w + b, y[:n_fit]) + 1e-4 * w.square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((x[n_fit:] @ w + b).argmax(1) == y[n_fit:]).float().mean().item()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--data", type=Path, default=Path("runs/default/data-train.npz"))
    p.add_argument("--fit", type=int, default=5000)
    p.add_argument("--held-out", type=int, default=1000)
    args = p.parse_args(argv)
    data = np.load(args.data)
    labels = data["labels"]
    with_word = np.where((labels[:, :, 2] > 0).any(1))[0][:args.fit + args.held_out]
    images, labels = data["images"][with_word], labels[with_word]
    words = torch.from_numpy(labels[:, :, 2].max(1) - 1)
    for path in args.checkpoints:
        x = word_features(PaliGemma.from_pretrained(path).eval(), images, labels)
        print(f"{path}: word from the mean word-patch image token, held-out accuracy "
              f"{probe_accuracy(x, words, args.fit):.3f} ({args.held_out} scenes)")


if __name__ == "__main__":
    main()
