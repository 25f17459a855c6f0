"""The world's tokenizer: Gemma's layout with <image> last, atomic <loc>/<seg>, exact round trips of world text,
and the same ids as transformers' PaliGemmaProcessor reading the same files."""

import random
from pathlib import Path

import _spm
import pytest
import torch

from nanopali import Processor, Tokenizer
from nanopali.inputs.processor import IGNORE_INDEX
from nanopali.inputs.tokenizer import LOC_TOKENS, SEG_TOKENS
from nanopali.tasks import SegmentationVAE
from nanopali.world.examples import examples
from nanopali.world.scenes import COLORS, NUMBERS, POSITIONS, SHAPES, WORDS, make_scene
from nanopali.world.tokenizer import DEFAULT_VOCAB_SIZE, NUM_BYTES, USER_DEFINED, train_world_tokenizer

VAE_PATH = Path(__file__).resolve().parent / "fixtures" / "vqvae" / "vae-random.npz"
N_SCENES = 150  # training scenes: enough for every world word to get its merges, trained in about a second
IMAGE_SIZE, NUM_IMAGE_TOKENS = 64, 4
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:transformers")  # numpy 2 notices from transformers


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return train_world_tokenizer(tmp_path_factory.mktemp("world_tok"), seed=0, n_scenes=N_SCENES,
                                 image_size=IMAGE_SIZE, num_image_tokens=NUM_IMAGE_TOKENS)


@pytest.fixture(scope="module")
def tok(folder):
    return Tokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def fresh():
    """(scene, examples) of scenes the tokenizer was not trained on (another seed), segment examples included."""
    vae = SegmentationVAE.from_npz(VAE_PATH)
    r = random.Random(12345)
    return [(scene, examples(scene, r, vae)) for scene in (make_scene(r) for _ in range(25))]


def test_layout_image_last(tok):
    assert tok.vocab_size <= DEFAULT_VOCAB_SIZE
    assert tok.image_token_id == tok.vocab_size - 1 == tok.sp_vocab_size, "<image> must be the last id"
    assert tok.is_special(tok.image_token_id) and tok.decode([tok.image_token_id]) == ""
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
    sp = tok.sentencepiece
    assert [sp.id_to_piece(i) for i in range(4, 4 + len(USER_DEFINED))] == list(USER_DEFINED)
    assert all(sp.is_byte(i) for i in range(4 + len(USER_DEFINED), 4 + len(USER_DEFINED) + NUM_BYTES))


def test_loc_and_seg_are_single_baked_ids(tok):
    sp = tok.sentencepiece
    for tokens, to_id, value in ((LOC_TOKENS, tok.loc_id, tok.loc_value), (SEG_TOKENS, tok.seg_id, tok.seg_value)):
        for i, text in enumerate(tokens):
            (j,) = tok.encode(text)
            assert j == to_id(i) and value(j) == i and tok.decode([j]) == text, text
            assert sp.encode(text) == [j], f"{text} is not a piece of tokenizer.model"
    assert tok.encode("\n") == [5]


def test_world_text_round_trips_without_byte_fallback(tok, fresh):
    n_bytes = 0
    seen = set()
    for _, exs in fresh:
        for ex in exs:
            for text in (ex["prefix"], ex["prefix"] + "\n", ex["suffix"]):
                ids = tok.encode(text)
                assert tok.decode(ids) == text, repr(text)
                assert tok.unk_id not in ids, repr(text)
                n_bytes += sum(tok.sentencepiece.is_byte(i) for i in ids)
            seen.add(ex["prefix"].split()[0])
    assert seen >= {"caption", "answer", "detect", "segment", "ocr"}, seen
    assert n_bytes == 0, "every character of the world's text should be a piece, not byte fallback"
    odd = "Ünïcode ✓ 東京\t  two  spaces"  # not world text: still exact, through byte fallback
    assert tok.decode(tok.encode(odd)) == odd


def test_world_words_are_short(tok):
    words = list(SHAPES) + list(COLORS) + list(NUMBERS) + list(WORDS) + [w for p in POSITIONS for w in p.split()]
    texts = words + [" " + w for w in words]  # first in a string, or after a space
    texts += ["caption", "answer", "detect", "segment", "ocr"]  # task names only start a prefix
    texts += [" " + s + ("es" if s.endswith(("s", "x")) else "s") for s in SHAPES]
    texts += [" how", " many", " what", " where", " color", " shape", " object", " there", " the", " word", " with"]
    long = {t: [tok.id_to_token(i) for i in tok.encode(t)] for t in texts if len(tok.encode(t)) > 2}
    assert not long, f"world words split into more than 2 tokens: {long}"
    assert len(tok.encode("answer en how many circles are there?")) <= 8


def test_processor_batch_with_labels(folder, tok, fresh):
    processor = Processor.from_pretrained(folder)
    assert (processor.image_size, processor.num_image_tokens) == (IMAGE_SIZE, NUM_IMAGE_TOKENS)
    scene, exs = fresh[0]
    exs = [e for e in exs if e["prefix"].startswith(("detect", "caption"))]
    batch = processor([scene.image] * len(exs), [e["prefix"] for e in exs], [e["suffix"] for e in exs],
                      padding_side="right")
    assert batch["pixel_values"].shape == (len(exs), 3, IMAGE_SIZE, IMAGE_SIZE)
    for row, ex in enumerate(exs):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        suffix = tok.encode(ex["suffix"]) + [tok.eos_id]
        prefix = [tok.image_token_id] * NUM_IMAGE_TOKENS + [tok.bos_id] + tok.encode(ex["prefix"] + "\n")
        n = len(prefix) + len(suffix)
        assert ids[:n].tolist() == prefix + suffix
        assert labels[:len(prefix)].eq(IGNORE_INDEX).all() and labels[len(prefix):n].tolist() == suffix
        assert labels[n:].eq(IGNORE_INDEX).all() and ids[n:].eq(tok.pad_id).all()
        assert tok.decode(suffix) == ex["suffix"]
    assert int(batch["input_ids"].max()) < tok.vocab_size


def test_same_ids_as_transformers(folder, tok, fresh):
    pytest.importorskip("transformers")
    hf = _spm.hf_processor(folder)
    assert hf.image_token_id == tok.image_token_id and len(hf.tokenizer) == tok.vocab_size
    scene, exs = fresh[1]
    prompts, suffixes = [e["prefix"] for e in exs], [e["suffix"] for e in exs]
    ours = Processor.from_pretrained(folder)([scene.image] * len(exs), prompts, suffixes)  # left padding, as theirs
    theirs = hf(images=[scene.image] * len(exs), text=prompts, suffix=suffixes, padding="longest", return_tensors="pt")
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        assert torch.equal(ours[key], theirs[key]), key


def test_deterministic_and_hf_layout(folder, tmp_path):
    again = train_world_tokenizer(tmp_path, seed=0, n_scenes=N_SCENES)  # single-threaded training: same bytes
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name
    assert not (again / "preprocessor_config.json").exists()
    with pytest.raises(FileNotFoundError, match="image size"):
        Processor.from_pretrained(again)  # no image settings until a config.json says them


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_world_tokenizer(tmp_path, n_scenes=2, vocab_size=1200)
    with pytest.raises(ValueError, match="both image_size and num_image_tokens"):
        train_world_tokenizer(tmp_path, n_scenes=2, image_size=64)
