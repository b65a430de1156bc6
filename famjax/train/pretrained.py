"""Fine-tuning a pretrained checkpoint: train.init_from, train.trainable and the base a LoRA run points to.

    cfg.train.init_from = famjax.convert.smollm2_gguf(); cfg.model.lora_rank = 64; cfg.train.trainable = "lora"

`resolve` fills the architecture fields of cfg.model from the checkpoint (`pretrained_model_config`); at start
the trainer loads it with famjax.convert.load_pretrained (placed with the mesh rules), adds the LoRA adapters
(famjax.model.lora.add_lora) and, for trainable != "all", trains only `trainable_mask`'s leaves. A checkpoint
of such a run holds those leaves plus `base_info`: the base's path and content hash, checked on resume.
"""
from __future__ import annotations

import os

from famjax.convert.source import source_config, source_hash
from famjax.model import lora as loralib
from famjax.restore import LORA_FIELDS, MODEL_FIELDS, OVERRIDE_FIELDS, base_model, init_from, source_overrides

TRAINABLE = ("all", "lora", "lora_norms")


def trainable_mode(cfg) -> str:
    return str(cfg.train.get("trainable", "all"))


def trainable_mask(cfg, params):
    """The pure-dict bool mask of the leaves that train (None for train.trainable "all": every leaf)."""
    mode = trainable_mode(cfg)
    if mode == "all":
        return None
    return loralib.trainable_mask(params, norms=mode == "lora_norms")


def resolve_model_fields(cfg) -> None:
    """Sets every architecture field of cfg.model (all but OVERRIDE_FIELDS and LORA_FIELDS) to the checkpoint's
    (in place; cfg unlocked)."""
    mcfg = source_config(init_from(cfg), **source_overrides(cfg))
    for name in MODEL_FIELDS:
        if name not in OVERRIDE_FIELDS and name not in LORA_FIELDS:
            value = getattr(mcfg, name)
            cfg.model[name] = tuple(value) if isinstance(value, list) else value


def load_base(cfg, mesh=None):
    """Returns the parameters (pure dict, placed with cfg.mesh.rules on mesh) of famjax.restore.base_model:
    the checkpoint of train.init_from with the config's LoRA adapters added (seeded by train.seed)."""
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(base_model(cfg, mesh), nnx.Param))


# ------------------------------------------------------------------------------------------- the base pointer
def base_info(cfg) -> dict | None:
    """The base pointer a checkpoint of a frozen-base run stores ({"source", "sha256", "trainable"}), or None
    for train.trainable "all" (its checkpoints hold every parameter)."""
    mode = trainable_mode(cfg)
    if mode == "all":
        return None
    path = os.path.abspath(init_from(cfg))
    return {"source": path, "sha256": source_hash(path), "trainable": mode}


def check_base(stored: dict | None, current: dict | None, where: str) -> None:
    """Raises ValueError (one line) unless a checkpoint's base pointer `stored` fits this run's `current`."""
    have = (stored or {}).get("trainable", "all")
    want = (current or {}).get("trainable", "all")
    if have != want:
        raise ValueError(f"{where}: the checkpoint was trained with train.trainable={have!r}, this run asks "
                         f"{want!r}; they hold different parameters (use a new workdir)")
    if stored is not None and stored.get("sha256") != current.get("sha256"):
        raise ValueError(f"{where}: refusing to resume on a different base: the checkpoint's base "
                         f"{stored.get('source')} has {stored.get('sha256')}, train.init_from {current['source']} "
                         f"has {current['sha256']}")
