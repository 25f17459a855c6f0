"""Bad devices, dtypes, model paths, config.json files, checkpoints and wide-range images: one clear error each.

Issue 20's probe as a table: every API row asserts the nanopali error class and its message, every CLI row
(`nanopali.cli.main` in this process) exit status 2 and exactly one `nanopali: error:` line naming the problem,
with no traceback. The last rows show that the valid neighbours of those inputs still work.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_checkpoint import write_tiny_checkpoint

import nanopali
from nanopali import PaliGemma, PaliGemmaConfig
from nanopali.cli import main
from nanopali.devices import resolve_device, resolve_dtype
from nanopali.errors import CheckpointError, ConfigError, ImageError, MissingFileError, NanopaliError, UsageError
from nanopali.inputs.images import load_image
from nanopali.io.hf_checkpoint import load_state_dict, tensor_specs

NO_GPU = not torch.cuda.is_available()
needs_no_gpu = pytest.mark.skipif(not NO_GPU, reason="the no-GPU error needs a machine without a CUDA GPU")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), generation=1)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(path)
    return path


def variant(model: Path, tmp_path: Path, config=None, edit=None, weights: bytes | None = None) -> Path:
    """A copy of the tiny checkpoint with config.json replaced (`config`: raw text), edited (`edit(dict)`), or the
    weights replaced by `weights`."""
    folder = tmp_path / "variant"
    shutil.copytree(model, folder)
    if config is not None:
        (folder / "config.json").write_bytes(config if isinstance(config, bytes) else config.encode())
    if edit is not None:
        d = json.loads((folder / "config.json").read_text())
        edit(d)
        (folder / "config.json").write_text(json.dumps(d))
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


def truncated(model: Path) -> bytes:
    data = (model / "model.safetensors").read_bytes()
    return data[: len(data) // 2]


def setter(section: str | None, key: str, value):
    def edit(d):
        (d[section] if section else d)[key] = value
    return edit


def mismatched(d):  # a valid config whose decoder MLP is narrower than the tensors in the file
    d["text_config"]["intermediate_size"] = 80


# ---------------------------------------------------------------------------------------------------- the API

MISSING = "/nonexistent/model"  # device and dtype rows use it: they must fail before any file is looked at

API_ROWS = [
    # (id, call(model, tmp_path), error class, message regex)
    pytest.param(lambda m, t: nanopali.load(MISSING, device="cuda"), UsageError,
                 r"--device cuda: no CUDA GPU is visible to torch \(torch.cuda.is_available\(\) is False\)",
                 id="load device=cuda without a GPU", marks=needs_no_gpu),
    pytest.param(lambda m, t: PaliGemma.from_pretrained(MISSING, device="cuda"), UsageError, "no CUDA GPU is visible",
                 id="from_pretrained device=cuda without a GPU", marks=needs_no_gpu),
    pytest.param(lambda m, t: PaliGemma.from_pretrained(MISSING, device=torch.device("cuda", 3)), UsageError,
                 "cuda:3", id="from_pretrained device=cuda:3", marks=needs_no_gpu),
    pytest.param(lambda m, t: nanopali.load(MISSING, device="bogus"), UsageError,
                 r"'bogus' is not a device; use cpu, cuda, cuda:N, mps or auto", id="load device=bogus"),
    pytest.param(lambda m, t: load_state_dict(m, device="bogus"), UsageError, "'bogus' is not a device",
                 id="load_state_dict device=bogus is not blamed on the file"),
    pytest.param(lambda m, t: PaliGemma.from_pretrained(MISSING, device="meta"), UsageError, "not on 'meta'",
                 id="device=meta"),
    pytest.param(lambda m, t: PaliGemma.from_pretrained(MISSING, device=3.5), UsageError,
                 "device must be a string or a torch.device", id="device=3.5"),
    pytest.param(lambda m, t: PaliGemma.from_pretrained(MISSING, dtype="bfloat17"), UsageError,
                 "'bfloat17' is not a dtype nanopali loads weights in; use float32, bfloat16, float16",
                 id="dtype=bfloat17"),
    pytest.param(lambda m, t: nanopali.load(MISSING, dtype=torch.int8), UsageError,
                 r"torch.int8 cannot hold the weights.*quantize='int8'", id="dtype=torch.int8"),
    pytest.param(lambda m, t: PaliGemma.from_pretrained(MISSING, dtype=16), UsageError,
                 "dtype must be a torch.dtype or its name", id="dtype=16"),
    pytest.param(lambda m, t: PaliGemma.from_pretrained(m / "model.safetensors"), CheckpointError,
                 r"model.safetensors is a file; a model is a checkpoint directory .*pass the folder",
                 id="from_pretrained of a file"),
    pytest.param(lambda m, t: nanopali.load(m / "config.json"), CheckpointError, "config.json is a file",
                 id="load of config.json"),
    pytest.param(lambda m, t: nanopali.load(t / "nothing-here"), MissingFileError,
                 "checkpoint directory .*nothing-here does not exist", id="load of a missing directory"),
    pytest.param(lambda m, t: PaliGemma.from_pretrained(variant(m, t, weights=truncated(m))), CheckpointError,
                 "model.safetensors: cannot read safetensors file .*truncated or corrupt", id="truncated weights"),
    pytest.param(lambda m, t: tensor_specs(variant(m, t, weights=b"not a safetensors file")), CheckpointError,
                 "truncated or corrupt", id="tensor_specs of a garbage file"),
    pytest.param(lambda m, t: PaliGemma.from_pretrained(variant(m, t, edit=mismatched)), CheckpointError,
                 r"does not fit the model:\n  shape mismatches", id="weights that do not match config.json"),
]

CONFIG_ROWS = [
    # (id, raw config.json text or an edit of the tiny one, message regex)
    ("null", "null", r"config.json: config.json must hold a JSON object, found null"),
    ("a list", "[1, 2]", "must hold a JSON object, found a list"),
    ("a number", "3", "found a number"),
    ("a string", '"paligemma"', "found a string"),
    ("not UTF-8", b"\xff\xfe\x00binary", "not a JSON text file"),
    ("not JSON", "{model_type: paligemma", "not valid JSON"),
    ("negative hidden_size", setter("text_config", "hidden_size", -64),
     r"text_config.hidden_size must be a positive integer, got -64"),
    ("zero layers", setter("text_config", "num_hidden_layers", 0), "text_config.num_hidden_layers must be a positive integer, got 0"),
    ("zero heads", setter("text_config", "num_attention_heads", 0), "text_config.num_attention_heads must be a positive integer"),
    ("zero kv heads", setter("text_config", "num_key_value_heads", 0), "text_config.num_key_value_heads must be"),
    ("negative vocab_size", setter("text_config", "vocab_size", -5), "text_config.vocab_size must be a positive integer"),
    ("negative head_dim", setter("text_config", "head_dim", -16), "text_config.head_dim must be a positive integer"),
    ("fractional intermediate_size", setter("text_config", "intermediate_size", 95.5),
     "text_config.intermediate_size must be a positive integer, got 95.5"),
    ("string max_position_embeddings", setter("text_config", "max_position_embeddings", "8k"),
     "max_position_embeddings must be a positive integer, got '8k'"),
    ("boolean layers", setter("text_config", "num_hidden_layers", True), "num_hidden_layers must be a positive integer, got True"),
    ("null hidden_size", setter("text_config", "hidden_size", None), "hidden_size must be a positive integer, got None"),
    ("negative rms_norm_eps", setter("text_config", "rms_norm_eps", -1e-6), "text_config.rms_norm_eps must be a positive number"),
    ("string rope_theta", setter("text_config", "rope_parameters", {"rope_type": "default", "rope_theta": "big"}),
     "text_config.rope_theta must be a positive number, got 'big'"),
    ("rope_parameters a list", setter("text_config", "rope_parameters", [10000]), "rope_parameters must be an object, found a list"),
    ("eos outside the vocabulary", setter("text_config", "eos_token_id", 10**6), r"eos_token_id must be a token id in 0\.\."),
    ("negative image_size", setter("vision_config", "image_size", -28), "vision_config.image_size must be a positive integer, got -28"),
    ("zero patch_size", setter("vision_config", "patch_size", 0), "vision_config.patch_size must be a positive integer"),
    ("zero vision heads", setter("vision_config", "num_attention_heads", 0), "vision_config.num_attention_heads must be"),
    ("one channel", setter("vision_config", "num_channels", 1), "num_channels is 1; PaliGemma takes RGB images"),
    ("zero layer_norm_eps", setter("vision_config", "layer_norm_eps", 0), "vision_config.layer_norm_eps must be a positive number"),
    ("negative image_token_index", setter(None, "image_token_index", -1), "image_token_index must be a token id"),
    ("text_config a list", setter(None, "text_config", []), "missing the text_config section"),
]

IMAGE_ROWS = [
    # (id, image, message regex): pixels outside the range their type implies
    ("float PIL F 0..255", Image.fromarray(np.full((8, 8), 128.0, np.float32)),
     r"mode F image has values in \[128.0, 128.0\]; float images must be in \[0, 1\]"),
    ("float numpy 0..255", np.full((8, 8, 3), 128.0), r"float image array has values in \[128.0, 128.0\]"),
    ("float tensor with NaN", torch.tensor([[[0.5, float("nan")]]]), "1 NaN or infinite values"),
    ("int32 PIL I over 255", Image.fromarray(np.full((8, 8), 1000, np.int32)), r"mode I image of int32 .*pass 16-bit pixels as uint16"),
    ("int64 tensor negative", torch.full((3, 8, 8), -1), r"int64 has values in \[-1, -1\]"),
]


@pytest.mark.parametrize("call, error, message", API_ROWS)
def test_api_errors(model, tmp_path, call, error, message):
    with pytest.raises(error, match=message) as caught:
        call(model, tmp_path)
    assert isinstance(caught.value, NanopaliError)


@pytest.mark.parametrize("config, message", [row[1:] for row in CONFIG_ROWS], ids=[row[0] for row in CONFIG_ROWS])
def test_bad_config_json(model, tmp_path, config, message):
    folder = variant(model, tmp_path, **({"edit": config} if callable(config) else {"config": config}))
    with pytest.raises(ConfigError, match=message):
        PaliGemmaConfig.from_pretrained(folder)
    with pytest.raises(ConfigError, match=message):
        PaliGemma.from_pretrained(folder)


@pytest.mark.parametrize("image, message", [row[1:] for row in IMAGE_ROWS], ids=[row[0] for row in IMAGE_ROWS])
def test_bad_pixel_ranges(image, message):
    with pytest.raises(ImageError, match=message):
        load_image(image)


# ---------------------------------------------------------------------------------------------------- the CLI

CLI_ROWS = [
    # (id, argv with {model} {image} {file} {variant} placeholders, how to build {variant}, message regex)
    pytest.param(["caption", "{image}", "--model", "{model}", "--device", "cuda"], None,
                 r"--device cuda: no CUDA GPU is visible to torch", id="caption --device cuda", marks=needs_no_gpu),
    pytest.param(["caption", "{image}", "--model", "{model}", "--device", "cuda:1"], None,
                 r"--device cuda:1: no CUDA GPU", id="caption --device cuda:1", marks=needs_no_gpu),
    pytest.param(["caption", "{image}", "--model", "{model}", "--device", "bogus"], None,
                 r"--device 'bogus' is not a device; use cpu, cuda, cuda:N, mps or auto", id="caption --device bogus"),
    pytest.param(["detect", "{image}", "cat", "--model", "{model}", "--device", "gpu"], None,
                 "'gpu' is not a device", id="detect --device gpu"),
    pytest.param(["caption", "{image}", "--model", "{model}/model.safetensors"], None,
                 "model.safetensors is a file; a model is a checkpoint directory", id="caption --model FILE"),
    pytest.param(["caption", "{image}", "--model", "{model}/tokenizer.model"], None, "tokenizer.model is a file",
                 id="caption --model tokenizer.model"),
    pytest.param(["info", "{model}/config.json"], None, "config.json is a file", id="info FILE"),
    pytest.param(["info", "{variant}"], dict(weights="truncated"), "cannot read safetensors file .*truncated or corrupt",
                 id="info truncated weights"),
    pytest.param(["caption", "{image}", "--model", "{variant}"], dict(weights="truncated"),
                 "cannot read safetensors file .*truncated or corrupt", id="caption truncated weights"),
    pytest.param(["info", "{variant}"], dict(weights=b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}"),
                 "truncated or corrupt", id="info garbage weights"),
    pytest.param(["info", "{variant}"], dict(edit=mismatched), r"does not fit the model:\n  shape mismatches",
                 id="info weights that do not match config.json"),
    pytest.param(["info", "{variant}"], dict(config="null"), "must hold a JSON object, found null", id="info config null"),
    pytest.param(["caption", "{image}", "--model", "{variant}"], dict(config="null"),
                 "must hold a JSON object, found null", id="caption config null"),
    pytest.param(["caption", "{image}", "--model", "{variant}"], dict(config="[]"), "found a list", id="caption config list"),
    pytest.param(["caption", "{image}", "--model", "{variant}"], dict(edit=setter("text_config", "hidden_size", -64)),
                 "text_config.hidden_size must be a positive integer, got -64", id="caption negative hidden_size"),
    pytest.param(["info", "{variant}"], dict(edit=setter("vision_config", "patch_size", 0)),
                 "vision_config.patch_size must be a positive integer, got 0", id="info zero patch_size"),
    pytest.param(["caption", "{file}", "--model", "{model}"], None, r"float images must be in \[0, 1\]",
                 id="caption float TIFF 0..255"),
]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv, build, message", CLI_ROWS)
def test_cli_errors(model, image, tmp_path, capsys, argv, build, message):
    float_tiff = tmp_path / "float.tiff"
    Image.fromarray(np.full((20, 20), 200.0, np.float32)).save(float_tiff)
    build = dict(build or {})
    if build.get("weights") == "truncated":
        build["weights"] = truncated(model)
    folder = variant(model, tmp_path, **build) if build else None
    code, out, err = run_cli([a.format(model=model, image=image, file=float_tiff, variant=folder) for a in argv], capsys)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("nanopali: error:")]
    assert len(lines) == 1 and err.startswith("nanopali: error:"), err
    assert re.search(message, err), err


# ---------------------------------------------------------------------------------------------------- still works

@pytest.mark.parametrize("given, expected", [
    ("cpu", torch.device("cpu")), (torch.device("cpu"), torch.device("cpu")), (" CPU ", torch.device("cpu")),
    (None, torch.device("cpu")), ("auto", torch.device("cuda", 0) if not NO_GPU else torch.device("cpu")),
], ids=["cpu", "torch.device", "spaced upper case", "None", "auto"])
def test_valid_devices(given, expected):
    assert resolve_device(given) == expected


@pytest.mark.parametrize("given, expected", [
    ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), ("float32", torch.float32), ("fp32", torch.float32),
    ("torch.float16", torch.float16), ("half", torch.float16), (torch.bfloat16, torch.bfloat16),
    (torch.float64, torch.float64),
], ids=lambda v: str(v))
def test_valid_dtypes(given, expected):
    assert resolve_dtype(given) is expected


@pytest.mark.parametrize("dtype", ["bfloat16", "bf16", torch.float16], ids=str)
def test_a_named_dtype_loads(model, dtype):
    loaded = PaliGemma.from_pretrained(model, dtype=dtype)
    assert {p.dtype for p in loaded.parameters()} == {resolve_dtype(dtype)}


def test_the_pipeline_takes_named_dtypes_and_a_device_object(model):
    pali = nanopali.load(model, dtype="bf16", device=torch.device("cpu"))
    assert next(pali.model.parameters()).dtype == torch.bfloat16


def test_sixteen_bit_images_caption_like_their_eight_bit_version(model, tmp_path, capsys):
    rng = np.random.default_rng(2)
    eight = rng.integers(0, 256, (30, 40), dtype=np.uint8)
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "gray16.png")  # mode I;16, the same picture
    Image.fromarray(eight).save(tmp_path / "gray8.png")
    assert Image.open(tmp_path / "gray16.png").mode == "I;16"
    pali = nanopali.load(model)
    answers = {name: pali.caption(str(tmp_path / name), max_new_tokens=4) for name in ("gray16.png", "gray8.png")}
    assert answers["gray16.png"] == answers["gray8.png"]
    unit = io.BytesIO()
    Image.fromarray(eight.astype(np.float32) / 255).save(unit, format="TIFF")  # a float TIFF in [0, 1]
    assert pali.caption(unit.getvalue(), max_new_tokens=4) == answers["gray8.png"]
    args = ["caption", tmp_path / "gray16.png", "--model", model, "--dtype", "float32", "--max-new-tokens", "4"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert out.strip() == answers["gray8.png"].strip()


def test_info_reads_the_real_tensors_and_the_tokenizer(model, capsys):
    code, out, err = run_cli(["info", model, "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    loaded = PaliGemma.from_pretrained(model)
    assert info["parameters"] == sum(p.numel() for p in loaded.parameters())
    assert info["tensors"] == len(loaded.state_dict()) and info["dtypes"] == ["F32"]
    assert info["tokenizer_vocab"] == len(nanopali.Processor.from_pretrained(model).tokenizer) <= info["vocab_rows"]
    assert info["vqvae"] is None
    code, out, err = run_cli(["info", model], capsys)
    assert code == 0 and "tokenizer_vocab" in out and "vqvae" in out, err
