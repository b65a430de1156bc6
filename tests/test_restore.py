"""famjax.restore: a saved run whose config sets a model field famjax does not know (a removed option, another
version) is refused in one line naming the field, by inference and by a resuming trainer, and nothing is
written; the reader imports none of the trainer."""
# ruff: noqa: F811  (pytest fixtures imported from test_train_common are redefined as arguments)
import json
import os
import subprocess
import sys

import pytest
from test_train_common import REPO, passkey_dir, tiny_config  # noqa: F401

from famjax import restore
from famjax.train.config import to_json


def _saved_run(tmp_path, cfg, section, field, value):
    """A workdir as the trainer leaves it (config.json, checkpoints/), with one field set that famjax lacks."""
    saved = json.loads(to_json(cfg))
    saved[section][field] = value
    workdir = tmp_path / "run"
    os.makedirs(workdir / "checkpoints")
    (workdir / "config.json").write_text(json.dumps(saved))
    return workdir


@pytest.mark.parametrize("section,field", [("fam", "stretch"), ("fam", "pre_age"), ("model", "fam_null_slot"),
                                           ("model", "rope_scaling")])
def test_unknown_model_field_is_refused_in_one_line(passkey_dir, tmp_path, section, field):
    workdir = _saved_run(tmp_path, tiny_config(passkey_dir), section, field, 1.0)
    with pytest.raises(ValueError) as err:
        restore.restore_model(str(workdir))
    message = str(err.value)
    assert f"unknown field {section}.{field}" in message and "config.json" in message and "\n" not in message


def test_resume_and_generate_refuse_a_run_with_a_removed_option(passkey_dir, tmp_path):
    from famjax.train import train

    cfg = tiny_config(passkey_dir)
    workdir = _saved_run(tmp_path, cfg, "fam", "inflate", 1.0)
    before = (workdir / "config.json").read_text()
    with pytest.raises(ValueError, match="unknown field fam.inflate"):
        train(cfg, str(workdir))
    assert (workdir / "config.json").read_text() == before  # not overwritten by the new config
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-m", "famjax.generate", f"--workdir={workdir}", "--prompt=hi"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode != 0 and out.stdout == ""
    assert out.stderr.strip().count("\n") == 0 and "unknown field fam.inflate" in out.stderr, out.stderr


def test_known_fields_are_the_default_configs():
    """The reader's list of fam-section fields is exactly what configs/default.py defines (no drift)."""
    from famjax.train.config import sibling_config

    cfg = sibling_config(os.path.join(REPO, "configs", "x.py"), "default").get_config()
    assert set(cfg.fam) == set(restore.FAM_MODEL_FIELDS) | set(restore.FAM_TRAINING_FIELDS)
    assert set(cfg.model) == set(restore.MODEL_FIELDS)


def test_inference_reader_imports_no_trainer():
    code = ("import sys, famjax.restore, famjax.infer, famjax.evals, famjax.infer.load; "
            "bad = [m for m in sys.modules if m.startswith('famjax.train')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                   timeout=120)
