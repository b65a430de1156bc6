"""The experiment's presets: a few representative ones resolve to valid trainer configs, no preset sets an option
the trainer no longer has, and no stage silently overrides a model's own setting."""
import ast
import os

import pytest

from experiments.passkey.presets import PRESETS, stage_options
from famjax.train.config import model_config, sibling_config, validate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# One of each kind: FAM and BSWA with a two-stage curriculum from an init run (tiny), the paper's ablation
# switches (ablations), block sizes, F, keep_norm, noise and the key's position (variants), streams and RSP on
# keep_norm (bounded_stream), noise + drift on the spec's task (key_start_drift), a d 256 model (key_start_d256)
# and a preset evaluated with the key at the start (key_start_noise_start).
REPRESENTATIVE = ("tiny", "ablations", "variants", "bounded_stream", "key_start_drift", "key_start_d256",
                  "key_start_noise_start")
# Training options removed in issue 20 (check out fd01abd to rerun their presets).
REMOVED = ("fam.null_slot", "fam.stretch", "fam.age", "fam.read_age", "fam.read_stretch", "fam.inflate",
           "fam.norm_penalty", "fam.change_penalty", "fam.pre_age", "fam.pre_age_rows")


def resolved(config: str, overrides: dict, stages: list[dict], k: int):
    """The trainer config of stage k of a model: its config file with stage_options applied as the script's
    --config.KEY=VALUE flags set them (a string for a tuple field is parsed as the flag parser does)."""
    cfg = sibling_config(os.path.join(REPO, config), os.path.basename(config)[:-3]).get_config()
    cfg.model.vocab_size = 66
    for key, value in stage_options(overrides, stages, k).items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        if isinstance(node[leaf], tuple) and isinstance(value, str):
            value = ast.literal_eval(value)
        node[leaf] = value
    return cfg


@pytest.mark.parametrize("preset", REPRESENTATIVE)
def test_representative_presets_resolve_to_valid_configs(preset):
    spec = PRESETS[preset]
    for name, (config, overrides, *init) in spec["models"].items():
        for k in range(1, len(spec["stages"]) + 1):
            cfg = resolved(config, overrides, spec["stages"], k)
            validate(cfg)
            model_config(cfg)
        assert all(isinstance(w, str) for w in init), name


def test_no_preset_sets_a_removed_option():
    used = {key for spec in PRESETS.values() for _, overrides, *_ in spec["models"].values()
            for key in [*overrides, *(k for stage in spec["stages"] for k in stage)]}
    assert not used & set(REMOVED)


def test_stages_keep_model_overrides():
    """A stage's overrides win over a model's (stage_options), so a model override that a stage sets to another
    value would silently not apply: the model would train as its preset's control (found on 2026-11-27)."""
    clashes = [(preset, model, key) for preset, spec in PRESETS.items()
               for model, (_, overrides, *_) in spec["models"].items()
               for stage in spec["stages"] for key, value in stage.items()
               if key in overrides and overrides[key] != value]
    assert not clashes, f"a stage overrides these models' own settings: {clashes}"


def test_every_preset_has_models_stages_and_an_eval():
    for name, spec in PRESETS.items():
        assert spec["models"] and spec["stages"], name
        assert all("steps" in st for st in spec["stages"]), name
        assert {"multipliers", "examples", "chunk_size", "batch_size", "seed"} <= set(spec["eval"]), name


def test_the_root_conftest_set_up_applies_here():
    """experiments/ gets the tests' set-up (root conftest.py): 8 fake CPU devices, float32 matmuls."""
    import jax

    assert jax.device_count() == 8 and jax.config.jax_default_matmul_precision == "highest"
