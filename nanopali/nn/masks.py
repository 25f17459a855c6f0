"""The prefix-LM attention mask: one formula for training, prefill and cached decoding.

PaliGemma's sequence is  [image tokens, <bos>, prompt, "\\n"] (the prefix, token_type 0) followed by
the suffix (token_type 1). With q, k indices into the same sequence (or KV-cache slots):

    allowed(q, k) = valid[k] and ( causal(q, k) or (prefix[q] and prefix[k]) )
    causal(q, k)  = k <= q  and  (no window  or  k > q - window)

so the prefix attends to the whole prefix in both directions, the suffix is causal, and padding is
never attended. Drawn for a prefix of 3 and a suffix of 2 (rows = queries):

    1 1 1 . .
    1 1 1 . .
    1 1 1 . .
    1 1 1 1 .
    1 1 1 1 1

Sliding-window layers (Gemma 2) follow transformers 5.23: the window only narrows the causal part,
so prefix tokens still see the whole prefix. The window is measured in positions (k_pos > q_pos -
window): within a sequence that equals transformers' index distance, and it stays right when
generated tokens follow right padding. A query that may attend to nothing
(a padding query) is allowed its own slot so that softmax stays finite; its output is never used.
"""

from __future__ import annotations

import torch


def prefix_lm_mask(
    valid: torch.Tensor,      # bool (B, S): slot holds a real token
    prefix: torch.Tensor,     # bool (B, S): slot holds a prefix token
    positions: torch.Tensor,  # long (B, S): RoPE position of the token in each slot
    q_index: torch.Tensor,    # long (Tq,): slots of the queries (already written)
    window: int | None = None,
) -> torch.Tensor:            # bool (B, 1, Tq, S)
    k = torch.arange(valid.shape[1], device=valid.device)  # (S,)
    q = q_index[:, None]                                    # (Tq, 1)
    causal = (k <= q)[None]                                 # (1, Tq, S)
    if window is not None:
        q_pos = positions[:, q_index]                       # (B, Tq)
        causal = causal & (positions[:, None, :] > q_pos[:, :, None] - window)
    bidirectional = prefix[:, q_index, None] & prefix[:, None, :]  # (B, Tq, S)
    allowed = valid[:, None, :] & (causal | bidirectional)
    allowed = allowed | (k == q)  # padding queries see themselves (see module docstring)
    return allowed[:, None]


def prefix_lm_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     token_type_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Defaults and checks for the mask inputs: a missing attention_mask is all ones (every token real),
    missing token_type_ids all zeros (everything prefix). Both must have the shape (B, T) of input_ids."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
    for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if t.shape != input_ids.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but input_ids has {tuple(input_ids.shape)}")
    return attention_mask, token_type_ids


def sequence_mask(attention_mask: torch.Tensor, token_type_ids: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """The mask of a whole sequence attending to itself (training, uncached forward, prefill).

    attention_mask, token_type_ids: (B, T) as the processor returns them. Returns bool (B, 1, T, T).
    """
    valid = attention_mask.bool()
    index = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return prefix_lm_mask(valid, valid & (token_type_ids == 0), positions_of(attention_mask), index, window)


def positions_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions (B, T): the 1-based count of real tokens, as transformers and big_vision."""
    return attention_mask.long().cumsum(-1)
