"""Shared helpers of the trainer tests (tiny PassKey configs, synthetic batches), plus quick unit tests."""
import json
import os
import subprocess
import sys

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from famjax.train import optim
from famjax.train.config import resolve, sibling_config, validate
from famjax.train.step import passkey_exact, position_offsets

# The suite's XLA flags (conftest.py) with one CPU device (the last occurrence of a flag wins).
ONE_DEVICE_XLA_FLAGS = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1"

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir, **train):
    """Returns a resolved tiny passkey config (2 layers, d 32, B 16, F 4, m 1, batch 8 x 128 tokens)."""
    cfg = sibling_config(os.path.join(REPO, "configs", "x.py"), "passkey_tiny").get_config()
    cfg.model.update(d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64, block_size=16, memory_blocks=1)
    cfg.fam.fam_len = 4
    cfg.data.data_dir = str(data_dir)
    cfg.data.update(seq_len=128, batch_size=8, prefetch_batches=0, read_threads=0)
    cfg.data.passkey.update(train_filler_min=8, train_filler_max=40, train_examples=400, validation_examples=16,
                            eval_multipliers=(1,), eval_examples=4)
    cfg.train.update(steps=4, warmup_steps=1, log_every=1, peak_flops=1e12)
    unknown = set(train) - set(cfg.train)
    assert not unknown, f"not train fields: {unknown}"
    cfg.train.update(train)
    cfg.checkpoint.update(every_steps=2, keep=3)
    cfg.eval.update(every_steps=0, batches=1)
    cfg = resolve(cfg)
    validate(cfg)
    return cfg


def cli_args(cfg_overrides: dict) -> list[str]:
    """Returns --config.x=y flags for python -m famjax.main."""
    out = []
    for k, v in cfg_overrides.items():
        out.append(f"--config.{k}={v}")
    return out


def tiny_cli(data_dir) -> dict:
    """The overrides of tiny_config as command-line flags (for subprocess runs of famjax.main)."""
    return {"model.d_model": 32, "model.num_heads": 4, "model.num_kv_heads": 2, "model.mlp_dim": 64,
            "model.block_size": 16, "model.memory_blocks": 1, "fam.fam_len": 4, "data.data_dir": data_dir,
            "data.seq_len": 128, "data.batch_size": 8, "data.prefetch_batches": 0, "data.read_threads": 0,
            "data.passkey.train_filler_min": 8, "data.passkey.train_filler_max": 40,
            "data.passkey.train_examples": 400, "data.passkey.validation_examples": 16,
            "data.passkey.eval_multipliers": "(1,)", "data.passkey.eval_examples": 4,
            "train.warmup_steps": 1, "train.log_every": 1, "train.peak_flops": 1e12, "eval.batches": 1,
            "eval.every_steps": 0}


def losses(workdir) -> dict:
    """Returns {step: loss} from metrics.jsonl (the last record of a step wins: a resumed run rewrites it)."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out[r["step"]] = r["loss"]
    return out


def run_main(args, env_extra=None, timeout=300, **popen):
    """Starts `python -m famjax.main args` (1 CPU device unless env_extra says otherwise); returns Popen."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=ONE_DEVICE_XLA_FLAGS,
               PYTHONPATH=REPO)
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "famjax.main", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


@pytest.fixture(scope="session")
def passkey_dir(tmp_path_factory):
    """A data dir where the tiny PassKey dataset is prepared once for all trainer tests."""
    d = tmp_path_factory.mktemp("famjax_data")
    import famjax.data as fd
    cfg = tiny_config(d)
    it = fd.make_iterator(cfg.data, block_size=16, process_index=0, process_count=1)
    next(it)
    it.close()
    return str(d)


def synthetic_batch(rows, seq_len, vocab, block, seed=0):
    """Returns a packed-style batch of random tokens: two examples per row (second at a block boundary)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, vocab, (rows, seq_len)).astype(np.int32)
    ss = np.zeros((rows, seq_len), bool)
    ss[:, 0] = True
    ss[::2, block * 2] = True
    mask = rng.uniform(size=(rows, seq_len)).astype(np.float32)
    return {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": mask, "segment_start": ss}


# ---------------------------------------------------------------- quick unit tests
def test_schedule_warmup_then_cosine_and_constant(passkey_dir):
    cfg = tiny_config(passkey_dir, steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1,
                      schedule="cosine")
    lr = optim.schedule(cfg.train)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0) and float(lr(100)) == pytest.approx(0.1, abs=1e-6)
    cfg.train.schedule = "constant"
    assert float(optim.schedule(cfg.train)(90)) == pytest.approx(1.0)


def test_rpo_offsets_range_and_zero_fraction(passkey_dir):
    cfg = tiny_config(passkey_dir)
    off = np.asarray(position_offsets(jax.random.PRNGKey(0), 20000, cfg))
    assert off.min() >= 0 and off.max() < 2 * np.pi * cfg.model.rope_base
    assert 0.47 < np.mean(off == 0) < 0.53
    assert off.max() > 0.9 * 2 * np.pi * cfg.model.rope_base  # really uniform over the whole range


def test_passkey_exact_counts_examples_not_rows():
    # Row 0: two examples, first right, second wrong; row 1: one example, right.
    tgt = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]])
    pred = tgt.at[0, 6].set(0)
    ans = jnp.zeros((2, 8), bool).at[0, 1].set(True).at[0, 6].set(True).at[1, 3].set(True)
    ss = jnp.zeros((2, 8), bool).at[:, 0].set(True).at[0, 4].set(True)
    ok, n = passkey_exact(pred, tgt, ans, ss, block_size=4)
    assert (int(ok), int(n)) == (2, 3)


def test_optimizers_build_and_step(passkey_dir):
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones((3,))}
    for name in ("adamw", "adafactor"):
        cfg = tiny_config(passkey_dir, optimizer=name)
        tx = optim.make_optimizer(cfg.train)
        s = tx.init(params)
        upd, _ = tx.update(jax.tree.map(jnp.ones_like, params), s, params)
        assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(upd))


def _layer_scans(jaxpr, num_layers: int) -> int:
    """The scans over the layers (length num_layers) in a jaxpr, nested ones included."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan" and eqn.params["length"] == num_layers:
            count += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _layer_scans(sub, num_layers)
    return count


def test_train_step_computes_the_initial_fam_inside_its_one_layer_scan(passkey_dir):
    """A fresh state's call installs the initial FAM of the trained parameters layer by layer, so the train step
    starts from init_state(initial_fam=False): the forward layer scan and its transpose, no third scan over
    the layers for an initial FAM that nothing reads. The same logits either way."""
    from flax import nnx

    from famjax.train import mesh as meshlib
    from famjax.train.state import abstract_model, create_train_state
    from famjax.train.step import make_train_step

    cfg = tiny_config(passkey_dir)
    cfg.mesh.shape = (1, 1, 1)
    tx = optim.make_optimizer(cfg.train)
    ts, _ = create_train_state(cfg, tx, meshlib.make_mesh(cfg.mesh, jax.devices()[:1]), stream=False)
    graphdef, _, _ = abstract_model(cfg)
    batch = synthetic_batch(8, 128, cfg.model.vocab_size, 16)
    step = make_train_step(cfg, graphdef, tx, streaming=False)
    assert _layer_scans(jax.make_jaxpr(step)(ts, batch).jaxpr, cfg.model.num_layers) == 2

    model = nnx.merge(graphdef, ts.params)
    tokens = jnp.asarray(batch["tokens"][:2, :40])
    with_fam, without = model.init_state(2), model.init_state(2, initial_fam=False)
    assert float(jnp.abs(with_fam.layers.fam).max()) > 0 and not bool(jnp.any(without.layers.fam))
    logits = [model(tokens, state)[0] for state in (with_fam, without, None)]
    np.testing.assert_array_equal(logits[0], logits[1])
    np.testing.assert_array_equal(logits[0], logits[2])
