"""nanopali.tokenizer.Tokenizer against transformers' GemmaTokenizer (as PaliGemmaProcessor sets it up) and SentencePiece.

Every test runs on the four ways the PaliGemma tokens can reach a tokenizer (see tests/_spm.py): baked
into the SentencePiece model, declared in tokenizer_config.json, declared in added_tokens.json, or nowhere.
"""

from __future__ import annotations

import json
import random
import shutil

import _spm
import pytest

from nanopali.inputs.tokenizer import Tokenizer, TokenizerError

TEXTS = [
    "", " ", "caption en", "answer en what is in this image?", " leading space", "trailing space ",
    "two  spaces   three", "tabs\tand\nnewlines\n\n", "\n", "café über naïve 東京 猫", "emoji 🙂🐈 and 𝔘nicode ∑",
    "detect cat <loc0001><loc1023> ; dog <seg000><seg127>", "<loc0512>", "x<loc0000>y", "<loc0001 unfinished",
    "numbers 0123456789 and 3.14", "text with <bos> and <eos> and <pad> inside", "<image>after", "<unk>", "<mask>",
    "segment cat\n<loc0100><loc0200><loc0300><loc0400> <seg010><seg020> cat", "a" * 300,
]
_ALPHABET = list("abcdeéz東猫🙂 \n\t.,?0123456789") + ["<loc0007>", "<seg042>", "<image>", "<bos>", "<eos>", " the ", "cat"]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {v: _spm.write_checkpoint(root / v, v) for v in _spm.VARIANTS}


@pytest.fixture(scope="module", params=_spm.VARIANTS)
def pair(request, folders):
    """(nanopali Tokenizer, transformers tokenizer of a PaliGemmaProcessor) read from the same files."""
    folder = folders[request.param]
    return Tokenizer.from_pretrained(folder), _spm.hf_processor(folder).tokenizer


def test_special_ids_are_looked_up_by_name(pair):
    ours, hf = pair
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id)
    assert ours.image_token_id == hf.convert_tokens_to_ids("<image>")
    assert [ours.loc_id(i) for i in range(1024)] == hf.convert_tokens_to_ids(_spm.LOC)
    assert [ours.seg_id(i) for i in range(128)] == hf.convert_tokens_to_ids(_spm.SEG)
    assert ours.vocab_size == len(ours) == len(hf)


def test_encode_matches_transformers(pair):
    ours, hf = pair
    for text in TEXTS + _random_texts(300):
        want = hf(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text) == want, f"encode({text!r})"


def test_batch_encode_and_bos_eos(pair):
    ours, hf = pair
    got = ours.batch_encode(TEXTS, add_bos=True, add_eos=True)
    want = [[hf.bos_token_id] + ids + [hf.eos_token_id] for ids in hf(TEXTS, add_special_tokens=False)["input_ids"]]
    assert got == want
    with pytest.raises(TypeError, match="list of str"):
        ours.batch_encode("one string")


def _random_ids(tok: Tokenizer, n: int, seed: int, keep=lambda i: True) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 20))]
        out.append([i for i in ids if keep(i)])
    return out


def test_decode_matches_transformers(pair):
    """Random ids over the whole vocabulary (control tokens, loc/seg/image, words), except byte pieces:
    on an invalid UTF-8 byte run transformers writes U+FFFD for every byte, SentencePiece (and nanopali)
    only for the bad ones. Valid byte runs are covered by the encoded texts."""
    ours, hf = pair
    sp = ours.sentencepiece
    sequences = [hf(t, add_special_tokens=False)["input_ids"] for t in TEXTS + _random_texts(100, seed=2)]
    sequences += _random_ids(ours, 600, seed=1, keep=lambda i: i >= ours.sp_vocab_size or not sp.is_byte(i))
    for ids in sequences:
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), f"decode({ids}, {skip})"
    assert ours.batch_decode(sequences[:5]) == hf.batch_decode(sequences[:5], skip_special_tokens=True)


def test_decode_matches_sentencepiece_on_broken_bytes(pair):
    """Random SentencePiece ids, byte pieces and control tokens included: the same text as SentencePiece."""
    ours, _ = pair
    sp = ours.sentencepiece
    keep = lambda i: i < ours.sp_vocab_size and not (ours.is_special(i) and not sp.is_control(i))  # noqa: E731
    for ids in _random_ids(ours, 600, seed=4, keep=keep):
        assert ours.decode(ids) == sp.decode(ids), f"decode({ids})"
    newline = sp.piece_to_id("<0x0A>")
    assert ours.decode([sp.piece_to_id("<0xC3>"), newline]) == "\ufffd\n"  # transformers: two U+FFFD


def test_decode_of_a_prefix_behaves_like_sentencepiece(pair):
    ours, _ = pair
    for text in ["héllo 🙂 wörld 東京", "emoji 🐈🐈 end", "plain words only"]:
        ids = ours.sentencepiece.encode(text)
        for k in range(len(ids) + 1):
            assert ours.decode(ids[:k]) == ours.sentencepiece.decode(ids[:k]), f"prefix {k} of {text!r}"


def test_encode_decode_round_trip(pair):
    ours, _ = pair
    for text in TEXTS + _random_texts(100, seed=3):
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text


def test_decode_skips_special_tokens_but_keeps_loc_and_seg(pair):
    ours, _ = pair
    ids = [ours.image_token_id] * 3 + [ours.bos_id] + ours.encode("detect cat\n") + [ours.loc_id(5), ours.seg_id(7), ours.eos_id, ours.pad_id]
    assert ours.decode(ids) == "detect cat\n<loc0005><seg007>"
    assert ours.decode(ids, skip_special_tokens=False) == "<image><image><image><bos>detect cat\n<loc0005><seg007><eos><pad>"
    assert ours.is_special(ours.image_token_id) and not ours.is_special(ours.loc_id(0))


def test_loc_and_seg_helpers(pair):
    ours, _ = pair
    for i in (0, 1, 511, 1023):
        assert ours.is_loc(ours.loc_id(i)) and ours.loc_value(ours.loc_id(i)) == i and not ours.is_seg(ours.loc_id(i))
        assert ours.id_to_token(ours.loc_id(i)) == f"<loc{i:04d}>" == ours.id_to_token(ours.token_to_id(f"<loc{i:04d}>"))
    for i in (0, 64, 127):
        assert ours.is_seg(ours.seg_id(i)) and ours.seg_value(ours.seg_id(i)) == i
    assert not ours.is_loc(ours.bos_id)
    with pytest.raises(ValueError, match="location index 1024"):
        ours.loc_id(1024)
    with pytest.raises(ValueError, match="segmentation index -1"):
        ours.seg_id(-1)
    with pytest.raises(ValueError, match="not a <locNNNN> token"):
        ours.loc_value(ours.bos_id)
    with pytest.raises(ValueError, match="not a <segNNN> token"):
        ours.seg_value(ours.loc_id(0))


def test_save_pretrained_round_trips_and_transformers_reads_it(pair, tmp_path):
    ours, hf = pair
    ours.save_pretrained(tmp_path)
    _spm.write_preprocessor_config(tmp_path, 32, 4)
    again, hf_again = Tokenizer.from_pretrained(tmp_path), _spm.hf_processor(tmp_path).tokenizer
    assert (again.bos_id, again.eos_id, again.pad_id, again.unk_id, again.image_token_id, again.vocab_size) == (
        ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id, ours.image_token_id, ours.vocab_size)
    assert len(hf_again) == len(hf)
    for text in TEXTS:
        want = hf(text, add_special_tokens=False)["input_ids"]
        assert again.encode(text) == want
        assert hf_again(text, add_special_tokens=False)["input_ids"] == want


def test_special_token_ids_come_from_the_files(tmp_path):
    """A model whose control ids differ from Gemma's, and a config that renames pad: nothing is assumed."""
    model = _spm.train(["<mask>"], pad_id=3, eos_id=2, bos_id=1, unk_id=0, pad_piece="<p>", eos_piece="</s>", bos_piece="<s>", unk_piece="<u>")
    (tmp_path / "tokenizer.model").write_bytes(model)
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 3, 0)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": {"content": "</s>"}, "bos_token": "<s>"}))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.encode("a", add_bos=True, add_eos=True) == [1] + tok.encode("a") + [2]


def test_missing_tokenizer_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="needs the SentencePiece model"):
        Tokenizer.from_pretrained(tmp_path)


def test_files_that_contradict_each_other(folders, tmp_path):
    shutil.copytree(folders["added"], tmp_path / "t")
    folder = tmp_path / "t"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    image_id = next(int(i) for i, e in config["added_tokens_decoder"].items() if e["content"] == "<image>")
    (folder / "added_tokens.json").write_text(json.dumps({"<image>": image_id + 1}))
    with pytest.raises(TokenizerError, match="'<image>' has id"):
        Tokenizer.from_pretrained(folder)
    (folder / "added_tokens.json").write_text(json.dumps({"<extra>": image_id + 5}))
    with pytest.raises(TokenizerError, match="without gaps"):
        Tokenizer.from_pretrained(folder)


def test_a_tokenizer_model_that_normalizes_is_refused(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(_spm.train(["<mask>"], add_dummy_prefix=True))
    with pytest.raises(TokenizerError, match="dummy prefix"):
        Tokenizer.from_pretrained(tmp_path)


def test_bad_arguments(pair):
    ours, _ = pair
    with pytest.raises(TypeError, match="encode takes a str"):
        ours.encode(123)
    with pytest.raises(ValueError, match=f"token id {ours.vocab_size} is outside the vocabulary"):
        ours.decode([1, ours.vocab_size])
    with pytest.raises(TypeError, match="use batch_decode"):
        ours.decode([[1, 2]])
    with pytest.raises(KeyError, match="not a token"):
        ours.token_to_id("<no such token>")
