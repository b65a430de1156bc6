"""PassKey: the key sits where stated, the answer is the key, the loss mask is the answer, lengths, seeds."""
import numpy as np
import pytest

import famjax.data as fd
from famjax.data import passkey
from famjax.data.tokenizers import ByteTokenizer, WordTokenizer, passkey_vocab


def small_cfg(data_dir, kind="word", position="uniform", seed=0):
    cfg = fd.default_config()
    cfg.data_dir = str(data_dir)
    cfg.tokenizer.kind = kind
    cfg.passkey.update(key_position=position, train_filler_min=20, train_filler_max=40, train_examples=40,
                       validation_examples=8, eval_multipliers=(1, 4), eval_examples=4, seed=seed)
    return cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("passkey")


def _records(cfg, split):
    return list(fd.passkey_examples(cfg, split))


@pytest.mark.parametrize("position", ["start", "uniform", "end"])
def test_key_where_stated_answer_is_key_mask_is_answer(data_dir, position):
    cfg = small_cfg(data_dir, position=position)
    tok = fd.make_tokenizer(cfg)
    intro_len = 1 + len(tok.encode(passkey.INTRO))  # bos + intro
    key_before = len(tok.encode(passkey.KEY_BEFORE))
    positions = set()
    for ex in _records(cfg, "train"):
        t, a, s, kp = ex["tokens"], int(ex["answer_len"]), int(ex["answer_start"]), int(ex["key_position"])
        key_ids = tok.encode(ex["key"])
        assert len(ex["key"]) == 5 and ex["key"][0] != "0"
        assert t[0] == tok.bos_id and t[-1] == tok.eos_id
        # The answer is exactly the key, right after the question, and the mask covers exactly it.
        assert t[s:s + a].tolist() == key_ids.tolist() and a == 5
        assert tok.decode(t[s - len(tok.encode(passkey.QUESTION)):s]) == passkey.QUESTION.strip()
        np.testing.assert_array_equal(np.nonzero(ex["loss_mask"])[0], np.arange(s, s + a))
        assert np.all(ex["loss_mask"][s:s + a] == 1.0)
        # The key is written twice in the key sentence, with the answer's ids.
        assert t[kp:kp + a].tolist() == key_ids.tolist()
        sentence = tok.decode(t[kp - key_before:kp + 2 * a + 5])
        assert sentence.startswith(f"The pass key is {ex['key']}. Remember it. {ex['key']}")
        filler_before = kp - key_before - intro_len
        if position == "start":
            assert filler_before == 0
        elif position == "end":
            assert filler_before == ex["filler_tokens"]
        positions.add(filler_before)
        assert 0 <= filler_before <= ex["filler_tokens"]
    if position == "uniform":
        assert len(positions) > 5  # spread over the filler, not pinned


@pytest.mark.parametrize("kind", ["byte", "word"])
def test_filler_lengths_in_range_and_eval_lengths_fixed(data_dir, kind):
    cfg = small_cfg(data_dir, kind=kind)
    train = _records(cfg, "train")
    lengths = [int(ex["filler_tokens"]) for ex in train]
    assert min(lengths) >= 20 and max(lengths) <= 40 and len(set(lengths)) > 5
    tok = fd.make_tokenizer(cfg)
    overhead = len(train[0]["tokens"]) - lengths[0]
    for ex in train:  # the filler really is that many tokens of this tokenizer
        assert len(ex["tokens"]) - int(ex["filler_tokens"]) == overhead
    for m in (1, 4):
        ev = _records(cfg, fd.eval_split_name(m))
        assert len(ev) == 4 and {int(e["filler_tokens"]) for e in ev} == {40 * m}
        longest = passkey.max_tokens(cfg.passkey, tok, fd.eval_split_name(m))
        assert max(len(e["tokens"]) for e in ev) <= longest


def test_filler_lengths_with_sentencepiece(tmp_path):
    import sentencepiece as spm

    corpus = [s.strip() for s in passkey.template_texts()] * 20 + ["0 1 2 3 4 5 6 7 8 9 12345 67890"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "m"),
                                   vocab_size=70, hard_vocab_limit=False, bos_id=1, eos_id=2, pad_id=0,
                                   unk_id=3, minloglevel=2)
    cfg = small_cfg(tmp_path / "d", kind="sentencepiece")
    cfg.tokenizer.path = str(tmp_path / "m.model")
    tok = fd.make_tokenizer(cfg)
    for ex in _records(cfg, "train"):
        assert 20 <= ex["filler_tokens"] <= 40
        s, a = int(ex["answer_start"]), int(ex["answer_len"])
        assert tok.decode(ex["tokens"][s:s + a]).strip() == ex["key"]
        assert tok.decode(ex["tokens"][int(ex["key_position"]):][:a]).strip() == ex["key"]


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    a = _records(small_cfg(tmp_path / "a", seed=3), "train")
    b = _records(small_cfg(tmp_path / "b", seed=3), "train")
    c = _records(small_cfg(tmp_path / "c", seed=4), "train")
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))
    assert [x["key"] for x in a] != [x["key"] for x in c]


def test_passkey_pairs_and_host_split(data_dir):
    cfg = small_cfg(data_dir)
    tok = WordTokenizer(passkey_vocab())
    recs = _records(cfg, "eval_x4")
    pairs = list(fd.passkey_pairs(cfg, "eval_x4"))
    assert len(pairs) == 4
    for (prompt, answer), ex in zip(pairs, recs):
        assert prompt[0] == tok.bos_id and tok.decode(answer) == ex["key"]
        assert tok.decode(prompt).endswith("What is the pass key? The pass key is")
        assert prompt.dtype == np.int32 and answer.dtype == np.int32
    halves = [list(fd.passkey_pairs(cfg, "eval_x4", process_index=i, process_count=2)) for i in (0, 1)]
    keys = sorted(tok.decode(p.answer) for h in halves for p in h)
    assert [len(h) for h in halves] == [2, 2] and keys == sorted(ex["key"] for ex in recs)
    with pytest.raises(ValueError, match="split 'eval_x3' is not in dataset 'passkey'"):
        list(fd.passkey_pairs(cfg, "eval_x3"))


def test_byte_answer_has_no_space(tmp_path):
    cfg = small_cfg(tmp_path, kind="byte")
    p = next(iter(fd.passkey_pairs(cfg, "validation")))
    tok = ByteTokenizer()
    assert tok.decode(p.answer).isdigit() and tok.decode(p.prompt).endswith("The pass key is ")


def test_prepare_survives_another_process_finishing_first(tmp_path):
    """Two processes preparing one dataset: tfds's final rename fails for the later one with
    FileExistsError; prepare then reads the files the first one wrote instead of crashing."""
    from famjax.data import tfds_util

    cfg = small_cfg(tmp_path)
    tok = WordTokenizer(passkey_vocab())
    made = []

    def make():
        b = passkey.FamjaxPasskey(config=passkey.passkey_config(cfg.passkey, tok), data_dir=str(tmp_path),
                                  tokenizer=tok, file_format="array_record")
        if not made:  # the first builder loses the race: the "other process" prepares, then the rename fails
            def lose(**kwargs):
                passkey.FamjaxPasskey(config=passkey.passkey_config(cfg.passkey, tok), data_dir=str(tmp_path),
                                      tokenizer=tok, file_format="array_record").download_and_prepare(**kwargs)
                raise FileExistsError("Destination 1.0.0 already exists.")
            b.download_and_prepare = lose
        made.append(b)
        return b

    builder = tfds_util.prepare(make)
    assert len(made) == 2 and builder is made[1]
    assert len(builder.as_data_source(split="train")) == 40
    with pytest.raises(FileExistsError):  # a rename that fails with nothing prepared is still an error
        tfds_util.prepare(lambda: _always_losing_builder(tmp_path / "none", cfg, tok))


def _always_losing_builder(data_dir, cfg, tok):
    b = passkey.FamjaxPasskey(config=passkey.passkey_config(cfg.passkey, tok), data_dir=str(data_dir),
                              tokenizer=tok, file_format="array_record")

    def lose(**kwargs):
        raise FileExistsError("Destination already exists.")
    b.download_and_prepare = lose
    return b


def test_make_pairs_any_length_reproducible():
    tok = WordTokenizer(passkey_vocab())
    a = passkey.make_pairs(tok, np.random.default_rng(7), filler_len=300, count=3)
    b = passkey.make_pairs(tok, np.random.default_rng(7), filler_len=300, count=3)
    assert len(a) == 3 and all(np.array_equal(x.prompt, y.prompt) for x, y in zip(a, b))
    short = passkey.make_pairs(tok, np.random.default_rng(7), filler_len=20, count=1)[0]
    for pair in a:
        assert len(pair.prompt) - len(short.prompt) == 280  # exactly the filler difference
        key = tok.decode(pair.answer).strip()
        assert len(key) == 5 and key.isdigit() and key in tok.decode(pair.prompt)
    with pytest.raises(ValueError, match="key_position"):
        passkey.make_pairs(tok, np.random.default_rng(0), filler_len=10, count=1, key_position="middle")
