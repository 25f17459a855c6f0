"""big_vision .npz checkpoints against big_vision's own numbers (tests/fixtures/bigvision/, whose README says how
Google's unmodified big_vision code made them on tiny random PaliGemma 1 and 2 models in the release layout).

Forward logits within 1e-4 (PG1) / 1e-3 (PG2) of big_vision's on every position, the projected image embeddings
within 1e-5, greedy tokens identical and the cached decode's per-step logits equal, for the float32 and the
bfloat16 (`|V2`) files; the soft-cap and sliding-window differences shown on the same data; the reader's
mapping written back bit for bit; `nanopali convert` loaded by transformers with equal logits.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_reference import hf_logits
from transformers import PaliGemmaForConditionalGeneration

from nanopali import PaliGemma, PaliGemmaConfig
from nanopali.cli import main
from nanopali.inference.decode import prefill
from nanopali.inference.generate import generate
from nanopali.io import big_vision

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "bigvision"
N_IMG, VOCAB, IMAGE = 16, 1200, 1200  # image tokens, big_vision's vocabulary, <image> = the first padding row
TOL = {"pg1-tiny": 1e-4, "pg2-tiny": 1e-3}  # the README's: PG2's sharpened attention amplifies f32 rounding
CASES = [("pg1-tiny", "params.npz"), ("pg2-tiny", "params.npz"), ("pg2-tiny", "params.b16.npz")]


def ref(name: str, file: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / name / file) as f:
        return {k: f[k] for k in f.files}


def config(name: str) -> PaliGemmaConfig:
    return PaliGemmaConfig.from_pretrained(FIXTURES / name)


def load(name: str, file: str, **kw) -> PaliGemma:
    kw.setdefault("dtype", torch.float32)
    return PaliGemma.from_big_vision(FIXTURES / name / file, FIXTURES / name / "config.json", **kw).eval()


def forward_inputs(name: str) -> dict[str, torch.Tensor]:
    """big_vision's training forward as nanopali inputs: [image tokens, fwd_text]; token_type = mask_ar (0 = prefix,
    the "\\n" included); every position real, as big_vision's Model.__call__ (input_mask all True)."""
    inp = ref(name, "inputs.npz")
    text = torch.from_numpy(inp["fwd_text"]).long()
    B = len(text)
    ids = torch.cat([torch.full((B, N_IMG), IMAGE), text], 1)
    types = torch.cat([torch.zeros(B, N_IMG, dtype=torch.long), torch.from_numpy(inp["fwd_mask_ar"]).long()], 1)
    return dict(input_ids=ids, pixel_values=torch.from_numpy(inp["images"]).permute(0, 3, 1, 2),
                attention_mask=torch.ones_like(ids), token_type_ids=types)


def decode_inputs(name: str) -> dict[str, torch.Tensor]:
    """big_vision's decode prompts ([bos, prompt, "\\n"], right-padded there) left-padded, as generate() takes them."""
    inp = ref(name, "inputs.npz")
    rows = [[IMAGE] * N_IMG + row[:n].tolist() for row, n in zip(inp["dec_text"], inp["prefix_lens"])]
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return dict(input_ids=ids, pixel_values=torch.from_numpy(inp["images"]).permute(0, 3, 1, 2), attention_mask=mask,
                token_type_ids=torch.zeros_like(ids))


def prefix(file: str) -> str:
    return "b16_" if "b16" in file else ""


# ---------------------------------------------------------------------------------------------- fidelity

@pytest.mark.parametrize("name, file", CASES)
def test_forward_matches_big_vision(name, file):
    model, out, batch = load(name, file), ref(name, "outputs.npz"), forward_inputs(name)
    with torch.no_grad():
        logits = model(**batch).logits
        zimg = model.image_features(batch["pixel_values"])
    assert logits.shape[-1] == 1216 and (logits[..., VOCAB:] == 0).all(), "padding rows are zero, so their logits are"
    err = (logits[..., :VOCAB] - torch.from_numpy(out[prefix(file) + "logits"])).abs()
    valid = torch.from_numpy(out["fwd_valid"])
    assert err[valid].max() < TOL[name], f"logits differ from big_vision's by {err[valid].max():.2e}"
    assert err.max() < TOL[name], "padding positions too (computed as big_vision does, all tokens real)"
    z_err = (zimg - torch.from_numpy(out[prefix(file) + "zimg"])).abs().max()
    assert z_err < 1e-5, f"projected image embeddings differ by {z_err:.2e}"
    if not prefix(file):
        with torch.no_grad():
            pre_head = model.vision(batch["pixel_values"])
            hidden = model.hidden_states(**batch)
        np.testing.assert_allclose(pre_head.numpy(), out["img_pre_head"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(hidden.numpy(), out["llm_pre_logits"], rtol=0, atol=TOL[name])


@pytest.mark.parametrize("name, file", CASES)
def test_greedy_tokens_equal_big_vision(name, file):
    """big_vision's decode with a float32 KV cache (its reference; `b16_tokens` for the bf16 file)."""
    model, out = load(name, file), ref(name, "outputs.npz")
    tokens = generate(model, **decode_inputs(name), max_new_tokens=12, eos_token_id=1, pad_token_id=0, vocab_limit=VOCAB)
    expected = out["b16_tokens"] if prefix(file) else out["decode_tokens"]
    np.testing.assert_array_equal(tokens.numpy(), expected)


@pytest.mark.parametrize("name", ["pg1-tiny", "pg2-tiny"])
def test_cached_decode_logits_equal_big_vision_every_step(name):
    """Prefill + one cached step per token (teacher-forced with big_vision's tokens): each step's logits equal
    big_vision's. big_vision soft-caps its extend steps but not its prefill step (README §7): nanopali caps all,
    so step 0 equals big_vision's capped, and greedy picks the same token (tanh is monotonic)."""
    model, out = load(name, "params.npz"), ref(name, "outputs.npz")
    expected = torch.from_numpy(out["decode_step_logits"])
    cap = model.config.text_config.final_logit_softcapping
    capped = torch.from_numpy(out["decode_step_logits_softcapped"])
    assert capped.tolist() == [bool(cap) and s > 0 for s in range(12)], "big_vision's quirk, as the README says"
    if cap:
        expected[:, 0] = torch.tanh(expected[:, 0] / cap) * cap
    tokens = torch.from_numpy(out["decode_tokens"]).long()
    with torch.no_grad():
        logits, state = prefill(model, **decode_inputs(name), max_new_tokens=12)
        steps = [logits] + [state.step(model, tokens[:, s]) for s in range(11)]
    ours = torch.stack(steps, 1)[..., :VOCAB]
    err = (ours - expected).abs().max()
    assert err < TOL[name], f"cached decode logits differ from big_vision's by {err:.2e}"
    assert torch.equal(ours.argmax(-1), tokens)
    np.testing.assert_allclose(ours.numpy(), out["greedy_fullfwd_logits"], rtol=0, atol=TOL[name])


def test_big_vision_training_logits_are_the_uncapped_head():
    """big_vision's Model.__call__ (its training loss) skips Gemma 2's final soft-cap; nanopali, as transformers,
    always applies it. The uncapped head (decoder.embed_tokens.unembed) gives big_vision's text_logits; the
    cap changes the values by up to 2.7 here but never the argmax."""
    model, out, batch = load("pg2-tiny", "params.npz"), ref("pg2-tiny", "outputs.npz"), forward_inputs("pg2-tiny")
    with torch.no_grad():
        h = model.hidden_states(**batch)[:, N_IMG:]
        uncapped, capped = model.decoder.embed_tokens.unembed(h)[..., :VOCAB], model.decoder.logits(h)[..., :VOCAB]
    text_logits = torch.from_numpy(out["text_logits"])
    assert (uncapped - text_logits).abs().max() < TOL["pg2-tiny"]
    assert (capped - text_logits).abs().max() > 1.0, "the test needs logits the soft-cap changes"
    assert torch.equal(capped.argmax(-1), text_logits.argmax(-1))


def test_without_sliding_window_any_length_matches_big_vision():
    """big_vision has no sliding window. With a window (8) shorter than the sequence (32) the default differs from
    big_vision; use_sliding_window=False reproduces it."""
    windowed = config("pg2-tiny").replace(sliding_window=8)
    batch, out = forward_inputs("pg2-tiny"), ref("pg2-tiny", "outputs.npz")
    path = FIXTURES / "pg2-tiny" / "params.npz"
    with torch.no_grad():
        off = PaliGemma.from_big_vision(path, windowed, dtype=torch.float32, use_sliding_window=False)(**batch).logits
        on = PaliGemma.from_big_vision(path, windowed, dtype=torch.float32)(**batch).logits
    expected = torch.from_numpy(out["logits"])
    assert (off[..., :VOCAB] - expected).abs().max() < TOL["pg2-tiny"]
    assert (on[..., :VOCAB] - expected).abs().max() > 0.1


def test_bfloat16_loads_the_b16_file_exactly_and_rounds_the_f32_file():
    b16 = load("pg2-tiny", "params.b16.npz", dtype=torch.bfloat16).state_dict()
    f32 = load("pg2-tiny", "params.npz").state_dict()
    rounded = load("pg2-tiny", "params.npz", dtype="bfloat16").state_dict()
    assert {t.dtype for t in b16.values()} == {torch.bfloat16}
    for k in f32:
        assert torch.equal(rounded[k], f32[k].to(torch.bfloat16)), k  # round to nearest even, as big_vision's cast
        assert torch.equal(b16[k], rounded[k]), k  # the .b16.npz holds exactly those values


# ---------------------------------------------------------------------------------------------- the mapping

@pytest.mark.parametrize("name, file, dtype", [("pg1-tiny", "params.npz", torch.float32),
                                               ("pg2-tiny", "params.npz", torch.float32),
                                               ("pg2-tiny", "params.b16.npz", torch.bfloat16)])
def test_writing_back_gives_the_release_file_bit_for_bit(tmp_path, name, file, dtype):
    """Every block's view is inverted exactly: loaded and written again, each array equals the original's bytes, in
    the original's key order (and the embedding loses its padding rows again)."""
    model = load(name, file, dtype=dtype)
    path = big_vision.save_npz(model.state_dict(), model.config, tmp_path / file, dtype=dtype, embedding_rows=VOCAB)
    with zipfile.ZipFile(FIXTURES / name / file) as a, zipfile.ZipFile(path) as b:
        assert a.namelist() == b.namelist()
        for member in a.namelist():
            assert a.read(member) == b.read(member), member


def test_chunked_reads_and_a_deflated_npz_give_the_same_weights(tmp_path, monkeypatch):
    reference = load("pg2-tiny", "params.npz").state_dict()
    deflated = tmp_path / "params.npz"
    with zipfile.ZipFile(FIXTURES / "pg2-tiny" / "params.npz") as src, \
            zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for member in src.namelist():
            dst.writestr(member, src.read(member))
    monkeypatch.setattr(big_vision, "CHUNK", 1000)  # many chunks per block, and rows split across blocks
    for path in (FIXTURES / "pg2-tiny" / "params.npz", deflated):
        state = PaliGemma.from_big_vision(path, FIXTURES / "pg2-tiny" / "config.json", dtype=torch.float32).state_dict()
        for k in reference:
            assert torch.equal(state[k], reference[k]), (path.name, k)


def test_keys_without_the_params_prefix_load_too(tmp_path):
    bare = tmp_path / "params.npz"
    with zipfile.ZipFile(FIXTURES / "pg1-tiny" / "params.npz") as src, zipfile.ZipFile(bare, "w") as dst:
        for member in src.namelist():
            dst.writestr(member.removeprefix("params/"), src.read(member))
    a = load("pg1-tiny", "params.npz").state_dict()
    b = PaliGemma.from_big_vision(bare, FIXTURES / "pg1-tiny" / "config.json", dtype=torch.float32).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fused_qkv_einsum_when_every_head_has_its_kv_head(tmp_path):
    """big_vision stores q, k, v as one qkv_einsum (L, 3, N, D, H) when num_kv_heads == num_heads."""
    cfg = config("pg2-tiny").replace(num_key_value_heads=4)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in PaliGemma(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    path = big_vision.save_npz(state, cfg, tmp_path / "mha.npz")
    with np.load(path) as f:
        assert f["params/llm/layers/attn/qkv_einsum/w"].shape == (2, 3, 4, 64, 32)
        assert "params/llm/layers/attn/q_einsum/w" not in f
        q = f["params/llm/layers/attn/qkv_einsum/w"][1, 0]                       # layer 1's q: (N, D, H)
    w = state["language_model.model.layers.1.self_attn.q_proj.weight"]          # (N * H, D)
    np.testing.assert_array_equal(q, w.view(4, 32, 64).permute(0, 2, 1).numpy())  # q[n, d, h] = w[n * H + h, d]
    loaded = PaliGemma.from_big_vision(path, cfg, dtype=torch.float32).state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


# ---------------------------------------------------------------------------------------------- convert

@pytest.mark.parametrize("name", ["pg1-tiny", "pg2-tiny"])
def test_convert_writes_a_directory_transformers_loads_with_equal_logits(tmp_path, capsys, name):
    out_dir = tmp_path / "hf"
    code = main(["convert", str(FIXTURES / name / "params.npz"), str(out_dir), "--config", str(FIXTURES / name / "config.json"),
                 "--dtype", "float32", "--max-shard-size", "200KB"])
    assert code == 0, capsys.readouterr().err
    assert "no tokenizer" in capsys.readouterr().out
    assert len(list(out_dir.glob("model-*.safetensors"))) > 1
    hf = PaliGemmaForConditionalGeneration.from_pretrained(out_dir, attn_implementation="eager").eval()
    batch = forward_inputs(name)
    theirs = hf_logits(hf, batch)
    with torch.no_grad():
        ours = PaliGemma.from_pretrained(out_dir).eval()(**batch).logits
        direct = load(name, "params.npz")(**batch).logits
    assert (theirs - ours).abs().max() < 1e-5 * theirs.abs().max(), "f32 rounding of two implementations"
    assert torch.equal(ours, direct), "the converted directory is the npz, tensor for tensor"
    assert (theirs[..., :VOCAB] - torch.from_numpy(ref(name, "outputs.npz")["logits"])).abs().max() < TOL[name]
