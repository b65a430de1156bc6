"""Sharded training: mesh (2, 2, 2) on 8 CPU devices == 1 device; params sharded as the rules say;
gradient accumulation and carried stream state."""
# ruff: noqa: F811  (pytest fixtures imported from test_train_common are redefined as arguments)
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from test_train_common import passkey_dir, synthetic_batch, tiny_config  # noqa: F401

from famjax.train import mesh as meshlib
from famjax.train import optim
from famjax.train.config import to_json
from famjax.train.state import abstract_model, create_train_state
from famjax.train.step import make_train_step

_STEPS: dict = {}


def run_steps(cfg, devices, batches, *, streaming=False):
    cfg.mesh.shape = (2, 2, 2) if len(devices) == 8 else (1, 1, 1)
    mesh = meshlib.make_mesh(cfg.mesh, devices)
    tx = optim.make_optimizer(cfg.train)
    ts, shardings = create_train_state(cfg, tx, mesh, stream=streaming)
    graphdef, _, _ = abstract_model(cfg)
    losses = []
    key = (to_json(cfg), len(devices), streaming)
    for b in batches:
        gb = meshlib.global_batch(b, cfg.mesh.rules, mesh)
        if key not in _STEPS:  # runs with the same config reuse the compiled step (CPU compiles are slow)
            _STEPS[key] = jax.jit(make_train_step(cfg, graphdef, tx, streaming=streaming),
                                  in_shardings=(shardings, {k: v.sharding for k, v in gb.items()}),
                                  out_shardings=(shardings, meshlib.replicated(mesh)), donate_argnums=0)
        with meshlib.activation_rules(mesh, cfg.mesh.rules):  # as the trainer runs it
            ts, m = _STEPS[key](ts, gb)
        losses.append(float(m["loss"]))
    return ts, losses


def rsp_config(data_dir, **train):
    cfg = tiny_config(data_dir, **train)
    cfg.fam.rsp_prob = 1.0  # exercise random state passing too (from step 2 on)
    return cfg


def batches(cfg, n=5):
    return [synthetic_batch(8, 128, cfg.model.vocab_size, 16, seed=i) for i in range(n)]


@pytest.mark.slow
def test_mesh_222_matches_one_device_and_shards_params(passkey_dir):
    assert jax.device_count() == 8
    cfg = rsp_config(passkey_dir)
    data = batches(cfg)
    ts8, l8 = run_steps(cfg, jax.devices(), data)
    ts1, l1 = run_steps(cfg, jax.devices()[:1], data)
    np.testing.assert_allclose(l8, l1, rtol=1e-4, atol=1e-5)
    assert l1[-1] < l1[0]
    for a, b in zip(jax.tree.leaves(ts8.params), jax.tree.leaves(ts1.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    p = ts8.params
    # Rules: vocab -> tensor, embed -> fsdp, q_heads/kv_heads/mlp -> tensor, layers/head_dim/fam -> None.
    assert p["embed"].sharding.spec == P("tensor", "fsdp")
    assert p["layers"]["attn"]["q"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert p["layers"]["mlp"]["down"].sharding.spec == P(None, "tensor", "fsdp")
    assert p["fam_init"].sharding.spec == P(None, "fsdp")
    shard = p["layers"]["mlp"]["up"].addressable_shards[0].data
    assert shard.shape == (2, 16, 32)  # [L, d / fsdp, mlp / tensor]: really split, not replicated
    mu = ts8.opt_state[1][0].mu  # clip -> adamw(scale_by_adam): moments sharded like the params
    assert mu["layers"]["mlp"]["up"].sharding.spec == P(None, "fsdp", "tensor")


@pytest.mark.slow
def test_grad_accumulation_equals_one_big_batch(passkey_dir):
    data = batches(rsp_config(passkey_dir), 2)
    _, l1 = run_steps(rsp_config(passkey_dir), jax.devices()[:1], data)  # compiled once per config
    _, l2 = run_steps(rsp_config(passkey_dir, grad_accum_steps=4), jax.devices()[:1], data)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)


@pytest.mark.slow
def test_stream_state_is_carried_across_steps_and_reset(passkey_dir):
    cfg = tiny_config(passkey_dir)
    cfg.fam.rpo = False
    mk = lambda seed, start: dict(synthetic_batch(8, 128, cfg.model.vocab_size, 16, seed),
                                  segment_start=np.full(8, start))
    # Step 2 continues the documents of step 1 ...
    ts, carried = run_steps(cfg, jax.devices()[:1], [mk(0, True), mk(1, False)], streaming=True)
    # ... and gives another loss than starting the same chunk fresh, which a reset reproduces exactly.
    _, restarted = run_steps(cfg, jax.devices()[:1], [mk(0, True), mk(1, True)], streaming=True)
    assert abs(carried[1] - restarted[1]) > 1e-4
    assert int(ts.stream.pos[0]) == 256
    cfg2 = tiny_config(passkey_dir)
    cfg2.fam.rpo = False
    cfg2.train.grad_accum_steps = 2
    _, acc = run_steps(cfg2, jax.devices()[:1], [mk(0, True), mk(1, False)], streaming=True)
    np.testing.assert_allclose(acc, carried, rtol=1e-5)


def test_make_mesh_fill_and_errors():
    from ml_collections import ConfigDict
    assert meshlib.make_mesh(ConfigDict({"shape": (2, -1, 1)})).shape == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ValueError, match="needs 4 devices"):
        meshlib.make_mesh(ConfigDict({"shape": (2, 2, 1)}))


def test_activation_constraints_follow_the_rules_and_vanish_without_a_mesh():
    import os

    import jax.numpy as jnp
    import ml_collections

    from famjax.model.sharding import constrain
    from famjax.train.config import sibling_config

    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    rules = sibling_config(os.path.join(configs, "x.py"), "default").get_config().mesh.rules
    mesh = meshlib.make_mesh(ml_collections.ConfigDict({"shape": (2, 2, 2)}), jax.devices()[:8])
    f = jax.jit(lambda x: constrain(x * 2, "batch", None, "q_heads", "head_dim"))
    x = jnp.ones((4, 6, 2, 3))
    with meshlib.activation_rules(mesh, rules):
        out = f(x)
    # batch -> (data, fsdp); q_heads -> tensor; "embed" would be fsdp, already taken by batch
    def spec(a):  # trailing unsharded dims may be left out of a spec
        return tuple(a.sharding.spec) + (None,) * (a.ndim - len(a.sharding.spec))
    assert spec(out) == (("data", "fsdp"), None, "tensor", None)
    g = jax.jit(lambda x: constrain(x * 2, "batch", None, "embed"))
    with meshlib.activation_rules(mesh, rules):
        assert spec(g(jnp.ones((4, 6, 8)))) == (("data", "fsdp"), None, None)
    assert len(f(x).sharding.device_set) == 1  # no mesh, no rules: unconstrained, one device


def test_adafactor_state_shards_under_fsdp():
    """Adafactor's factored moments have a lower rank than their parameter: replicated, while the full-size
    momentum follows the parameter (before, the parameter's spec was given to the factored vectors too)."""
    import os

    from famjax.train.config import sibling_config
    from famjax.train.state import abstract_train_state

    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    cfg = sibling_config(os.path.join(configs, "x.py"), "passkey_tiny").get_config()
    cfg.model.update(vocab_size=256, d_model=128, mlp_dim=256)
    cfg.train.optimizer, cfg.mesh.shape = "adafactor", (1, -1, 1)
    mesh = meshlib.make_mesh(cfg.mesh, jax.devices()[:8])
    state, _ = abstract_train_state(cfg, optim.make_optimizer(cfg.train), mesh, stream=False)
    leaves = jax.tree_util.tree_flatten_with_path(state.opt_state)[0]  # each spec was checked against its leaf
    factored = [x for path, x in leaves if "v_row" in jax.tree_util.keystr(path) or "v_col" in
                jax.tree_util.keystr(path)]
    assert factored and all(x.sharding.spec == P() for x in factored)
    assert any("fsdp" in str(x.sharding.spec) and x.ndim >= 2 for _, x in leaves)  # momentum, like its parameter
