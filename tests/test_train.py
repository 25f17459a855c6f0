"""Training: overfitting, exact resume, atomic checkpoints, recipes, accumulation, data errors."""

import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_checkpoint import write_tiny_checkpoint
from transformers import PaliGemmaForConditionalGeneration

from nanopali import PaliGemma, Processor, generate
from nanopali.train import RECIPES, DataError, JsonlDataset, TrainConfig, TrainingInterrupted, apply_recipe, fit
from nanopali.train import checkpoint as ckpt

SUFFIXES = ["red circle", "blue square", "two green stars", "a word: cat"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("base"), generation=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    lines = []
    for i, suffix in enumerate(SUFFIXES):
        Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "prefix": f"caption en {i}" if i % 2 else "caption en", "suffix": suffix}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


def weights(path):
    return PaliGemma.from_pretrained(path).state_dict()


def run(base, data, out, **kw):
    options = dict(model=str(base), data=str(data), out=str(out), steps=6, batch_size=2, lr=3e-3, warmup_steps=2, seed=1)
    return fit(TrainConfig(**{**options, **kw}))


def test_overfits_and_then_generates_the_suffixes(base, data, tmp_path):
    final = run(base, data, tmp_path / "run", steps=80, batch_size=4, lr=1e-2, warmup_steps=5, eval=str(data))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[0] > 2 and losses[-1] < 0.05, f"loss went from {losses[0]:.3f} to {losses[-1]:.3f}"
    assert rows[-1]["eval/caption/exact_match"] == 1.0
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    model, processor = PaliGemma.from_pretrained(final), Processor.from_pretrained(final)
    for line in data.read_text().splitlines():
        ex = json.loads(line)
        batch = processor(images=[data.parent / ex["image"]], prompts=[ex["prefix"]])
        ids = generate(model, **batch, max_new_tokens=12)
        assert processor.decode(ids[0].tolist()) == ex["suffix"]


class InterruptAt(list):
    """A dataset that sends SIGTERM to this process when example number `at` is first read."""

    def __init__(self, items, at):
        super().__init__(items)
        self.at, self.reads = at, 0

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__getitem__(i)


def test_interrupted_and_resumed_equals_uninterrupted(base, data, tmp_path):
    examples = list(JsonlDataset(data))
    straight = run(base, data, tmp_path / "a", save_every=2)
    out = tmp_path / "b"
    with pytest.raises(TrainingInterrupted) as stop:  # fit saves, then says so: an interrupted run is no result
        fit(TrainConfig(model=str(base), out=str(out), steps=6, batch_size=2, lr=3e-3, warmup_steps=2, seed=1),
            train_data=InterruptAt(examples, at=5))  # SIGTERM while collecting step 3
    stopped = stop.value.checkpoint
    assert stopped.name == "checkpoint-000003" and ckpt.latest(out) == stopped
    assert stop.value.step == 3 and stop.value.exit_code == 143
    resumed = fit(TrainConfig(model=str(base), out=str(out), steps=6, batch_size=2, lr=3e-3, warmup_steps=2, seed=1,
                              resume=True), train_data=examples)
    a, b = weights(straight), weights(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert not torch.equal(a["multi_modal_projector.linear.weight"], weights(base)["multi_modal_projector.linear.weight"])


def assert_same_training(a: dict, b: dict, atol: float = 1e-5, outlier_atol: float = 1e-4,
                         outlier_share: float = 1e-3) -> None:
    """Weights after a few AdamW steps on the same global batch, summed in a different order.

    Attention key biases get exactly zero gradient (softmax ignores a constant shift), so Adam
    turns rounding noise into +-lr steps there: they are skipped (in_proj_bias's middle third too).
    Elsewhere Adam can amplify a near-zero gradient's rounding, hence 1e-5 and not 1e-7, and for a rare
    element more: on an Intel Xeon (AMX, another summation order than the AMD machine) one weight of 6144
    ended 2.3e-5 apart. So at most `outlier_share` of a tensor's elements (one, in a tensor of fewer than
    1/outlier_share: one of a SigLIP text MLP's 48 biases did) may differ by more than atol, and nothing by more
    than outlier_atol, still far below what a wrong gradient does in these runs (lr 3e-3 per step).
    """
    for k in a:
        if k.endswith("k_proj.bias"):
            continue
        diff = (a[k].float() - b[k].float()).abs()
        if k.endswith("in_proj_bias"):  # nn.MultiheadAttention's (q, k, v) biases: leave out the key's third
            third = diff.numel() // 3
            diff = torch.cat([diff[:third], diff[2 * third:]])
        assert diff.max() <= outlier_atol, f"{k}: differs by up to {diff.max():.2e}"
        outliers = int((diff > atol).sum())
        assert outliers <= max(1, outlier_share * diff.numel()), \
            f"{k}: {outliers} of {diff.numel()} elements differ by more than {atol} (up to {diff.max():.2e})"


def test_gradient_accumulation_equals_one_big_batch(base, data, tmp_path):
    big = weights(run(base, data, tmp_path / "big", steps=3, batch_size=4))
    small = weights(run(base, data, tmp_path / "small", steps=3, batch_size=2, grad_accum=2))
    assert_same_training(big, small)


def test_a_mid_run_checkpoint_loads_in_transformers_with_equal_logits(base, data, tmp_path):
    run(base, data, tmp_path / "r", save_every=3, keep_checkpoints=5)
    mid = tmp_path / "r" / "checkpoint-000003"
    assert (mid / "trainer_state.pt").is_file() and (mid / "tokenizer.model").is_file()
    ours, processor = PaliGemma.from_pretrained(mid), Processor.from_pretrained(mid)
    hf = PaliGemmaForConditionalGeneration.from_pretrained(mid, attn_implementation="eager").eval()
    batch = processor(images=[data.parent / "0.png"], prompts=["caption en"], suffixes=["red circle"])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        ref = hf(**inputs, position_ids=inputs["attention_mask"].cumsum(-1)).logits
        torch.testing.assert_close(ours(**inputs).logits, ref, rtol=0, atol=1e-4 * ref.abs().max().item())


def test_a_crash_while_saving_never_becomes_latest(tmp_path):
    ckpt.save(tmp_path, 1, lambda p: p.mkdir(), {"step": 1})

    def crash(path):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(tmp_path, 2, crash, {"step": 2})
    assert ckpt.latest(tmp_path).name == "checkpoint-000001"
    assert list(tmp_path.glob(".tmp-*"))
    ckpt.remove_partial(tmp_path)
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipes_train_exactly_what_they_name(base, recipe):
    model = PaliGemma.from_pretrained(base)
    trainable = set(apply_recipe(model, recipe))
    names = {n for n, _ in model.named_parameters()}
    expected = {
        "full": names,
        "freeze-vision": {n for n in names if not n.startswith("vision_tower.")},
        "attention-only": {n for n in names if n.startswith("language_model.") and ".self_attn." in n},
        "projector-only": {n for n in names if n.startswith("multi_modal_projector.")},
    }[recipe]
    assert trainable == expected and trainable


def test_frozen_parameters_do_not_move(base, data, tmp_path):
    before = weights(base)
    after = weights(run(base, data, tmp_path / "att", steps=2, recipe="attention-only", weight_decay=0.1))
    for k in before:
        moved = not torch.equal(before[k], after[k])
        assert moved == (".self_attn." in k and k.startswith("language_model.")), k


def test_bad_lines_name_their_line_number(data, tmp_path):
    lines = data.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    (tmp_path / "notimage.png").write_text("hello")
    bad.write_text("\n".join([
        lines[0].replace('"0.png"', f'"{data.parent / "0.png"}"'),
        '{"image": "missing.png", "prefix": "caption en", "suffix": "x"}',
        '{"image": "notimage.png", "prefix": "caption en", "suffix": "x"}',
        '{"prefix": "caption en", "suffix": "x"}',
        "not json",
    ]) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: image .*missing.png does not exist"):
        JsonlDataset(bad)
    ds = JsonlDataset(bad, skip_bad=True)
    assert len(ds) == 1 and len(ds.skipped) == 4
    assert [s.split(": ", 1)[0].rsplit(":", 1)[1] for s in ds.skipped] == ["2", "3", "4", "5"]
    assert "cannot be read" in ds.skipped[1] and "missing or non-string field(s) ['image']" in ds.skipped[2]


def test_weight_decay_skips_norms_biases_and_embeddings(base):
    from nanopali.train.recipes import param_groups
    model = PaliGemma.from_pretrained(base)
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, lr_scale={"multi_modal_projector.*": 10.0})
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    for name, _ in model.named_parameters():
        exempt = "norm" in name or name.endswith(".bias") or "embed_tokens" in name or "position_embedding" in name
        assert (name not in decayed) == exempt, name
    lrs = {n: g["lr"] for g in groups for n in g["names"]}
    assert lrs["multi_modal_projector.linear.weight"] == 1e-2 and lrs["language_model.model.norm.weight"] == 1e-3


def test_activation_checkpointing_gives_the_same_gradients(base, data):
    from nanopali.train.data import collate
    processor = Processor.from_pretrained(base)
    batch = collate(processor, list(JsonlDataset(data)))
    grads = []
    for enabled in (False, True):
        model = PaliGemma.from_pretrained(base).train()
        model.gradient_checkpointing(enabled)
        model(**batch).loss.backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=0, atol=1e-7, msg=k)


def test_bf16_autocast_trains_close_to_float32(base, data, tmp_path):
    run(base, data, tmp_path / "fp32", steps=4)
    run(base, data, tmp_path / "bf16", steps=4, bf16=True)
    rows = {name: [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("fp32", "bf16")}
    assert rows["bf16"] != rows["fp32"], "autocast had no effect"
    for a, b in zip(rows["fp32"], rows["bf16"]):
        assert abs(a - b) < 0.05 * a
    assert {p.dtype for p in PaliGemma.from_pretrained(tmp_path / "bf16" / "checkpoint-000004").parameters()} == {torch.float32}


def test_detection_metrics_use_the_parser():
    from nanopali.train.metrics import detection_scores
    truth = "<loc0000><loc0000><loc0512><loc0512> cat ; <loc0512><loc0512><loc1023><loc1023> dog"
    exact, n = detection_scores(truth, truth, (100, 100))
    assert exact == [1.0, 1.0] and n == 2
    shifted, n = detection_scores("<loc0000><loc0256><loc0512><loc0768> cat", truth, (100, 100))
    assert shifted == [pytest.approx(1 / 3, abs=0.02), 0.0] and n == 1


# ---------------------------------------------------------------- auxiliary loss on the vision tower's tokens

def patch_examples(data) -> list[dict]:
    """The JSONL examples as dict items with per-patch labels (16 patches; groups of 3 and 2 classes) that
    depend on the patch's place only, so the tower can learn them through its position embeddings."""
    place = np.arange(16)
    labels = np.stack([place % 3, place // 8], -1)
    return [{"image": e.image, "prefix": e.prefix, "suffix": e.suffix, "patch_labels": labels} for e in JsonlDataset(data)]


def run_aux(base, examples, out, weight: float | None, **kw):
    from nanopali.world.patch_warmup import PatchLoss
    torch.manual_seed(7)
    auxiliary = PatchLoss(32, (3, 2), background_weight=0.5, weight=weight) if weight is not None else None
    options = dict(model=str(base), out=str(out), steps=6, batch_size=2, lr=3e-3, warmup_steps=2, seed=1)
    final = fit(TrainConfig(**{**options, **kw}), train_data=examples, auxiliary=auxiliary)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return final, auxiliary, rows


def test_auxiliary_patch_loss_trains_its_heads_and_the_tower_only_through_its_weight(base, data, tmp_path):
    examples = patch_examples(data)
    plain, _, plain_rows = run_aux(base, examples, tmp_path / "plain", None)
    zero, _, zero_rows = run_aux(base, examples, tmp_path / "zero", 0.0)
    one, heads, rows = run_aux(base, examples, tmp_path / "one", 1.0, steps=30, lr_scale={"auxiliary.*": 10.0},
                               max_grad_norm=None)
    # weight 0: the same training as none (up to the rounding of a gradient norm over more tensors), and the
    # logged loss is the language-model loss alone
    assert_same_training(weights(plain), weights(zero))
    assert [r["loss"] for r in zero_rows] == pytest.approx([r["loss"] for r in plain_rows], rel=1e-5)
    assert "aux_loss" not in plain_rows[0] and zero_rows[0]["aux_loss"] == 0.0
    # weight 1: the heads learn the labels and the tower moves differently
    aux = [r["aux_loss"] for r in rows]
    assert aux[-1] < 0.7 * aux[0], f"auxiliary loss went from {aux[0]:.3f} to {aux[-1]:.3f}"
    short = weights(run_aux(base, examples, tmp_path / "plain30", None, steps=30, max_grad_norm=None)[0])
    trained = weights(one)
    assert not torch.equal(trained["vision_tower.vision_model.post_layernorm.weight"],
                           short["vision_tower.vision_model.post_layernorm.weight"])
    assert not any(k.startswith("auxiliary") or "heads" in k for k in trained)  # the heads stay out of the model
    state = torch.load(one / "trainer_state.pt", weights_only=False)["auxiliary"]
    assert state["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(3e-2)  # lr_scale "auxiliary.*"
    for k, v in heads.state_dict().items():
        assert torch.equal(state["module"][k], v)


def test_auxiliary_loss_resumes_exactly_and_refuses_a_mismatched_resume(base, data, tmp_path, monkeypatch):
    from nanopali.world.patch_warmup import PatchLoss
    loaded, load = [], PaliGemma.from_pretrained  # every model fit trains, to check its hooks at the end
    monkeypatch.setattr(PaliGemma, "from_pretrained", lambda *args, **kw: loaded.append(load(*args, **kw)) or loaded[-1])
    examples = patch_examples(data)
    straight, straight_heads, _ = run_aux(base, examples, tmp_path / "a", 1.0)
    out = tmp_path / "b"
    with pytest.raises(TrainingInterrupted) as stop:
        run_aux(base, InterruptAt(examples, at=5), out, 1.0)
    assert stop.value.checkpoint.name == "checkpoint-000003"
    resumed, resumed_heads, _ = run_aux(base, examples, out, 1.0, resume=True)
    a, b = weights(straight), weights(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    for k, v in straight_heads.state_dict().items():
        assert torch.equal(resumed_heads.state_dict()[k], v), k
    with pytest.raises(ValueError, match="started with an auxiliary loss"):
        run_aux(base, examples, out, None, resume=True, steps=8)
    with pytest.raises(ValueError, match="'patch_labels'.*train.jsonl:1"):
        fit(TrainConfig(model=str(base), out=str(tmp_path / "c"), steps=1, batch_size=4),
            train_data=list(JsonlDataset(data)), auxiliary=PatchLoss(32, (3, 2)))
    with pytest.raises(ValueError, match="16 patches and there are 3 label groups"):
        fit(TrainConfig(model=str(base), out=str(tmp_path / "d"), steps=1, batch_size=4), train_data=examples,
            auxiliary=PatchLoss(32, (3, 2, 2)))
    # fit removes its forward hook from the vision tower when it returns, and when it stops on an error
    assert len(loaded) >= 6 and not any(m.vision._forward_hooks for m in loaded)
