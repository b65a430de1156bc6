"""The trainer's config: building a ModelConfig from it, resolving it, and validating every section.

A famjax config is an `ml_collections.ConfigDict` with the sections `model`, `fam`, `data`, `train`, `mesh`,
`checkpoint`, `eval` (see configs/default.py for every field and its meaning). `validate` reports every bad
field, one line each, in a single ValueError.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from types import ModuleType

import ml_collections

import famjax.data as fd
from famjax.errors import ConfigError
from famjax.restore import FAM_MODEL_FIELDS, check_model_fields, from_json, model_config, to_json

__all__ = ["check_model_fields", "config_changes", "from_json", "model_config", "resolve", "sibling_config", "to_json",
           "validate"]

SECTIONS = ("model", "fam", "data", "train", "mesh", "checkpoint", "eval")
MESH_AXES = ("data", "fsdp", "tensor")
OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("cosine", "constant")
STREAM_MODES = ("auto", "on", "off")
# What a resumed run may change (each change is logged): how it trains, evaluates, saves and is laid out on the
# devices, not what its checkpoints or its data stream mean. A prefix ending in "." covers its whole section.
# Every other field is fixed once a workdir holds checkpoints.
RESUME_MAY_CHANGE = ("train.", "eval.", "checkpoint.", "mesh.", "fam.rsp_prob", "fam.rpo", "fam.rpo_zero_prob",
                     "fam.noise", "fam.drift", "model.dtype", "model.remat", "model.max_len",
                     "model.attention_impl", "model.fam_unroll", "model.fam_deferred_grads", "model.fam_remat",
                     "data.data_dir", "data.eval_split", "data.read_threads", "data.prefetch_batches")
RESUME_FIXED = ("train.optimizer", "train.trainable")  # exceptions to the sections above: the state's layout


def sibling_config(file: str, name: str) -> ModuleType:
    """Returns the config module `name`.py next to `file` (how presets import configs/default.py).

    Loading by path keeps configs/ free of packaging: presets work from any working directory.
    """
    path = os.path.join(os.path.dirname(os.path.abspath(file)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"famjax_configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def resolve(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Returns a copy with derived fields filled: with train.init_from, the architecture fields of `model`
    from the checkpoint (famjax.train.pretrained.resolve_model_fields); model.vocab_size 0 -> the tokenizer's
    vocabulary size."""
    from famjax.train import pretrained

    cfg = ml_collections.ConfigDict(cfg.to_dict())
    if pretrained.init_from(cfg):
        with cfg.unlocked():
            pretrained.resolve_model_fields(cfg)
    if int(cfg.model.vocab_size) == 0:
        with cfg.unlocked():
            cfg.model.vocab_size = int(fd.make_tokenizer(cfg.data).vocab_size)
    return cfg


# Training options that act on the FAM (0 = off); set on a model without FAM they are an error, not a no-op.
_FAM_PERTURBATIONS = ("noise", "drift")
_FAM_TRAINING_ONLY = ("rsp_prob",) + _FAM_PERTURBATIONS


def validate(cfg: ml_collections.ConfigDict, *, process_count: int = 1) -> None:
    """Raises ValueError with one line per bad field ("section.field: what is wrong, allowed values")."""
    errors: list[str] = []

    def err(msg: str) -> None:
        errors.append(msg)

    missing = [s for s in SECTIONS if s not in cfg]
    if missing:
        raise ConfigError("\n".join(f"config: missing section {s!r}" for s in missing))

    # model / fam
    mcfg = None
    try:
        check_model_fields(cfg)
        mcfg = model_config(cfg if int(cfg.model.vocab_size) > 0 else _with_vocab(cfg, 1))
    except (ValueError, TypeError) as e:
        for part in str(e).split("; "):
            for name, field in FAM_MODEL_FIELDS.items():
                if part.startswith(field + " ") and field != name:
                    part = f"fam.{name}" + part[len(field):]
            err(part if part.startswith(("fam.", "config:")) else f"model: {part}")
    if int(cfg.model.vocab_size) < 0:
        err(f"model.vocab_size must be >= 0 (0 = the tokenizer's), got {cfg.model.vocab_size}")
    fam = cfg.fam
    if not 0.0 <= float(fam.rsp_prob) <= 1.0:
        err(f"fam.rsp_prob must be in [0, 1], got {fam.rsp_prob}")
    if not 0.0 <= float(fam.rpo_zero_prob) <= 1.0:
        err(f"fam.rpo_zero_prob must be in [0, 1], got {fam.rpo_zero_prob}")
    if not isinstance(fam.rpo, bool):
        err(f"fam.rpo must be True or False, got {fam.rpo!r}")
    for name in _FAM_PERTURBATIONS:
        if float(fam.get(name, 0.0)) < 0:
            err(f"fam.{name} must be >= 0, got {fam[name]}")
    if mcfg is not None and not mcfg.num_fam:  # the step would skip them silently
        for name in _FAM_TRAINING_ONLY:
            if float(fam.get(name, 0.0)):
                err(f"fam.{name} acts on the FAM, which model.attention {cfg.model.attention!r} (or fam_len 0) "
                    "does not have; set it to 0")

    # data
    try:
        fd.validate(cfg.data, process_count=process_count,
                    block_size=mcfg.block_size if mcfg is not None else None)
    except ValueError as e:
        err(str(e))

    # train
    t = cfg.train
    if int(t.steps) < 0:
        err(f"train.steps must be >= 0, got {t.steps}")
    if t.optimizer not in OPTIMIZERS:
        err(f"train.optimizer must be one of {OPTIMIZERS}, got {t.optimizer!r}")
    if t.schedule not in SCHEDULES:
        err(f"train.schedule must be one of {SCHEDULES}, got {t.schedule!r}")
    if not float(t.learning_rate) > 0:
        err(f"train.learning_rate must be > 0, got {t.learning_rate}")
    if int(t.warmup_steps) < 0:
        err(f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    if not 0.0 <= float(t.min_lr_ratio) <= 1.0:
        err(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    if float(t.grad_clip_norm) < 0:
        err(f"train.grad_clip_norm must be >= 0 (0 = off), got {t.grad_clip_norm}")
    if float(t.weight_decay) < 0:
        err(f"train.weight_decay must be >= 0, got {t.weight_decay}")
    if float(t.z_loss) < 0:
        err(f"train.z_loss must be >= 0, got {t.z_loss}")
    if int(t.grad_accum_steps) < 1:
        err(f"train.grad_accum_steps must be >= 1, got {t.grad_accum_steps}")
    elif int(cfg.data.batch_size) % int(t.grad_accum_steps):
        err(f"train.grad_accum_steps must divide data.batch_size {cfg.data.batch_size}, "
            f"got {t.grad_accum_steps}")
    if t.stream_state not in STREAM_MODES:
        err(f"train.stream_state must be one of {STREAM_MODES}, got {t.stream_state!r}")
    if int(t.log_every) < 1:
        err(f"train.log_every must be >= 1, got {t.log_every}")
    if float(t.peak_flops) < 0:
        err(f"train.peak_flops must be >= 0 (0 = measure at start), got {t.peak_flops}")
    from famjax.train.pretrained import TRAINABLE, init_from
    mode = t.get("trainable", "all")
    if mode not in TRAINABLE:
        err(f"train.trainable must be one of {TRAINABLE}, got {mode!r}")
    elif mode != "all":
        if not init_from(cfg):
            err(f"train.trainable {mode!r} freezes the base weights: set train.init_from to the pretrained "
                "checkpoint (Hugging Face folder or .gguf) they come from")
        if mcfg is not None and not (mcfg.lora_rank or mcfg.num_fam or mode == "lora_norms"):
            err(f"train.trainable {mode!r} leaves nothing to train: set model.lora_rank > 0 (or use a FAM model)")

    # mesh
    shape = tuple(cfg.mesh.shape)
    if len(shape) != len(MESH_AXES) or any(not isinstance(s, int) or (s < 1 and s != -1) for s in shape):
        err(f"mesh.shape must be 3 sizes for {MESH_AXES}, each >= 1 or -1 (fill), got {shape}")
    elif sum(s == -1 for s in shape) > 1:
        err(f"mesh.shape may have at most one -1, got {shape}")
    for rule in cfg.mesh.rules:
        if len(rule) != 2:
            err(f"mesh.rules entries must be (logical name, mesh axis or None), got {rule!r}")
            continue
        axes = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
        bad = [a for a in axes if a is not None and a not in MESH_AXES]
        if bad:
            err(f"mesh.rules[{rule[0]!r}] names unknown mesh axes {bad}; allowed {MESH_AXES} or None")
        if rule[0] == "blocks" and rule[1] is not None:
            err("mesh.rules['blocks'] must be None: the block axis is sequential and never sharded")

    # checkpoint
    c = cfg.checkpoint
    if int(c.every_steps) < 0:
        err(f"checkpoint.every_steps must be >= 0 (0 = only at the end), got {c.every_steps}")
    if int(c.keep) < 1:
        err(f"checkpoint.keep must be >= 1, got {c.keep}")

    # eval
    e = cfg.eval
    if int(e.every_steps) < 0:
        err(f"eval.every_steps must be >= 0 (0 = only at the end), got {e.every_steps}")
    if int(e.batches) < 1:
        err(f"eval.batches must be >= 1, got {e.batches}")

    if errors:
        raise ConfigError("invalid config:\n" + "\n".join(errors))


def _with_vocab(cfg: ml_collections.ConfigDict, vocab: int) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    with cfg.unlocked():
        cfg.model.vocab_size = vocab
    return cfg


def rope_offset_range(cfg: ml_collections.ConfigDict) -> int:
    """Returns the exclusive upper bound of the random position offset: ceil(2 * pi * rope_base)."""
    return math.ceil(2 * math.pi * float(cfg.model.rope_base))


def _flat(cfg: ml_collections.ConfigDict) -> dict:
    """{dotted field: JSON value} of a config (tuples and lists compare equal)."""
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v
    walk(json.loads(to_json(cfg)), "")
    return out


def config_changes(saved: ml_collections.ConfigDict, new: ml_collections.ConfigDict
                   ) -> tuple[list[str], list[str]]:
    """Returns (refused, allowed): the fields in which `new` differs from a run's `saved` config, as
    "field old -> new", split by RESUME_MAY_CHANGE / RESUME_FIXED (both configs resolved)."""
    a, b = _flat(saved), _flat(new)
    refused, allowed = [], []
    for key in sorted(set(a) | set(b)):
        old, now = a.get(key, "<absent>"), b.get(key, "<absent>")
        if key not in a:  # a field newer than the saved run: it ran with the field's default
            old = _model_default(key, old)
        if old == now or (isinstance(old, (list, tuple)) and list(old) == now):
            continue
        free = key.startswith(tuple(p for p in RESUME_MAY_CHANGE if p.endswith("."))) or key in RESUME_MAY_CHANGE
        (allowed if free and key not in RESUME_FIXED else refused).append(f"{key} {old!r} -> {now!r}")
    return refused, allowed


def _model_default(key: str, absent):
    """The ModelConfig default of a `model.` / FAM `fam.` field (what a config written before the field existed
    means), else `absent`."""
    from famjax.model import ModelConfig

    section, _, name = key.partition(".")
    field = name if section == "model" else FAM_MODEL_FIELDS.get(name) if section == "fam" else None
    spec = ModelConfig.__dataclass_fields__.get(field or "")
    if spec is None or spec.default is dataclasses.MISSING:
        return absent
    return json.loads(json.dumps(spec.default, default=list))
