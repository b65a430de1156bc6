"""fam.noise, .stretch, .drift, .age, .read_age, .read_stretch and .inflate: training-time FAM perturbations change the
training forward, are reproducible, and (all but the two ages) split over micro-batches so gradient accumulation
changes nothing."""
# ruff: noqa: F811  (pytest fixtures imported from test_train_common are redefined as arguments)
import numpy as np
import pytest
from test_train_common import passkey_dir, synthetic_batch  # noqa: F401
from test_train_norm_penalty import _config, _steps


@pytest.mark.slow
@pytest.mark.parametrize("field,value", [("noise", 0.5), ("stretch", 3.0), ("drift", 0.5), ("age", 3.0),
                                         ("read_age", 3.0), ("read_stretch", 3.0), ("inflate", 1.0)])
def test_fam_noise_changes_training_and_accumulates_exactly(passkey_dir, field, value):
    base = _config(passkey_dir, 0.0)
    data = [synthetic_batch(8, 128, base.model.vocab_size, 16, seed=i) for i in range(3)]
    _, _, _, clean = _steps(base, data)
    noisy_cfg = _config(passkey_dir, 0.0)
    noisy_cfg.fam[field] = value
    _, _, _, noisy = _steps(noisy_cfg, data)
    _, _, _, again = _steps(noisy_cfg, data)
    accum_cfg = _config(passkey_dir, 0.0, grad_accum_steps=2)
    accum_cfg.fam[field] = value
    _, _, _, accum = _steps(accum_cfg, data)
    assert abs(noisy[0]["loss"] - clean[0]["loss"]) > 1e-4  # the noise reaches the loss
    np.testing.assert_allclose([m["loss"] for m in again], [m["loss"] for m in noisy], rtol=1e-6)
    if field in ("age", "read_age"):  # the shared update is the mean over the micro-batch: accumulation changes it
        assert abs(accum[0]["loss"] - noisy[0]["loss"]) > 1e-6
        return
    np.testing.assert_allclose([m["loss"] for m in accum], [m["loss"] for m in noisy], rtol=1e-5)
    np.testing.assert_allclose([m["fam_norm"] for m in accum], [m["fam_norm"] for m in noisy], rtol=1e-5)


@pytest.mark.parametrize("field", ["noise", "stretch", "drift", "age", "read_age", "read_stretch", "inflate",
                                   "change_penalty", "norm_penalty"])
def test_negative_fam_perturbation_is_a_config_error(passkey_dir, field):
    from famjax.train.config import validate

    cfg = _config(passkey_dir, 0.0)
    cfg.fam[field] = -0.1
    with pytest.raises(ValueError, match=f"fam.{field} must be >= 0"):
        validate(cfg)


@pytest.mark.parametrize("field", ["stretch", "age", "inflate"])
def test_fam_stretch_or_age_with_keep_norm_is_a_config_error(passkey_dir, field):
    from famjax.train.config import validate

    cfg = _config(passkey_dir, 0.0)
    cfg.fam[field], cfg.fam.keep_norm = 2.0, True
    with pytest.raises(ValueError, match=f"fam.{field} needs fam.keep_norm off"):
        validate(cfg)


def test_draw_fam_noise_shapes_and_structure():
    """noise is fresh per block, drift is one direction repeated after every block, stretch one factor per row;
    each switch on its own key, so turning one on leaves the others' draws unchanged."""
    import jax

    from famjax.train.step import draw_fam_noise

    key, shape = jax.random.PRNGKey(0), (2, 3, 4, 5, 6)
    assert draw_fam_noise(key, shape, noise=0.0, stretch=0.0, drift=0.0) is None
    drift = np.asarray(draw_fam_noise(key, shape, noise=0.0, stretch=0.0, drift=0.5).eps)
    assert drift.shape == shape and np.all(drift == drift[:, :, :1]) and 0.3 < drift.std() < 0.7
    noise = np.asarray(draw_fam_noise(key, shape, noise=0.2, stretch=0.0, drift=0.0).eps)
    assert np.abs(noise[:, :, 1] - noise[:, :, 0]).max() > 0.01  # fresh per block
    both = draw_fam_noise(key, shape, noise=0.2, stretch=3.0, drift=0.5)
    np.testing.assert_allclose(np.asarray(both.eps), noise + drift, rtol=1e-6)
    stretch = np.asarray(both.stretch)
    assert stretch.shape == shape[:3] and np.all(stretch == stretch[:1, :, :1])
    assert np.all((stretch >= 0) & (stretch <= 3))
    assert len(np.unique(stretch[0, :, 0])) == shape[1]  # one factor per row
    aged = draw_fam_noise(key, shape, noise=0.2, stretch=3.0, drift=0.5, age=2.0)
    np.testing.assert_array_equal(np.asarray(aged.stretch), stretch)  # its own key: the others are unchanged
    age = np.asarray(aged.age)
    assert age.shape == shape[:3] and np.all(age == age[:1, :, :1]) and np.all((age >= 0) & (age <= 2))
    assert not np.allclose(age / 2.0, stretch / 3.0)
    read = draw_fam_noise(key, shape, noise=0.2, stretch=3.0, drift=0.5, age=2.0, read_age=4.0)
    np.testing.assert_array_equal(np.asarray(read.age), age)
    read_age = np.asarray(read.read_age)
    assert read_age.shape == shape[:3] and np.all(read_age == read_age[:1, :, :1])
    assert np.all((read_age >= 0) & (read_age <= 4)) and not np.allclose(read_age / 4.0, age / 2.0)
    both_reads = draw_fam_noise(key, shape, noise=0.0, stretch=0.0, drift=0.0, read_age=4.0, read_stretch=4.0)
    np.testing.assert_array_equal(np.asarray(both_reads.read_age), read_age)
    assert both_reads.eps is None and not np.allclose(np.asarray(both_reads.read_stretch), read_age)
    inflated = draw_fam_noise(key, shape, noise=0.0, stretch=3.0, drift=0.0, inflate=4.0)
    np.testing.assert_array_equal(np.asarray(inflated.stretch), stretch)
    inflate = np.asarray(inflated.inflate)
    assert inflate.shape == shape[:3] and np.all(inflate == inflate[:1, :, :1])
    assert np.all((inflate >= 0) & (inflate <= 4))
    assert not np.allclose(inflate / 4.0, stretch / 3.0)
