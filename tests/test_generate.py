"""Generation against transformers' generate, against the uncached forward, and its sampling properties."""

from contextlib import contextmanager

import pytest
import torch
from hf_reference import EOS, IMAGE_TOKEN, PAD, batch, hf_config, hf_generation_model

from nanopali import PaliGemma, generate
from nanopali.inference.decode import prefill
from nanopali.inference.sampling import pick_token, top_k_top_p

# (generation, kv heads, <eos> boost); the Gemma 2 window (6) is far shorter than prompt + new tokens
CASES = {"pg1": (1, 1, 3.0), "pg2-window": (2, 2, 12.0)}


def prompts(cfg, seed=0):
    """Three left-padded prefix-only rows of different prompt lengths, as the processor makes them."""
    g = torch.Generator().manual_seed(seed)
    full = batch(cfg, seed)
    n_img = 16
    lengths = [3, 9, 6]
    T = n_img + 2 + max(lengths)
    ids = torch.full((3, T), PAD)
    am = torch.zeros(3, T, dtype=torch.long)
    for r, n in enumerate(lengths):
        row = [IMAGE_TOKEN] * n_img + [2] + torch.randint(3, IMAGE_TOKEN, (n,), generator=g).tolist() + [108]
        ids[r, T - len(row):] = torch.tensor(row)
        am[r, T - len(row):] = 1
    return dict(input_ids=ids, attention_mask=am, token_type_ids=torch.zeros_like(ids), pixel_values=full["pixel_values"])


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    generation, kv, eos_boost = CASES[request.param]
    cfg = hf_config(generation, kv)
    hf = hf_generation_model(cfg, eos_boost)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, PaliGemma.from_pretrained(path), cfg


def until_eos(tokens: torch.Tensor, eos: int = 1) -> list[list[int]]:
    out = []
    for row in tokens.tolist():
        out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def hf_generate(hf, inputs, **kw):
    with torch.no_grad():
        seq = hf.generate(**inputs, suppress_tokens=[IMAGE_TOKEN], **kw)
    return seq[:, inputs["input_ids"].shape[1]:]


def test_greedy_equals_transformers(pair):
    hf, ours, cfg = pair
    inputs = prompts(cfg)
    ref = hf_generate(hf, inputs, max_new_tokens=20, do_sample=False)
    got = generate(ours, **inputs, max_new_tokens=20)
    assert until_eos(got) == until_eos(ref)
    assert got.shape == ref.shape
    rows = until_eos(got)
    assert any(row[-1] == EOS for row in rows), "the test model should end some row with <eos>"
    assert len({t for row in rows for t in row}) > 6, "the test model should not repeat one token"
    for r, row in enumerate(rows):  # finished rows are padded with the pad id
        assert (got[r, len(row):] == PAD).all()


@pytest.mark.parametrize("num_beams, length_penalty", [(2, 1.0), (3, 0.5)])
def test_beam_search_equals_transformers(pair, num_beams, length_penalty):
    hf, ours, cfg = pair
    inputs = prompts(cfg, seed=1)
    ref = hf_generate(hf, inputs, max_new_tokens=12, num_beams=num_beams, length_penalty=length_penalty, do_sample=False)
    got = generate(ours, **inputs, max_new_tokens=12, num_beams=num_beams, length_penalty=length_penalty)
    assert until_eos(got) == until_eos(ref)
    assert until_eos(got) != until_eos(generate(ours, **inputs, max_new_tokens=12)), "beams should differ from greedy here"


def test_cached_decoding_equals_uncached_forward(pair):
    """At every step, the decode logits equal a full forward over prompt + generated suffix."""
    _, ours, cfg = pair
    assert_cached_decoding_equals_forward(ours, prompts(cfg), steps=12)


def assert_cached_decoding_equals_forward(ours, inputs: dict, steps: int) -> None:
    with torch.no_grad():
        logits, state = prefill(ours, **inputs, max_new_tokens=steps)
        ids, am, tt = inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"]
        for step in range(steps):
            full = ours(ids, inputs["pixel_values"], am, tt).logits[:, -1]
            torch.testing.assert_close(logits, full, rtol=0, atol=1e-5 * full.abs().max().item())
            token = logits[:, :IMAGE_TOKEN].argmax(-1)
            ids = torch.cat([ids, token[:, None]], 1)
            am = torch.cat([am, torch.ones_like(token)[:, None]], 1)
            tt = torch.cat([tt, torch.ones_like(token)[:, None]], 1)
            logits = state.step(ours, token)


def test_a_row_alone_equals_the_row_in_a_padded_batch(pair):
    _, ours, cfg = pair
    inputs = prompts(cfg)
    together = generate(ours, **inputs, max_new_tokens=10)
    for r in range(3):
        keep = inputs["attention_mask"][r].bool()
        alone = generate(ours, inputs["input_ids"][r:r + 1, keep], inputs["pixel_values"][r:r + 1], max_new_tokens=10)
        assert until_eos(alone)[0] == until_eos(together[r:r + 1])[0]


def test_right_padding_generates_like_left_padding(pair):
    _, ours, cfg = pair
    left = prompts(cfg)
    right = dict(left)
    order = torch.argsort(left["attention_mask"], dim=1, descending=True, stable=True)  # move padding to the end
    right["input_ids"] = left["input_ids"].gather(1, order)
    right["attention_mask"] = left["attention_mask"].gather(1, order)
    assert until_eos(generate(ours, **right, max_new_tokens=8)) == until_eos(generate(ours, **left, max_new_tokens=8))


def test_sampling_is_reproducible_and_temperature_zero_is_greedy(pair):
    _, ours, cfg = pair
    inputs = prompts(cfg)
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.95)
    a = generate(ours, **inputs, generator=torch.Generator().manual_seed(7), **kw)
    b = generate(ours, **inputs, generator=torch.Generator().manual_seed(7), **kw)
    c = generate(ours, **inputs, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c), "different seeds gave identical samples at temperature 1.5"
    greedy = generate(ours, **inputs, max_new_tokens=10)
    cold = generate(ours, **inputs, max_new_tokens=10, do_sample=True, temperature=0.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(greedy, cold)


@contextmanager
def biased(model, bias: dict[int, float]):
    """Add a constant to some output logits (to make chosen tokens the most likely ones)."""
    original = model.decoder.logits
    add = torch.zeros(model.config.text_config.vocab_size)
    for token, value in bias.items():
        add[token] = value
    model.decoder.logits = lambda h: original(h) + add
    try:
        yield
    finally:
        del model.decoder.logits


def test_never_generates_image_or_padding_rows(pair):
    _, ours, cfg = pair
    inputs = prompts(cfg)
    with biased(ours, {IMAGE_TOKEN: 1000.0, 298: 500.0}):
        got = generate(ours, **inputs, max_new_tokens=5, vocab_limit=298)
        assert got.max() < 298
        got = generate(ours, **inputs, max_new_tokens=5)  # no tokenizer: every row but <image> may be generated
        assert (got == 298).all()
        sampled = generate(ours, **inputs, max_new_tokens=5, do_sample=True, generator=torch.Generator().manual_seed(0))
        assert (sampled == 298).all()


def test_min_new_tokens_and_eos(pair):
    _, ours, cfg = pair
    inputs = prompts(cfg)
    with biased(ours, {1: 1000.0}):  # <eos> first, whatever the input
        first = generate(ours, **inputs, max_new_tokens=6)
        assert first.tolist() == [[1]] * 3
        later = generate(ours, **inputs, max_new_tokens=6, min_new_tokens=3)
        assert (later[:, :3] != 1).all() and (later[:, 3] == 1).all() and later.shape[1] == 4
    with biased(ours, {1: 2000.0, 7: 1000.0}):
        assert generate(ours, **inputs, max_new_tokens=6, eos_token_id=7).tolist() == [[1] * 6] * 3
        assert generate(ours, **inputs, max_new_tokens=6, eos_token_id=[7, 1]).tolist() == [[1]] * 3


def test_logprobs_are_the_model_probabilities(pair):
    _, ours, cfg = pair
    inputs = prompts(cfg)
    out = generate(ours, **inputs, max_new_tokens=4, return_logprobs=True)
    with torch.no_grad():
        logits, _ = prefill(ours, **inputs)
    expected = logits[:, :IMAGE_TOKEN].log_softmax(-1).gather(1, out.tokens[:, :1])[:, 0]
    torch.testing.assert_close(out.logprobs[:, 0], expected)
    beams = generate(ours, **inputs, max_new_tokens=4, num_beams=2, return_logprobs=True)
    assert beams.logprobs.shape == beams.tokens.shape and (beams.logprobs <= 0).all()


class CharTokenizer:
    """Decodes id i to one letter (pad id 0 to nothing): enough to test stop strings."""

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids if i != PAD)


def test_stop_strings_end_a_row(pair):
    _, ours, cfg = pair
    inputs = prompts(cfg)
    plain = generate(ours, **inputs, max_new_tokens=12, eos_token_id=[])
    tok = CharTokenizer()
    stop = tok.decode(plain[0, 3:5].tolist())
    stopped = generate(ours, **inputs, max_new_tokens=12, eos_token_id=[], stop_strings=[stop], tokenizer=tok)
    for r in range(3):
        ends = [k for k in range(1, 13) if stop in tok.decode(plain[r, :k].tolist())]
        k = ends[0] if ends else 12
        assert stopped[r, :k].tolist() == plain[r, :k].tolist()
        assert (stopped[r, k:] == PAD).all()
    assert stopped.shape[1] == max(k for k in [([k for k in range(1, 13) if stop in tok.decode(plain[r, :k].tolist())] or [12])[0] for r in range(3)])


def test_top_k_and_top_p_never_leave_the_allowed_set():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    allowed_k = logits.topk(5, dim=-1).indices
    probs = logits.softmax(-1)
    sorted_p, order = probs.sort(-1, descending=True)
    n_nucleus = ((sorted_p.cumsum(-1) - sorted_p) < 0.7).sum(-1)
    for _ in range(300):
        t = pick_token(logits, do_sample=True, top_k=5, generator=g)
        assert all(t[r] in allowed_k[r] for r in range(4))
        t = pick_token(logits, do_sample=True, top_p=0.7, generator=g)
        assert all(t[r] in order[r, : n_nucleus[r]] for r in range(4))
    kept = torch.isfinite(top_k_top_p(logits, top_p=0.7)).sum(-1)
    assert torch.equal(kept, n_nucleus)
    assert (probs.gather(1, order)[:, :1] > 0).all()


def test_a_prompt_longer_than_the_model_takes_is_an_error(pair):
    _, ours, cfg = pair
    inputs = prompts(cfg)
    limit = ours.config.text_config.max_position_embeddings
    with pytest.raises(ValueError, match=f"but this model takes at most {limit}"):
        generate(ours, **inputs, max_new_tokens=limit)
