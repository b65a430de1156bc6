"""The PassKey experiment script (python -m experiments.passkey.run) runs end to end on its smoke preset; its
eval examples, output names and the phase sweep do what they say."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments.passkey import phase_sweep
from experiments.passkey.run import digit_accuracy, eval_examples, output_stem
from famjax.train.config import sibling_config

# The suite's XLA flags (conftest.py) with one CPU device (the last occurrence of a flag wins).
ONE_DEVICE_XLA_FLAGS = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1"

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _data_cfg():
    return sibling_config(os.path.join(REPO, "configs", "x.py"), "default").get_config().data


@pytest.mark.slow
def test_run_smoke_preset_writes_table_and_plot(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "experiments.passkey.run", "--preset=smoke", "--models=fam_m0", f"--out={out}",
           f"--set=data.data_dir={tmp_path / 'data'}", "--set=data.read_threads=0", "--set=data.prefetch_batches=0"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=ONE_DEVICE_XLA_FLAGS)
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = json.loads((out / "passkey.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    # smoke: stage 2 trains up to N = 360 filler tokens; evaluated at 1x, 2x, 4x with 2 examples each
    assert sorted(r["length"] for r in rows) == [360, 720, 1440]
    assert all(r["model"] == "fam_m0" and r["count"] == 2 for r in rows)
    assert (out / "passkey.png").stat().st_size > 0 and "| fam_m0 |" in (out / "passkey.md").read_text()
    # both stages ran from the command line's overrides (data in tmp_path, not ~/famjax_data)
    assert (tmp_path / "data" / "famjax_passkey").is_dir()
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run(cmd[:3] + ["--set=nonsense"], cwd=REPO, env=env, capture_output=True, check=True)


def test_every_script_runs_as_a_module():
    """`python -m experiments.passkey.NAME --help` from the repository root (no sys.path edits)."""
    for name in ("run", "fam_probe", "fam_oracle", "fam_drift", "phase_sweep"):
        res = subprocess.run([sys.executable, "-m", f"experiments.passkey.{name}", "--help"], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stdout.startswith(f"usage: python -m experiments.passkey.{name}"), res.stdout[:200]


def test_eval_examples_place_the_key_as_asked():
    data_cfg = _data_cfg()
    assert data_cfg.passkey.key_position == "uniform"
    lengths = (90, 180)
    start = eval_examples(data_cfg, lengths, 16, 7, "start")
    anywhere = eval_examples(data_cfg, lengths, 16, 7)
    for n in lengths:
        # With the key at the start, the key's first token sits at the same offset in every prompt.
        first = {int(np.flatnonzero(prompt == answer[0])[0]) for prompt, answer, _ in start[n]}
        assert len(first) == 1
        where = {int(np.flatnonzero(prompt == answer[0])[0]) for prompt, answer, _ in anywhere[n]}
        assert len(where) > 1 and min(where) >= min(first)


def test_output_stem_keeps_key_start_tables_apart():
    assert output_stem("o", 0, 0, None) == os.path.join("o", "passkey")
    assert output_stem("o", 0, 0, "uniform") == os.path.join("o", "passkey")
    assert output_stem("o", 2, 64, "start") == os.path.join("o", "passkey_stage2_64ex_key_start")
    assert output_stem("o", 0, 0, "start", phases=True) == os.path.join("o", "passkey_key_start_phases")


def test_digit_accuracy_counts_right_digits():
    from famjax.evals import PassKeyScore

    a = np.array([1, 2, 3, 4])
    scores = [PassKeyScore(9, 1, a, a), PassKeyScore(9, 0, np.array([1, 0, 3, 0]), a)]
    assert digit_accuracy(scores) == pytest.approx(0.75)


def test_eval_examples_spread_puts_the_question_at_every_block_offset():
    """spread = B: example i has k x N + (i mod B) - B / 2 filler tokens, so over B examples the prompt's length
    (key at the start: everything but the filler is fixed) takes every value mod B once; spread 0 keeps one."""
    data_cfg = _data_cfg()
    exact = eval_examples(data_cfg, (1440,), 32, 7, "start")[1440]
    spread = eval_examples(data_cfg, (1440,), 32, 7, "start", spread=32)[1440]
    assert len({len(p) % 32 for p, _, _ in exact}) == 1
    assert sorted(len(p) % 32 for p, _, _ in spread) == list(range(32))
    lengths = [len(p) for p, _, _ in spread]
    assert max(lengths) - min(lengths) == 31 and lengths[16] == len(exact[0][0])  # centred on k x N
    assert all(n == 1440 for _, _, n in spread)


def test_phase_sweep_groups_by_the_answers_block_offset(monkeypatch):
    """phase_sweep.sweep scores each example under (prompt length mod B), per_offset examples per index: with an
    evaluator that is right exactly when that index is 3, the sweep reads 1 at index 3 and 0 elsewhere."""
    from famjax import evals
    from famjax.evals.passkey import PassKeyScore

    def fake(model, exs, **_):
        return [PassKeyScore(n, int(len(p) % 8 == 3), a, a) for p, a, n in exs]

    monkeypatch.setattr(evals, "evaluate_passkey", fake)
    data_cfg = _data_cfg()
    data_cfg.passkey.key_position = "start"
    acc = phase_sweep.sweep(None, data_cfg, [180, 360], 8, 3, seed=0, batch=4)
    want = np.eye(8)[3]
    for n in (180, 360):
        np.testing.assert_array_equal(acc[n], want)
