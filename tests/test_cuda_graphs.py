"""The decode step as a CUDA graph (inference/cuda_graph.py): equal to the eager step, and never used where it must not be.

The CUDA tests run only where torch sees a GPU; the CPU tests check the switch and the fallback.
"""

import warnings

import pytest
import torch
from tiny_checkpoint import tiny_config

from nanopali import PaliGemma, Runtime, generate
from nanopali.inference import cuda_graph, decode
from nanopali.inference.decode import prefill

IMAGE_TOKEN, BOS = 299, 2
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_model(generation: int, dtype=torch.float32, device="cpu") -> PaliGemma:
    """A random PaliGemma 1 or 2 (GQA, soft-caps and a window of 6, shorter than prompt + new tokens)."""
    gemma2 = dict(query_pre_attn_scalar=17, sliding_window=6, attn_logit_softcapping=4.0, final_logit_softcapping=6.0)
    config = tiny_config(300, IMAGE_TOKEN, generation, vision=dict(num_hidden_layers=2, num_attention_heads=4),
                         num_hidden_layers=3, head_dim=24, rope_theta=500.0, **(gemma2 if generation == 2 else {}))
    torch.manual_seed(generation)
    model = PaliGemma(config).init_weights(std=0.2)
    with torch.no_grad():  # small embeddings: the layers, not the last input token, decide (varied greedy output)
        model.decoder.embed_tokens.weight.mul_(0.1)
    return model.to(device, dtype).eval()


def prompts(rows: int = 2, device="cpu", dtype=torch.float32) -> dict[str, torch.Tensor]:
    """`rows` prompts of 16 image tokens, <bos>, 7 / 4 / ... text ids and "\\n", left-padded."""
    g = torch.Generator().manual_seed(0)
    seqs = [[IMAGE_TOKEN] * 16 + [BOS] + torch.randint(3, IMAGE_TOKEN, (7 - 3 * r,), generator=g).tolist() + [108]
            for r in range(rows)]
    T = len(seqs[0])
    ids, mask = torch.zeros(rows, T, dtype=torch.long), torch.zeros(rows, T, dtype=torch.long)
    for r, seq in enumerate(seqs):
        ids[r, T - len(seq):], mask[r, T - len(seq):] = torch.tensor(seq), 1
    pixels = torch.rand(rows, 3, 28, 28, generator=g) * 2 - 1
    inputs = dict(input_ids=ids, pixel_values=pixels.to(dtype), attention_mask=mask,
                  token_type_ids=torch.zeros_like(ids))
    return {k: v.to(device) for k, v in inputs.items()}


@torch.no_grad()
def teacher_forced(model, inputs, steps: int, tokens=None, runtime=None):
    """Prefill, then `steps` steps fed `tokens` (steps, B) or, if None, the argmax.

    Returns the logits (steps + 1, B, V), the tokens fed (steps, B) and the decode state."""
    logits, state = prefill(model, **inputs, max_new_tokens=steps, runtime=runtime)
    out, fed = [logits], []
    for i in range(steps):
        fed.append(out[-1].argmax(-1) if tokens is None else tokens[i])
        out.append(state.step(model, fed[-1]))
    return torch.stack(out), torch.stack(fed), state


def test_cpu_decoding_never_uses_a_graph():
    model = tiny_model(1)
    assert Runtime().cuda_graphs, "CUDA graphs should be on by default"
    _, _, state = teacher_forced(model, prompts(), steps=3)
    assert not state.cuda_graph and state.graph is None


def test_a_failed_capture_falls_back_to_eager_with_one_warning(monkeypatch):
    tries = []

    def broken(*args):
        tries.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graph, "GraphedStep", broken)
    model, inputs, runtime = tiny_model(2), prompts(), Runtime()
    want, tokens, _ = teacher_forced(model, inputs, steps=4)
    with torch.no_grad():
        logits, state = prefill(model, **inputs, max_new_tokens=4, runtime=runtime)
        state.cuda_graph = True  # as prefill sets it on CUDA
        with pytest.warns(RuntimeWarning, match="CUDA graph failed .*operation not permitted"):
            got = [state.step(model, tokens[0])]
        assert not state.cuda_graph and state.graph is None
        got += [state.step(model, t) for t in tokens[1:]]
        _, again = prefill(model, **inputs, max_new_tokens=4, runtime=runtime)
        again.cuda_graph = True
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning, and no second try
            again.step(model, tokens[0])
    assert len(tries) == 1
    torch.testing.assert_close(torch.stack([logits] + got), want, rtol=0, atol=0)


def test_beam_search_turns_the_graph_off():
    with torch.no_grad():
        _, state = prefill(tiny_model(1), **prompts(), max_new_tokens=2)
    state.cuda_graph = True
    state.reorder(torch.tensor([1, 0]))
    assert not state.cuda_graph and state.graph is None


@cuda
@pytest.mark.parametrize("generation", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_steps_equal_eager_steps(generation, dtype):
    model, inputs = tiny_model(generation, dtype, "cuda"), prompts(2, "cuda", dtype)
    eager, tokens, eager_state = teacher_forced(model, inputs, steps=12, runtime=Runtime(cuda_graphs=False))
    assert eager_state.graph is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed, _, state = teacher_forced(model, inputs, steps=12, tokens=tokens, runtime=Runtime())
    assert state.graph is not None, f"the step was not captured: {[str(w.message) for w in caught]}"
    # the replay runs the eager step's kernels on the same inputs
    scale = eager.float().abs().max()
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    err = (graphed - eager).abs().max()
    assert err <= tol * scale, f"the graph's logits differ by {err:.3g} (scale {scale:.3g})"
    if dtype == torch.float32:  # (bf16 near-ties could flip on a last-bit difference)
        assert torch.equal(graphed.argmax(-1), eager.argmax(-1))


@cuda
@pytest.mark.parametrize("rows", [1, 2])
def test_cuda_generate_with_graphs_equals_eager(rows):
    model, inputs = tiny_model(2, device="cuda"), prompts(rows, "cuda")
    eager, graphed = Runtime(cuda_graphs=False), Runtime()
    want = generate(model, **inputs, max_new_tokens=10, eos_token_id=[], runtime=eager)
    beams_want = generate(model, **inputs, max_new_tokens=6, num_beams=2, runtime=eager)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns: fail instead of decoding eagerly
        first = generate(model, **inputs, max_new_tokens=10, eos_token_id=[], runtime=graphed)
        second = generate(model, **inputs, max_new_tokens=10, eos_token_id=[], runtime=graphed)  # a new capture
        beams = generate(model, **inputs, max_new_tokens=6, num_beams=2, runtime=graphed)        # beams stay eager
    assert torch.equal(first, want) and torch.equal(second, want)
    assert torch.equal(beams, beams_want)
    assert len(set(want.flatten().tolist())) > 2, "the test model should not repeat one token"


@cuda
def test_cuda_capture_failure_falls_back_to_eager(monkeypatch):
    """A step that synchronises with the host cannot be captured: generate() warns and decodes eagerly."""
    model, inputs = tiny_model(1, device="cuda"), prompts(2, "cuda")
    want = generate(model, **inputs, max_new_tokens=6, eos_token_id=[], runtime=Runtime(cuda_graphs=False))
    step = decode.decode_step
    monkeypatch.setattr(decode, "decode_step", lambda model, cache, tokens, *rest: (
        float(tokens.sum()), step(model, cache, tokens, *rest))[1])     # float(): a host sync inside the step
    with pytest.warns(RuntimeWarning, match="CUDA graph failed"):
        got = generate(model, **inputs, max_new_tokens=6, eos_token_id=[], runtime=Runtime())
    assert torch.cuda.current_stream() == torch.cuda.default_stream(), "the failed capture's stream is still current"
    assert torch.equal(got, want)
