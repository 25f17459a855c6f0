"""The mixture-of-experts decoder against transformers' MoE blocks, its losses, upcycling, training, inference paths.

The reference (moe_reference.py) is a tiny transformers PaliGemma whose Gemma layers' `mlp` is transformers'
MixtralSparseMoeBlock (4 experts, top-2, renormalized) or Qwen2MoeSparseMoeBlock (5 experts, top-3, not
renormalized, a shared expert, only layers 0 and 2 sparse), saved with save_pretrained and loaded by nanopali.
"""

import json
from dataclasses import replace

import pytest
import torch
from hf_reference import EOS, batch
from moe_reference import CASES, hf_moe_model, record_router_logits, save
from test_distributed import assert_same_run, metrics, options, torchrun
from test_generate import assert_cached_decoding_equals_forward, hf_generate, prompts, until_eos
from test_loss import with_labels
from test_model import assert_close
from test_model import test_logits_match_transformers_with_padding_and_suffix as assert_logits_match
from test_train import base, data  # noqa: F401  (fixtures)
from tiny_checkpoint import tiny_config, write_tiny_checkpoint
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from nanopali import PaliGemma, Processor, cli, generate, prepare
from nanopali.config import MOE_FIELDS, ConfigError, PaliGemmaConfig
from nanopali.io.hf_checkpoint import canonical_key
from nanopali.nn.losses import router_losses
from nanopali.nn.mlp import GeGLU
from nanopali.nn.moe import Experts, SparseMoE, dispatch
from nanopali.train import TrainConfig, fit
from nanopali.train.upcycle import upcycle


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    hf, cfg, moe = hf_moe_model(request.param)
    return hf, PaliGemma.from_pretrained(save(hf, moe, tmp_path_factory.mktemp(request.param))).eval(), cfg


@pytest.fixture(scope="module", params=list(CASES))
def generation_pair(request, tmp_path_factory):
    """A model whose greedy answers are varied and sometimes end in <eos> (as test_generate's)."""
    hf, cfg, moe = hf_moe_model(request.param, std=0.3, embed_scale=0.1, eos_boost=12.0)
    return hf, PaliGemma.from_pretrained(save(hf, moe, tmp_path_factory.mktemp(request.param))).eval(), cfg


def test_logits_match_transformers_moe_blocks(pair):
    assert_logits_match(pair)  # test_model's check: 1e-4 of the logit scale, padded batch with a suffix
    t = pair[1].config.text_config
    assert [type(layer.mlp) for layer in pair[1].decoder.layers] == [
        SparseMoE if t.moe_layers is None or i in t.moe_layers else GeGLU for i in range(t.num_hidden_layers)]


def test_greedy_and_beams_equal_transformers_and_cached_decoding_equals_the_forward(generation_pair):
    hf, ours, cfg = generation_pair
    inputs = prompts(cfg)
    got = generate(ours, **inputs, max_new_tokens=16)
    assert until_eos(got) == until_eos(hf_generate(hf, inputs, max_new_tokens=16, do_sample=False))
    rows = until_eos(got)
    assert any(row[-1] == EOS for row in rows) and len({t for row in rows for t in row}) > 6
    beams = generate(ours, **inputs, max_new_tokens=10, num_beams=2)
    assert until_eos(beams) == until_eos(hf_generate(hf, inputs, max_new_tokens=10, num_beams=2, do_sample=False))
    for rows_of in (slice(None), slice(1, 2)):  # every decode step, batched and batch 1, against the forward
        assert_cached_decoding_equals_forward(ours, {k: v[rows_of] for k, v in inputs.items()}, steps=6)


def test_router_losses_and_every_gradient_equal_transformers(pair):
    """The load-balancing loss equals transformers' load_balancing_loss_func on the same router logits and
    mask; the whole training loss (suffix + 0.3 x balance + 0.05 x z) and every gradient equal the reference's."""
    hf, ours, cfg = pair
    t = ours.config.text_config
    ours.config.text_config = replace(t, router_aux_loss_coef=0.3, router_z_loss_coef=0.05)
    try:
        inputs = with_labels(batch(cfg))
        recorded = record_router_logits(hf)
        hf.zero_grad(), ours.zero_grad()
        out = ours(**inputs)
        lm = hf(**inputs, position_ids=inputs["attention_mask"].cumsum(-1)).loss
    finally:
        ours.config.text_config = t
    E, k = t.num_local_experts, t.num_experts_per_tok
    balance = load_balancing_loss_func(tuple(recorded), E, k, inputs["attention_mask"])
    real = inputs["attention_mask"].reshape(-1).bool()
    z = torch.cat([torch.logsumexp(r[real], -1) ** 2 for r in recorded]).mean()
    torch.testing.assert_close(out.balance_loss, balance, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.z_loss, z, rtol=1e-6, atol=0)
    assert abs(load_balancing_loss_func(tuple(recorded), E, k) - balance) > 1e-4, "padding should matter here"
    reference = lm + 0.3 * balance + 0.05 * z
    torch.testing.assert_close(out.loss, reference, rtol=1e-6, atol=0)
    reference.backward()
    out.loss.backward()
    grads = {k: p.grad for k, p in ours.named_parameters()}
    largest = max(p.grad.abs().max().item() for p in hf.parameters())
    for name, p in hf.named_parameters():
        key = canonical_key(name)
        scale = max(p.grad.abs().max().item(), 1e-3 * largest)
        assert (grads[key] - p.grad).abs().max().item() <= 1e-5 * scale, f"gradient of {key} differs"
    assert len(grads) == len(dict(hf.named_parameters()))
    assert out.expert_counts.shape == (len(recorded), E) and out.expert_counts.sum(1).eq(real.sum() * k).all()


def test_router_losses_split_over_processes_add_up_to_the_whole():
    """With `reduce` (a sum over processes) each shard's losses are its share of the whole batch's: the shares
    add up to the one-process losses (DDP's average of the shards' gradients is then the one-process gradient)."""
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(12, 6, generator=g) for _ in range(3)]          # 3 layers, batch (2, 6)
    mask = (torch.rand(2, 6, generator=g) > 0.3).long()
    balance, z, counts = router_losses(logits, 2, mask)
    shards = [([x[6 * r:6 * r + 6] for x in logits], mask[r:r + 1]) for r in range(2)]
    stats = [router_losses(x, 2, m)[2] for x, m in shards], [m.sum() * 3 for _, m in shards]
    summed = {tuple(s[0].shape): s[0] + s[1] for s in stats}               # what an all-reduce returns
    shares = [router_losses(x, 2, m, reduce=lambda v: summed[tuple(v.shape)]) for x, m in shards]
    torch.testing.assert_close(shares[0][0] + shares[1][0], balance, rtol=1e-6, atol=0)
    torch.testing.assert_close(shares[0][1] + shares[1][1], z, rtol=1e-6, atol=0)
    torch.testing.assert_close(shares[0][2], counts)


def small_moe(experts=4, top_k=2, **kw):
    config = tiny_config(300, 299, 2, num_local_experts=experts, num_experts_per_tok=top_k, **kw)
    torch.manual_seed(0)
    model = PaliGemma(config).init_weights(0.2)
    return model.eval(), config


def test_grouped_gemm_dispatch_equals_the_expert_loop():
    """The one-GEMM path (CUDA bf16 uses it; torch's CPU kernel takes bf16 too) against the per-expert loop,
    forward and backward, with an expert that gets no row."""
    torch.manual_seed(0)
    experts = Experts(4, 32, 24).to(torch.bfloat16)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.2), experts.down_proj.normal_(0, 0.2)
    x = torch.randn(10, 32, dtype=torch.bfloat16)
    ids = torch.randint(0, 3, (10, 2))  # expert 3 unused
    weights = torch.rand(10, 2)
    grads = []
    for grouped in (False, True):
        experts.zero_grad()
        y = (dispatch(x, ids, weights, 4, grouped=experts._grouped) if grouped else experts(x, ids, weights))
        y.float().square().sum().backward()
        grads.append((y, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    assert grads[0][1][3].abs().max() == 0  # the unused expert's gradient exists, and is zero
    experts.float()  # fp32 weights, bf16 rows (autocast training): the weights are cast for the grouped GEMM
    torch.testing.assert_close(dispatch(x, ids, weights, 4, grouped=experts._grouped).float(), grads[0][0].float(),
                               rtol=2e-2, atol=2e-2)


def test_fast_experts_keep_the_grouped_gemm_off_the_cpu_decode_path(monkeypatch):
    """FastExperts takes its one-row kernels only for a CPU inference step's single row; any other single row (a
    GPU decode step, training) keeps Experts' grouped GEMM, which needs no host sync and can be graph-captured."""
    from nanopali.inference import cpu_kernels

    torch.manual_seed(0)
    experts = Experts(4, 32, 24).to(torch.bfloat16)
    fast = cpu_kernels.FastExperts(experts, cpu_kernels.PLAIN)
    calls = []
    real = cpu_kernels.grouped_experts
    monkeypatch.setattr(cpu_kernels, "grouped_experts", lambda *a: calls.append(1) or real(*a))
    x, ids, weights = torch.randn(1, 32, dtype=torch.bfloat16), torch.tensor([[0, 2]]), torch.rand(1, 2)
    with torch.no_grad():
        want = experts(x, ids, weights)
        fast(x, ids, weights)
    assert calls == [], "a CPU decode step's row takes the one-row kernels"
    monkeypatch.setattr(cpu_kernels, "_inference_cpu", lambda x: False)  # as on a GPU
    with torch.no_grad():
        torch.testing.assert_close(fast(x, ids, weights), want)
    assert calls == [1]


def test_upcycled_and_one_expert_models_equal_the_dense_model():
    torch.manual_seed(0)
    dense = PaliGemma(tiny_config(300, 299, 2)).init_weights(0.2).eval()
    inputs = batch(None)
    with torch.no_grad():
        ref = dense(**inputs).logits
        for experts, top_k in ((1, 1), (4, 2), (8, 3)):
            moe = upcycle(dense, experts, top_k, router_std=0.5).eval()
            assert {type(layer.mlp) for layer in moe.decoder.layers} == {SparseMoE}
            assert_close(moe(**inputs).logits, ref, rel=1e-6)
        with pytest.raises(ValueError, match="already has a mixture-of-experts decoder"):
            upcycle(moe, 8, 2)
        with pytest.raises(ValueError, match="--top-k 3 must be between 1 and --experts 2"):
            upcycle(dense, 2, 3)


def test_dense_configs_stay_dense_and_bad_moe_fields_are_errors():
    dense = tiny_config(300, 299, 2)
    assert not set(MOE_FIELDS) & set(dense.to_hf_dict()["text_config"])
    with torch.device("meta"):
        keys = PaliGemma(dense).state_dict().keys()
    assert not any("expert" in k or "mlp.gate." in k for k in keys)
    moe = tiny_config(300, 299, 2, num_local_experts=4, moe_layers=[1], shared_expert_intermediate_size=8)
    again = PaliGemmaConfig.from_hf_dict(json.loads(json.dumps(moe.to_hf_dict())))
    assert again.text_config == moe.text_config
    for fields, message in [
        (dict(num_local_experts=2, num_experts_per_tok=3), "num_experts_per_tok 3 exceeds num_local_experts 2"),
        (dict(num_local_experts=-1), "num_local_experts must be an integer >= 0"),
        (dict(num_local_experts=4, moe_layers=[0, 5]), r"moe_layers \[5\] are not layers"),
        (dict(moe_layers=[0]), "sets moe_layers but num_local_experts is 0"),
        (dict(num_local_experts=4, router_aux_loss_coef=-0.1), "router_aux_loss_coef must be a number >= 0"),
        (dict(num_local_experts=4, router_jitter_noise=1.5), "router_jitter_noise must be below 1"),
        (dict(num_local_experts=4, norm_topk_prob="yes"), "norm_topk_prob must be true or false"),
    ]:
        with pytest.raises(ConfigError, match=message):
            tiny_config(300, 299, 2, **fields)


def test_router_noise_is_training_only_and_checkpointing_keeps_the_gradients():
    model, config = small_moe(router_jitter_noise=0.2, router_noisy_topk=True, router_z_loss_coef=0.01)
    inputs = with_labels(batch(None))
    with torch.no_grad():
        a, b = model(**inputs).loss, model(**inputs).loss
        model.train()
        c = model(**inputs).loss
    assert a == b and c != a, "noise must change the routing in training mode only"
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.gradient_checkpointing(enabled)
        torch.manual_seed(1)
        model(**inputs).loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=0, atol=1e-6, msg=k)
    assert grads[0]["language_model.model.layers.0.mlp.noise.weight"].abs().max() > 0


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_cpu_kernels_and_quantization_take_the_experts(mode):
    """prepare() swaps Experts for FastExperts (int8 / int4 experts when quantized; the router stays float).
    Float: the same greedy tokens. Quantized: the experts compute exactly what their dequantized weights do, on
    many rows and on the one row of a decode step, and the model's logits stay close to bf16's."""
    from nanopali.inference.cpu_kernels import dequantize_int4

    model, config = small_moe(experts=4, top_k=2, shared_expert_intermediate_size=32)
    model = model.init_weights(0.1).to(torch.bfloat16)
    with torch.no_grad():  # small embeddings: varied greedy answers (test_generate)
        model.decoder.embed_tokens.weight.mul_(0.3)
    inputs = {**batch(None), "token_type_ids": torch.zeros(3, batch(None)["input_ids"].shape[1], dtype=torch.long)}
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    with torch.no_grad():
        want = model(**inputs).logits
    plain_tokens = generate(model, **inputs, max_new_tokens=8)
    float_experts = model.decoder.layers[0].mlp.experts
    runtime = prepare(model, quantize=mode)
    layer = model.decoder.layers[0].mlp
    assert {type(block.mlp.experts).__name__ for block in model.decoder.layers} == {"FastExperts"}
    assert layer.gate.weight.dtype == torch.bfloat16, "the router stays float"
    if mode is None:
        assert torch.equal(generate(model, **inputs, max_new_tokens=8, runtime=runtime), plain_tokens)
        return
    fast = layer.experts
    assert fast.gate_up_proj.dtype == (torch.int8 if mode == "int8" else torch.uint8)
    E, two_i, D = float_experts.gate_up_proj.shape
    if mode == "int8":
        gate_up = fast.gate_up_proj.float() * fast.gate_up_scale[..., None]
        down = fast.down_proj.float() * fast.down_scale[..., None]
    else:
        gate_up, down = (torch.stack([dequantize_int4(w, s, torch.float32) for w, s in zip(q, scales)])
                         for q, scales in ((fast.gate_up_proj, fast.gate_up_scale), (fast.down_proj, fast.down_scale)))
    reference = Experts(E, D, two_i // 2)
    reference.gate_up_proj.data, reference.down_proj.data = gate_up.bfloat16(), down.bfloat16()
    g = torch.Generator().manual_seed(0)
    for rows in (40, 1):
        x = torch.randn(rows, D, generator=g).bfloat16()
        ids, weights = torch.randint(0, E, (rows, 2), generator=g), torch.rand(rows, 2, generator=g)
        with torch.no_grad():
            got, ref = fast(x, ids, weights).float(), reference(x, ids, weights).float()
        assert (got - ref).abs().max() <= 0.02 * ref.abs().max(), f"{rows} rows"
    with torch.no_grad():
        got = model(**inputs).logits
    real = inputs["attention_mask"].bool()
    cos = torch.nn.functional.cosine_similarity(got[real].double(), want[real].double(), dim=-1)
    # a position whose routing the quantization noise flips (a near-tie of two experts) moves further: int8
    # keeps test_quantize's bound at 9 in 10 positions; int4's 16 levels move this small random model far more
    # (test_quantize: 0.98 after 21 dense layers), so only a sanity bound there (a wrong layout gives ~0)
    if mode == "int8":
        assert (cos >= 0.999).float().mean() >= 0.9, f"lowest cosine {cos.min():.4f}, median {cos.median():.4f}"
    else:
        assert cos.mean() >= 0.9, f"mean cosine {cos.mean():.4f}"


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_moe_quantized_as_read_equals_quantized_after_loading(mode, tmp_path):
    """load_quantized (nanopali.load's quantize=) on a mixture of experts: the fused expert weights quantized expert
    by expert as they are read, the shared expert's linears too, the routers left float: bit for bit what quantize()
    makes of the loaded float model."""
    from nanopali.inference.quantize import load_quantized, quantize

    model, _ = small_moe(experts=4, top_k=2, shared_expert_intermediate_size=32)
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    want = quantize(PaliGemma.from_pretrained(tmp_path, dtype=torch.bfloat16), mode)
    got = load_quantized(tmp_path, mode, dtype=torch.bfloat16)
    a, b = want.state_dict(), got.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    mlp = got.decoder.layers[0].mlp
    assert type(mlp.experts).__name__ == "FastExperts" and mlp.experts.down_proj.dtype in (torch.int8, torch.uint8)
    assert type(mlp.shared_expert.up_proj).__name__ in ("Int8Linear", "Int4Linear")
    assert mlp.gate.weight.dtype == mlp.shared_expert_gate.weight.dtype == torch.bfloat16, "the routers stay float"


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("moe-base"), num_local_experts=4, num_experts_per_tok=2,
                                 router_aux_loss_coef=0.1, router_z_loss_coef=0.01)


@pytest.fixture(scope="module")
def single(moe_checkpoint, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe-single") / "run"
    fit(TrainConfig(**options(moe_checkpoint, data, out, batch_size=4)))
    return out


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_train_the_weights_of_one_and_log_the_routing(moe_checkpoint, data, single, tmp_path, fsdp):
    """torchrun with 2 gloo processes (batch 2 each) against 1 process (batch 4): the same weights, losses
    (suffix and router) and gradient norms at every step, and the expert counts in metrics.jsonl and loss.png."""
    two = torchrun(tmp_path, options(moe_checkpoint, data, tmp_path / "two", fsdp=fsdp))
    assert_same_run(two, single)
    rows = metrics(single)
    for a, b in zip(rows, metrics(two), strict=True):
        for key in ("router_balance_loss", "router_z_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), f"step {a['step']}: {key}"
        assert a["expert_counts"] == b["expert_counts"]
    counts = torch.tensor(rows[0]["expert_counts"])  # (sparse layers, experts): each real token twice per layer
    assert counts.shape == (2, 4) and (counts.sum(1) == counts.sum(1)[0]).all() and counts.sum(1)[0] % 2 == 0
    assert 1.0 < rows[0]["router_balance_loss"] < 4.0 and rows[0]["router_z_loss"] > 0
    assert (single / "loss.png").stat().st_size > 1000


def test_upcycle_command_writes_a_checkpoint_with_the_dense_logits(base, tmp_path, capsys):
    out = tmp_path / "moe"
    assert cli.main(["upcycle", str(base), str(out), "--experts", "4", "--top-k", "2", "--noise", "0.01"]) == 0
    dense, moe = PaliGemma.from_pretrained(base).eval(), PaliGemma.from_pretrained(out).eval()
    assert moe.config.text_config.router_jitter_noise == 0.01 and (out / "tokenizer.model").is_file()
    processor = Processor.from_pretrained(out)
    inputs = processor(images=[torch.zeros(3, 28, 28)], prompts=["caption en"])
    with torch.no_grad():
        assert_close(moe(**inputs).logits, dense(**inputs).logits, rel=1e-6)
    capsys.readouterr()
    assert cli.main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    experts = sum(p.numel() for name, p in moe.named_parameters() if ".experts." in name)
    assert info["parameters"] == sum(p.numel() for p in moe.parameters())
    assert info["active_parameters"] == info["parameters"] - experts // 2 and info["experts"].startswith("4 per")
    assert cli.main(["upcycle", str(base), str(out)]) == 2
    assert cli.main(["upcycle", str(out), str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert "is not an empty directory" in err and "already has a mixture-of-experts decoder" in err


def test_the_moe_name_says_that_no_moe_model_ships_and_loads_one_that_does(base, tmp_path, capsys, monkeypatch):
    """`--model moe` names the shipped mixture-of-experts model: where there is none (as in this repository:
    BENCHMARKS.md says why) one error line that says how to make one; where there is one, that model."""
    from nanopali import load, paths
    folder = tmp_path / "moe_model"
    monkeypatch.setitem(paths.NAMED, "moe", folder)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["caption", "image.png", "--model", "moe"]) == 2
    err = capsys.readouterr().err
    assert "no 'moe' model ships with this nanopali" in err and "scripts/make_moe_model.py" in err
    assert len(err.strip().splitlines()) == 1
    upcycle(PaliGemma.from_pretrained(base), 4, 2).save_pretrained(folder)
    Processor.from_pretrained(base).save_pretrained(folder)
    assert load("moe").model_dir == folder


def test_the_world_runs_paired_sign_tests_and_shipping_condition(tmp_path):
    """recipe/moe.py's paired comparison: per-task win/loss counts over the same (scene, prompt) examples, the sign
    test equal to scipy's exact binomial test, and the condition decided before scoring."""
    stats = pytest.importorskip("scipy.stats")
    from nanopali.world.recipe.moe import paired, passes_rule, sign_test
    for wins, losses in ((0, 0), (6, 4), (514, 420), (0, 9), (124, 153)):
        expected = stats.binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0
        assert sign_test(wins, losses) == pytest.approx(expected, rel=1e-9)
    scores = {"moe": [1, 1, 1, 0, 0.5, 1], "dense": [0, 0, 1, 1, 0.25, 1]}
    tasks = ["vqa/how many", "vqa/where", "caption", "caption", "segment", "ocr"]
    for kind, values in scores.items():
        records = [{"scene": i, "prefix": f"p{i}", "task": task, "score": value}
                   for i, (task, value) in enumerate(zip(tasks, values))]
        (tmp_path / f"records-x-{kind}.json").write_text(json.dumps(records))
    tests = paired(tmp_path, "x")
    assert {task: counts[:2] for task, counts in tests.items()} == {
        "caption": (0, 1), "ocr": (0, 0), "segment": (1, 0), "vqa": (2, 0), "vqa/how many": (1, 0), "vqa/where": (1, 0)}
    assert tests["vqa"][2] == sign_test(2, 0) == 0.5 and not passes_rule(tests)
    assert passes_rule({"vqa": (30, 10, 0.002), "detect": (5, 9, 0.4)})
    assert not passes_rule({"vqa": (30, 10, 0.002), "detect": (5, 30, 1e-5)})  # worse somewhere: refused
    assert not passes_rule({"vqa": (10, 30, 0.002)})                             # significant, the wrong way
    one = [{"scene": 0, "prefix": "p0", "task": "ocr", "score": 1}]
    (tmp_path / "records-x-dense.json").write_text(json.dumps(one))
    with pytest.raises(ValueError, match="not scored on the same examples"):
        paired(tmp_path, "x")
