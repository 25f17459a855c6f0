"""The decode step through torch.compile (inference/compiled.py): the eager step's logits and tokens, compiled once
per shape family, and refused or given up where it cannot run.

On the CPU, Inductor compiles the plain modules (cpu_kernels=False), which checks that the whole step traces as one
graph (fullgraph=True) and computes what the eager step does; the CUDA tests, where torch sees a GPU, check the
compiled step inside a CUDA graph, in bf16 and with int8 weights.
"""

import copy
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from test_batching import PROMPTS, alone
from test_batching import run as run_batch
from test_cuda_graphs import prompts, teacher_forced, tiny_model
from tiny_checkpoint import write_tiny_checkpoint
from torch._dynamo.utils import counters

import nanopali
from nanopali import generate
from nanopali.errors import UsageError
from nanopali.inference import compiled
from nanopali.inference.decode import decode_step
from nanopali.inference.runtime import Runtime, prepare

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def graphs() -> int:
    """Graphs torch.compile has made in this process so far."""
    return counters["stats"]["unique_graphs"]


def compiled_runtime(model, **kwargs) -> Runtime:
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a compile that fails warns: fail the test instead
        return prepare(model, cpu_kernels=False, compile=True, **kwargs)


@pytest.mark.parametrize("generation", [1, 2])
def test_compiled_steps_equal_eager_steps(generation):
    model, inputs = tiny_model(generation), prompts(2)
    eager, tokens, _ = teacher_forced(model, inputs, steps=8)
    runtime, before = compiled_runtime(model), graphs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got, _, _ = teacher_forced(model, inputs, steps=8, tokens=tokens, runtime=runtime)
    assert graphs() > before, "the step did not go through torch.compile"
    assert not runtime.compiled[decode_step].failed
    err, scale = (got - eager).abs().max(), eager.abs().max()
    assert err <= 1e-5 * scale, f"the compiled step's logits differ by {err:.3g} (scale {scale:.3g})"
    assert torch.equal(got.argmax(-1), eager.argmax(-1))


def test_compiled_generate_equals_eager_and_reuses_its_compilation():
    """Greedy and beam search give the eager tokens; other lengths and a second model of the same config reuse the
    first compilation (the cache length is dynamic from the start)."""
    model, inputs = tiny_model(2), prompts(2)
    other = copy.deepcopy(model)
    want = {n: generate(model, **inputs, max_new_tokens=n, eos_token_id=[]) for n in (6, 9, 12)}
    beams = generate(model, **inputs, max_new_tokens=5, num_beams=2)
    runtime = compiled_runtime(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert torch.equal(generate(model, **inputs, max_new_tokens=6, eos_token_id=[], runtime=runtime), want[6])
        settled = graphs()
        assert torch.equal(generate(model, **inputs, max_new_tokens=9, eos_token_id=[], runtime=runtime), want[9])
        assert torch.equal(generate(model, **inputs, max_new_tokens=12, eos_token_id=[], runtime=runtime), want[12])
        assert torch.equal(generate(other, **inputs, max_new_tokens=12, eos_token_id=[], runtime=compiled_runtime(other)),
                           want[12])
        assert graphs() == settled, "another cache length or a second model of the same config compiled again"
        assert torch.equal(generate(model, **inputs, max_new_tokens=5, num_beams=2, runtime=runtime), beams)
    assert list(runtime.compiled) == [decode_step]
    assert len(set(want[12].flatten().tolist())) > 2, "the test model should not repeat one token"


def test_compiled_int8_step_equals_the_eager_int8_step():
    """The int8 modules trace too (on a GPU this is where the compiled step reads int8 weights without a bf16 copy)."""
    model, inputs = tiny_model(1), prompts(2)
    eager_model = copy.deepcopy(model)
    want = generate(eager_model, **inputs, max_new_tokens=8, eos_token_id=[],
                    runtime=prepare(eager_model, quantize="int8", cpu_kernels=False, cuda_graphs=False))
    runtime, before = compiled_runtime(model, quantize="int8"), graphs()
    got = generate(model, **inputs, max_new_tokens=8, eos_token_id=[], runtime=runtime)
    assert graphs() > before and not runtime.compiled[decode_step].failed
    assert torch.equal(got, want)


def test_a_step_that_fails_to_compile_runs_eagerly_with_one_warning(monkeypatch):
    calls = []

    def broken(fn, **kwargs):
        def run(*args):
            calls.append(1)
            raise RuntimeError("InductorError: no C++ compiler")
        return run

    monkeypatch.setattr(compiled.torch, "compile", broken)
    model, inputs = tiny_model(1), prompts(2)
    want, tokens, _ = teacher_forced(model, inputs, steps=4)
    runtime = prepare(model, cpu_kernels=False, compile=True)
    with pytest.warns(RuntimeWarning, match="compiling the decode step failed .*no C\\+\\+ compiler"):
        got, _, _ = teacher_forced(model, inputs, steps=4, tokens=tokens, runtime=runtime)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, and no second try
        again, _, _ = teacher_forced(model, inputs, steps=4, tokens=tokens, runtime=runtime)
    assert len(calls) == 1
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(again, want, rtol=0, atol=0)


def test_the_pipeline_passes_compile_to_its_runtime(tmp_path):
    """nanopali.load(compile=True) (the CLI's --compile) answers with the compiled step, as the eager one does."""
    path = write_tiny_checkpoint(tmp_path, generation=2)
    image = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    eager = nanopali.load(path, fast=False)
    pali, before = nanopali.load(path, fast=False, compile=True), graphs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = pali.caption(Image.fromarray(image), max_new_tokens=6)
    assert pali.runtime.compile and graphs() > before
    assert got == eager.caption(Image.fromarray(image), max_new_tokens=6)


def test_a_continuous_batch_with_the_compiled_step_answers_as_each_row_alone(tmp_path):
    """Rows joining and leaving a running batch (a server's requests: the batch size and cache length change
    between steps) get from the compiled step what each gets alone from the eager one."""
    path = write_tiny_checkpoint(tmp_path, generation=2)
    eager, pali = nanopali.load(path, fast=False), nanopali.load(path, fast=False, compile=True)
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (20 + 7 * i, 40 - 3 * i, 3), dtype=np.uint8) for i in range(3)]
    lengths = [12, 5, 9]
    rows = [pali.row(image, prompt, max_new_tokens=n) for image, prompt, n in zip(images, PROMPTS, lengths)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        run_batch(pali.batch(), rows, join_at=[0, 2, 4])
    assert pali.runtime.compiled and not pali.runtime.compiled[decode_step].failed
    for row, image, prompt, n in zip(rows, images, PROMPTS, lengths):
        assert row.answer.text == alone(eager, image, prompt, max_new_tokens=n).text, prompt


def test_compile_on_the_cpu_needs_the_cpu_kernels_off():
    model = tiny_model(1)
    with pytest.raises(UsageError, match="compile=True on the CPU .* cpu_kernels=False"):
        prepare(model, compile=True)
    with pytest.raises(UsageError, match="compile=True on the CPU"):  # before any file is looked for
        nanopali.load("no/such/checkpoint", compile=True)
    assert not prepare(model).compile, "compile should be off by default"


@cuda
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_cuda_compiled_graph_steps_equal_eager_steps(quantize):
    """In bf16 the compiled graph's logits are as close to an fp32 run of the same weights as the eager step's are
    (they round in other places, so they are not the eager step's bit for bit)."""
    model, inputs = tiny_model(2, torch.bfloat16, "cuda"), prompts(2, "cuda", torch.bfloat16)
    models = {dtype: copy.deepcopy(model).to(dtype) for dtype in (torch.float32, torch.bfloat16)}
    fp32, tokens, _ = teacher_forced(models[torch.float32], {k: v.float() if v.is_floating_point() else v
                                                             for k, v in inputs.items()}, steps=10,
                                     runtime=prepare(models[torch.float32], quantize=quantize, cuda_graphs=False))
    eager, _, _ = teacher_forced(models[torch.bfloat16], inputs, steps=10, tokens=tokens,
                                 runtime=prepare(models[torch.bfloat16], quantize=quantize, cuda_graphs=False))
    runtime = prepare(model, quantize=quantize, compile=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, _, state = teacher_forced(model, inputs, steps=10, tokens=tokens, runtime=runtime)
    messages = [str(w.message) for w in caught]
    assert state.graph is not None and not runtime.compiled[decode_step].failed, messages
    scale = fp32.abs().max()
    err, eager_err = (got.float() - fp32).abs().max(), (eager.float() - fp32).abs().max()
    assert err <= 1.5 * eager_err + 1e-3 * scale, f"compiled graph off by {err:.3g}, eager bf16 {eager_err:.3g}"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        first = generate(model, **inputs, max_new_tokens=8, eos_token_id=[], runtime=runtime)
        second = generate(model, **inputs, max_new_tokens=8, eos_token_id=[], runtime=runtime)
    assert torch.equal(first, second)
