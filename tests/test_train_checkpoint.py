"""Checkpoints: RSP state survives, corrupt newest falls back, restore_model paths, NaN stops the run."""
# ruff: noqa: F811  (pytest fixtures imported from test_train_common are redefined as arguments)
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_common import passkey_dir, synthetic_batch, tiny_config  # noqa: F401

from famjax.errors import CheckpointError
from famjax.train import checkpoint as ck
from famjax.train import loop, optim
from famjax.train import mesh as meshlib
from famjax.train.config import to_json
from famjax.train.state import abstract_model, abstract_train_state, create_train_state
from famjax.train.step import cross_entropy, make_train_step

_STEPS: dict = {}


def two_steps(cfg):
    mesh = meshlib.make_mesh(cfg.mesh, jax.devices()[:1])
    tx = optim.make_optimizer(cfg.train)
    ts, _ = create_train_state(cfg, tx, mesh, stream=False)
    graphdef, _, _ = abstract_model(cfg)
    key = to_json(cfg.model) + to_json(cfg.fam) + to_json(cfg.train)
    if key not in _STEPS:  # same config, same compiled step (CPU compiles are slow)
        _STEPS[key] = jax.jit(make_train_step(cfg, graphdef, tx, streaming=False))
    step = _STEPS[key]
    b1, b2 = (synthetic_batch(8, 128, cfg.model.vocab_size, 16, seed=s) for s in (0, 1))
    ts1, m1 = step(ts, b1)
    before = jax.tree.map(np.asarray, ts1)  # ts1 is not donated (plain jit)
    ts2, m2 = step(ts1, b2)
    return graphdef, before, b2, (m1, m2), ts2, mesh, tx


def loss_from(graphdef, params, batch, fam):
    """Returns the loss of batch from fresh rows, or (fam [L, F, d] given) rows started from that FAM."""
    from flax import nnx

    @jax.jit  # eager op-by-op execution of the model is far slower than compiling it on CPU
    def f(params, batch, fam):
        model = nnx.merge(graphdef, params)
        state = None if fam is None else model.start_from_fam(8, fam)  # fam [L, F, d]
        ss = batch["segment_start"].at[:, 0].set(False)
        logits, _ = model(batch["tokens"], state, segment_start=ss)
        ce, _, w, _, _ = cross_entropy(logits, batch["targets"], batch["loss_mask"])
        return ce / w
    return float(f(params, batch, fam))


@pytest.mark.slow
@pytest.mark.parametrize("p", [1.0, 0.0])
def test_rsp_next_step_starts_from_saved_fam_iff_p1(passkey_dir, p):
    cfg = tiny_config(passkey_dir)
    cfg.fam.rsp_prob, cfg.fam.rpo = p, False
    graphdef, ts1, b2, (m1, m2), _, _, _ = two_steps(cfg)
    assert float(m1["rsp_used"]) == 0.0  # nothing saved before the first step
    assert float(m2["rsp_used"]) == p
    assert bool(ts1.rsp_valid)
    from_saved = loss_from(graphdef, ts1.params, b2, ts1.rsp_fam)
    fresh = loss_from(graphdef, ts1.params, b2, None)
    assert abs(from_saved - fresh) > 1e-4  # the saved FAM matters
    np.testing.assert_allclose(float(m2["loss"]), from_saved if p == 1.0 else fresh, rtol=1e-5)


def test_rsp_state_survives_a_checkpoint(passkey_dir, tmp_path):
    cfg = tiny_config(passkey_dir)
    cfg.fam.rsp_prob, cfg.fam.rpo = 1.0, False
    cfg.checkpoint.async_save = True
    _, _, _, _, ts2, mesh, tx = two_steps(cfg)
    c = ck.Checkpointer(str(tmp_path), cfg.checkpoint, cfg)
    c.save(ts2, {"next": 7})
    c.wait()
    abstract, _ = abstract_train_state(cfg, tx, mesh, stream=False)
    restored, data_state, step = c.restore(abstract)
    c.close()
    assert step == 2 and data_state == {"next": 7} and bool(restored.rsp_valid)
    np.testing.assert_array_equal(np.asarray(restored.rsp_fam), np.asarray(ts2.rsp_fam))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(ts2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def corrupt(step_dir):
    """Destroys a committed step's parameters (as a crash or disk fault mid-file could)."""
    for root, _, files in os.walk(os.path.join(step_dir, "params")):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")


def test_corrupt_latest_falls_back_and_restore_model_paths(passkey_dir, tmp_path, caplog):
    cfg = tiny_config(passkey_dir)
    cfg.checkpoint.async_save = False
    mesh = meshlib.make_mesh(cfg.mesh, jax.devices()[:1])
    tx = optim.make_optimizer(cfg.train)
    ts, _ = create_train_state(cfg, tx, mesh, stream=False)
    with open(tmp_path / "config.json", "w") as f:
        f.write(to_json(cfg))
    c = ck.Checkpointer(str(tmp_path), cfg.checkpoint, cfg)
    c.save(ts, None)
    ts5 = ts.replace(step=jnp.asarray(5, jnp.int32), params=jax.tree.map(lambda x: x + 1, ts.params))
    c.save(ts5, None)
    c.wait()
    # restore_model from the workdir, the checkpoints dir and a step dir.
    m, cfg2 = ck.restore_model(str(tmp_path))
    np.testing.assert_array_equal(np.asarray(m.embed[...]), np.asarray(ts5.params["embed"]))
    assert cfg2.model.to_dict() == cfg.model.to_dict()
    m0, _ = ck.restore_model(str(tmp_path / "checkpoints" / "0"))
    np.testing.assert_array_equal(np.asarray(m0.embed[...]), np.asarray(ts.params["embed"]))
    m5, _ = ck.restore_model(str(tmp_path / "checkpoints"))
    np.testing.assert_array_equal(np.asarray(m5.embed[...]), np.asarray(ts5.params["embed"]))

    corrupt(str(tmp_path / "checkpoints" / "5"))
    m, _ = ck.restore_model(str(tmp_path))  # inference falls back (and moves nothing)
    np.testing.assert_array_equal(np.asarray(m.embed[...]), np.asarray(ts.params["embed"]))
    assert (tmp_path / "checkpoints" / "5").is_dir()
    abstract, _ = abstract_train_state(cfg, tx, mesh, stream=False)
    caplog.set_level("WARNING")
    restored, _, step = c.restore(abstract)
    assert step == 0 and "step 5" in caplog.text and "unreadable" in caplog.text
    np.testing.assert_array_equal(np.asarray(restored.params["embed"]), np.asarray(ts.params["embed"]))
    # The trainer moved the bad step aside (kept, not deleted) and can save step 5 again.
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["0", "corrupt-5"] and c.steps() == [0]
    c.save(ts5, None)
    c.wait()
    assert c.steps() == [0, 5]
    corrupt(str(tmp_path / "checkpoints" / "0"))
    corrupt(str(tmp_path / "checkpoints" / "5"))
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        c.restore(abstract)
    assert c.steps() == [0, 5]  # nothing moved when nothing restores
    c.close()
    shutil.rmtree(tmp_path / "checkpoints")
    with pytest.raises(FileNotFoundError):
        ck.restore_model(str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(passkey_dir, tmp_path):
    cfg = tiny_config(passkey_dir, learning_rate=1e30, grad_clip_norm=0.0, warmup_steps=0, steps=6,
                      schedule="constant")
    cfg.checkpoint.update(every_steps=1, async_save=False)
    with pytest.raises(loop.NonFiniteLossError, match="last good checkpoint: step 1") as e:
        loop.train(cfg, str(tmp_path))
    assert "at step 2" in str(e.value)
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [1]


def test_bswa_state_with_zero_size_leaves_checkpoints(passkey_dir, tmp_path):
    """A BSWA model has a [L, 0, d] saved FAM: orbax refuses zero-size arrays, the checkpointer skips them."""
    cfg = tiny_config(passkey_dir)
    cfg.model.attention = "bswa"
    mesh = meshlib.make_mesh(cfg.mesh, jax.devices()[:1])
    tx = optim.make_optimizer(cfg.train)
    ts, _ = create_train_state(cfg, tx, mesh, stream=False)
    assert any(x.size == 0 for x in jax.tree.leaves(ts))
    c = ck.Checkpointer(str(tmp_path), cfg.checkpoint, cfg)
    c.save(ts, None)
    c.wait()
    abstract, _ = abstract_train_state(cfg, tx, mesh, stream=False)
    restored, _, step = c.restore(abstract)
    c.close()
    assert step == 0
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(ts)):
        assert a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _train_restores(c) -> list:
    """Records the steps of the train-state restores that Checkpointer c starts from now on."""
    steps, restore = [], c._mngr.restore

    def spy(step, *args, **kwargs):
        if "train" in kwargs.get("args", {}).keys():
            steps.append(step)
        return restore(step, *args, **kwargs)
    c._mngr.restore = spy
    return steps


def test_packed_checkpoint_restores_for_document_streams(passkey_dir, tmp_path, caplog):
    """A packed-rows run fine-tuned as document streams (data.passkey.chain): everything but the streams is
    restored, and the streams start as a new run starts them. Which case it is comes from the checkpoint's
    metadata: one restore each, none started only to fail."""
    from famjax.train.state import fresh_streams

    cfg = tiny_config(passkey_dir)
    cfg.fam.rsp_prob, cfg.fam.rpo = 0.0, False  # the config of the RSP p = 0 test: one compiled step for both
    _, _, _, _, ts2, mesh, tx = two_steps(cfg)
    c = ck.Checkpointer(str(tmp_path), cfg.checkpoint, cfg)
    c.save(ts2, None)
    c.wait()
    abstract, shardings = abstract_train_state(cfg, tx, mesh, stream=True)
    restores = _train_restores(c)
    with caplog.at_level("WARNING"):
        restored, _, step = c.restore(abstract)
    c.close()
    assert step == 2 and restored.stream is None and "holds no stream state" in caplog.text
    assert restores == [2]
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(ts2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    filled = fresh_streams(cfg, restored, shardings)
    new, _ = create_train_state(cfg, tx, mesh, stream=True)
    assert jax.tree.structure(filled) == jax.tree.structure(new)
    # The streams are what a new run starts with for the same parameters.
    again = fresh_streams(cfg, new.replace(stream=None, stream_offset=None), shardings)
    for a, b in zip(jax.tree.leaves((again.stream, again.stream_offset)),
                    jax.tree.leaves((new.stream, new.stream_offset))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A stream run's checkpoint fine-tuned with another batch size: everything but the streams is restored.
    caplog.clear()
    c = ck.Checkpointer(str(tmp_path / "streams"), cfg.checkpoint, cfg)
    c.save(new, None)
    c.wait()
    half = tiny_config(passkey_dir)
    half.data.batch_size = cfg.data.batch_size // 2
    abstract_half, _ = abstract_train_state(half, tx, mesh, stream=True)
    assert abstract_half.stream_offset.shape != new.stream_offset.shape
    restores = _train_restores(c)
    with caplog.at_level("WARNING"):
        restored, _, step = c.restore(abstract_half)
    c.close()
    assert step == 0 and restored.stream is None and "another batch size" in caplog.text and restores == [0]
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(new.replace(stream=None, stream_offset=None))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A checkpoint that is unreadable for another reason still fails (here: every step corrupt).
    corrupt(tmp_path / "checkpoints" / "2")
    c = ck.Checkpointer(str(tmp_path), cfg.checkpoint, cfg)
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        c.restore(abstract)
    c.close()
