"""Contrastive losses over the global batch of several processes (torchrun), and the one-process ones they equal.

    clip_loss(image, text, logit_scale) / siglip_loss(image, text, logit_scale, logit_bias)   one process (nn/contrastive.py)
    gathered_clip_loss(...) / ring_siglip_loss(...)                                           each process its local rows

Convention (open_clip's, and what DistributedDataParallel expects): each process passes its local B_l examples and
gets back its share of the loss, such that the *mean over processes* is the one-process loss of the whole global
batch of B = W * B_l examples, and gradients flow back to the process that computed each feature. DDP averages
the parameters' gradients over processes, so training under torchrun equals training on the global batch in one
process. All processes must pass the same number of examples.

- CLIP needs every row's softmax over all columns: the features are all-gathered *with* gradients
  (torch.distributed.nn.functional.all_gather) and each process takes its rows of both directions.
- SigLIP's loss is a sum over pairs, so no process needs the whole B x B matrix (the SigLIP paper's chunked
  scheme): each keeps its images and the text chunks travel around the ring (rank r sends to r + 1) with
  torch.distributed point-to-point ops, W - 1 hops; only one B_l x B_l block of logits exists at a time, in the
  forward and in the backward, which recomputes each block as the chunks travel the ring again, carrying the
  gradient of each chunk back to its owner. Peak memory grows with B_l², not with B².
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F

from nanopali.nn.contrastive import clip_loss, contrastive_logits, sigmoid_terms, siglip_loss, softmax_terms

__all__ = ["clip_loss", "gathered_clip_loss", "ring_siglip_loss", "siglip_loss", "contrastive_loss"]


def _world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def gathered_clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                       group=None) -> torch.Tensor:
    """This process's share of the CLIP loss of the global batch (its image rows and its text rows against all
    the gathered columns, divided by B_l); one process: clip_loss."""
    rank, world = _world(group)
    if world == 1:
        return clip_loss(image_emb, text_emb, logit_scale)
    images = torch.cat(dist_nn.all_gather(image_emb.contiguous(), group))  # (B, D), gradients flow back to each rank
    texts = torch.cat(dist_nn.all_gather(text_emb.contiguous(), group))
    B = image_emb.shape[0]
    targets = torch.arange(B, device=image_emb.device) + rank * B
    return softmax_terms(contrastive_logits(image_emb, texts, logit_scale),
                         contrastive_logits(text_emb, images, logit_scale), targets) / B


def ring_siglip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                     logit_bias: torch.Tensor, group=None) -> torch.Tensor:
    """This process's share of the SigLIP loss of the global batch: its images against every process's texts,
    divided by B_l; one process: siglip_loss."""
    _, world = _world(group)
    if world == 1:
        return siglip_loss(image_emb, text_emb, logit_scale, logit_bias)
    image, text = F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
    return _RingSigmoid.apply(image, text, logit_scale.float().exp(), logit_bias.float(), group)


def contrastive_loss(objective: str, image_emb, text_emb, logit_scale, logit_bias, group=None) -> torch.Tensor:
    """The share of this process of the `objective`'s ("siglip" | "clip") loss of the global batch."""
    if objective == "siglip":
        return ring_siglip_loss(image_emb, text_emb, logit_scale, logit_bias, group)
    return gathered_clip_loss(image_emb, text_emb, logit_scale, group)


def _shift(x: torch.Tensor, group) -> torch.Tensor:
    """Send x to the next rank of the ring and receive the previous rank's (same shape)."""
    rank, world = _world(group)
    to, frm = (dist.get_global_rank(group, r) if group is not None else r for r in ((rank + 1) % world, (rank - 1) % world))
    out = torch.empty_like(x)
    for request in dist.batch_isend_irecv([dist.P2POp(dist.isend, x.contiguous(), to, group),
                                           dist.P2POp(dist.irecv, out, frm, group)]):
        request.wait()
    return out


class _RingSigmoid(torch.autograd.Function):
    """Σ over every block (own images x each rank's texts) of the sigmoid terms, / B_l; inputs normalized, float32,
    `scale` = exp(t'). Nothing but the inputs is kept for the backward, which recomputes block by block."""

    @staticmethod
    def forward(ctx, image, text, scale, bias, group):
        _, world = _world(group)
        total, chunk = image.new_zeros(()), text
        for hop in range(world):
            if hop:
                chunk = _shift(chunk, group)  # after `hop` shifts: the texts of rank - hop
            total += sigmoid_terms(scale * image @ chunk.T + bias, positives=hop == 0)
        ctx.save_for_backward(image, text, scale, bias)
        ctx.group = group
        return total / image.shape[0]

    @staticmethod
    def backward(ctx, grad):
        image, text, scale, bias = ctx.saved_tensors
        group, (_, world) = ctx.group, _world(ctx.group)
        g_image, g_scale, g_bias = torch.zeros_like(image), torch.zeros_like(scale), torch.zeros_like(bias)
        chunk, g_chunk = text, torch.zeros_like(text)
        for hop in range(world):
            if hop:  # the chunk travels with the gradient its visitors have added to it so far
                chunk, g_chunk = _shift(torch.cat([chunk, g_chunk]), group).chunk(2)
            sim = image @ chunk.T                                       # (B_l, B_l)
            z = -torch.ones_like(sim)
            if hop == 0:
                z.diagonal().fill_(1.0)
            d_logits = -z * torch.sigmoid(-z * (scale * sim + bias)) * (grad / image.shape[0])
            g_image += scale * d_logits @ chunk
            g_chunk = g_chunk + scale * d_logits.T @ image
            g_scale += (d_logits * sim).sum()
            g_bias += d_logits.sum()
        g_text = _shift(g_chunk, group)  # one more hop brings each chunk's gradient home
        return g_image, g_text, g_scale, g_bias, None
