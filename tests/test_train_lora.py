"""LoRA fine-tuning in the trainer (train.init_from, train.trainable): only adapters + fam_init (+ norms) move,
the optimizer holds nothing of the frozen base, checkpoints hold the trained leaves + the base's path and hash
and resume to the same parameters, a different base is refused in one line, dropout acts in training only.

The pretrained bases are tiny random Llama-style models exported with famjax.convert (no PyTorch needed)."""
# ruff: noqa: F811  (pytest fixtures imported from test_train_common are redefined as arguments)
import json
import os
import shutil
from collections.abc import Mapping

import jax
import numpy as np
import pytest
from flax import nnx
from test_train_common import passkey_dir, synthetic_batch, tiny_config  # noqa: F401

import famjax
import famjax.restore
from famjax.convert.source import source_hash
from famjax.model import lora
from famjax.train import loop, optim, pretrained
from famjax.train import mesh as meshlib
from famjax.train.checkpoint import Checkpointer
from famjax.train.config import resolve, to_json, validate
from famjax.train.state import abstract_model, create_train_state
from famjax.train.step import make_eval_step, make_train_step


@pytest.fixture(scope="module")
def bases(passkey_dir, tmp_path_factory):
    """Two different pretrained bases (HF folders) with the tiny config's vocabulary and shapes."""
    import famjax.convert as fc

    vocab = tiny_config(passkey_dir).model.vocab_size
    root = tmp_path_factory.mktemp("bases")
    out = []
    for seed in (0, 1):
        cfg = famjax.ModelConfig(vocab_size=vocab, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                 mlp_dim=64, attention="full")
        folder = fc.export_pretrained(famjax.FamLM(cfg, rngs=nnx.Rngs(seed)), str(root / f"base{seed}"))
        with open(os.path.join(folder, "config.json")) as f:
            hf = json.load(f)
        with open(os.path.join(folder, "config.json"), "w") as f:  # as a checkpoint with a tokenizer has
            json.dump(dict(hf, bos_token_id=1, eos_token_id=2), f)
        out.append(folder)
    return out


def lora_config(data_dir, base, trainable="lora", **model):
    cfg = tiny_config(data_dir)
    cfg.fam.rsp_prob, cfg.fam.rpo = 0.0, False
    cfg.train.init_from, cfg.train.trainable = base, trainable
    cfg.model.update(dict(dict(lora_rank=4, lora_alpha=8.0), **model))
    cfg = resolve(cfg)
    validate(cfg)
    return cfg


def flat(tree):
    """{"a/b/c": leaf} of a nested mapping (pure dicts, or orbax's tree metadata)."""
    def plain(x):
        return {k: plain(v) for k, v in x.items()} if isinstance(x, Mapping) or hasattr(x, "tree") else x
    return {"/".join(map(str, k)): np.asarray(v) for k, v in lora._flatten(plain(tree)).items()}


_STEPS: dict = {}


def compiled_step(cfg, tx):
    key = to_json(cfg)
    if key not in _STEPS:  # CPU compiles are slow: one per config
        graphdef, _, _ = abstract_model(cfg)
        _STEPS[key] = jax.jit(make_train_step(cfg, graphdef, tx, streaming=False))
    return _STEPS[key]


def start(cfg, mutate=None):
    mesh = meshlib.make_mesh(cfg.mesh, jax.devices()[:1])
    tx = optim.make_optimizer(cfg.train)
    params = pretrained.load_base(cfg, mesh)
    if mutate is not None:
        params = mutate(params)
    ts, _ = create_train_state(cfg, tx, mesh, stream=False, params=params)
    return ts, tx, mesh


def batch(cfg, seed):
    return synthetic_batch(8, 128, cfg.model.vocab_size, 16, seed=seed)


def param_paths_in(opt_state):
    """The parameter paths (dict keys) of every leaf of an optimizer state."""
    out = set()
    for path, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
        if keys:
            out.add("/".join(keys))
    return out


@pytest.mark.parametrize("trainable", ["lora", "lora_norms"])
def test_only_adapters_and_fam_init_train_and_opt_state_holds_no_frozen_leaf(passkey_dir, bases, trainable):
    cfg = lora_config(passkey_dir, bases[0], trainable)
    assert cfg.model.d_model == 32 and cfg.model.attention == "fam" and cfg.model.lora_rank == 4
    ts, tx, _ = start(cfg)
    before = flat(jax.device_get(ts.params))
    step = compiled_step(cfg, tx)
    for i in range(3):
        ts, m = step(ts, batch(cfg, i))
        assert np.isfinite(float(m["loss"]))
    after = flat(jax.device_get(ts.params))
    mask = flat(lora.trainable_mask(ts.params, norms=trainable == "lora_norms"))
    trained = {p for p, on in mask.items() if on}
    assert "fam_init" in trained and "layers/attn/q_lora_a" in trained and "layers/attn/q" not in trained
    assert ("layers/norm1/scale" in trained) == (trainable == "lora_norms")
    for p in before:
        if p in trained:
            assert not np.array_equal(before[p], after[p]), f"{p} did not train"
        else:
            np.testing.assert_array_equal(before[p], after[p], err_msg=f"frozen {p} changed")
    assert param_paths_in(ts.opt_state) == trained  # adam's mu and nu: the trained leaves, nothing else
    opt_size = sum(x.size for x in jax.tree.leaves(ts.opt_state) if x.ndim)
    assert opt_size == 2 * sum(after[p].size for p in trained)


def test_checkpoint_holds_trained_leaves_and_base_pointer_and_resumes(passkey_dir, bases, tmp_path):
    cfg = lora_config(passkey_dir, bases[0])
    cfg.checkpoint.async_save = False
    ts, tx, mesh = start(cfg)
    step = compiled_step(cfg, tx)
    for i in range(3):
        ts, _ = step(ts, batch(cfg, i))
    c = Checkpointer(str(tmp_path), cfg.checkpoint, cfg)
    c.save(ts, {"next": 3})
    c.wait()
    trained = {p for p, on in flat(lora.trainable_mask(ts.params)).items() if on}
    saved = c._mngr.item_metadata(3)["params"]
    assert set(flat(saved)) == trained
    info = c.stored_base(3)
    assert info == {"source": os.path.abspath(bases[0]), "sha256": source_hash(bases[0]),
                    "trainable": "lora"}
    assert info["sha256"].startswith("sha256:") and len(info["sha256"]) == 7 + 64
    (restored, data_state, s), _ = loop._restore(cfg, c, tx, mesh, stream=False)
    c.close()
    assert s == 3 and data_state == {"next": 3}
    assert jax.tree.structure(restored) == jax.tree.structure(ts)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(ts)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_train_resumes_and_refuses_another_base(passkey_dir, bases, tmp_path):
    base = str(tmp_path / "base")
    shutil.copytree(bases[0], base)
    cfg = lora_config(passkey_dir, base)
    cfg.train.steps = 2
    cfg.checkpoint.update(every_steps=2, async_save=False)
    workdir = str(tmp_path / "run")
    assert loop.train(cfg, workdir).step == 2
    cfg.train.steps = 3
    assert loop.train(cfg, workdir).step == 3  # resumed from step 2 on the same base
    # Inference restores the run without the trainer: the base's frozen weights, the trained adapters.
    model, _ = famjax.restore.restore_model(workdir)
    base_params = flat(nnx.to_pure_dict(nnx.state(famjax.restore.base_model(cfg), nnx.Param)))
    restored = flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert set(restored) == set(base_params)
    moved = {p for p in restored if not np.array_equal(np.asarray(restored[p]), np.asarray(base_params[p]))}
    assert moved and moved <= {p for p, on in flat(lora.trainable_mask(restored)).items() if on}
    good = source_hash(base)
    shutil.rmtree(base)
    shutil.copytree(bases[1], base)  # another model at the same path
    bad = source_hash(base)
    with pytest.raises(ValueError, match="was trained on base"):
        famjax.restore.restore_model(workdir)
    cfg.train.steps = 4
    with pytest.raises(ValueError) as e:
        loop.train(cfg, workdir)
    msg = str(e.value)
    assert "\n" not in msg and good in msg and bad in msg and "different base" in msg
    # a full-parameter run cannot resume the LoRA checkpoints either
    cfg.train.trainable = "all"
    with pytest.raises(ValueError, match="train.trainable 'lora' -> 'all'"):  # refused by the resume check
        loop.train(cfg, workdir)


def test_dropout_changes_the_training_forward_only(passkey_dir, bases):
    cfg = lora_config(passkey_dir, bases[0], lora_dropout=0.5)

    def random_b(params):  # B = 0 would make dropout invisible
        out = lora._flatten(params)
        for i, p in enumerate(sorted(out)):
            if str(p[-1]).endswith("_lora_b"):
                out[p] = 0.05 * jax.random.normal(jax.random.PRNGKey(i), out[p].shape)
        return lora._unflatten(out)
    ts, tx, _ = start(cfg, random_b)
    graphdef, _, _ = abstract_model(cfg)
    b = batch(cfg, 0)
    sums, _ = jax.jit(make_eval_step(cfg, graphdef, streaming=False))(ts.params, b, None)
    eval_loss = float(sums["loss_sum"] / sums["weight"])
    no_dropout = lora_config(passkey_dir, bases[0], lora_dropout=0.0)
    graphdef0, _, _ = abstract_model(no_dropout)
    sums0, _ = jax.jit(make_eval_step(no_dropout, graphdef0, streaming=False))(ts.params, b, None)
    assert float(sums0["loss_sum"] / sums0["weight"]) == eval_loss  # eval: no dropout
    _, m = compiled_step(cfg, tx)(ts, b)
    assert abs(float(m["loss"]) - eval_loss) > 1e-4  # the training forward drops adapter inputs


def test_config_errors(passkey_dir, bases):
    cfg = tiny_config(passkey_dir)
    cfg.train.trainable = "lora"
    with pytest.raises(ValueError, match="set train.init_from"):
        validate(cfg)
    cfg.train.trainable = "adapters"
    with pytest.raises(ValueError, match="train.trainable must be one of"):
        validate(cfg)
    cfg = tiny_config(passkey_dir)
    cfg.model.attention = "bswa"
    cfg.train.init_from, cfg.train.trainable = bases[0], "lora"
    with pytest.raises(ValueError, match="leaves nothing to train"):
        validate(resolve(cfg))
    cfg.train.init_from = str(bases[0]) + "_missing"
    with pytest.raises(ValueError, match="no such Hugging Face folder"):
        resolve(cfg)
