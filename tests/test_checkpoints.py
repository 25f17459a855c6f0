"""Checkpoint loading and saving: transformers round trip, key spellings, dtypes and bad files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_reference import batch, hf_config, hf_logits, hf_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PaliGemmaForConditionalGeneration

from nanopali import CheckpointError, ConfigError, PaliGemma

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny PaliGemma 2 saved by transformers (5.x key spelling) and its reference model."""
    hf = hf_model(hf_config(2, 2))
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    return hf, path


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


def copy_checkpoint(src: Path, dst: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(read_tensors(src) if tensors is None else tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_save_then_transformers_loads_equal_logits(saved, tmp_path):
    hf, path = saved
    ours = PaliGemma.from_pretrained(path)
    ours.save_pretrained(tmp_path / "out", max_shard_size="100KB")
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1, "expected a sharded save"
    reloaded = PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    inputs = batch(hf_config(2, 2))
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(hf_logits(reloaded, inputs)[valid], hf_logits(hf, inputs)[valid], rtol=0, atol=1e-5)
    again = PaliGemma.from_pretrained(tmp_path / "out")
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_all_key_spellings_load_identical_tensors(saved, tmp_path):
    _, path = saved
    v5 = read_tensors(path)  # transformers 5.x save: vision_tower.*, language_model.model.*
    embed = v5["language_model.model.embed_tokens.weight"]
    hub = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): t for k, t in v5.items()}
    hub["language_model.lm_head.weight"] = embed.clone()
    memory = {}
    for k, t in v5.items():
        k = k.replace("language_model.model.", "language_model.", 1)
        memory["model." + k] = t
    memory["lm_head.weight"] = embed.clone()
    memory["model.vision_tower.embeddings.position_ids"] = torch.arange(16)[None]
    models = [PaliGemma.from_pretrained(copy_checkpoint(path, tmp_path / name, tensors))
              for name, tensors in (("v5", v5), ("hub", hub), ("memory", memory))]
    reference = models[0].state_dict()
    for model in models[1:]:
        state = model.state_dict()
        assert state.keys() == reference.keys()
        for k in reference:
            assert torch.equal(state[k], reference[k]), k
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in reference


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load_has_no_fp32_copy(saved, dtype):
    hf, path = saved
    model = PaliGemma.from_pretrained(path, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    inputs = batch(hf_config(2, 2))
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    ref = hf_logits(hf, inputs)
    valid = inputs["attention_mask"].bool()
    # half precision through 3 layers with soft-caps: loose, but far below the logit scale
    assert (logits[valid] - ref[valid]).abs().max() < 0.05 * ref.abs().max()


# ---------------------------------------------------------------------------------- bad checkpoints

def test_missing_config(saved, tmp_path):
    _, path = saved
    copy_checkpoint(path, tmp_path / "c")
    (tmp_path / "c" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        PaliGemma.from_pretrained(tmp_path / "c")


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json in|does not exist"):
        PaliGemma.from_pretrained(tmp_path / "nope")


def test_no_weights(saved, tmp_path):
    _, path = saved
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        PaliGemma.from_pretrained(tmp_path / "c")


def test_truncated_safetensors(saved, tmp_path):
    _, path = saved
    c = copy_checkpoint(path, tmp_path / "c")
    data = (c / "model.safetensors").read_bytes()
    (c / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read .*truncated"):
        PaliGemma.from_pretrained(c)


def test_missing_shard(saved, tmp_path):
    _, path = saved
    PaliGemma.from_pretrained(path).save_pretrained(tmp_path / "c", max_shard_size="100KB")
    shards = sorted((tmp_path / "c").glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"lists shards that are missing.*{shards[-1].name}"):
        PaliGemma.from_pretrained(tmp_path / "c")


def test_wrong_shape_missing_and_unexpected_tensors(saved, tmp_path):
    _, path = saved
    tensors = read_tensors(path)
    tensors["multi_modal_projector.linear.weight"] = torch.zeros(3, 3)
    del tensors["language_model.model.norm.weight"]
    tensors["language_model.model.extra.weight"] = torch.zeros(1)
    c = copy_checkpoint(path, tmp_path / "c", tensors)
    with pytest.raises(CheckpointError) as err:
        PaliGemma.from_pretrained(c)
    msg = str(err.value)
    assert "missing tensors (1)" in msg and "language_model.model.norm.weight" in msg
    assert "unexpected tensors (1)" in msg and "language_model.model.extra.weight" in msg
    assert "multi_modal_projector.linear.weight: file (3, 3) vs config (64, 32)" in msg


def test_config_that_does_not_match_the_weights(saved, tmp_path):
    _, path = saved
    c = copy_checkpoint(path, tmp_path / "c")
    cfg = json.loads((c / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 128
    (c / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape mismatches \(does config.json match the weights\?\) \(9\)"):
        PaliGemma.from_pretrained(c)


def test_config_not_json(saved, tmp_path):
    _, path = saved
    c = copy_checkpoint(path, tmp_path / "c")
    (c / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        PaliGemma.from_pretrained(c)


def test_random_checkpoint_script_writes_a_loadable_bf16_checkpoint(saved, tmp_path):
    _, path = saved
    out = tmp_path / "random"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_random_checkpoint.py"), "--config", str(path),
                    "--out", str(out), "--dtype", "bfloat16"], check=True, capture_output=True)
    model = PaliGemma.from_pretrained(out, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
