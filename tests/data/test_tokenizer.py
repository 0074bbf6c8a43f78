"""SentencePiece training flags and the Tokenizer wrapper."""

from __future__ import annotations

import hashlib

import pytest

from loom.data.tokenizer import Tokenizer, train_tokenizer


def test_llama_style_special_ids_and_exact_round_trip(tokenizer_model, documents):
    tok = Tokenizer(tokenizer_model)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 320
    tricky = ["  leading spaces", "trailing  \n\n", "tabs\tand\nnewlines", "unseen 漢字 and emoji 🙂", "x" * 50]
    for text in documents + tricky:
        assert tok.decode(tok.encode(text)) == text  # identity normalisation + byte fallback keep everything
    assert tok.id_to_piece(tok.encode("\n")[-1]) == "<0x0A>"


def test_digits_are_split_and_bos_eos_are_optional(tokenizer_model):
    tok = Tokenizer(tokenizer_model)
    digits = tok.encode("2024")
    assert len(digits) >= 4 and all(len(tok.id_to_piece(i).strip("▁")) <= 1 for i in digits)
    ids = tok.encode("hello", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and ids[1:-1] == tok.encode("hello")
    assert tok.encode_batch(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]


def test_sha256_is_of_the_model_file_bytes(tokenizer_model):
    assert Tokenizer(tokenizer_model).sha256 == hashlib.sha256(tokenizer_model.read_bytes()).hexdigest()


def test_training_is_deterministic_and_unigram_works(tmp_path, corpus_file, tokenizer_model):
    again = Tokenizer(train_tokenizer(corpus_file, tmp_path / "again", vocab_size=320, num_threads=1))
    first = Tokenizer(tokenizer_model)  # the files differ only in the stored model_prefix
    assert [again.id_to_piece(i) for i in range(320)] == [first.id_to_piece(i) for i in range(320)]
    uni = Tokenizer(train_tokenizer(corpus_file, tmp_path / "uni", vocab_size=310, model_type="unigram"))
    assert uni.eos_id == 3 and uni.decode(uni.encode("resume state ✓")) == "resume state ✓"


def test_training_errors_are_clear(tmp_path, corpus_file):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty input"):
        train_tokenizer(tmp_path / "empty.jsonl", tmp_path / "t", vocab_size=300)
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer(corpus_file, tmp_path / "t", model_type="wordpiece")
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(corpus_file, tmp_path / "t", vocab_size=100)
    with pytest.raises(ValueError, match="vocab_size=100000"):
        train_tokenizer(corpus_file, tmp_path / "t", vocab_size=100000)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer(tmp_path / "missing.model")
