"""The compiled decode-step kernel (fast.py): equal to F.linear, used where it should be, invisible elsewhere."""

import pytest
import torch
import torch.nn.functional as F

from hf_reference import batch, hf_config, hf_model
from nanopali import PaliGemma, fast
from nanopali.decode import prefill


@pytest.mark.parametrize("shape", [(1, 96), (1, 1, 96)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_equals_f_linear(shape, dtype):
    g = torch.Generator().manual_seed(len(shape))
    w = torch.randn(257, 96, generator=g).to(dtype)
    x = torch.randn(shape, generator=g).to(dtype)
    with torch.no_grad():
        assert fast.uses_kernel(x, w)
        got = fast.linear(x, w)
    want = x.float() @ w.float().T                            # fp32 reference of the half-precision inputs
    assert got.shape == (*shape[:-1], 257) and got.dtype == dtype
    # the kernel accumulates in fp32 and rounds once: within half a unit of the output dtype
    torch.testing.assert_close(got.float(), want, rtol=2 ** -7, atol=1e-3)


def test_int8_paths_equal_the_dequantized_product():
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (40, 8192), generator=g, dtype=torch.int8)  # K > MAX_K: int8pack for one row
    scale = torch.rand(40, generator=g) / 100
    for rows in (1, 3, 16, 17):                               # loop/int8pack, int8pack, int8pack, dequantize
        for K in (96, 8192):
            x = torch.randn(rows, K, generator=g).bfloat16()
            with torch.no_grad():
                got = fast.linear(x, w[:, :K].contiguous(), scale)
            want = (x.float() @ w[:, :K].float().T) * scale
            # bf16 output (and, for many rows, the bf16 dequantized weight): 1% of the outputs' range
            err = (got.float() - want).abs().max()
            assert err <= 0.01 * want.abs().max(), f"{rows} rows, K={K}: error {err:.4f} of {want.abs().max():.2f}"


@pytest.mark.parametrize("N", [64, 96, 48])  # whole blocks of 64 rows, a block and a tail, a tail only
def test_int4_unpack_inverts_torch_packing(N):
    g = torch.Generator().manual_seed(N)
    q = torch.randint(0, 16, (N, 96), generator=g, dtype=torch.int32)
    assert torch.equal(fast.unpack_int4(torch._convert_weight_to_int4pack_for_cpu(q, 2), N, 96), q.to(torch.uint8))


def test_int4_paths_equal_the_dequantized_product():
    g = torch.Generator().manual_seed(1)
    N, K, G = 80, 256, 64
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    scales_and_zeros = torch.stack([torch.rand(K // G, N, generator=g) / 100,
                                    torch.randn(K // G, N, generator=g) / 100], -1).bfloat16()
    s, z = (scales_and_zeros[..., i].float().repeat_interleave(G, 0).T for i in (0, 1))   # (N, K) each
    w = (q.float() - 8) * s + z                                  # the definition, written independently
    for rows in (1, 4, fast.INT4_KERNEL_ROWS + 1):              # fast: torch's int4 kernel, then unpack; plain: unpack
        x = torch.randn(rows, K, generator=g).bfloat16()
        want = x.float() @ w.T
        for on in (True, False):
            with torch.no_grad():
                got = fast.linear_int4(x, packed, scales_and_zeros, fast=on)
            assert got.shape == (rows, N) and got.dtype == torch.bfloat16
            err = (got.float() - want).abs().max()
            assert err <= 0.01 * want.abs().max(), f"{rows} rows, fast={on}: error {err:.4f} of {want.abs().max():.2f}"


def test_kernel_does_not_apply_to_training_prefill_or_fp32():
    w = torch.randn(64, 32).bfloat16()
    assert not fast.uses_kernel(torch.randn(1, 32).bfloat16(), w)         # autograd is on
    with torch.no_grad():
        assert fast.uses_kernel(torch.randn(1, 32).bfloat16(), w)
        assert not fast.uses_kernel(torch.randn(2, 32).bfloat16(), w)     # two rows: F.linear is faster
        assert not fast.uses_kernel(torch.randn(1, 32), w.float())        # fp32 weights: F.linear
        assert not fast.uses_kernel(torch.randn(1, 8192).bfloat16(), torch.randn(4, 8192).bfloat16())  # rows too long


@pytest.fixture(scope="module", params=[1, 2])
def bf16_model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"fast-pg{request.param}")
    hf_model(hf_config(request.param)).save_pretrained(path)
    return PaliGemma.from_pretrained(path, dtype=torch.bfloat16), hf_config(request.param)


def decode_logits(model, inputs, steps=4):
    """Prefill logits and those of `steps` greedy cached steps, stacked (steps + 1, B, V)."""
    logits, state = prefill(model, inputs["input_ids"], inputs["pixel_values"].bfloat16(), inputs["attention_mask"],
                            inputs["token_type_ids"], max_new_tokens=steps)
    out = [logits]
    for _ in range(steps):
        out.append(state.step(model, out[-1].argmax(-1)))
    return torch.stack(out)


def test_fast_decode_equals_plain_decode(bf16_model, monkeypatch):
    model, cfg = bf16_model
    inputs = {k: v for k, v in batch(cfg).items()}
    calls = []
    kernel = fast._kernel
    monkeypatch.setattr(fast, "_kernel", lambda x, w, s=None: calls.append(tuple(w.shape)) or kernel(x, w, s))
    inputs = {k: v[:1] for k, v in inputs.items()}  # one row: the kernel is for batch 1
    with torch.no_grad():
        plain = decode_logits(fast.enable(model, False), inputs)
        assert not calls, "the kernel ran although the model's fast flag is off"
        quick = decode_logits(fast.enable(model, True), inputs)
    assert calls, "the decode step never used the compiled kernel"
    assert (cfg.text_config.vocab_size, cfg.text_config.hidden_size) in calls, "the tied output head took F.linear"
    # Same math, different summation order and one rounding of each product in bf16: compare
    # against the logits' scale, and the greedy choices must agree.
    scale = plain.abs().amax()
    assert (quick - plain).abs().max() <= 0.02 * scale, f"fast path differs by {(quick - plain).abs().max():.4f} (scale {scale:.2f})"
    assert torch.equal(quick.argmax(-1), plain.argmax(-1))


def test_training_and_saving_see_the_plain_model(bf16_model, tmp_path):
    model, cfg = bf16_model
    keys = set(model.state_dict())
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in keys
    inputs = batch(cfg)
    with torch.no_grad():
        decode_logits(model, inputs, steps=1)  # the kernel ran; the parameters are untouched
    assert set(model.state_dict()) == keys
    model.save_pretrained(tmp_path)
    again = PaliGemma.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    # autograd through the decoder linears works (the kernel is never used with gradients)
    x = torch.randn(1, 1, cfg.text_config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    layer = model.decoder.layers[0].mlp
    layer(x).float().sum().backward()
    assert x.grad is not None and layer.up_proj.weight.grad is not None
    expected = F.linear(x.detach(), layer.up_proj.weight)
    with torch.enable_grad():
        torch.testing.assert_close(layer.up_proj(x.detach()), expected)
