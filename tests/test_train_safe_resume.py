"""A run can always resume and never changes meaning on resume (issue 23): a truncated newest checkpoint is moved
aside and the run goes on from the previous one in the same invocation; a config that changes what the checkpoints
or the data mean is refused before config.json is touched; eval mode writes no config.json; SIGTERM and Ctrl-C
finish the step, save and exit 75 (a second Ctrl-C aborts); famjax.main's user errors are one stderr line."""
# ruff: noqa: F811  (pytest fixtures imported from test_train_common are redefined as arguments)
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_train_common import REPO, cli_args, losses, passkey_dir, run_main, tiny_cli, tiny_config  # noqa: F401

from famjax.errors import EXIT_PREEMPTED, ConfigError
from famjax.train import loop


def _truncate(step_dir) -> None:
    """Cuts every file of a committed step's parameters and train state to half (a disk filling up mid-write)."""
    for item in ("params", "train"):
        for root, _, files in os.walk(os.path.join(step_dir, item)):
            for name in files:
                path = os.path.join(root, name)
                size = os.path.getsize(path)
                if size > 1:
                    with open(path, "r+b") as f:
                        f.truncate(size // 2)


def test_truncated_latest_checkpoint_is_moved_aside_and_the_run_finishes(passkey_dir, tmp_path):
    """Acceptance: one invocation resumes from the good step, trains past the bad one, and ends with the loss of
    an uninterrupted run."""
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    loop.train(tiny_config(passkey_dir, steps=6), straight)
    loop.train(tiny_config(passkey_dir, steps=4), broken)  # checkpoints 2 and 4
    _truncate(os.path.join(broken, "checkpoints", "4"))
    result = loop.train(tiny_config(passkey_dir, steps=6), broken)
    assert result.step == 6 and not result.preempted
    assert sorted(os.listdir(os.path.join(broken, "checkpoints"))) == ["2", "4", "6", "corrupt-4"]
    assert losses(broken)[6] == losses(straight)[6]  # bitwise: steps 3-6 replayed from step 2's state


def test_meaning_changes_are_refused_before_config_json_is_written(passkey_dir, tmp_path):
    workdir = str(tmp_path / "run")
    loop.train(tiny_config(passkey_dir, steps=2), workdir)
    saved = (tmp_path / "run" / "config.json").read_text()
    changed = tiny_config(passkey_dir, steps=3)
    changed.model.rope_base = 500.0
    changed.model.memory_blocks = 2
    with pytest.raises(ConfigError) as err:
        loop.train(changed, workdir)
    msg = str(err.value)
    assert "\n" not in msg and "model.memory_blocks 1 -> 2" in msg and "model.rope_base 10000.0 -> 500.0" in msg
    assert (tmp_path / "run" / "config.json").read_text() == saved
    # Eval mode checks too and never writes config.json, even with an allowed change.
    with pytest.raises(ConfigError, match="model.rope_base"):
        loop.evaluate(changed, workdir)
    out = loop.evaluate(tiny_config(passkey_dir, steps=9), workdir)
    assert out.step == 2 and (tmp_path / "run" / "config.json").read_text() == saved


def test_training_only_changes_resume_and_are_logged(passkey_dir, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    loop.train(tiny_config(passkey_dir, steps=2), workdir)
    result = loop.train(tiny_config(passkey_dir, steps=3, learning_rate=1e-3), workdir)
    out = capsys.readouterr().out
    assert result.step == 3 and "resumed from step 2" in out
    assert "config changes since the run's saved config:" in out
    assert "train.steps 2 -> 3" in out and "train.learning_rate" in out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["steps"] == 3


def _wait_for(proc, path, what):
    deadline = time.time() + 240
    while not os.path.exists(path):
        assert proc.poll() is None and time.time() < deadline, f"no {what}: " + proc.communicate()[0][-3000:]
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_finishes_the_step_saves_and_exits_preempted(passkey_dir, tmp_path, sig):
    """Through a real process: the signal after step 1 -> the step is saved, no final eval, exit 75; the same
    command then resumes and finishes (exit 0; checked after SIGTERM)."""
    workdir = str(tmp_path / "run")
    flags = cli_args(dict(tiny_cli(passkey_dir), **{"train.steps": 6, "checkpoint.every_steps": 0,
                                                       "train.debug_step_delay_s": 1.5}))
    args = [f"--workdir={workdir}", "--mode=train_and_eval", *flags]
    proc = run_main(args)
    _wait_for(proc, os.path.join(workdir, "metrics.jsonl"), "first step")
    proc.send_signal(getattr(signal, sig))
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    assert f"{sig}: saved step" in out and "PassKey accuracy" not in out
    steps = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
    assert len(steps) == 1 and 1 <= steps[0] < 6
    assert not os.path.exists(os.path.join(workdir, "eval_metrics.json"))
    if sig == "SIGINT":
        return  # the resume after a stop is the same for both signals: checked once
    again = run_main([f"--workdir={workdir}", "--mode=train_and_eval",
                      *cli_args(dict(tiny_cli(passkey_dir), **{"train.steps": 6, "checkpoint.every_steps": 0}))])
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-3000:]
    assert f"resumed from step {steps[0]}" in out and "PassKey accuracy" in out


@pytest.mark.slow
def test_second_ctrl_c_aborts_at_once(passkey_dir, tmp_path):
    workdir = str(tmp_path / "run")
    flags = cli_args(dict(tiny_cli(passkey_dir), **{"train.steps": 6, "train.debug_step_delay_s": 20.0}))
    proc = run_main([f"--workdir={workdir}", *flags])
    _wait_for(proc, os.path.join(workdir, "metrics.jsonl"), "first step")
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)  # during the 20 s sleep after step 1: no wait for the step to end
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out[-3000:]
    assert not os.path.isdir(os.path.join(workdir, "checkpoints", "1"))


def _cli(args, **env):
    e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **env)
    return subprocess.run([sys.executable, "-m", "famjax.main", *args], capture_output=True, text=True, env=e,
                          cwd=REPO, timeout=120)


@pytest.fixture(scope="module")
def a_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "a_file"
    path.write_text("x")
    return str(path)


@pytest.mark.parametrize("case,args,expect", [
    ("misspelled field", ["--config.train.stepz=3"], "--config.train.stepz: the config has no field 'stepz' "
                                                       '(did you mean "steps"?)'),
    ("wrong type", ["--config.train.steps=abc"], "--config.train.steps=abc: invalid literal for int()"),
    ("missing config", ["--config=nothere.py"], "--config=nothere.py: no such file"),
    ("config is a folder", ["--config=configs"], "--config=configs: a folder, not a config file"),
    ("impossible shape", ["--config.data.seq_len=100"], "data.seq_len must be a multiple of block_size"),
    ("unknown section value", ["--config.model.attention=flash"], "model: attention must be one of"),
    ("workdir is a file", ["WORKDIR=FILE"], "is a file, not a folder"),
    ("workdir not writable", ["--workdir=/proc/famjax_run"], "workdir /proc/famjax_run is not writable"),
    ("eval without checkpoints", ["--mode=eval"], "no checkpoint to evaluate in "),
])
def test_user_errors_are_one_line_with_exit_2(tmp_path, a_file, case, args, expect):
    workdir = a_file if args == ["WORKDIR=FILE"] else str(tmp_path)
    args = [a for a in args if a != "WORKDIR=FILE"]
    if not any(a.startswith("--workdir") for a in args):
        args.append(f"--workdir={workdir}")
    out = _cli(args)
    assert out.returncode == 2, (case, out.stderr[-2000:])
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("famjax.main: "), (case, out.stderr)
    assert expect in out.stderr, (case, out.stderr)


def test_verbose_shows_the_traceback(tmp_path):
    out = _cli([f"--workdir={tmp_path}", "--config.data.seq_len=100", "--verbose"])
    assert out.returncode != 0 and "Traceback" in out.stderr and "ConfigError" in out.stderr
