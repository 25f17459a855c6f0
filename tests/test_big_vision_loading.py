"""big_vision .npz files through every door (PaliGemma, nanopali.load, the CLI, Processor.from_config) and every
bad file: one clear error each, naming the file and the problem.

The rows follow tests/test_loading_hardening.py: an API row asserts the nanopali error class and its message, a
CLI row exit status 2 and one `nanopali: error:` line. The good paths check that an npz loads to the same
answers as the checkpoint directory it was written from.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import _spm
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_checkpoint import write_tiny_checkpoint

import nanopali
from nanopali import PaliGemma, PaliGemmaConfig, Processor, Tokenizer
from nanopali.cli import main
from nanopali.errors import CheckpointError, ConfigError, MissingFileError, NanopaliError, UsageError
from nanopali.io import big_vision

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
PG1, PG2 = FIXTURES / "bigvision" / "pg1-tiny", FIXTURES / "bigvision" / "pg2-tiny"
VAE = FIXTURES / "vqvae" / "vae-random.npz"


def rewritten(src: Path, dst: Path, edit) -> Path:
    """A copy of the npz `src` whose {name: bytes} members went through `edit` (which may add, drop or change)."""
    with zipfile.ZipFile(src) as z:
        members = {name: z.read(name) for name in z.namelist()}
    edit(members)
    with zipfile.ZipFile(dst, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return dst


def npy(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def drop(key):
    return lambda m: m.pop(f"params/{key}.npy")


def put(key, array):
    return lambda m: m.__setitem__(f"params/{key}.npy", npy(array))


def truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) * 2 // 3])
    return dst


def flipped(src: Path, dst: Path) -> Path:
    """A deflated copy with one byte of compressed data changed: zipfile's CRC (or zlib) notices."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as out:
        for name in z.namelist():
            out.writestr(name, z.read(name))
    data = bytearray(dst.read_bytes())
    with zipfile.ZipFile(dst) as z:
        info = z.getinfo("params/llm/embedder/input_embedding.npy")
    data[info.header_offset + 30 + len(info.filename) + info.compress_size * 3 // 4] ^= 0xFF
    dst.write_bytes(bytes(data))
    return dst


def unstacked(m):  # the ViT's layers as separate keys (flax without nn.scan): not the released layout
    key = "params/img/Transformer/encoderblock/LayerNorm_0/scale.npy"
    m["params/img/Transformer/encoderblock_0/LayerNorm_0/scale.npy"] = m.pop(key)


CFG1 = str(PG1 / "config.json")

# (id, make(tmp) -> npz path, config, error class, message regex)
BAD_FILES = [
    ("missing key", lambda t: rewritten(PG1 / "params.npz", t / "x.npz", drop("llm/final_norm/scale")), CFG1,
     CheckpointError, r"x\.npz does not fit the model:\n  missing tensors \(1\):\n    llm/final_norm/scale"),
    ("unexpected key", lambda t: rewritten(PG1 / "params.npz", t / "x.npz", put("llm/extra/w", np.zeros(3, np.float32))),
     CFG1, CheckpointError, r"x\.npz does not fit the model:\n  unexpected tensors \(1\):\n    llm/extra/w"),
    ("wrong shape", lambda t: rewritten(PG1 / "params.npz", t / "x.npz", put("img/head/kernel", np.zeros((32, 60), np.float32))),
     CFG1, CheckpointError, r"shape mismatches \(does the config match the weights\?\) \(1\):\n    img/head/kernel: file \(32, 60\) vs config \(32, 64\)"),
    ("truncated", lambda t: truncated(PG1 / "params.npz", t / "x.npz"), CFG1, CheckpointError,
     r"x\.npz: not a readable \.npz file \(.*\); is it truncated or corrupt\?"),
    ("corrupt data (CRC)", lambda t: flipped(PG1 / "params.npz", t / "x.npz"), CFG1, CheckpointError,
     r"x\.npz: cannot read the array 'llm/embedder/input_embedding' \(.*\); is the file truncated or corrupt\?"),
    ("not a zip", lambda t: (t / "x.npz").write_bytes(b"\x93NUMPY not a zip") and t / "x.npz", CFG1, CheckpointError,
     r"x\.npz: not a readable \.npz file"),
    ("a zip of other files", lambda t: rewritten(PG1 / "params.npz", t / "x.npz", lambda m: m.__setitem__("notes.txt", b"hi")),
     CFG1, CheckpointError, r"x\.npz: holds 'notes\.txt', which is not a \.npy array"),
    ("the mask VQ-VAE", lambda t: shutil.copy(VAE, t / "vae-oid.npz") and t / "vae-oid.npz", CFG1, CheckpointError,
     r"vae-oid\.npz is not a big_vision PaliGemma checkpoint: none of its \d+ arrays is under img/ or llm/ .*mask VQ-VAE"),
    ("integer weights", lambda t: rewritten(PG1 / "params.npz", t / "x.npz", put("llm/final_norm/scale", np.zeros(64, np.int32))),
     CFG1, CheckpointError, r"x\.npz: arrays that are not floating-point weights .*llm/final_norm/scale: <i4"),
    ("header and data disagree", lambda t: rewritten(PG1 / "params.npz", t / "x.npz", lambda m: m.__setitem__(
        "params/llm/final_norm/scale.npy", m["params/llm/final_norm/scale.npy"][:-8])), CFG1, CheckpointError,
     r"the array 'llm/final_norm/scale' holds 248 bytes but its \.npy header describes 256"),
    ("per-layer keys", lambda t: rewritten(PG1 / "params.npz", t / "x.npz", unstacked), CFG1, CheckpointError,
     r"encoderblock_0/LayerNorm_0/scale.*this reader takes the released layout, whose layers are stacked"),
    ("a config of another model", lambda t: PG1 / "params.npz", str(PG2 / "config.json"), CheckpointError,
     r"params\.npz does not fit the model:\n  missing tensors \(2\):\n    llm/layers/post_attention_norm/scale"),
    ("a published size that is not this file's", lambda t: PG1 / "params.npz", "paligemma-3b-224", CheckpointError,
     r"img/embedding/kernel: file \(14, 14, 3, 32\) vs config \(14, 14, 3, 1152\)"),
    ("more embedding rows than the config", lambda t: PG1 / "params.npz",
     PaliGemmaConfig.from_pretrained(PG1).replace(vocab_size=1100), CheckpointError,
     r"llm/embedder/input_embedding: file \(1200, 64\) vs config \(1100, 64\)"),
    ("no such file", lambda t: t / "nothing.npz", CFG1, MissingFileError, r"big_vision checkpoint .*nothing\.npz does not exist"),
    ("no config", lambda t: PG1 / "params.npz", None, UsageError, r"a big_vision \.npz does not say its sizes: pass config="),
    ("an unknown size", lambda t: PG1 / "params.npz", "paligemma-3b", ConfigError,
     r"unknown config 'paligemma-3b': give a published size \(paligemma-3b-224, .*\), the path of a config\.json"),
    ("a config file that is not there", lambda t: PG1 / "params.npz", "configs/pg.json", MissingFileError,
     r"config file configs/pg\.json does not exist"),
]


@pytest.mark.parametrize("make, config, error, message", [r[1:] for r in BAD_FILES], ids=[r[0] for r in BAD_FILES])
def test_bad_files(tmp_path, make, config, error, message):
    path = make(tmp_path)
    for load in (lambda: PaliGemma.from_big_vision(path, config), lambda: PaliGemma.from_pretrained(path, config=config)):
        with pytest.raises(error, match=message) as caught:
            load()
        assert isinstance(caught.value, NanopaliError)


def test_config_is_only_for_npz_files():
    with pytest.raises(UsageError, match="config= is for big_vision .npz files; .* is a checkpoint directory"):
        PaliGemma.from_pretrained(PG1, config="paligemma-3b-224")


# ---------------------------------------------------------------------------------------------- the other layouts

def test_a_fortran_ordered_npz_loads_the_same(tmp_path):
    """np.savez of a transposed numpy array stores it in Fortran order; such a file still loads, whole arrays at once."""
    with np.load(PG1 / "params.npz") as f:
        np.savez(tmp_path / "f.npz", **{k: np.asfortranarray(f[k]) for k in f.files})
    with zipfile.ZipFile(tmp_path / "f.npz") as z:
        assert b"'fortran_order': True" in z.read("params/llm/layers/mlp/linear.npy")[:128]
    a = PaliGemma.from_big_vision(PG1 / "params.npz", CFG1, dtype=torch.float32).state_dict()
    b = PaliGemma.from_big_vision(tmp_path / "f.npz", CFG1, dtype=torch.float32).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_random_release_script_writes_what_loads(tmp_path):
    """scripts/make_random_checkpoint.py --layout big_vision (the benchmark's full-size file, here tiny): the
    release's keys and shapes, float32, the embedding cut to the tokenizer's rows; and bfloat16 as |V2."""
    script = ROOT / "scripts" / "make_random_checkpoint.py"
    for out, dtype in ((tmp_path / "r.npz", []), (tmp_path / "r.b16.npz", ["--dtype", "bfloat16"])):
        subprocess.run([sys.executable, str(script), "--config", str(PG2), "--layout", "big_vision", "--out", str(out),
                        *dtype], check=True, capture_output=True)
        with np.load(PG2 / "params.npz") as ref, np.load(out) as ours:
            assert ours.files == ref.files
            assert all(ours[k].shape == ref[k].shape for k in ref.files)
            assert {ours[k].dtype.str for k in ours.files} == ({"|V2"} if dtype else {"<f4"})
        model = PaliGemma.from_big_vision(out, PG2 / "config.json")
        assert (model.decoder.embed_tokens.weight[1200:] == 0).all()
        assert model.decoder.embed_tokens.weight[:1200].std() > 0.01


# ---------------------------------------------------------------------------------------------- processor and pipeline

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny checkpoint directory and, beside it, its weights as a big_vision npz: embedding cut to the tokenizer's
    rows (the rest of the directory's random rows come back as zeros) and its tokenizer as a lone .model file."""
    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "hf", generation=2)
    model = PaliGemma.from_pretrained(folder)
    tokenizer = Tokenizer.from_pretrained(folder)
    assert model.config.text_config.vocab_size > len(tokenizer)
    release = folder.parent / "release"
    release.mkdir()
    big_vision.save_npz(model.state_dict(), model.config, release / "pg.npz", embedding_rows=len(tokenizer))
    shutil.copy(folder / "tokenizer.model", release / "paligemma_tokenizer.model")
    shutil.copy(VAE, release / "vae-oid.npz")
    return folder


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    return path


def test_processor_from_config_equals_the_directorys(checkpoint, image):
    config = PaliGemmaConfig.from_pretrained(checkpoint)
    ours = Processor.from_config(config, checkpoint.parent / "release" / "paligemma_tokenizer.model")
    ref = Processor.from_pretrained(checkpoint)
    a, b = ours([image], ["caption en"], suffixes=["a cat"]), ref([image], ["caption en"], suffixes=["a cat"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_processor_from_a_big_vision_style_tokenizer(tmp_path):
    """big_vision's paligemma_tokenizer.model has <loc>/<seg> baked in and no <image>: it is appended after them, at
    the id the published configs give it (257152 there: the model's size here)."""
    model = tmp_path / "paligemma_tokenizer.model"
    model.write_bytes(_spm.train(["<mask>", "\n"] + _spm.LOC + _spm.SEG))
    tokenizer = Tokenizer.from_pretrained(model)
    assert tokenizer.image_token_id == tokenizer.sp_vocab_size and tokenizer.loc_id(0) == 6
    config = PaliGemmaConfig.from_pretrained(PG1).replace(vocab_size=tokenizer.sp_vocab_size + 64)
    processor = Processor.from_config(PaliGemmaConfig(config.vision_config, config.text_config,
                                                      image_token_index=tokenizer.sp_vocab_size), model)
    ids = processor([np.zeros((8, 8, 3), np.uint8)], ["detect cat"])["input_ids"][0].tolist()
    assert ids[:16] == [tokenizer.sp_vocab_size] * 16 and ids[16] == tokenizer.bos_id
    with pytest.raises(ConfigError, match=r"the tokenizer has <image> at id \d+ but the config's image_token_index is 1200"):
        Processor.from_config(config, model)
    small = PaliGemmaConfig(config.vision_config, PaliGemmaConfig.from_pretrained(PG1).text_config,
                            image_token_index=tokenizer.sp_vocab_size)
    with pytest.raises(ConfigError, match=rf"the tokenizer has {len(tokenizer)} tokens but the model's embedding has only 1216 rows"):
        Processor.from_config(small, model)


def test_load_npz_answers_as_the_directory(checkpoint, image):
    release = checkpoint.parent / "release"
    from_dir = nanopali.load(checkpoint)
    from_npz = nanopali.load(release / "pg.npz", config=checkpoint / "config.json")  # tokenizer and VAE found beside it
    assert from_npz.vae is not None
    for pali in (from_dir, from_npz):
        pali.answers = [pali.caption(str(image), max_new_tokens=8), pali.detect(str(image), "cat", max_new_tokens=8).text]
    assert from_npz.answers == from_dir.answers
    explicit = nanopali.load(release / "pg.npz", config=PaliGemmaConfig.from_pretrained(checkpoint),
                             tokenizer=release / "paligemma_tokenizer.model", dtype="bfloat16")
    assert next(explicit.model.parameters()).dtype == torch.bfloat16


LOAD_ROWS = [
    ("npz without a tokenizer beside it", lambda c, t: nanopali.load(shutil.copy(c.parent / "release" / "pg.npz", t / "pg.npz"),
                                                                     config=c / "config.json"),
     MissingFileError, r"a big_vision \.npz carries no tokenizer and there is no paligemma_tokenizer\.model beside .*pass tokenizer="),
    ("a tokenizer file that is not there", lambda c, t: nanopali.load(c.parent / "release" / "pg.npz", config=c / "config.json",
                                                                      tokenizer=t / "tok.model"),
     MissingFileError, r"tokenizer file .*tok\.model does not exist"),
    ("a tokenizer of another model", lambda c, t: nanopali.load(PG1 / "params.npz", config=CFG1,
                                                                tokenizer=c.parent / "release" / "paligemma_tokenizer.model"),
     ConfigError, r"the tokenizer has <image> at id \d+ but the config's image_token_index is 1200"),
    ("config= with a directory", lambda c, t: nanopali.load(c, config="paligemma-3b-224"), UsageError,
     r"config=: only for a big_vision \.npz; a checkpoint directory carries its own config\.json and tokenizer"),
    ("the VQ-VAE as the model", lambda c, t: nanopali.load(VAE), CheckpointError, r"not a big_vision PaliGemma checkpoint"),
]


@pytest.mark.parametrize("call, error, message", [r[1:] for r in LOAD_ROWS], ids=[r[0] for r in LOAD_ROWS])
def test_load_errors(checkpoint, tmp_path, call, error, message):
    with pytest.raises(error, match=message):
        call(checkpoint, tmp_path)


# ---------------------------------------------------------------------------------------------- the CLI

def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_convert_with_the_tokenizer_makes_a_directory_every_command_uses(checkpoint, image, tmp_path, capsys):
    release = checkpoint.parent / "release"
    code, out, err = run_cli(["convert", release / "pg.npz", tmp_path / "out", "--config", checkpoint / "config.json",
                              "--dtype", "float32"], capsys)
    assert code == 0, err
    assert f"tokenizer {release / 'paligemma_tokenizer.model'}" in out
    args = [image, "--dtype", "float32", "--max-new-tokens", "6", "--no-stream"]
    answers = [run_cli(["caption", *args, "--model", model, *extra], capsys)
               for model, extra in ((checkpoint, []), (tmp_path / "out", []),
                                    (release / "pg.npz", ["--config", checkpoint / "config.json"]))]
    assert all(code == 0 for code, _, _ in answers), answers
    assert answers[0][1] == answers[1][1] == answers[2][1]


CLI_ROWS = [
    (["convert", "{vae}", "{tmp}/out", "--config", CFG1], r"not a big_vision PaliGemma checkpoint"),
    (["convert", "{truncated}", "{tmp}/out", "--config", CFG1], r"not a readable \.npz file"),
    (["convert", PG1 / "params.npz", "{tmp}/out", "--config", "paligemma-3b"], r"unknown config 'paligemma-3b'"),
    (["convert", PG1 / "params.npz", "{tmp}/full", "--config", CFG1], r"full is not empty; pass --overwrite"),
    (["convert", PG1 / "params.npz", "{tmp}/out", "--config", CFG1, "--max-shard-size", "lots"], r"--max-shard-size: cannot read"),
    (["convert", PG1 / "meta.json", "{tmp}/out", "--config", CFG1], r"meta\.json: convert reads a big_vision \.npz"),
    (["caption", "{image}", "--model", PG1 / "params.npz"], r"a big_vision \.npz does not say its sizes: pass config= \(--config"),
    (["info", PG1 / "params.npz"], r"params\.npz is a big_vision \.npz, not a checkpoint directory: .*nanopali convert"),
    (["train", "--model", PG1 / "params.npz", "--data", "{tmp}/d.jsonl", "--out", "{tmp}/run"],
     r"params\.npz is a big_vision \.npz, not a checkpoint directory"),
    (["caption", "{image}", "--model", PG1 / "params.npz", "--config", CFG1],
     r"no paligemma_tokenizer\.model beside .*params\.npz: pass tokenizer= \(--tokenizer"),
]


@pytest.mark.parametrize("argv, message", CLI_ROWS, ids=[f"{r[0][0]} {i}" for i, r in enumerate(CLI_ROWS)])
def test_cli_errors(image, tmp_path, capsys, argv, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep")
    names = dict(vae=VAE, tmp=tmp_path, image=image, truncated=truncated(PG1 / "params.npz", tmp_path / "t.npz"))
    code, out, err = run_cli([str(a).format(**names) for a in argv], capsys)
    assert code == 2, (out, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and err.startswith("nanopali: error:"), err
    assert re.search(message, err), err
    assert (tmp_path / "full" / "notes.txt").read_text() == "keep"
