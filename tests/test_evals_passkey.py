"""PassKey scoring on hand-made examples, iterable inputs, tables; perplexity buckets."""
import csv
import json

import ml_collections
import numpy as np
import pytest
from model_utils import make_model, random_tokens

from famjax import evals, infer
from famjax.evals import run

FAM = dict(attention="fam", block_size=4, memory_blocks=1, fam_len=3)


def test_exact_match():
    assert evals.exact_match([5, 6, 7], np.array([5, 6, 7])) == 1
    assert evals.exact_match([5, 6, 8], [5, 6, 7]) == 0
    assert evals.exact_match([5, 6], [5, 6, 7]) == 0
    assert evals.exact_match([5, 6, 7, 8], [5, 6, 7]) == 0


def _right_and_wrong(model, cfg):
    """Returns examples whose answer is the model's greedy continuation (right) or differs in one token."""
    prompts = [random_tokens(1, n, cfg.vocab_size, seed=20 + n)[0] for n in (5, 11, 5)]
    greedy = infer.generate(model, prompts, max_new_tokens=3, chunk_size=4).tokens
    right = [(p, g) for p, g in zip(prompts, greedy)]
    wrong = []
    for p, g in zip(prompts, greedy):
        bad = g.copy()
        bad[-1] = (bad[-1] + 1) % cfg.vocab_size  # only the last token differs: still all-or-nothing
        wrong.append((p, bad))
    return right, wrong


def test_passkey_scores_right_one_and_wrong_zero():
    model, cfg, _ = make_model(seed=11, **FAM)
    right, wrong = _right_and_wrong(model, cfg)
    examples = [right[0], wrong[1], right[2], wrong[0], right[1], wrong[2]]
    # A generator: the evaluator must accept any iterable, read lazily in batches.
    scores = evals.evaluate_passkey(model, (e for e in examples), chunk_size=4, batch_size=3)
    assert [s.correct for s in scores] == [1, 0, 1, 0, 1, 0]
    assert [s.length for s in scores] == [5, 11, 5, 5, 11, 5]  # prompt length when none is given
    np.testing.assert_array_equal(scores[1].predicted, right[1][1])
    acc = evals.accuracy_by_length(scores)
    assert acc == {5: {"correct": 2, "count": 4, "accuracy": 0.5}, 11: {"correct": 1, "count": 2, "accuracy": 0.5}}


def test_compare_passkey_writes_tables_and_plot(tmp_path):
    # Two models of one config (same compiled programs); any attention kind takes the same path.
    fam, cfg, _ = make_model(seed=11, **FAM)
    other, _, _ = make_model(seed=14, **FAM)
    right, _ = _right_and_wrong(fam, cfg)
    # Explicit lengths (third element) group examples, as a filler length would.
    examples = [(p, a, 100) for p, a in right[:2]] + [(right[2][0], right[2][1], 400)]
    rows = evals.compare_passkey({"fam": fam, "other": other}, {"split": lambda: iter(examples)}, chunk_size=4,
                                 batch_size=3)
    fam_rows = [r for r in rows if r["model"] == "fam"]
    assert [(r["length"], r["accuracy"], r["count"]) for r in fam_rows] == [(100, 1.0, 2), (400, 1.0, 1)]
    assert [r["model"] for r in rows] == ["fam", "fam", "other", "other"]
    js, cs = evals.write_rows(rows, str(tmp_path / "passkey"))
    with open(js) as f:
        assert json.load(f) == rows
    with open(cs) as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and table[0]["model"] == "fam" and float(table[0]["accuracy"]) == 1.0


@pytest.mark.parametrize("bad, match", [((np.array([1, 2]),), "example 0 must be"),
                                         ((np.array([1, 2]), np.array([], np.int32)), "answer must be")])
def test_bad_examples_are_clear_errors(bad, match):
    model, _, _ = make_model(seed=11, **FAM)
    with pytest.raises(ValueError, match=match):
        evals.evaluate_passkey(model, [bad])


def test_run_passkey_on_a_tfds_split(tmp_path):
    from famjax import data
    cfg = data.default_config()
    cfg.tokenizer.kind = "word"  # the PassKey word vocabulary: short prompts, a small model vocabulary
    cfg.data_dir = str(tmp_path / "data")
    cfg.passkey.train_filler_min, cfg.passkey.train_filler_max = 4, 8
    cfg.passkey.train_examples, cfg.passkey.validation_examples = 2, 2
    cfg.passkey.eval_multipliers, cfg.passkey.eval_examples = (1, 2), 2
    cfg.passkey.key_digits = 2
    model, _, _ = make_model(seed=12, vocab_size=data.make_tokenizer(cfg).vocab_size, **FAM)
    rows = run.run_passkey({"fam": model}, cfg, str(tmp_path / "out"), limit=2, chunk_size=32, batch_size=2,
                           log=lambda *_: None)
    assert [(r["length"], r["count"]) for r in rows] == [(8, 2), (16, 2)]
    assert all(r["accuracy"] in (0.0, 0.5, 1.0) for r in rows)
    for ext in ("json", "csv", "png"):
        assert (tmp_path / "out" / f"passkey.{ext}").stat().st_size > 0


def test_bucket_sums_by_hand():
    sums, counts = evals.bucket_sums([1.0, 2.0, 3.0, 4.0, 5.0], [1, 2, 4, 8])
    np.testing.assert_allclose(sums, [1.0, 5.0, 9.0])
    np.testing.assert_array_equal(counts, [1, 2, 2])
    assert evals.doubling_edges(300, first=64) == [1, 64, 128, 256, 512]


def test_perplexity_by_position_and_run(tmp_path):
    model, cfg, _ = make_model(seed=13, **FAM)
    docs = [random_tokens(1, 17, cfg.vocab_size, seed=1)[0], random_tokens(1, 9, cfg.vocab_size, seed=2)[0]]
    rows = evals.perplexity_by_position(model, docs, edges=[1, 4, 8, 16], chunk_size=8)
    # Position 16 of the long document is past the last edge, so it is in no bucket.
    assert [(r["lo"], r["hi"], r["tokens"]) for r in rows] == [(1, 4, 6), (4, 8, 8), (8, 16, 9)]
    want = np.concatenate([infer.token_nll(model, d[None], chunk_size=8)[0][:3] for d in docs]).mean()
    np.testing.assert_allclose(rows[0]["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(rows[0]["perplexity"], np.exp(want), rtol=1e-5)
    out = run.run_perplexity({"a": model}, docs, str(tmp_path), chunk_size=8, first_bucket=4,
                             log=lambda *_: None)
    assert sum(r["tokens"] for r in out["a"]) == 16 + 8
    table = (tmp_path / "perplexity.md").read_text()
    assert "| [1, 4) |" in table and "a ppl" in table
    assert (tmp_path / "perplexity.png").stat().st_size > 0


def test_data_override_is_typed():
    from famjax.evals.__main__ import _override
    cfg = ml_collections.ConfigDict({"dataset": "passkey", "seq_len": 8, "shuffle": True,
                                     "passkey": {"eval_multipliers": (1, 2)}})
    got = _override(cfg, ["dataset=local_text", "seq_len=16", "shuffle=false", "passkey.eval_multipliers=4,8"])
    assert (got.dataset, got.seq_len, got.shuffle, got.passkey.eval_multipliers) == ("local_text", 16, False,
                                                                                    (4, 8))
    assert cfg.seq_len == 8
    with pytest.raises(ValueError, match="KEY=VALUE"):
        _override(cfg, ["seq_len"])
