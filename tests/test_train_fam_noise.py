"""fam.noise and fam.stretch: training-time FAM perturbations change the training forward, are reproducible, and
split over micro-batches so gradient accumulation changes nothing."""
# ruff: noqa: F811  (pytest fixtures imported from test_train_common are redefined as arguments)
import numpy as np
import pytest
from test_train_common import passkey_dir, synthetic_batch  # noqa: F401
from test_train_norm_penalty import _config, _steps


@pytest.mark.slow
@pytest.mark.parametrize("field,value", [("noise", 0.5), ("stretch", 3.0)])
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
    np.testing.assert_allclose([m["loss"] for m in accum], [m["loss"] for m in noisy], rtol=1e-5)
    np.testing.assert_allclose([m["fam_norm"] for m in accum], [m["fam_norm"] for m in noisy], rtol=1e-5)


def test_negative_fam_noise_is_a_config_error(passkey_dir):
    from famjax.train.config import validate

    cfg = _config(passkey_dir, 0.0)
    cfg.fam.noise = -0.1
    with pytest.raises(ValueError, match="fam.noise"):
        validate(cfg)


@pytest.mark.parametrize("field,value,match", [("stretch", -1.0, "fam.stretch must be"),
                                               ("keep_norm", True, "fam.stretch needs fam.keep_norm off")])
def test_bad_fam_stretch_is_a_config_error(passkey_dir, field, value, match):
    from famjax.train.config import validate

    cfg = _config(passkey_dir, 0.0)
    cfg.fam.stretch = 2.0
    cfg.fam[field] = value
    with pytest.raises(ValueError, match=match):
        validate(cfg)
