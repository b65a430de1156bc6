"""Every preset in configs/ validates and initialises abstractly; bad fields are reported one per line."""
import glob
import os

import jax
import pytest

from famjax.train import optim
from famjax.train.config import model_config, sibling_config, validate
from famjax.train.state import make_init_fn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if not os.path.basename(p).startswith("_"))


def load(name):
    cfg = sibling_config(os.path.join(REPO, "configs", "x.py"), name).get_config()
    # Fields a user must supply (a text folder, a tokenizer file's vocabulary) get stand-ins.
    if cfg.data.dataset == "local_text" and not cfg.data.local_text.path:
        cfg.data.local_text.path = "/tmp/texts"
    if cfg.model.vocab_size == 0 and cfg.data.tokenizer.kind in ("sentencepiece", "hf"):
        cfg.model.vocab_size = 32000
    return cfg


def test_all_expected_presets_exist():
    assert {"default", "passkey_tiny", "passkey_bswa_tiny", "local_text_small", "pg19_base", "paper_1b",
            "retrofit"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_validates_and_inits_abstractly(name):
    cfg = load(name)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = 66
    if cfg.train.trainable != "all" and not cfg.train.init_from:  # retrofit: the user names the source
        with pytest.raises(ValueError, match="set train.init_from"):
            validate(cfg)
        cfg.train.trainable = "all"
    validate(cfg)
    tx = optim.make_optimizer(cfg.train)
    abstract = jax.eval_shape(make_init_fn(cfg, tx, stream=cfg.data.batching == "stream"))
    n = sum(x.size for x in jax.tree.leaves(abstract.params))
    assert n > 0
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
    if name == "paper_1b":
        m = model_config(cfg)
        assert (m.num_layers, m.d_model, m.num_heads, m.mlp_dim, m.block_size, m.memory_blocks, m.num_fam) == \
            (18, 1536, 12, 8 * 1536, 1024, 3, 64)
        assert cfg.data.batch_size == 128 and cfg.data.seq_len >= 8500


def test_passkey_tiny_is_the_documented_tiny_model():
    cfg = load("passkey_tiny")
    m = model_config(_vocab(cfg))
    assert (m.num_layers, m.d_model, m.block_size, m.num_fam, m.memory_blocks) == (2, 128, 32, 8, 0)
    assert (cfg.data.batch_size, cfg.data.seq_len, cfg.data.passkey.train_filler_max) == (40, 192, 90)
    assert cfg.data.tokenizer.kind == "word"


def _vocab(cfg):
    cfg.model.vocab_size = 66
    return cfg


@pytest.mark.parametrize("field,value,message", [
    ("train.optimizer", "sgd", "train.optimizer must be one of"),
    ("train.schedule", "linear", "train.schedule must be one of"),
    ("train.learning_rate", 0.0, "train.learning_rate must be > 0"),
    ("train.grad_accum_steps", 3, "train.grad_accum_steps must divide data.batch_size"),
    ("fam.rsp_prob", 1.5, "fam.rsp_prob must be in [0, 1]"),
    ("mesh.shape", (-1, -1, 1), "mesh.shape may have at most one -1"),
    ("mesh.shape", (2, 2), "mesh.shape must be 3 sizes"),
    ("checkpoint.keep", 0, "checkpoint.keep must be >= 1"),
    ("model.attention", "linear", "model: attention must be one of"),
    ("data.seq_len", 100, "data.seq_len must be a multiple of block_size"),
    ("data.tokenizer.kind", "bpe", "data.tokenizer.kind must be one of"),
    ("fam.positions", "none", "fam.positions must be one of block, zero"),
])
def test_bad_field_is_named(field, value, message):
    cfg = _vocab(load("passkey_tiny"))
    cfg.update_from_flattened_dict({field: value})
    with pytest.raises(ValueError, match=r"(?s)invalid config:.*" + message.replace("[", r"\[").replace("]", r"\]")):
        validate(cfg)


@pytest.mark.parametrize("field,value", [("fam.drift", 0.1), ("fam.rsp_prob", 0.5), ("fam.noise", 0.2)])
def test_fam_training_option_without_fam_is_named(field, value):
    """A FAM training option on a model without FAM would be skipped silently by the step: a config error."""
    cfg = _vocab(load("passkey_bswa_tiny"))
    validate(cfg)
    cfg.update_from_flattened_dict({field: value})
    with pytest.raises(ValueError, match=f"{field} acts on the FAM, which model.attention 'bswa'"):
        validate(cfg)
    fam = _vocab(load("passkey_tiny"))
    fam.update_from_flattened_dict({field: value, "fam.fam_len": 0})
    with pytest.raises(ValueError, match=f"{field} acts on the FAM"):
        validate(fam)


def test_several_bad_fields_give_one_line_each():
    cfg = _vocab(load("passkey_tiny"))
    cfg.train.optimizer, cfg.checkpoint.keep, cfg.eval.batches = "sgd", 0, 0
    with pytest.raises(ValueError) as e:
        validate(cfg)
    lines = str(e.value).splitlines()
    assert lines[0] == "invalid config:" and len(lines) == 4
    assert lines[1].startswith("train.optimizer") and lines[2].startswith("checkpoint.keep")


def test_sharding_the_block_axis_is_refused():
    cfg = _vocab(load("passkey_tiny"))
    cfg.mesh.rules = tuple(cfg.mesh.rules) + (("blocks", "data"),)
    with pytest.raises(ValueError, match="block axis is sequential"):
        validate(cfg)
