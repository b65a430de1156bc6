"""State noise and drift (fam.noise, fam.drift) through the one FAM perturbation point, and the trainer's hook
for a perturbation of one's own: the same training as before the perturbation point existed, reproducible,
split exactly over micro-batches."""
# ruff: noqa: F811  (pytest fixtures imported from test_train_common are redefined as arguments)
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_common import passkey_dir, synthetic_batch, tiny_config  # noqa: F401

from famjax import ops
from famjax.train import mesh as meshlib
from famjax.train import optim, perturb
from famjax.train.config import validate
from famjax.train.state import abstract_model, create_train_state
from famjax.train.step import make_train_step

# Recorded at commit fd01abd, before the perturbation point (noise was ops.FamNoise inside the FAM scan), on
# this config, 3 steps: the losses and the sum / sum of squares of (parameters after - parameters at init).
# The refactor reproduced them bit for bit (same draws, same order of operations); the tolerances below only
# allow for another CPU's float rounding.
REFERENCE = {
    "noise_drift": ([4.603132247924805, 4.650079727172852, 4.555113315582275],
                    -0.8148313050537581, 0.27551437367604537),
    "noise_drift_keep_norm": ([4.625410556793213, 4.638810157775879, 4.554434299468994],
                              -1.0632749432570563, 0.27240583172557337),
}


def _config(data_dir, *, noise=0.0, drift=0.0, keep_norm=False, **train):
    cfg = tiny_config(data_dir, **train)
    cfg.mesh.shape = (1, 1, 1)
    cfg.fam.update(noise=noise, drift=drift, keep_norm=keep_norm)
    return cfg


def _steps(cfg, n=3, perturb_fn=None):
    """Runs n train steps on fixed synthetic batches; returns (losses, update sum, update sum of squares)."""
    mesh = meshlib.make_mesh(cfg.mesh, jax.devices()[:1])
    tx = optim.make_optimizer(cfg.train)
    ts, _ = create_train_state(cfg, tx, mesh, stream=False)
    graphdef, _, _ = abstract_model(cfg)
    init = jax.tree.map(np.asarray, ts.params)
    step = jax.jit(make_train_step(cfg, graphdef, tx, streaming=False, perturb=perturb_fn))
    losses = []
    for i in range(n):
        batch = synthetic_batch(8, 128, cfg.model.vocab_size, 16, seed=i)
        ts, m = step(ts, {k: jnp.asarray(v) for k, v in batch.items()})
        losses.append(float(m["loss"]))
    upd = [np.asarray(a, np.float64) - b for a, b in zip(jax.tree.leaves(ts.params), jax.tree.leaves(init))]
    return losses, sum(float(u.sum()) for u in upd), sum(float(np.square(u).sum()) for u in upd)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_state_noise_training_equals_the_recorded_run(passkey_dir, name):
    keep = name.endswith("keep_norm")
    losses, total, square = _steps(_config(passkey_dir, noise=0.3, drift=0.2, keep_norm=keep))
    want_losses, want_total, want_square = REFERENCE[name]
    np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
    # The sum of the updates cancels (|total| ~ 1 from updates whose squares sum to 0.27): its rounding is absolute.
    np.testing.assert_allclose(total, want_total, rtol=0, atol=1e-4)
    np.testing.assert_allclose(square, want_square, rtol=1e-5)
    if keep:
        return
    assert abs(losses[0] - 4.619052410125732) > 1e-3  # without noise the first loss was this: noise reaches it
    # Accumulation: the rows' draws are split with the rows, so two micro-batches train the same.
    accum = _steps(_config(passkey_dir, noise=0.3, drift=0.2, grad_accum_steps=2))
    np.testing.assert_allclose(accum[0], losses, rtol=1e-5)
    np.testing.assert_allclose(accum[1:], [total, square], rtol=1e-4)
    # The same noise passed as a function of one's own (the experiments' hook) trains identically.
    own = _steps(_config(passkey_dir), perturb_fn=perturb.state_noise(noise=0.3, drift=0.2))
    assert own == (losses, total, square)


def test_own_perturbation_replaces_config_noise_and_needs_fam(passkey_dir, tmp_path):
    from famjax.train import train

    fn = perturb.state_noise(noise=0.1, drift=0.0)
    cfg = _config(passkey_dir, noise=0.1)
    graphdef, _, _ = abstract_model(cfg)
    with pytest.raises(ValueError, match="replaces fam.noise"):
        make_train_step(cfg, graphdef, optim.make_optimizer(cfg.train), streaming=False, perturb=fn)
    cfg.mesh.shape = (-1, 1, 1)
    with pytest.raises(ValueError, match="replaces fam.noise"):  # train() hands the function to the step
        train(cfg, str(tmp_path / "run"), perturb=fn)
    bswa = _config(passkey_dir)
    bswa.model.attention = "bswa"
    graphdef, _, _ = abstract_model(bswa)
    with pytest.raises(ValueError, match="needs a FAM model"):
        make_train_step(bswa, graphdef, optim.make_optimizer(bswa.train), streaming=False, perturb=fn)
    assert perturb.from_config(bswa) is None and perturb.from_config(_config(passkey_dir)) is None


@pytest.mark.parametrize("field", ["noise", "drift"])
def test_negative_state_noise_is_a_config_error(passkey_dir, field):
    cfg = _config(passkey_dir, **{field: -0.1})
    with pytest.raises(ValueError, match=f"fam.{field} must be >= 0"):
        validate(cfg)


def test_state_noise_draws():
    """noise is fresh per block, drift is one direction repeated after every block; each on its own key."""
    key, shape = jax.random.PRNGKey(0), (2, 3, 4, 5, 6)
    assert perturb.draw_state_noise(key, shape, noise=0.0, drift=0.0) is None
    assert perturb.state_noise(noise=0.0, drift=0.0) is None
    drift = np.asarray(perturb.draw_state_noise(key, shape, noise=0.0, drift=0.5))
    assert drift.shape == shape and np.all(drift == drift[:, :, :1]) and 0.3 < drift.std() < 0.7
    noise = np.asarray(perturb.draw_state_noise(key, shape, noise=0.2, drift=0.0))
    assert np.abs(noise[:, :, 1] - noise[:, :, 0]).max() > 0.01  # fresh per block
    both = perturb.state_noise(noise=0.2, drift=0.5)(key, shape)
    assert isinstance(both, ops.Perturbation)
    np.testing.assert_allclose(np.asarray(both.data), noise + drift, rtol=1e-6)
    fam = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 6)), jnp.float32)
    eps = jnp.asarray(noise[0, :, 0])
    rms = jnp.sqrt(jnp.mean(jnp.square(fam), -1, keepdims=True))
    np.testing.assert_allclose(perturb.add_state_noise(fam, eps, keep_norm=False), fam + eps * rms, rtol=1e-6)
    kept = perturb.add_state_noise(fam, eps, keep_norm=True)
    np.testing.assert_allclose(jnp.linalg.norm(kept, axis=-1), jnp.linalg.norm(fam, axis=-1), rtol=1e-5)
