"""Resume after SIGKILL of a real training process equals a straight run (bitwise on CPU); CLI smoke."""
# ruff: noqa: F811  (pytest fixtures imported from test_train_common are redefined as arguments)
import json
import os
import signal
import time

import numpy as np
import pytest
from test_train_common import cli_args, losses, passkey_dir, run_main, tiny_cli  # noqa: F401

from famjax.train.checkpoint import restore_model

N = 3


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.slow
def test_sigkill_then_resume_equals_straight_run(passkey_dir, tmp_path):
    base = dict(tiny_cli(passkey_dir), **{"train.steps": 2 * N, "checkpoint.every_steps": N})
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    finish(run_main([f"--workdir={straight}", *cli_args(base)]))

    slow = dict(base, **{"train.debug_step_delay_s": 2.0})
    proc = run_main([f"--workdir={killed}", *cli_args(slow)])
    commit = os.path.join(killed, "checkpoints", str(N), "commit_success.txt")
    deadline = time.time() + 300
    while not os.path.exists(commit):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)  # no chance to save anything more
    proc.wait()
    steps_left = sorted(int(d) for d in os.listdir(os.path.join(killed, "checkpoints")) if d.isdigit())
    assert steps_left == [N], steps_left
    assert max(losses(killed)) < 2 * N  # it really died before the end

    out = finish(run_main([f"--workdir={killed}", *cli_args(base)]))
    assert f"resumed from step {N}" in out
    a, b = losses(straight), losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 2 * N + 1))
    assert [a[s] for s in a] == [b[s] for s in a]  # bitwise equal losses
    ma, _ = restore_model(straight)
    mb, _ = restore_model(killed)
    import jax
    from flax import nnx
    for x, y in zip(jax.tree.leaves(nnx.state(ma)), jax.tree.leaves(nnx.state(mb))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_make_train_smoke_prints_summary(passkey_dir, tmp_path):
    """What `make train` runs (the passkey_tiny preset through famjax.main), shrunk to the steps and warmup of the
    notebook's smoke run (test_notebooks.py), so that the two share compiled programs."""
    overrides = {"data.data_dir": passkey_dir, "data.passkey.train_examples": 400,
                 "data.passkey.validation_examples": 16, "data.passkey.eval_multipliers": "(1,)",
                 "data.passkey.eval_examples": 4, "train.steps": 3, "train.warmup_steps": 1, "train.log_every": 1,
                 "eval.batches": 1}
    out = finish(run_main([f"--workdir={tmp_path}", "--config=configs/passkey_tiny.py",
                           "--mode=train_and_eval", *cli_args(overrides)]))
    assert "step 3/3  loss" in out and "MFU" in out
    assert "compiling the train step\ncompiled in " in out and "eta " in out  # log lines, not a tty
    assert "PassKey accuracy at the training length:" in out
    assert f"TensorBoard logs: {tmp_path}/tensorboard" in out
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model"]["vocab_size"] > 0 and cfg["train"]["steps"] == 3
    model, _ = restore_model(str(tmp_path))
    assert model.cfg.d_model == 128
