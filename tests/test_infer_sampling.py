"""Sampling filters on hand-made logits; seeds; top-k=1 == greedy; invalid settings are clear errors."""
import jax
import numpy as np
import pytest

from famjax.infer import Sampling, filter_logits, sample


def test_top_k_keeps_exactly_the_k_best():
    logits = np.array([[0.0, 3.0, 1.0, 2.0, -1.0]], np.float32)
    kept = np.isfinite(np.asarray(filter_logits(logits, Sampling(temperature=1.0, top_k=2))))
    np.testing.assert_array_equal(kept, [[False, True, False, True, False]])


@pytest.mark.parametrize("top_p, n_kept", [(0.5, 1), (0.7, 2), (0.8, 2), (0.81, 3), (0.96, 4), (1.0, 4)])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, n_kept):
    probs = np.array([[0.05, 0.5, 0.15, 0.3]], np.float32)  # sorted: 0.5, 0.3, 0.15, 0.05
    filtered = np.asarray(filter_logits(np.log(probs), Sampling(temperature=1.0, top_p=top_p)))
    kept = np.isfinite(filtered)[0]
    assert kept.sum() == n_kept
    # The kept tokens are the most likely ones.
    assert probs[0][kept].min() >= probs[0][~kept].max(initial=0.0)


def test_temperature_scales_logits():
    logits = np.array([[1.0, 2.0, 4.0]], np.float32)
    np.testing.assert_allclose(np.asarray(filter_logits(logits, Sampling(temperature=2.0))), logits / 2)


def test_greedy_and_top_k_1_equal_argmax():
    logits = np.random.default_rng(0).normal(size=(64, 50)).astype(np.float32)
    want = logits.argmax(-1)
    key = jax.random.key(0)
    np.testing.assert_array_equal(np.asarray(sample(logits, key, Sampling())), want)
    np.testing.assert_array_equal(np.asarray(sample(logits, key, Sampling(temperature=5.0, top_k=1))), want)
    np.testing.assert_array_equal(np.asarray(sample(logits, key, Sampling(temperature=5.0, top_p=1e-6))), want)


def test_sampling_is_seeded_and_follows_the_distribution():
    logits = np.log(np.tile(np.array([[0.1, 0.2, 0.7]], np.float32), (20_000, 1)))
    s = Sampling(temperature=1.0)
    a = np.asarray(sample(logits, jax.random.key(1), s))
    np.testing.assert_array_equal(a, np.asarray(sample(logits, jax.random.key(1), s)))
    assert not np.array_equal(a, np.asarray(sample(logits, jax.random.key(2), s)))
    np.testing.assert_allclose(np.bincount(a, minlength=3) / len(a), [0.1, 0.2, 0.7], atol=0.02)
    # top_k=2 removes the 0.1 token and renormalises the rest.
    b = np.asarray(sample(logits, jax.random.key(1), Sampling(temperature=1.0, top_k=2)))
    np.testing.assert_allclose(np.bincount(b, minlength=3) / len(b), [0.0, 2 / 9, 7 / 9], atol=0.02)


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature="1"), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(top_k=True), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
])
def test_invalid_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Sampling(**kwargs)


def test_top_k_larger_than_vocab_is_an_error():
    with pytest.raises(ValueError, match="top_k must be <= vocab_size 10"):
        Sampling(temperature=1.0, top_k=11).check_vocab(10)
