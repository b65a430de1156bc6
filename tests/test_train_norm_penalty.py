"""fam.norm_penalty: the loss gains exactly weight * mean(final FAM^2), accumulation keeps it, and its
gradient pulls the FAM norm down."""
# ruff: noqa: F811  (pytest fixtures imported from test_train_common are redefined as arguments)
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_train_common import passkey_dir, synthetic_batch, tiny_config  # noqa: F401

from famjax.train import mesh as meshlib
from famjax.train import optim
from famjax.train.state import abstract_model, create_train_state
from famjax.train.step import make_train_step


def _config(data_dir, penalty, **train):
    cfg = tiny_config(data_dir, **train)
    cfg.fam.rpo = False  # the independent forward below uses no position offset
    cfg.fam.norm_penalty = penalty
    cfg.mesh.shape = (1, 1, 1)
    return cfg


def _steps(cfg, batches):
    mesh = meshlib.make_mesh(cfg.mesh, jax.devices()[:1])
    tx = optim.make_optimizer(cfg.train)
    ts, _ = create_train_state(cfg, tx, mesh, stream=False)
    graphdef, _, _ = abstract_model(cfg)
    step = jax.jit(make_train_step(cfg, graphdef, tx, streaming=False))
    first = ts
    out = []
    for b in batches:
        ts, m = step(ts, {k: jnp.asarray(v) for k, v in b.items()})
        out.append({k: float(v) for k, v in m.items()})
    return graphdef, first, ts, out


@pytest.mark.slow
def test_norm_penalty_value_accumulation_and_effect(passkey_dir):
    base = _config(passkey_dir, 0.0)
    data = [synthetic_batch(8, 128, base.model.vocab_size, 16, seed=i) for i in range(6)]
    graphdef, ts0, _, m0 = _steps(_config(passkey_dir, 0.0), data)
    _, _, _, m1 = _steps(_config(passkey_dir, 0.05), data)
    _, _, _, m4 = _steps(_config(passkey_dir, 0.05, grad_accum_steps=4), data)

    # The penalty of step 1 is weight * mean over rows, layers, rows of F and d of the final FAM squared.
    model = nnx.merge(graphdef, ts0.params)
    b = data[0]
    ss = jnp.asarray(b["segment_start"]).at[:, 0].set(False)
    _, state = model(jnp.asarray(b["tokens"]), model.init_state(8), segment_start=ss)
    expect = 0.05 * float(jnp.mean(jnp.square(state.layers.fam)))
    assert m0[0]["fam_penalty"] == 0.0 and m0[0]["fam_change"] == 0.0  # fam.change_penalty off: not measured
    assert m1[0]["fam_penalty"] == pytest.approx(expect, rel=1e-5)
    assert m1[0]["loss"] == pytest.approx(m0[0]["loss"], rel=1e-6)  # "loss" stays the CE alone
    # Micro-batches sum to the same penalty and training (the same losses and FAM norms).
    np.testing.assert_allclose([m["fam_penalty"] for m in m4], [m["fam_penalty"] for m in m1], rtol=1e-5)
    np.testing.assert_allclose([m["loss"] for m in m4], [m["loss"] for m in m1], rtol=1e-5)
    # Its gradient acts: after a few steps the FAM is smaller than without it.
    assert m1[-1]["fam_norm"] < 0.9 * m0[-1]["fam_norm"]


@pytest.mark.slow
def test_change_penalty_value_accumulation_and_effect(passkey_dir):
    """fam.change_penalty adds weight x the mean relative change of the FAM updates (logged as fam_change),
    splits exactly over micro-batches, and its gradient makes the updates smaller."""
    data = [synthetic_batch(8, 128, 64, 16, seed=i) for i in range(6)]

    def config(weight, **train):
        cfg = _config(passkey_dir, 0.0, **train)
        cfg.fam.change_penalty = weight
        return cfg
    _, _, _, control = _steps(config(1e-9), data)  # measured, with no pull
    _, _, _, m1 = _steps(config(10.0), data)
    _, _, _, m2 = _steps(config(10.0, grad_accum_steps=2), data)
    assert m1[0]["fam_change"] > 0 and m1[0]["fam_penalty"] == pytest.approx(10.0 * m1[0]["fam_change"], rel=1e-6)
    assert m1[0]["loss"] == pytest.approx(control[0]["loss"], rel=1e-6)  # the same forward
    for key in ("loss", "fam_change", "fam_norm"):
        np.testing.assert_allclose([m[key] for m in m2], [m[key] for m in m1], rtol=1e-4)
    assert control[0]["fam_change"] == pytest.approx(m1[0]["fam_change"], rel=1e-6)
    assert m1[-1]["fam_change"] < 0.9 * control[-1]["fam_change"]
