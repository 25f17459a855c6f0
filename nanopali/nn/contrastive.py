"""The contrastive image-text losses on one process: CLIP's softmax and SigLIP's sigmoid.

Both compare every image of a batch with every text by cosine similarity; row i's image and text are the
positive pair, all other pairs negatives. With t' = `logit_scale` as the models store it (the temperature is
exp(t')) and b = `logit_bias`:

    logits[i, j] = exp(t') * cos(image_i, text_j) + b                         (N_img, N_txt)
    clip_loss    = ( CE(logits, diag) + CE(logitsᵀ, diag) ) / 2                softmax over each row and column
    siglip_loss  = -(1/B) Σ_ij log σ( z_ij * logits[i, j] ),  z = +1 on the diagonal, -1 elsewhere

The sigmoid loss is summed over all B² pairs and divided by B (the SigLIP paper's normalization, open_clip's
and transformers' `return_loss`). Embeddings need not be normalized (it is done here), and the arithmetic is in
float32 whatever the inputs' dtype. The paper initializes t' = log 10, b = -10 (`SIGLIP_INIT`): with zeros
(transformers' init) the loss starts near 0.69 * B, dominated by the B² - B negatives.

The multi-process versions (features gathered, or text chunks passed around a ring) are
nanopali/train/losses.py; they equal these on the whole global batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SIGLIP_INIT = (math.log(10.0), -10.0)      # (logit_scale t', logit_bias b), the SigLIP paper's
CLIP_INIT = (math.log(1 / 0.07), 0.0)      # CLIP's temperature 0.07; the bias cancels in a softmax


def contrastive_logits(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                       logit_bias: torch.Tensor | float = 0.0) -> torch.Tensor:
    """exp(t') * cos(image_i, text_j) + b in float32: (N_img, D), (N_txt, D) -> (N_img, N_txt)."""
    image = F.normalize(image_emb.float(), dim=-1)
    text = F.normalize(text_emb.float(), dim=-1)
    return image @ text.T * torch.as_tensor(logit_scale).float().exp() + torch.as_tensor(logit_bias).float()


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over the similarity matrix of B matching (image, text) pairs."""
    logits = contrastive_logits(image_emb, text_emb, logit_scale)
    return softmax_terms(logits, logits.T, torch.arange(len(logits), device=logits.device)) / len(logits)


def siglip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
    """The pairwise sigmoid loss of B matching (image, text) pairs, summed over pairs and divided by B."""
    logits = contrastive_logits(image_emb, text_emb, logit_scale, logit_bias)
    return sigmoid_terms(logits, positives=True) / len(logits)


def softmax_terms(logits_per_image: torch.Tensor, logits_per_text: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ over rows of (CE(image rows) + CE(text rows)) / 2; `targets` are the columns of each row's positive."""
    return (F.cross_entropy(logits_per_image, targets, reduction="sum")
            + F.cross_entropy(logits_per_text, targets, reduction="sum")) / 2


def sigmoid_terms(logits: torch.Tensor, positives: bool) -> torch.Tensor:
    """Σ_ij -log σ(z_ij * logits_ij): z = +1 on the diagonal when `positives` (a block of matching pairs), else -1
    everywhere (a block of one process's images against another process's texts)."""
    z = -torch.ones_like(logits)
    if positives:
        z.diagonal().fill_(1.0)
    return -F.logsigmoid(z * logits).sum()
