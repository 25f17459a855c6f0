"""LoRA through peft: only adapters train, checkpoints are merged models, resume is exact, DDP agrees.

The merged checkpoint is checked against peft's own `merge()` of the same adapters (weights) and
against the adapted model it came from (logits), and transformers must load it with equal logits.
"""

import importlib.util
import json
import shutil
import sys

import pytest
import torch
from test_distributed import torchrun
from test_train import assert_same_training, base, data, weights  # noqa: F401  (base, data are fixtures)
from transformers import PaliGemmaForConditionalGeneration

from nanopali import PaliGemma, Processor
from nanopali.train import TrainConfig, fit, lora
from nanopali.train import checkpoint as ckpt

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")
RANK, ALPHA = 4, 8.0


def options(base, data, out, **kw) -> dict:
    return {**dict(model=str(base), data=str(data), out=str(out), steps=4, batch_size=2, lr=1e-2, warmup_steps=1,
                   seed=3, save_every=2, keep_checkpoints=5, lora_rank=RANK, lora_alpha=ALPHA, lora_dropout=0.1), **kw}


def is_wrapped(name: str) -> bool:
    return name.startswith("language_model.model.layers.") and name.endswith("_proj.weight")


@pytest.fixture(scope="module")
def run(base, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    fit(TrainConfig(**options(base, data, out)))
    return out


def adapted_model(base, adapter: dict) -> PaliGemma:
    """The base model with LoRA applied and the saved adapter loaded: what the run trained, unmerged."""
    model = PaliGemma.from_pretrained(base)
    lora.apply(model, RANK, ALPHA)
    lora.load_adapter(model, adapter)
    return model.eval()


@needs_peft
def test_only_the_adapters_train(base, run):
    before, after = weights(base), weights(run / "checkpoint-000004")
    adapter = ckpt.load_state(run / "checkpoint-000004")["lora"]
    assert set(after) == set(before), "the merged checkpoint has exactly the base model's tensor names"
    for k in before:
        assert torch.equal(before[k], after[k]) != is_wrapped(k), f"{k}: {'unchanged' if is_wrapped(k) else 'moved'}"
    assert len(adapter) == 2 * 7 * 2 and all(".lora_A." in k or ".lora_B." in k for k in adapter)  # 2 layers x 7 linears
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if ".lora_B." in k), "every lora_B moved from zero"


@needs_peft
def test_apply_freezes_the_base_and_keeps_the_recipes_unwrapped_parameters(base):
    model = PaliGemma.from_pretrained(base)
    trainable = lora.apply(model, RANK, ALPHA, recipe="full", targets=["q_proj", "v_proj"])
    assert trainable and all(".lora_" in n and (".q_proj." in n or ".v_proj." in n) for n in trainable)
    assert not any(n.startswith("vision_tower.") and ".lora_" in n for n, _ in model.named_parameters())
    model = PaliGemma.from_pretrained(base)
    trainable = lora.apply(model, RANK, ALPHA, recipe="attention-only", targets=["q_proj"])
    full = {n for n in trainable if ".lora_" not in n}
    assert full == {f"language_model.model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "kvo"}
    with pytest.raises(ValueError, match="unknown LoRA targets \\['qkv'\\]"):
        lora.apply(PaliGemma.from_pretrained(base), RANK, ALPHA, targets=["qkv"])


@needs_peft
def test_merged_weights_equal_peft_merge(base, run):
    final = run / "checkpoint-000004"
    from peft.tuners.lora import LoraLayer
    model = adapted_model(base, ckpt.load_state(final)["lora"])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.merge()
    reference = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
    merged = weights(final)
    assert set(reference) == set(merged)
    for k in merged:
        torch.testing.assert_close(merged[k], reference[k], rtol=0, atol=1e-6, msg=k)


@needs_peft
def test_merged_checkpoint_has_the_adapted_models_logits(base, data, run):
    final = run / "checkpoint-000004"
    processor = Processor.from_pretrained(final)
    batch = processor(images=[data.parent / "0.png", data.parent / "1.png"], prompts=["caption en", "caption en 1"],
                      suffixes=["red circle", "blue square"], padding_side="right")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        adapted = adapted_model(base, ckpt.load_state(final)["lora"])(**inputs).logits
        merged = PaliGemma.from_pretrained(final)(**inputs).logits
        plain = PaliGemma.from_pretrained(base)(**inputs).logits
        hf = PaliGemmaForConditionalGeneration.from_pretrained(final, attn_implementation="eager").eval()
        ref = hf(**inputs, position_ids=inputs["attention_mask"].cumsum(-1)).logits
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)
    assert (adapted - plain).abs().max() > 1e-2, "the adapters changed the logits"
    torch.testing.assert_close(merged, ref, rtol=0, atol=1e-4 * ref.abs().max().item())


@needs_peft
def test_resume_equals_the_uninterrupted_run(base, data, run, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(run / "checkpoint-000002", out / "checkpoint-000002")
    (out / ckpt.LATEST).write_text("checkpoint-000002\n")
    final = fit(TrainConfig(**options(base, data, out, resume=True)))
    a, b = weights(run / "checkpoint-000004"), weights(final)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    sa, sb = ckpt.load_state(run / "checkpoint-000004")["lora"], ckpt.load_state(final)["lora"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(ValueError, match=r"lora_rank=4 -> 8"):
        fit(TrainConfig(**options(base, data, out, resume=True, steps=6, lora_rank=8)))
    with pytest.raises(ValueError, match=r"lora_rank=4 -> 0"):
        fit(TrainConfig(**options(base, data, out, resume=True, steps=6, lora_rank=0)))


@needs_peft
def test_ddp_lora_equals_one_process(base, data, tmp_path):
    out = torchrun(tmp_path, options(base, data, tmp_path / "ddp", batch_size=1, lora_dropout=0.0))
    single = fit(TrainConfig(**options(base, data, tmp_path / "single", lora_dropout=0.0)))
    assert_same_training(weights(single), weights(out / "checkpoint-000004"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_without_peft_the_error_says_how_to_install_it(base, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    with pytest.raises(ImportError, match=r"pip install nanopali\[lora\]"):
        lora.apply(PaliGemma.from_pretrained(base), RANK, ALPHA)
