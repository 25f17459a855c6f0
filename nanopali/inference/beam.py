"""Beam search on the static KV cache, step for step as transformers' vectorised beam search.

Each step: extend every running beam by every token (log-probabilities, summed along the beam),
keep the best 2·K candidates (2 = one eos + one spare, as transformers), move candidates that end
in <eos> (or reach max_new_tokens) and rank among the best K into the finished set with score
sum_logprob / length^length_penalty, and continue with the best K unfinished ones. A batch row
stops once no running beam can beat its worst finished beam (transformers' default heuristic,
early_stopping=False). big_vision decodes captions with 2 beams.
"""

from __future__ import annotations

import torch

from nanopali.inference.decode import prefill
from nanopali.inference.runtime import Runtime
from nanopali.inference.sampling import LogitRules, constrain, model_logprobs
from nanopali.models.paligemma import PaliGemma

NEG = -1.0e9  # transformers' "impossible" score, added rather than assigned so rankings match


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, M, ...) -> (B, N, ...) picked along dim 1 by index (B, N)."""
    return x.gather(1, index.view(*index.shape, *([1] * (x.ndim - 2))).expand(*index.shape, *x.shape[2:]))


def beam_search(model: PaliGemma, input_ids, pixel_values, attention_mask, token_type_ids, *, max_new_tokens: int,
                min_new_tokens: int, num_beams: int, length_penalty: float, pad: int, rules: LogitRules,
                runtime: Runtime | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The best beam of each row: tokens (B, N), pad after <eos>, and their log-probabilities under the model."""
    B, K, N = input_ids.shape[0], num_beams, max_new_tokens
    device = input_ids.device
    eos = rules.eos
    keep = max(2, 1 + len(eos)) * K
    in_top_k = torch.arange(keep, device=device) < K
    logits, state = prefill(model, input_ids, pixel_values, attention_mask, token_type_ids, N, rows_per_input=K,
                            runtime=runtime)

    run_tokens = torch.full((B, K, N), pad, device=device)
    run_logprobs = torch.zeros(B, K, N, device=device)
    run_scores = torch.zeros(B, K, device=device)
    run_scores[:, 1:] = NEG                                   # all beams start identical: expand only the first
    fin_tokens, fin_logprobs = run_tokens.clone(), run_logprobs.clone()
    fin_scores = torch.full((B, K), NEG, device=device)
    fin_done = torch.zeros(B, K, dtype=torch.bool, device=device)
    fin_len = torch.zeros(B, K, dtype=torch.long, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    prompt = input_ids.repeat_interleave(K, 0)

    for step in range(N):
        seen = torch.cat([prompt, run_tokens[:, :, :step].flatten(0, 1)], 1) if rules.repetition_penalty != 1.0 else None
        logp = constrain(logits.log_softmax(-1), rules, seen=seen, ban_eos=step < min_new_tokens)  # (B*K, V)
        V = logp.shape[-1]
        top_scores, top_index = (logp.view(B, K, V) + run_scores[..., None]).view(B, K * V).topk(keep)  # (B, keep)
        origin, token = top_index // V, top_index % V
        cand_tokens = _take(run_tokens, origin).clone()
        cand_tokens[:, :, step] = token
        cand_logprobs = _take(run_logprobs, origin).clone()
        lp = model_logprobs(logits, rules)  # log p(token) under the model over the real vocabulary
        cand_logprobs[:, :, step] = lp.view(B, K * V).gather(1, top_index)
        hits = torch.isin(token, eos) | (step == N - 1)

        # finished set: the best K of the old finished beams and the candidates that just finished
        cand_fin = top_scores / (step + 1) ** length_penalty
        cand_fin = cand_fin + (~improvable).float() * NEG + (~(hits & in_top_k)).float() * NEG
        best = torch.cat([fin_scores, cand_fin], 1).topk(K).indices
        fin_scores = _take(torch.cat([fin_scores, cand_fin], 1), best)
        fin_tokens = _take(torch.cat([fin_tokens, cand_tokens], 1), best)
        fin_logprobs = _take(torch.cat([fin_logprobs, cand_logprobs], 1), best)
        fin_done = _take(torch.cat([fin_done, hits & in_top_k], 1), best)
        fin_len = _take(torch.cat([fin_len, torch.full_like(token, step + 1)], 1), best)

        # running set: the best K candidates that did not finish
        cand_run = top_scores + hits.float() * NEG
        best = cand_run.topk(K).indices
        run_scores, run_tokens, run_logprobs = _take(cand_run, best), _take(cand_tokens, best), _take(cand_logprobs, best)
        run_origin = _take(origin, best)

        best_possible = run_scores[:, :1] / (step + 1) ** length_penalty
        worst_finished = torch.where(fin_done, fin_scores.min(1, keepdim=True).values, NEG)
        improvable = improvable & (best_possible > worst_finished).any(-1, keepdim=True)
        if not improvable.any() or hits.all():
            break
        state.reorder((run_origin + torch.arange(B, device=device)[:, None] * K).flatten())
        logits = state.step(model, run_tokens[:, :, step].flatten())

    length = fin_len[:, 0]
    width = int(length.max())
    filler = torch.arange(width, device=device) >= length[:, None]
    return fin_tokens[:, 0, :width].masked_fill(filler, pad), fin_logprobs[:, 0, :width].masked_fill(filler, 0.0)
