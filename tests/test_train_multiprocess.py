"""Two processes on localhost (jax.distributed.initialize) train with the same losses as one process."""
# ruff: noqa: F811  (pytest fixtures imported from test_train_common are redefined as arguments)
import os
import socket

import jax
import numpy as np
import pytest
from test_train_common import cli_args, passkey_dir, run_main, tiny_cli, tiny_config  # noqa: F401
from test_train_resume import finish, losses

import famjax.data as fd
from famjax.train import mesh as meshlib
from famjax.train import optim
from famjax.train.state import abstract_model, create_train_state
from famjax.train.step import make_train_step

STEPS = 3


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


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
    port = free_port()
    over = dict(tiny_cli(passkey_dir), **{"train.steps": STEPS, "checkpoint.every_steps": 2})
    procs = [run_main([f"--workdir={tmp_path}", "--distributed", f"--coordinator_address=localhost:{port}",
                       "--num_processes=2", f"--process_id={i}", *cli_args(over)]) for i in range(2)]
    outs = [finish(p) for p in procs]
    assert "2 devices" in outs[0]
    got = losses(str(tmp_path))
    cfg = tiny_config(passkey_dir, steps=STEPS)
    cfg.mesh.shape = (2, 1, 1)
    want = one_process_losses(cfg)
    np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)], want, rtol=1e-5)
    assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [2, 3]
