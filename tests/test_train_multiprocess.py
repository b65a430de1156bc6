"""Two processes on localhost (jax.distributed.initialize), started by launch/local_processes.sh, train with the
same losses as one process."""
# ruff: noqa: F811  (pytest fixtures imported from test_train_common are redefined as arguments)
import os

import jax
import numpy as np
import pytest
from test_launch import sh
from test_train_common import ONE_DEVICE_XLA_FLAGS, cli_args, passkey_dir, tiny_cli, tiny_config  # noqa: F401
from test_train_resume import losses

import famjax.data as fd
from famjax.train import mesh as meshlib
from famjax.train import optim
from famjax.train.state import abstract_model, create_train_state
from famjax.train.step import make_train_step

STEPS = 3


def one_process_losses(cfg):
    """The same global batches built in one process: rows of process 0 then process 1."""
    its = [fd.make_iterator(cfg.data, block_size=16, process_index=i, process_count=2) for i in range(2)]
    mesh = meshlib.make_mesh(cfg.mesh, jax.devices()[:2])
    tx = optim.make_optimizer(cfg.train)
    ts, _ = create_train_state(cfg, tx, mesh, stream=False)
    graphdef, _, _ = abstract_model(cfg)
    step = jax.jit(make_train_step(cfg, graphdef, tx, streaming=False))
    out = []
    for _ in range(STEPS):
        parts = [next(it) for it in its]
        batch = {k: np.concatenate([p[k] for p in parts]) for k in ("tokens", "targets", "loss_mask",
                                                                    "segment_start")}
        ts, m = step(ts, meshlib.global_batch(batch, cfg.mesh.rules, mesh))
        out.append(float(m["loss"]))
    for it in its:
        it.close()
    return out


@pytest.mark.slow
def test_two_processes_match_one(passkey_dir, tmp_path):
    """One real 2-process run, as a user starts it (launch/local_processes.sh), is also the launcher's test."""
    work = tmp_path / "run"
    over = dict(tiny_cli(passkey_dir), **{"train.steps": STEPS, "checkpoint.every_steps": 2})
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": ONE_DEVICE_XLA_FLAGS}
    r = sh("local_processes.sh", "2", "configs/passkey_tiny.py", str(work), *cli_args(over), env=env, timeout=600)
    logs = {i: (work / f"process_{i}.log").read_text() for i in range(2)}
    assert r.returncode == 0, (r.stderr, logs)
    assert "all 2 processes finished" in r.stdout
    assert "2 devices" in logs[0]
    got = losses(str(work))
    cfg = tiny_config(passkey_dir, steps=STEPS)
    cfg.mesh.shape = (2, 1, 1)
    want = one_process_losses(cfg)
    np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)], want, rtol=1e-5)
    assert sorted(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit()) == [2, 3]
