"""The linear probe of fam_probe reads a planted key and only that; fam_oracle's streamer equals one call and its
edits act only on the FAM."""
import numpy as np

from experiments.passkey import fam_oracle, fam_probe


def _data(n, dims, signal, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, (n, 5))
    y1h = np.eye(10)[labels].reshape(n, -1)
    mix = np.random.default_rng(0).normal(size=(50, dims))  # the same "writing" at every call
    x = signal * y1h @ mix + rng.normal(size=(n, dims))
    return x, y1h, labels


def test_probe_reads_a_linearly_written_key_and_not_noise():
    x, y1h, labels = _data(600, 300, 1.0, seed=1)
    probe = fam_probe.best_probe(x[:500], y1h[:500], labels[:500], 10)
    assert fam_probe.digit_accuracy(fam_probe.predict(probe, x[500:]), labels[500:], 10) > 0.9
    xn, yn, ln = _data(600, 300, 0.0, seed=2)  # no key in the features: chance
    probe = fam_probe.best_probe(xn[:500], yn[:500], ln[:500], 10)
    assert fam_probe.digit_accuracy(fam_probe.predict(probe, xn[500:]), ln[500:], 10) < 0.2


def _model():
    from flax import nnx

    import famjax

    cfg = famjax.ModelConfig(vocab_size=37, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
                             attention="fam", block_size=4, memory_blocks=0, fam_len=3)
    return famjax.FamLM(cfg, rngs=nnx.Rngs(0)), cfg


def test_oracle_streams_like_one_call_and_its_edits_act_only_on_the_fam():
    """fam_oracle.Streamer: block by block equals one call (spec 7); an edit toward the batch's own statistics
    changes nothing, toward another batch's it changes the predictions (so the edits reach the model); so does a
    scaled FAM, and a scale of 1 does not."""
    model, cfg = _model()
    rng = np.random.default_rng(1)
    seq = rng.integers(0, cfg.vocab_size, (1, 26)).astype(np.int32)
    other = rng.integers(0, cfg.vocab_size, (1, 26)).astype(np.int32)
    run = fam_oracle.Streamer(model)
    logits, _ = model(seq)
    pred, stats = run(seq, tail=18)  # 8 tokens in one call, then 4 + 4 + 4 + 4 + 2
    np.testing.assert_array_equal(pred, np.argmax(np.asarray(logits), -1)[:, -18:])
    assert len(stats) == 5
    for edit in ("recentred", "young_norm"):  # one row: its own mean and RMS give back its own FAM
        np.testing.assert_array_equal(run(seq, 18, stats, edit)[0], pred)
    _, other_stats = run(other, tail=18)
    moved = [run(seq, 18, other_stats, edit)[0] for edit in ("recentred", "young_norm")]
    assert all(np.any(m != pred) for m in moved)
    start = run.head(seq, 18)  # a shared head gives the same runs
    np.testing.assert_array_equal(run(seq, 18, other_stats, "recentred", start=start)[0], moved[0])
    np.testing.assert_array_equal(run(seq, 18, scale=(2, 1.0))[0], pred)
    assert np.any(run(seq, 18, scale=(1, 50.0))[0] != pred)  # a larger FAM weighs the later writes less
    hits = fam_oracle.digit_hits(pred, pred[:, -3:])
    assert hits.shape == (1, 3) and hits.all()
    assert fam_oracle.exact(pred, pred[:, -3:]) == 1.0
    wrong = pred[:, -3:].copy()
    wrong[0, 1] += 1
    assert fam_oracle.exact(pred, wrong) == 0.0
