"""The CPU kernels (inference/cpu_kernels.py): equal to F.linear, used where they should be, invisible elsewhere."""

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from hf_reference import batch, hf_config, hf_model

from nanopali import PaliGemma, Runtime, prepare
from nanopali.inference import cpu_kernels
from nanopali.inference.cpu_kernels import CpuKernels, StepChooser, install
from nanopali.inference.decode import prefill
from nanopali.nn.mlp import gelu_tanh


@pytest.mark.parametrize("path", ["loop", "library"])
@pytest.mark.parametrize("shape", [(1, 96), (1, 1, 96)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_row_paths_equal_f_linear(shape, dtype, path):
    g = torch.Generator().manual_seed(len(shape))
    w = torch.randn(257, 96, generator=g).to(dtype)
    x = torch.randn(shape, generator=g).to(dtype)
    kernels = CpuKernels(force=path)
    with torch.no_grad():
        assert kernels.takes_one_row(x, w)
        got = kernels.linear(x, w)
    want = x.float() @ w.float().T                            # fp32 reference of the half-precision inputs
    assert got.shape == (*shape[:-1], 257) and got.dtype == dtype
    # the kernel accumulates in fp32 and rounds once: within half a unit of the output dtype
    torch.testing.assert_close(got.float(), want, rtol=2 ** -7, atol=1e-3)


@pytest.mark.parametrize("path", ["loop", "library", None])  # None: measured
def test_int8_paths_equal_the_dequantized_product(path):
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (40, 8192), generator=g, dtype=torch.int8)
    scale = torch.rand(40, generator=g) / 100
    kernels = CpuKernels(force=path)
    for rows in (1, 1, 1, 1, 3, 16, 17):                      # one row (path), int8pack, int8pack, dequantize
        for K in (96, 8192):
            x = torch.randn(rows, K, generator=g).bfloat16()
            with torch.no_grad():
                got = kernels.linear(x, w[:, :K].contiguous(), scale)
            want = (x.float() @ w[:, :K].float().T) * scale
            # bf16 output (and, for many rows, the bf16 dequantized weight): 1% of the outputs' range
            err = (got.float() - want).abs().max()
            assert err <= 0.01 * want.abs().max(), f"{rows} rows, K={K}: error {err:.4f} of {want.abs().max():.2f}"


@pytest.mark.parametrize("N", [64, 96, 48])  # whole blocks of 64 rows, a block and a tail, a tail only
def test_int4_unpack_inverts_torch_packing(N):
    g = torch.Generator().manual_seed(N)
    q = torch.randint(0, 16, (N, 96), generator=g, dtype=torch.int32)
    assert torch.equal(cpu_kernels.unpack_int4(torch._convert_weight_to_int4pack_for_cpu(q, 2), N, 96), q.to(torch.uint8))


def test_int4_paths_equal_the_dequantized_product():
    g = torch.Generator().manual_seed(1)
    N, K, G = 80, 256, 64
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    scales_and_zeros = torch.stack([torch.rand(K // G, N, generator=g) / 100,
                                    torch.randn(K // G, N, generator=g) / 100], -1).bfloat16()
    s, z = (scales_and_zeros[..., i].float().repeat_interleave(G, 0).T for i in (0, 1))   # (N, K) each
    w = (q.float() - 8) * s + z                                  # the definition, written independently
    for rows in (1, 4, cpu_kernels.INT4_KERNEL_ROWS + 1):       # fast: torch's int4 kernel, then unpack; plain: unpack
        x = torch.randn(rows, K, generator=g).bfloat16()
        want = x.float() @ w.T
        for on in (True, False):
            with torch.no_grad():
                got = CpuKernels(enabled=on).linear_int4(x, packed, scales_and_zeros)
            assert got.shape == (rows, N) and got.dtype == torch.bfloat16
            err = (got.float() - want).abs().max()
            assert err <= 0.01 * want.abs().max(), f"{rows} rows, fast={on}: error {err:.4f} of {want.abs().max():.2f}"


def test_kernel_does_not_apply_to_training_prefill_or_fp32():
    w, kernels = torch.randn(64, 32).bfloat16(), CpuKernels()
    assert not kernels.takes_one_row(torch.randn(1, 32).bfloat16(), w)         # autograd is on
    with torch.no_grad():
        assert kernels.takes_one_row(torch.randn(1, 32).bfloat16(), w)
        assert not kernels.takes_one_row(torch.randn(2, 32).bfloat16(), w)     # two rows: F.linear is faster
        assert not kernels.takes_one_row(torch.randn(1, 32), w.float())        # fp32 weights: F.linear
        assert not CpuKernels(enabled=False).takes_one_row(torch.randn(1, 32).bfloat16(), w)


def test_step_chooser_keeps_the_faster_path():
    """A StepChooser runs its first steps alternately under each one-row path (TRIALS timed steps each after
    an untimed first), keeps the one whose steps were faster, then runs every step under it."""
    w, x = torch.randn(64, 32).bfloat16(), torch.randn(1, 32).bfloat16()
    for slow_path in ("loop", "library"):
        seen, kernels = [], CpuKernels()

        def step():
            seen.append(kernels.path)
            time.sleep(0.02 if kernels.path == slow_path else 0)
            with torch.no_grad():
                return kernels.linear(x, w)                 # either path gives F.linear's product
        chooser = StepChooser()
        for _ in range(2 * (cpu_kernels.TRIALS + 1)):
            torch.testing.assert_close(chooser.run(step, kernels), F.linear(x, w), rtol=2 ** -7, atol=1e-3)
        assert seen == ["loop", "library"] * (cpu_kernels.TRIALS + 1)
        faster = "library" if slow_path == "loop" else "loop"
        assert chooser.choice == faster
        seen.clear()
        chooser.run(step, kernels), chooser.run(step, kernels)
        assert seen == [faster, faster] and kernels.path == "library"  # the default again outside run()
    seen = []
    small = StepChooser(measure=False)                  # a small model: the library path, never timed
    small.run(step, kernels), small.run(step, kernels)
    assert seen == ["library", "library"] and small.times == {"loop": [], "library": []}


def test_a_loop_that_cannot_compile_falls_back_to_the_library(monkeypatch):
    def no_compiler(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("no C++ compiler")
        return fail

    monkeypatch.setattr(torch, "compile", no_compiler)
    w, x = torch.randn(64, 32).bfloat16(), torch.randn(1, 32).bfloat16()
    kernels = CpuKernels()
    chooser = kernels.chooser
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="compiling a kernel failed"):
        got = kernels.run_step(lambda: kernels.linear(x, w))     # the loop's trial step
    assert kernels.broken and torch.equal(got, F.linear(x, w))
    assert chooser.choice == "library"
    with torch.no_grad(), kernels.using("loop"):
        assert torch.equal(kernels.linear(x, w), F.linear(x, w))
    assert not CpuKernels().broken, "one model's failed compile leaves other models' kernels alone"


@pytest.fixture(scope="module", params=[1, 2])
def bf16_model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"fast-pg{request.param}")
    hf_model(hf_config(request.param)).save_pretrained(path)
    return PaliGemma.from_pretrained(path, dtype=torch.bfloat16), hf_config(request.param)


def decode_logits(model, inputs, steps=4, runtime=None):
    """Prefill logits and those of `steps` greedy cached steps, stacked (steps + 1, B, V)."""
    logits, state = prefill(model, inputs["input_ids"], inputs["pixel_values"].bfloat16(), inputs["attention_mask"],
                            inputs["token_type_ids"], max_new_tokens=steps, runtime=runtime)
    out = [logits]
    for _ in range(steps):
        out.append(state.step(model, out[-1].argmax(-1)))
    return torch.stack(out)


@pytest.mark.parametrize("path", ["loop", "library", None])  # None: measured
def test_fast_decode_equals_plain_decode(bf16_model, monkeypatch, path):
    model, cfg = bf16_model
    inputs = {k: v for k, v in batch(cfg).items()}
    calls = []
    one_row = CpuKernels._one_row
    monkeypatch.setattr(CpuKernels, "_one_row", lambda self, x, w, s=None: calls.append(tuple(w.shape)) or one_row(self, x, w, s))
    inputs = {k: v[:1] for k, v in inputs.items()}  # one row: the measured path is for batch 1
    kernels = CpuKernels(measure=True, force=path)  # measure: a tiny model would not time its steps
    fast_model = install(copy.deepcopy(model), kernels)
    with torch.no_grad():
        plain = decode_logits(model, inputs)
        assert not calls, "the one-row path ran in a model without the kernels"
        quick = decode_logits(fast_model, inputs, runtime=Runtime(kernels))
    assert calls, "the decode step never took the one-row path"
    trial_steps = [len(t) for t in kernels.chooser.times.values()]
    assert trial_steps == ([2, 2] if path is None else [0, 0]), trial_steps  # 4 steps timed, unless forced
    assert (cfg.text_config.vocab_size, cfg.text_config.hidden_size) in calls, "the tied output head took F.linear"
    # Same math, different summation order and one rounding of each product in bf16: compare
    # against the logits' scale, and the greedy choices must agree.
    scale = plain.abs().amax()
    assert (quick - plain).abs().max() <= 0.02 * scale, f"fast path differs by {(quick - plain).abs().max():.4f} (scale {scale:.2f})"
    assert torch.equal(quick.argmax(-1), plain.argmax(-1))


def test_training_and_saving_see_the_plain_model(bf16_model, tmp_path):
    plain, cfg = bf16_model
    model = copy.deepcopy(plain)
    runtime = prepare(model)
    assert type(model.decoder.layers[0].mlp.up_proj) is cpu_kernels.FastLinear
    keys = set(plain.state_dict())
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in keys
    inputs = batch(cfg)
    with torch.no_grad():
        decode_logits(model, inputs, steps=1, runtime=runtime)  # the kernel ran; the parameters are untouched
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_elementwise_ops_equal_the_eager_ones(dtype):
    """CpuKernels.gelu / rms_norm on tensors large enough to take the compiled pass equal the eager ops
    (computed here in fp64 from the same inputs), rounded once to the input dtype."""
    g = torch.Generator().manual_seed(4)
    gate, up = (3 * torch.randn(2, 260, 1024, generator=g)).to(dtype), torch.randn(2, 260, 1024, generator=g).to(dtype)
    weight = torch.randn(1024, generator=g) / 4
    assert gate.numel() >= cpu_kernels.ELEMENTWISE_MIN
    kernels = CpuKernels()
    gelu = F.gelu(gate.double(), approximate="tanh")
    x = gate.double()
    norm = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + weight.double())
    tol = dict(rtol=2 ** -8, atol=1e-5) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        for got, want in ((kernels.gelu(gate), gelu), (kernels.gelu(gate, up), gelu * up.double()),
                          (kernels.rms_norm(gate, weight, 1e-6), norm)):
            assert got.dtype == dtype and got.shape == gate.shape
            torch.testing.assert_close(got.double(), want, **tol)
    # with autograd on, the eager ops run and gradients flow
    gate.requires_grad_(True)
    kernels.gelu(gate, up).float().sum().backward()
    assert gate.grad is not None


def test_fused_elementwise_ops_in_the_model(bf16_model, monkeypatch):
    """With every tensor taking the compiled gelu / RMSNorm (threshold 0), prefill and decode give the
    plain model's logits and greedy tokens."""
    model, cfg = bf16_model
    inputs = {k: v[:1] for k, v in batch(cfg).items()}
    calls = []
    run = CpuKernels._run
    monkeypatch.setattr(CpuKernels, "_run", lambda self, fn, *a: calls.append(fn.__name__) or run(self, fn, *a))
    monkeypatch.setattr(cpu_kernels, "ELEMENTWISE_MIN", 0)
    kernels = CpuKernels(force="library")  # the products as in the plain model: only the elementwise ops differ
    fused_model = install(copy.deepcopy(model), kernels)
    with torch.no_grad():
        plain = decode_logits(model, inputs)
        assert not calls
        fused = decode_logits(fused_model, inputs, runtime=Runtime(kernels))
    assert {"_gelu", "_geglu", "rms_norm"} <= set(calls), set(calls)
    scale = plain.abs().amax()
    assert (fused - plain).abs().max() <= 0.02 * scale, f"fused ops differ by {(fused - plain).abs().max():.4f} (scale {scale:.2f})"
    assert torch.equal(fused.argmax(-1), plain.argmax(-1))


def test_int8_prefill_reuses_one_buffer_correctly():
    """Two int8 weights of one shape dequantize into the same scratch buffer one after the other: each
    product must still see its own weight (the buffer is rewritten, not stale)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(cpu_kernels.MAX_ROWS + 1, 64, generator=g).bfloat16()
    outs, kernels = [], CpuKernels()
    with torch.no_grad():
        for _ in range(2):
            w = torch.randint(-127, 128, (48, 64), generator=g, dtype=torch.int8)
            scale = torch.rand(48, generator=g) / 100
            got = kernels.linear(x, w, scale)
            want = (x.float() @ w.float().T) * scale
            assert (got.float() - want).abs().max() <= 0.01 * want.abs().max()
            outs.append(got)
    assert not torch.equal(outs[0], outs[1])
    assert ((48, 64), torch.bfloat16) in kernels._local.scratch


def test_only_large_decoders_time_their_steps(bf16_model):
    """The 3B's decoder times its first steps to pick the one-row path; a tiny one takes the library path
    at once (compiling the loop would cost each process seconds for nothing), also after quantizing."""
    from nanopali.registry import named_config
    with torch.device("meta"):
        big = PaliGemma(named_config("paligemma-3b-224"))
    chooser = prepare(big).kernels.chooser
    assert chooser.measure and chooser.choice is None
    model, cfg = bf16_model
    for quantize in (None, "int8"):
        kernels = prepare(PaliGemma(model.config).init_weights(), quantize=quantize).kernels
        assert not kernels.chooser.measure and kernels.chooser.choice == "library"
        with torch.no_grad():  # nor fused elementwise ops, even on a tensor past the threshold (a batched prefill)
            x = torch.randn(cpu_kernels.ELEMENTWISE_MIN, dtype=torch.bfloat16)
            assert torch.equal(kernels.gelu(x), gelu_tanh(x)) and not kernels._compiled
