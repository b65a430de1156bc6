"""Tokenizers: round trips, special ids, word-level compression, clear errors on bad files."""
import json

import ml_collections
import numpy as np
import pytest

from famjax.data import passkey
from famjax.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    WordTokenizer,
    build_word_vocab,
    make_tokenizer,
    passkey_vocab,
    split_words,
)

TEXT = ("There is an important info hidden inside a lot of irrelevant text. The pass key is 40213. "
        "Remember it. 40213 is the pass key. The grass is green. What is the pass key? "
        "The pass key is 40213.")


def _tcfg(kind, path=""):
    return ml_collections.ConfigDict({"kind": kind, "path": str(path), "bos_token": "", "eos_token": "",
                                      "pad_token": ""})


def test_byte_round_trip_and_specials():
    tok = ByteTokenizer()
    ids = tok.encode("héllo 12")
    assert ids.dtype == np.int32 and len(ids) == len("héllo 12".encode())
    assert ids.min() >= 3 and tok.vocab_size == 259
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == "héllo 12"


def test_word_splits_digits_and_round_trips_passkey_text():
    tok = make_tokenizer(_tcfg("word"))
    assert split_words("key is 402.") == ["key", "is", "4", "0", "2", "."]
    ids = tok.encode(TEXT)
    assert tok.unk_id not in ids.tolist()  # the built-in vocabulary covers the task
    assert tok.decode(ids) == TEXT
    # Word level is what makes long PassKey runs affordable: 3.75x fewer filler tokens than bytes.
    filler = "".join(passkey.FILLER) * 10
    assert len(ByteTokenizer().encode(filler)) / len(tok.encode(filler)) > 3.7
    assert tok.encode("zebra")[0] == tok.unk_id


def test_word_vocab_file_round_trip(tmp_path):
    words = build_word_vocab(["the cat sat. the cat ran 7", "a dog"], max_size=14)
    assert words[:10] == [str(d) for d in range(10)] and words[10:12] == ["the", "cat"]
    tok = WordTokenizer(words)
    tok.save(tmp_path / "vocab.txt")
    tok2 = make_tokenizer(_tcfg("word", tmp_path / "vocab.txt"))
    assert tok2.vocab_size == tok.vocab_size == 4 + 14
    assert tok2.encode("the cat sat.").tolist() == tok.encode("the cat sat.").tolist()
    assert tok2.fingerprint == tok.fingerprint != WordTokenizer(passkey_vocab()).fingerprint


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    corpus = [TEXT] + [s.strip() for s in passkey.template_texts()] * 20
    corpus += [" ".join(str(i) for i in range(100))]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(d / "m"), vocab_size=80,
                                   model_type="bpe", hard_vocab_limit=False, bos_id=1, eos_id=2, pad_id=0,
                                   unk_id=3, minloglevel=2)
    return d / "m.model"


def test_sentencepiece_round_trip(sp_model):
    tok = make_tokenizer(_tcfg("sentencepiece", sp_model))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    ids = tok.encode("The grass is green.")
    assert ids.dtype == np.int32 and len(ids) > 0 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == "The grass is green."


@pytest.fixture(scope="module")
def hf_file(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("hf")
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator([TEXT] * 10, trainer=trainer)
    from tokenizers import decoders

    t.decoder = decoders.ByteLevel()
    t.save(str(d / "tokenizer.json"))
    return d / "tokenizer.json"


def test_hf_tokenizer_json(hf_file):
    tok = make_tokenizer(_tcfg("hf", hf_file))
    assert isinstance(tok, HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)  # found by the common names
    ids = tok.encode(" The pass key is 40213.")
    assert tok.bos_id not in ids.tolist()  # no special tokens added by encode
    assert tok.decode(ids) == " The pass key is 40213."
    # A tokenizer_config.json beside the file names the specials explicitly.
    (hf_file.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<unk>"}))
    try:
        assert make_tokenizer(_tcfg("hf", hf_file.parent)).eos_id == 3
    finally:
        (hf_file.parent / "tokenizer_config.json").unlink()


@pytest.mark.parametrize("kind", ["sentencepiece", "hf", "word"])
def test_broken_or_missing_tokenizer_file_is_a_clear_error(tmp_path, kind):
    bad = tmp_path / "broken.bin"
    bad.write_bytes(b"\x00\xffnot a model" if kind != "word" else b"")
    with pytest.raises(ValueError, match=r"tokenizer\.path: .*broken\.bin"):
        make_tokenizer(_tcfg(kind, bad))
    if kind != "word":
        with pytest.raises(ValueError, match=r"tokenizer\.path: .*missing"):
            make_tokenizer(_tcfg(kind, tmp_path / "missing"))


def test_unknown_kind_and_missing_path():
    with pytest.raises(ValueError, match="tokenizer.kind must be one of .*'bpe'"):
        make_tokenizer(_tcfg("bpe"))
    with pytest.raises(ValueError, match="tokenizer.path is required"):
        make_tokenizer(_tcfg("sentencepiece"))
