"""The CPU kernels (inference/cpu_kernels.py): equal to F.linear, used where they should be, invisible elsewhere."""

import copy
import io
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hf_reference import batch, hf_config, hf_model

from nanopali import PaliGemma, Runtime, prepare
from nanopali.inference import cpu_kernels, native
from nanopali.inference.cpu_kernels import CpuKernels, StepChooser, install
from nanopali.inference.decode import prefill
from nanopali.nn.mlp import gelu_tanh


@pytest.mark.parametrize("path", ["native", "loop", "library"])
@pytest.mark.parametrize("shape", [(1, 96), (1, 1, 96), (1, 104)])  # 104: the vector loops' tails (16 and 32 wide)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_row_paths_equal_f_linear(shape, dtype, path):
    g = torch.Generator().manual_seed(len(shape))
    w = torch.randn(257, shape[-1], generator=g).to(dtype)
    x = torch.randn(shape, generator=g).to(dtype)
    kernels = CpuKernels(force=path)
    with torch.no_grad():
        assert kernels.takes_one_row(x, w)
        got = kernels.linear(x, w)
    want = x.float() @ w.float().T                            # fp32 reference of the half-precision inputs
    assert got.shape == (*shape[:-1], 257) and got.dtype == dtype
    # the kernel accumulates in fp32 and rounds once: within half a unit of the output dtype
    torch.testing.assert_close(got.float(), want, rtol=2 ** -7, atol=1e-3)


@pytest.mark.parametrize("path", ["native", "loop", "library", None])  # None: measured
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


@pytest.mark.parametrize("G", [32, 128])
@pytest.mark.parametrize("sz_dtype", [torch.bfloat16, torch.float32])
def test_int4_prefill_unpacking_equals_torch_unpacking(G, sz_dtype):
    """An int4 prefill of INT4_DEQUANT_ROWS rows or more unpacks the weight with native.dequantize_int4 (bf16) for
    the bf16 GEMM: bit for bit the weight dequantize_int4 makes with tensor ops, and linear_int4's product
    within bf16 rounding of the fp32 product with it."""
    g = torch.Generator().manual_seed(G)
    N, K = 192, 256
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    sz = torch.stack([torch.rand(K // G, N, generator=g) / 100, torch.randn(K // G, N, generator=g) / 100], -1).to(sz_dtype)
    out = torch.full((N, K), float("nan"), dtype=torch.bfloat16)
    if not native.dequantize_int4(packed, sz, cpu_kernels.int4_block(), out):
        assert torch.isnan(out).all()                                           # untouched where it does not run
        pytest.skip("native.dequantize_int4 needs AVX-512 VBMI and BF16 and 64-row blocks; this processor has not")
    want = cpu_kernels.dequantize_int4(packed, sz, torch.bfloat16)
    assert torch.equal(out, want)
    x = torch.randn(cpu_kernels.INT4_DEQUANT_ROWS, K, generator=g).bfloat16()
    with torch.no_grad():
        got = CpuKernels().linear_int4(x, packed, sz)
    torch.testing.assert_close(got.float(), x.float() @ want.float().T, rtol=2 ** -7, atol=1e-4)


def test_kernel_does_not_apply_to_training_prefill_or_fp32():
    w, kernels = torch.randn(64, 32).bfloat16(), CpuKernels()
    assert not kernels.takes_one_row(torch.randn(1, 32).bfloat16(), w)         # autograd is on
    with torch.no_grad():
        assert kernels.takes_one_row(torch.randn(1, 32).bfloat16(), w)
        assert not kernels.takes_one_row(torch.randn(2, 32).bfloat16(), w)     # two rows: F.linear is faster
        assert not kernels.takes_one_row(torch.randn(1, 32), w.float())        # fp32 weights: F.linear
        assert not CpuKernels(enabled=False).takes_one_row(torch.randn(1, 32).bfloat16(), w)


def test_step_chooser_keeps_the_faster_path():
    """A StepChooser runs its first steps under each one-row path in turn (TRIALS timed steps each after an untimed
    first), keeps the one whose steps were fastest, then runs every step under it."""
    w, x = torch.randn(64, 32).bfloat16(), torch.randn(1, 32).bfloat16()
    assert native.available(), "the hand-written kernels did not build here"
    for fast_path in cpu_kernels.PATHS:
        seen, kernels = [], CpuKernels()

        def step():
            seen.append(kernels.path)
            time.sleep(0 if kernels.path == fast_path else 0.05)
            with torch.no_grad():
                return kernels.linear(x, w)                 # every path gives F.linear's product
        chooser = StepChooser()
        for _ in range(3 * (cpu_kernels.TRIALS + 1)):
            torch.testing.assert_close(chooser.run(step, kernels), F.linear(x, w), rtol=2 ** -7, atol=1e-3)
        assert seen == list(cpu_kernels.PATHS) * (cpu_kernels.TRIALS + 1)
        assert chooser.choice == fast_path
        seen.clear()
        chooser.run(step, kernels), chooser.run(step, kernels)
        assert seen == [fast_path, fast_path] and kernels.path == "library"  # the default again outside run()
    seen = []
    small = StepChooser(measure=False)                  # a small model: the library path, never timed
    small.run(step, kernels), small.run(step, kernels)
    assert seen == ["library", "library"] and small.times is None


def test_paths_that_cannot_be_built_are_left_out(monkeypatch):
    """No C++ compiler: the loop warns once when its trial step fails to compile, native.py's kernels are not offered,
    and the steps go on on torch's kernels with the same results."""
    def no_compiler(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("no C++ compiler")
        return fail

    monkeypatch.setattr(torch, "compile", no_compiler)
    monkeypatch.setattr(native, "_library", lambda: None)
    w, x = torch.randn(64, 32).bfloat16(), torch.randn(1, 32).bfloat16()
    kernels = CpuKernels()
    chooser = kernels.chooser
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="compiling a kernel failed"):
        got = kernels.run_step(lambda: kernels.linear(x, w))     # the loop's trial step
    assert kernels.broken and torch.equal(got, F.linear(x, w)) and list(chooser.times) == ["library"]
    with torch.no_grad():
        for _ in range(cpu_kernels.TRIALS + 1):
            kernels.run_step(lambda: kernels.linear(x, w))
    assert chooser.choice == "library"
    with torch.no_grad(), kernels.using("loop"):
        assert torch.equal(kernels.linear(x, w), F.linear(x, w))
    with torch.no_grad(), kernels.using("native"):
        assert torch.equal(kernels.linear(x, w), F.linear(x, w))
    assert not CpuKernels().broken, "one model's failed compile leaves other models' kernels alone"


@pytest.mark.parametrize("rows", [1, 3])
def test_int8_by_int8_product_is_within_its_rounding_bound(rows):
    """native.py's W8A8 product: x rounded to int8 in blocks of 32 (scale max|x| / 127), exact integer products, the
    block and row scales in fp32. Its error against the product of the unrounded x is at most half a step of each
    block's x scale times the |weights| of the block, summed, times the row scale (and fp32 rounding)."""
    g = torch.Generator().manual_seed(rows)
    N, K = 70, 4096 + 96                                     # the vector loop and its tail
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    scale = torch.rand(N, generator=g) / 100
    x = torch.randn(rows, K, generator=g) * torch.logspace(-2, 1, K // 32).repeat_interleave(32)  # blocks of all sizes
    got = native.gemv(x.bfloat16(), w, scale)
    xb = x.bfloat16().double()
    want = (xb @ w.double().T) * scale.double()
    step = xb.view(rows, K // 32, 32).abs().amax(-1) / 127                                     # (rows, K/32)
    bound = (step / 2) @ w.double().abs().view(N, K // 32, 32).sum(-1).T * scale.double()     # (rows, N)
    assert got.shape == (rows, N) and ((got.double() - want).abs() <= bound + 1e-5 * want.abs().max()).all()
    # x already on the int8 grid (integers, every block holding a ±127: scale 1): the integer products are exact
    xi = torch.randint(-127, 128, (rows, K), generator=g).float()
    xi[:, ::32] = 127 * torch.sign(torch.randn(rows, K // 32, generator=g))
    got = native.gemv(xi, w, scale).double()
    want = (xi.double() @ w.double().T) * scale.double()
    sizes = (xi.double().abs() @ w.double().abs().T) * scale.double()
    assert ((got - want).abs() <= 2 ** -23 * (K // 32) * sizes).all()  # fp32 sums of K / 32 exact block sums


@pytest.mark.parametrize("N", [64, 96, 48, 16])  # torch's packing: whole blocks of 32 / 64 rows, and tails
@pytest.mark.parametrize("G", [32, 128])
@pytest.mark.parametrize("sz_dtype", [torch.bfloat16, torch.float32])
def test_int4_by_int8_product_equals_its_definition(N, G, sz_dtype):
    """native.py's W4A8 product on torch's packed int4 weights: x rounded to int8 in blocks of 32 (scale max|x| / 127)
    for the Σ q·x term, w = (q - 8)·s + z per group. Equal (to fp32 sums) to that product written here in float64 from
    the unpacked definition; within the rounding of x of the exact product; and the path linear_int4 takes for one
    row under "native"."""
    g = torch.Generator().manual_seed(N + G)
    K = 256
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    sz = torch.stack([torch.rand(K // G, N, generator=g) / 100, torch.randn(K // G, N, generator=g) / 100], -1).to(sz_dtype)
    s, z = (sz[..., i].double().repeat_interleave(G, 0).T for i in (0, 1))                      # (N, K) each
    x = torch.randn(1, K, generator=g) * torch.logspace(-2, 1, K // 32).repeat_interleave(32)    # blocks of all sizes
    got = native.gemv_int4(x, packed, sz, cpu_kernels.int4_block())
    assert got is not None and got.shape == (1, N) and got.dtype == torch.float32
    xd = x.double()
    step = xd.view(K // 32, 32).abs().amax(-1).repeat_interleave(32) / 127
    xr = torch.round(xd / step) * step                                                            # x on the int8 grid
    w = (q.double() - 8) * s + z
    want = (xr * s * q).sum(-1) + (xd * (z - 8 * s)).sum(-1)                                    # the definition
    size = (xr.abs() * s * q).sum(-1) + (xd.abs() * (z - 8 * s).abs()).sum(-1)
    assert ((got.double() - want).abs() <= 1e-5 * size).all()
    exact = (xd * w).sum(-1)
    bound = (step / 2 * s * q.double()).sum(-1) + 1e-5 * size                                    # x's rounding
    assert ((got.double() - exact).abs() <= bound).all()
    with torch.no_grad():
        via = CpuKernels(force="native").linear_int4(x.bfloat16(), packed, sz)
        plain = CpuKernels(force="library").linear_int4(x.bfloat16(), packed, sz)
    same = native.gemv_int4(x.bfloat16(), packed, sz, cpu_kernels.int4_block())
    torch.testing.assert_close(via.float(), same, rtol=2 ** -7, atol=1e-4)                      # bf16 of the same
    assert (via.float() - plain.float()).abs().max() <= 0.02 * plain.float().abs().max()
    assert native.gemv_int4(torch.randn(2, K), packed, sz, cpu_kernels.int4_block()) is None    # one row only


def test_widened_products_equal_the_fp32_product(monkeypatch):
    """Where this CPU multiplies bf16 slowly (widen_is_faster), a large model's products of 32 rows or more run as fp32
    GEMMs on the weight widened chunk by chunk: the fp32 product of the bf16 inputs (+ bias), rounded once; int8
    weights times their row scales. Fewer rows, autograd and small models keep torch's bf16 product."""
    measured = cpu_kernels.widen_is_faster
    monkeypatch.setattr(cpu_kernels, "widen_is_faster", lambda dtype: True)
    monkeypatch.setattr(cpu_kernels, "WIDEN_CHUNK", 96 * 40)                 # 3 chunks of 40 rows, the last short
    g = torch.Generator().manual_seed(5)
    linear = nn.Linear(96, 100).bfloat16()
    x = torch.randn(2, 20, 96, generator=g).bfloat16()                        # 40 rows
    kernels = CpuKernels()
    fast = cpu_kernels.FastLinear(linear, kernels)
    with torch.no_grad():
        assert kernels.widens(x, linear.weight) and not kernels.widens(x[:, :15], linear.weight)
        assert not CpuKernels(measure=False).widens(x, linear.weight)
        got = fast(x)
        w8 = torch.randint(-127, 128, (100, 96), generator=g, dtype=torch.int8)
        scale = torch.rand(100, generator=g) / 100
        got8 = kernels.linear(x, w8, scale)
    assert not kernels.widens(x, linear.weight)                               # autograd is on
    want = x.float() @ linear.weight.float().T + linear.bias.float()
    assert got.shape == (2, 20, 100) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2 ** -8, atol=1e-5)    # rounded once to bf16
    want8 = x.float() @ (w8.float() * scale[:, None]).T
    torch.testing.assert_close(got8.float(), want8, rtol=2 ** -8, atol=1e-5)
    assert isinstance(measured(torch.bfloat16), bool)                        # the real timing runs


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


@pytest.mark.parametrize("path", ["native", "loop", "library", None])  # None: measured
def test_fast_decode_equals_plain_decode(bf16_model, monkeypatch, path):
    model, cfg = bf16_model
    inputs = {k: v for k, v in batch(cfg).items()}
    calls, step_ops = [], []
    one_row = CpuKernels._one_row
    monkeypatch.setattr(CpuKernels, "_one_row", lambda self, x, w, s=None: calls.append(tuple(w.shape)) or one_row(self, x, w, s))
    for name in ("attend_one_row", "rms_norm", "geglu", "decode_layer"):  # a large model's step ops (measure=True below)
        monkeypatch.setattr(native, name, lambda *a, f=getattr(native, name), n=name: step_ops.append(n) or f(*a))
    inputs = {k: v[:1] for k, v in inputs.items()}  # one row: the measured path is for batch 1
    kernels = CpuKernels(measure=True, force=path)  # measure: a tiny model would not time its steps
    fast_model = install(copy.deepcopy(model), kernels)
    with torch.no_grad():
        plain = decode_logits(model, inputs)
        assert not calls, "the one-row path ran in a model without the kernels"
        quick = decode_logits(fast_model, inputs, runtime=Runtime(kernels))
    assert calls, "the decode step never took the one-row path"
    # the native path runs each layer's step as one native call; the others the step ops one by one
    want_ops = {"decode_layer"} if path == "native" else {"attend_one_row", "rms_norm", "geglu"}
    assert want_ops <= set(step_ops), set(step_ops)
    times = kernels.chooser.times
    assert ([len(t) for t in times.values()] == [2, 1, 1]) if path is None else times is None, times  # 4 steps timed
    assert (cfg.text_config.vocab_size, cfg.text_config.hidden_size) in calls, "the tied output head took F.linear"
    # Same math, different summation order and one rounding of each product in bf16: compare
    # against the logits' scale, and the greedy choices must agree.
    scale = plain.abs().amax()
    assert (quick - plain).abs().max() <= 0.02 * scale, f"fast path differs by {(quick - plain).abs().max():.4f} (scale {scale:.2f})"
    assert torch.equal(quick.argmax(-1), plain.argmax(-1))


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_native_layer_step_equals_the_per_op_step(bf16_model, monkeypatch, quantize):
    """native.decode_layer (a whole decoder layer of a decode step as one call) rounds where the per-op native path
    rounds: the same logits bit for bit, Gemma 1 and 2 (post-norms, soft-caps, sliding window), bf16 and quantized
    weights, and every layer of every step took it."""
    model, cfg = bf16_model
    model = copy.deepcopy(model)
    runtime = prepare(model, quantize=quantize, force_path="native")
    runtime.kernels.chooser.measure = True  # as a large model: the native step ops and layers
    inputs = {k: v[:1] for k, v in batch(cfg).items()}
    layer_calls = []
    decode_layer = native.decode_layer
    monkeypatch.setattr(native, "decode_layer", lambda *a: layer_calls.append(1) or decode_layer(*a))
    with torch.no_grad():
        whole = forced_logits(model, inputs, runtime)
        assert len(layer_calls) == 4 * cfg.text_config.num_hidden_layers
        monkeypatch.setattr(native, "decode_layer", lambda *a: None)     # the per-op path: the layer's own forward
        per_op = forced_logits(model, inputs, runtime)
    assert_same_as_per_op(whole, per_op)


def forced_logits(model, inputs, runtime, tokens=(5, 17, 33, 2)):
    """The logits of decode steps fed `tokens` after the prefill (the same inputs whatever the logits), stacked."""
    _, state = prefill(model, inputs["input_ids"], inputs["pixel_values"].bfloat16(), inputs["attention_mask"],
                       inputs["token_type_ids"], max_new_tokens=len(tokens), runtime=runtime)
    return torch.stack([state.step(model, torch.tensor([t])) for t in tokens])


def assert_same_as_per_op(whole: torch.Tensor, per_op: torch.Tensor) -> None:
    """The native layer step's logits are the per-op path's bit for bit, where both take native.geglu."""
    if native._library().geglu_vectorised():
        assert torch.equal(whole, per_op), (whole - per_op).abs().max()
    else:  # no AVX-512 BF16: the per-op GeGLU is eager torch's (two roundings), the layer's native (one), which the
        # quantized activations of W8A8 / W4A8 amplify in a tiny random model (measured: up to 5 % of the scale)
        assert (whole - per_op).abs().max() <= 0.1 * per_op.abs().max()


def test_native_layer_step_follows_the_modules(bf16_model, monkeypatch):
    """A layer whose modules have no native form (a wrapped projection, as LoRA does) runs its own forward; weights
    replaced between generations are the ones the next generation reads."""
    model, cfg = bf16_model
    model = copy.deepcopy(model)
    runtime = prepare(model, force_path="native")
    runtime.kernels.chooser.measure = True
    inputs = {k: v[:1] for k, v in batch(cfg).items()}
    ran = []
    decode_layer = native.decode_layer
    monkeypatch.setattr(native, "decode_layer", lambda spec, *a: ran.append(spec) or decode_layer(spec, *a))

    class Wrapped(nn.Module):  # a projection the kernels do not know
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    layer = model.decoder.layers[0]
    with torch.no_grad():
        before = forced_logits(model, inputs, runtime)
        layer.self_attn.v_proj = Wrapped(layer.self_attn.v_proj)
        ran.clear()
        wrapped = forced_logits(model, inputs, runtime)
        assert len(ran) == 4 * (cfg.text_config.num_hidden_layers - 1)   # not layer 0's
        assert_same_as_per_op(before, wrapped)
        layer.self_attn.v_proj = layer.self_attn.v_proj.inner
        layer.self_attn.q_proj.weight = nn.Parameter(layer.self_attn.q_proj.weight * 2, requires_grad=False)
        doubled = forced_logits(model, inputs, runtime)
        monkeypatch.setattr(native, "decode_layer", lambda *a: None)
        per_op = forced_logits(model, inputs, runtime)
    assert not torch.equal(doubled, before)
    assert_same_as_per_op(doubled, per_op)


def test_native_layer_refuses_bad_slots_and_attends_to_nothing_as_nan(bf16_model):
    model, cfg = bf16_model
    model = copy.deepcopy(model)
    prepare(model, force_path="native")
    layer = model.decoder.layers[0]
    spec = layer.native_spec()
    held = {t.data_ptr() for t in spec.tensors}  # every pointer the C struct holds points into a tensor it keeps
    assert {p for w in spec.proj for p in (w.w, w.scale, w.sz) if p} | {p for p in spec.norm if p} <= held
    text = model.config.text_config
    from nanopali.inference.kv_cache import KVCache
    from nanopali.nn.rope import rope
    cache = KVCache(text, 1, 8, torch.bfloat16)
    x = torch.randn(1, 1, text.hidden_size).bfloat16()
    cos, sin = rope(torch.tensor([[3]]), text.head_dim, text.rope_theta, torch.bfloat16)
    mask = torch.zeros(1, 1, 1, 8, dtype=torch.bool)
    with torch.no_grad():
        with pytest.raises(IndexError, match="slot 8"):
            native.decode_layer(spec, x, cos, sin, cache.k[0], cache.v[0], torch.tensor([8]), mask)
        out = native.decode_layer(spec, x, cos, sin, cache.k[0], cache.v[0], torch.tensor([3]), mask)
    assert out.isnan().all()  # softmax over no slot: NaN, as the explicit attention gives, never a made-up number
    assert native.decode_layer(spec, x.float(), cos, sin, cache.k[0], cache.v[0], torch.tensor([3]), mask) is None


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_native_step_ops_equal_their_definitions(dtype, softcap):
    """native.py's one-pass kernels for a decode step's small tensors: attention of one query row per head (8 heads
    grouped onto 2 kv heads, slots masked per row, Gemma 2's soft-cap), RMSNorm and GeGLU, against their definitions
    computed in fp64 from the same inputs, rounded once; a row that may attend to nothing is left to the explicit
    path (None)."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(*shape, generator=g).to(dtype) for shape in ((2, 8, 1, 64), (2, 2, 40, 64), (2, 2, 40, 64)))
    mask = torch.rand(2, 1, 1, 40, generator=g) > 0.4
    scale = 0.3
    scores = torch.einsum("bkgd,bksd->bkgs", q.double().view(2, 2, 4, 64), k.double()) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    probs = scores.masked_fill(~mask.view(2, 1, 1, 40), float("-inf")).softmax(-1)
    want = torch.einsum("bkgs,bksd->bkgd", probs, v.double()).reshape(2, 8, 1, 64)
    tol = dict(rtol=2 ** -8, atol=1e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    got = native.attend_one_row(q, k, v, mask, scale, softcap)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.double(), want, **tol)
    assert native.attend_one_row(q, k, v, mask & False, scale, softcap) is None
    x, weight = torch.randn(3, 256, generator=g).to(dtype), (torch.randn(256, generator=g) / 4).to(dtype)
    xd = x.double()
    norm = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + weight.double())
    torch.testing.assert_close(native.rms_norm(x, weight, 1e-6).double(), norm, **tol)
    gate, up = (3 * torch.randn(5000, generator=g)).to(dtype), torch.randn(5000, generator=g).to(dtype)
    got = native.geglu(gate, up)
    if got is None:  # no AVX-512 BF16 here: eager torch's two ops are faster than one expf at a time
        assert not native._library().geglu_vectorised()
    else:
        torch.testing.assert_close(got.double(), F.gelu(gate.double(), approximate="tanh") * up.double(), **tol)


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


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_a_prepared_model_deep_copies_and_pickles(bf16_model, quantize):
    """copy.deepcopy and torch.save / torch.load of a prepared model give the same logits under the runtime that
    prepared it; the copy shares that runtime's kernels and makes its own native layer specs, so its weights, not
    the original's, are what it reads (doubling a copy's weight changes its logits alone)."""
    model, cfg = bf16_model
    model = copy.deepcopy(model)
    runtime = prepare(model, quantize=quantize, force_path="native")
    runtime.kernels.chooser.measure = True
    inputs = {k: v[:1] for k, v in batch(cfg).items()}
    with torch.no_grad():
        want = forced_logits(model, inputs, runtime)  # the original's layers now hold specs
        twin = copy.deepcopy(model)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        for other in (twin, loaded):
            assert all(layer._spec is None for layer in other.decoder.layers), "a copy kept the original's spec"
            assert torch.equal(forced_logits(other, inputs, runtime), want)
        assert twin.decoder.layers[0].kernels is runtime.kernels
        layer = twin.decoder.layers[0].self_attn.q_proj  # (Gemma 2 normalizes a scaled down_proj away)
        if quantize is None:
            layer.weight.mul_(2)
        else:
            layer.scale.mul_(2)
        assert not torch.equal(forced_logits(twin, inputs, runtime), want)
        assert torch.equal(forced_logits(model, inputs, runtime), want)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_preparing_again_takes_the_new_runtime(bf16_model, quantize):
    """A prepared model (or its copy) prepared again computes with the new runtime's kernels everywhere: with
    cpu_kernels=False, the plain path's logits bit for bit, and no native call."""
    model, cfg = bf16_model
    plain = copy.deepcopy(model)
    model = copy.deepcopy(model)
    prepare(model, quantize=quantize, force_path="native").kernels.chooser.measure = True
    inputs = {k: v[:1] for k, v in batch(cfg).items()}
    with torch.no_grad():
        want = forced_logits(plain, inputs, prepare(plain, quantize=quantize, cpu_kernels=False))
        for target in (model, copy.deepcopy(model)):
            runtime = prepare(target, cpu_kernels=False)
            users = [m for m in target.modules() if hasattr(m, "kernels")]
            assert users and all(m.kernels is runtime.kernels for m in users)
            assert all(layer.self_attn.attend == runtime.kernels.attention for layer in target.decoder.layers)
            assert torch.equal(forced_logits(target, inputs, runtime), want)
