"""Reading a trained run back: its config.json, the ModelConfig it describes, and its parameters.

The small read side of the trainer's checkpoint format, for inference, evals and notebooks: it needs orbax
but none of the trainer's modules. Layout of a workdir (famjax.train.checkpoint writes it):
    <workdir>/config.json                      the resolved config of the run
    <workdir>/checkpoints/<step>/params/       parameters: the pure dict of nnx.to_pure_dict (orbax pytree)
    <workdir>/checkpoints/<step>/config/       the resolved config again, so a step directory stands alone
    (and train/, data/: the trainer's own state)

    model, cfg = famjax.restore.restore_model("runs/passkey_tiny")   # a workdir, checkpoints/ or a step dir
"""
from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections

from famjax.model.config import ModelConfig

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"

# ModelConfig fields that live in the config's `fam` section (name there -> ModelConfig field); the others
# live in `model`. Configs written before a switch existed get the ModelConfig default.
FAM_MODEL_FIELDS = {"fam_len": "fam_len", "zero_residual": "fam_zero_residual", "positions": "fam_positions",
                    "stop_gradient": "fam_stop_gradient", "keep_norm": "fam_keep_norm"}
# The training options of the `fam` section (configs/default.py documents them).
FAM_TRAINING_FIELDS = ("rsp_prob", "rpo", "rpo_zero_prob", "noise", "drift")
MODEL_FIELDS = tuple(f for f in ModelConfig.__dataclass_fields__ if f not in FAM_MODEL_FIELDS.values())
# A run fine-tuned from a pretrained source (train.init_from): the ModelConfig fields its config decides; every
# other field of `model` comes from the source.
OVERRIDE_FIELDS = ("attention", "block_size", "memory_blocks", "max_len", "dtype", "param_dtype", "scan_layers",
                   "remat") + tuple(FAM_MODEL_FIELDS.values())
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")

_LOG = logging.getLogger(__name__)


def to_json(cfg: ml_collections.ConfigDict) -> str:
    """Returns the config as JSON (what the trainer writes to <workdir>/config.json)."""
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)


def from_json(text: str) -> ml_collections.ConfigDict:
    """Returns the ConfigDict of a config.json (lists become tuples, as the presets write them)."""
    def tuples(x):
        if isinstance(x, dict):
            return {k: tuples(v) for k, v in x.items()}
        if isinstance(x, list):
            return tuple(tuples(v) for v in x)
        return x
    return ml_collections.ConfigDict(tuples(json.loads(text)))


def check_model_fields(cfg: ml_collections.ConfigDict, source: str = "config") -> None:
    """Raises ValueError (one line) if the `model` or `fam` section holds a field famjax does not know.

    A field of another famjax version (e.g. a training option that was removed) would otherwise be dropped
    and the run would load silently as another model.
    """
    known = {"model": set(MODEL_FIELDS), "fam": set(FAM_MODEL_FIELDS) | set(FAM_TRAINING_FIELDS)}
    for section, names in known.items():
        unknown = sorted(set(cfg.get(section, {})) - names)
        if unknown:
            raise ValueError(f"{source}: unknown field {section}.{unknown[0]}"
                             f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}: not a field of "
                             "this famjax version (a removed option?); this run cannot be loaded as it was trained")


def model_config(cfg: ml_collections.ConfigDict) -> ModelConfig:
    """Returns the ModelConfig of a (resolved) config: cfg.model fields plus the FAM fields of cfg.fam."""
    check_model_fields(cfg)
    fields = {k: cfg.model[k] for k in MODEL_FIELDS if k in cfg.model}
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in fields.items()}
    fields.update({field: cfg.fam[name] for name, field in FAM_MODEL_FIELDS.items() if name in cfg.fam})
    return ModelConfig(**fields)


def init_from(cfg) -> str:
    """The run config's pretrained source, train.init_from ("" = none), with ~ expanded."""
    train = cfg.get("train", {})
    path = str(train.get("init_from", "") or "")
    return os.path.expanduser(path) if path else ""


def source_overrides(cfg) -> dict:
    """The ModelConfig fields a run config gives load_pretrained (OVERRIDE_FIELDS, from `model` and `fam`)."""
    out = {k: cfg.model[k] for k in OVERRIDE_FIELDS if k in cfg.model}
    out.update({field: cfg.fam[name] for name, field in FAM_MODEL_FIELDS.items() if name in cfg.fam})
    return out


def base_model(cfg, mesh=None):
    """Returns the FamLM a run with train.init_from starts from: the pretrained source loaded with the config's
    overrides (placed with cfg.mesh.rules on mesh) and the config's LoRA adapters added (seeded by train.seed).

    Raises ValueError (one line) if the result is not the config's model (the source changed since resolve).
    """
    from famjax.convert import load_pretrained
    from famjax.model import lora

    rules = cfg.mesh.rules if mesh is not None else None
    seed = int(cfg.train.seed)
    model, _ = load_pretrained(init_from(cfg), mesh=mesh, rules=rules, fam_init=cfg.train.get("init_fam") or None,
                               fam_seed=seed, **source_overrides(cfg))
    want = model_config(cfg)
    if want.lora_rank:
        model = lora.add_lora(model, want.lora_rank, want.lora_alpha, want.lora_dropout, want.lora_targets,
                              seed=seed, mesh=mesh, rules=rules)
    if model.cfg != want:
        diff = [f for f in ModelConfig.__dataclass_fields__ if getattr(model.cfg, f) != getattr(want, f)]
        raise ValueError(f"train.init_from {init_from(cfg)}: the checkpoint's model differs from the config's in "
                         f"{', '.join(diff)} (resolve the config again: model fields come from the checkpoint)")
    return model


def find_checkpoint(path: str) -> tuple[str, int | None, str | None]:
    """Returns (checkpoints directory, step or None for the latest, workdir config.json path or None).

    path: a workdir (holding config.json and checkpoints/), its checkpoints/ directory, or one step
    directory checkpoints/<step>.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such checkpoint or workdir: {path}")
    if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
        cfg = os.path.join(path, CONFIG_FILE)
        return os.path.join(path, CHECKPOINT_DIR), None, cfg if os.path.exists(cfg) else None
    base = os.path.basename(path)
    if base.isdigit() and os.path.isdir(os.path.join(path, "params")):
        parent = os.path.dirname(path)
        cfg = os.path.join(os.path.dirname(parent), CONFIG_FILE)
        return parent, int(base), cfg if os.path.exists(cfg) else None
    cfg = os.path.join(os.path.dirname(path), CONFIG_FILE)
    return path, None, cfg if os.path.exists(cfg) else None


def checkpoint_steps(ckpt_dir: str) -> list[int]:
    """Returns the steps of the (complete) step directories in ckpt_dir, unsorted."""
    if not os.path.isdir(ckpt_dir):
        return []
    return [int(d) for d in os.listdir(ckpt_dir) if d.isdigit() and os.path.isdir(os.path.join(ckpt_dir, d))]


def load_config(path: str) -> ml_collections.ConfigDict:
    """Returns the resolved config of a workdir, checkpoints dir or step dir (config.json or config item).

    Raises ValueError (one line naming the file and field) if it holds a model field famjax does not know.
    """
    ckpt_dir, step, cfg_file = find_checkpoint(path)
    if cfg_file is None:
        steps = [step] if step is not None else sorted(checkpoint_steps(ckpt_dir), reverse=True)
        items = (os.path.join(ckpt_dir, str(s), "config", "metadata") for s in steps)
        cfg_file = next((item for item in items if os.path.exists(item)), None)
        if cfg_file is None:
            raise FileNotFoundError(f"no {CONFIG_FILE} and no config item found for {path}")
    with open(cfg_file) as f:
        cfg = from_json(f.read())
    check_model_fields(cfg, cfg_file)
    return cfg


def abstract_params(mcfg: ModelConfig):
    """Returns (graphdef, abstract parameters as a pure dict) of a FamLM, without allocating."""
    from flax import nnx

    from famjax.model import FamLM

    graphdef, state = nnx.split(nnx.eval_shape(lambda: FamLM(mcfg, rngs=nnx.Rngs(0))))
    return graphdef, nnx.to_pure_dict(state)


def restore_model(path: str, step: int | None = None):
    """Returns (FamLM with the restored parameters, the run's resolved config).

    path: a workdir, its checkpoints/ directory, or a step directory; step: which step (default: the one in
    the path, else the newest readable one; a corrupt newest falls back to the previous with a warning).
    Parameters land on the default device, in the dtype they were saved in (param_dtype).
    """
    import orbax.checkpoint as ocp
    from flax import nnx
    from jax.sharding import SingleDeviceSharding

    ckpt_dir, path_step, _ = find_checkpoint(path)
    cfg = load_config(path)
    want = step if step is not None else path_step
    steps = [want] if want is not None else sorted(checkpoint_steps(ckpt_dir), reverse=True)
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {ckpt_dir}")
    base = None
    if os.path.isdir(os.path.join(ckpt_dir, str(steps[0]), "base")):
        # A run that trained some leaves of a pretrained base (train.trainable): its checkpoints hold those only.
        pointer = _read_json_item(ckpt_dir, steps[0], "base")
        check_base_source(pointer, cfg, f"{ckpt_dir}/{steps[0]}")  # before the load: a wrong base costs one line
        base = base_model(cfg)
        graphdef, full = nnx.split(base)
        frozen, saved = _split_saved(nnx.to_pure_dict(full), pointer)
    else:
        graphdef, saved = abstract_params(model_config(cfg))
    device = SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), saved)
    with ocp.CheckpointManager(ckpt_dir, item_names=("params",),
                               options=ocp.CheckpointManagerOptions(read_only=True, create=False)) as mngr:
        for i, s in enumerate(steps):
            try:
                out = mngr.restore(s, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
                break
            except Exception as e:
                if want is not None or i == len(steps) - 1:
                    raise
                _LOG.warning("checkpoint step %d in %s is unreadable (%s); falling back to step %d",
                             s, ckpt_dir, e, steps[i + 1])
    params = out["params"]
    if base is not None:
        from famjax.model import lora
        params = lora.combine(frozen, params)
    return nnx.merge(graphdef, params), cfg


def check_base_source(stored: dict, cfg, where: str) -> None:
    """Raises ValueError (one line naming both hashes) unless the pretrained source of cfg (train.init_from) has
    the content hash a checkpoint's base pointer `stored` recorded."""
    from famjax.convert.source import source_hash

    have = source_hash(init_from(cfg))
    if stored.get("sha256") != have:
        raise ValueError(f"{where}: the checkpoint was trained on base {stored.get('source')} "
                         f"({stored.get('sha256')}), but train.init_from {init_from(cfg)} has {have}")


def _read_json_item(ckpt_dir: str, step: int, item: str) -> dict:
    with open(os.path.join(ckpt_dir, str(step), item, "metadata")) as f:
        return json.load(f)


def _split_saved(full: dict, stored: dict) -> tuple[dict, dict]:
    """(frozen, saved): the parameters a frozen-base checkpoint leaves to its base, and those it holds (by its
    base pointer's trainable mode)."""
    from famjax.model import lora

    saved, frozen = lora.split(full, lora.trainable_mask(full, norms=stored.get("trainable") == "lora_norms"))
    return frozen, saved
