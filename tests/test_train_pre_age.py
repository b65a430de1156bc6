"""fam.pre_age: training rows start from FAMs that read key-free PassKey filler (no gradient), the aged FAM is
exactly the model's own after those blocks, training stays reproducible and accumulation-exact, and bad
settings are one-line config errors."""
# ruff: noqa: F811  (pytest fixtures imported from test_train_common are redefined as arguments)
import jax.numpy as jnp
import numpy as np
import pytest
from model_utils import make_model, random_tokens
from test_train_common import passkey_dir, synthetic_batch  # noqa: F401
from test_train_norm_penalty import _config, _steps

from famjax.train.step import pre_aged_fam


def test_pre_aged_fam_is_the_fam_after_reading_the_last_blocks():
    model, cfg, _ = make_model(memory_blocks=0)
    B = cfg.block_size
    filler = jnp.asarray(np.repeat(random_tokens(1, 3 * B, cfg.vocab_size, seed=3), 4, axis=0))
    ages = jnp.asarray([0, 1, 2, 3])
    aged = pre_aged_fam(model, filler, ages, B)  # [L, 4, F, d]
    for row, k in enumerate([1, 2, 3]):
        _, state = model(filler[:1, (3 - k) * B:], model.init_state(1))
        np.testing.assert_allclose(np.asarray(aged[:, row + 1]), np.asarray(state.layers.fam[:, 0]),
                                   rtol=2e-5, atol=2e-5)
    # ages differ, so do the FAMs (the check above cannot pass by reading the same blocks for every row)
    assert float(jnp.max(jnp.abs(aged[:, 1] - aged[:, 3]))) > 1e-3


@pytest.mark.slow
def test_pre_age_changes_training_reproducibly_and_accumulates_exactly(passkey_dir):
    base = _config(passkey_dir, 0.0)
    data = [synthetic_batch(8, 128, base.model.vocab_size, 16, seed=i) for i in range(2)]
    _, _, _, clean = _steps(base, data)
    cfgs = []
    for accum in (1, 2):
        cfg = _config(passkey_dir, 0.0, grad_accum_steps=accum)
        cfg.fam.pre_age, cfg.fam.pre_age_rows = 6, 4
        cfgs.append(cfg)
    _, _, _, aged = _steps(cfgs[0], data)
    _, _, _, again = _steps(cfgs[0], data)
    _, _, _, accum = _steps(cfgs[1], data)
    assert abs(aged[0]["loss"] - clean[0]["loss"]) > 1e-4  # the aged FAMs reach the loss
    np.testing.assert_allclose([m["loss"] for m in again], [m["loss"] for m in aged], rtol=1e-6)
    np.testing.assert_allclose([m["loss"] for m in accum], [m["loss"] for m in aged], rtol=1e-5)


@pytest.mark.parametrize("change,match", [
    ({"fam.pre_age": -1}, "fam.pre_age must be >= 0"),
    ({"fam.pre_age": 4, "fam.pre_age_rows": 0}, "fam.pre_age_rows >= 1"),
    ({"fam.pre_age": 4, "data.passkey.chain": 4}, "data.passkey.chain > 1"),
    ({"fam.pre_age": 4, "data.batching": "stream"}, "data.batching 'stream'"),
    ({"fam.pre_age": 4, "data.dataset": "local_text"}, "needs data.dataset 'passkey'"),
])
def test_bad_pre_age_is_a_config_error(passkey_dir, change, match):
    from famjax.train.config import validate

    cfg = _config(passkey_dir, 0.0)
    cfg.update_from_flattened_dict(change)
    with pytest.raises(ValueError, match=match):
        validate(cfg)
