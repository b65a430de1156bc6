"""The linear probe of experiments/passkey/fam_probe.py reads a planted key and only that."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                                "passkey"))
import fam_probe  # noqa: E402


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
