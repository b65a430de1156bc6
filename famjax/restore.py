"""Reading a trained run back: its config.json, the ModelConfig it describes, and its parameters.

The small read side of the trainer's checkpoint format, for inference, evals and notebooks: it needs orbax
but none of the trainer's modules. Layout of a workdir (famjax.train.checkpoint writes it):
    <workdir>/config.json                      the resolved config of the run
    <workdir>/checkpoints/<step>/params/       parameters: the pure dict of nnx.to_pure_dict (orbax pytree)
    <workdir>/checkpoints/<step>/config/       the resolved config again, so a step directory stands alone
    (and train/, data/: the trainer's own state)

    model, cfg = famjax.restore.restore_model("runs/passkey_tiny")   # a workdir, checkpoints/ or a step dir
    model, cfg = famjax.restore.restore_model("gs://bucket/run")     # remote ones too (famjax.paths)
"""
from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections

from famjax import paths
from famjax.errors import CheckpointError, CheckpointNotFoundError, ConfigError
from famjax.model.config import ModelConfig

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
COMMIT_FILE = "commit_success.txt"  # orbax marks a complete step directory on gs:// with it

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
                   "remat", "attention_impl", "fam_unroll", "fam_deferred_grads", "fam_remat"
                   ) + tuple(FAM_MODEL_FIELDS.values())
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
    """Raises ConfigError (a ValueError; one line) if the `model` or `fam` section holds a field famjax lacks.

    A field of another famjax version (e.g. a training option that was removed) would otherwise be dropped
    and the run would load silently as another model.
    """
    known = {"model": set(MODEL_FIELDS), "fam": set(FAM_MODEL_FIELDS) | set(FAM_TRAINING_FIELDS)}
    for section, names in known.items():
        unknown = sorted(set(cfg.get(section, {})) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown field {section}.{unknown[0]}"
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

    Raises CheckpointError (a ValueError; one line) if the result is not the config's model (the source changed
    since resolve).
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
        raise CheckpointError(f"train.init_from {init_from(cfg)}: the checkpoint's model differs from the "
                              f"config's in {', '.join(diff)} (resolve the config again: model fields come "
                              "from the checkpoint)")
    return model


def find_checkpoint(path: str) -> tuple[str, int | None, str | None]:
    """Returns (checkpoints directory, step or None for the latest, workdir config.json path or None).

    path: a workdir (holding config.json and/or checkpoints/), its checkpoints/ directory, or one step
    directory checkpoints/<step>. Raises CheckpointNotFoundError (one line naming it) if path is not a folder.
    """
    given = path
    paths.check_reachable(path, write=False)
    path = paths.resolve(os.path.expanduser(path))
    if not path.exists():
        raise CheckpointNotFoundError(f"no such workdir or checkpoint folder: {given} (the --workdir of a "
                                      "training run, its checkpoints/ or one checkpoints/<step> folder)")
    if not path.is_dir():
        raise CheckpointNotFoundError(f"{given} is a file, not a workdir or checkpoint folder")
    cfg = path / CONFIG_FILE
    if (path / CHECKPOINT_DIR).is_dir() or cfg.is_file():  # a workdir
        return path / CHECKPOINT_DIR, None, cfg if cfg.is_file() else None
    if path.name.isdigit() and (path / "params").is_dir():
        cfg = path.parent.parent / CONFIG_FILE
        return path.parent, int(path.name), cfg if cfg.is_file() else None
    cfg = path.parent / CONFIG_FILE
    return path, None, cfg if cfg.is_file() else None


def _no_checkpoints(path: str, ckpt_dir: paths.Path) -> CheckpointNotFoundError:
    """The one-line error of a workdir (or another folder) without a checkpoint."""
    if ckpt_dir.name == CHECKPOINT_DIR:
        workdir = ckpt_dir.parent
        return CheckpointNotFoundError(f"no checkpoints in {workdir}: train first (python -m famjax.main "
                                       f"--config=... --workdir={workdir}) or give another workdir")
    return CheckpointNotFoundError(f"{path} is not a famjax workdir or checkpoint folder (no {CONFIG_FILE}, no "
                                   f"{CHECKPOINT_DIR}/, no step folders): give the --workdir of a training run")


def checkpoint_steps(ckpt_dir) -> list[int]:
    """Returns the steps of the complete step directories in ckpt_dir (a path or str, local or remote), unsorted.

    Locally a step directory exists only once complete (orbax renames it into place); on an object store it is
    written in place and complete once orbax's COMMIT_FILE is in it.
    """
    ckpt_dir = paths.Path(ckpt_dir)
    remote = paths.is_remote(ckpt_dir)
    return [int(d) for d in paths.listdir(ckpt_dir) if d.isdigit() and (ckpt_dir / d).is_dir()
            and (not remote or (ckpt_dir / d / COMMIT_FILE).exists())]


def checkpoint_dir_and_steps(path: str, step: int | None = None) -> tuple[paths.Path, list[int]]:
    """Returns (checkpoints directory, steps to try, newest first) of a workdir, checkpoints dir or step dir:
    [step] (or the step in the path) if given, else every saved step.

    Raises CheckpointNotFoundError (one line naming the folder; "train first") if there is none.
    """
    ckpt_dir, path_step, _ = find_checkpoint(path)
    want = step if step is not None else path_step
    have = checkpoint_steps(ckpt_dir)
    if want is None:
        if not have:
            raise _no_checkpoints(path, ckpt_dir)
        return ckpt_dir, sorted(have, reverse=True)
    if want not in have:
        raise CheckpointNotFoundError(f"no checkpoint of step {want} in {ckpt_dir}; steps there: "
                                      f"{sorted(have) or 'none'}")
    return ckpt_dir, [want]


def load_config(path: str) -> ml_collections.ConfigDict:
    """Returns the resolved config of a workdir, checkpoints dir or step dir (config.json or config item).

    Raises (one line naming the file or field) CheckpointNotFoundError if there is neither a config.json nor a
    checkpoint, ConfigError if the file is not a config (not JSON) or holds a model field famjax does not know.
    """
    ckpt_dir, step, cfg_file = find_checkpoint(path)
    if cfg_file is None:
        steps = [step] if step is not None else sorted(checkpoint_steps(ckpt_dir), reverse=True)
        if not steps:
            raise _no_checkpoints(path, ckpt_dir)
        items = (ckpt_dir / str(s) / "config" / "metadata" for s in steps)
        cfg_file = next((item for item in items if item.exists()), None)
        if cfg_file is None:
            raise CheckpointError(f"{ckpt_dir}: no {CONFIG_FILE} beside the checkpoints and no config item in them "
                                  f"(copy the run's {CONFIG_FILE} into {ckpt_dir.parent})")
    try:
        cfg = from_json(paths.read_text(cfg_file))
    except (OSError, TypeError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError: ValueErrors
        raise ConfigError(f"{cfg_file}: cannot read the run's config ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, ml_collections.ConfigDict) or "model" not in cfg:
        raise ConfigError(f"{cfg_file}: not a famjax run config (no 'model' section)")
    check_model_fields(cfg, str(cfg_file))
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

    cfg = load_config(path)
    ckpt_dir, steps = checkpoint_dir_and_steps(path, step)
    want = step if step is not None else find_checkpoint(path)[1]
    base = None
    if (ckpt_dir / str(steps[0]) / "base").is_dir():
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
    # The params item of a step directly (a read-only CheckpointManager would log two warnings on every load).
    with ocp.StandardCheckpointer() as checkpointer:
        for i, s in enumerate(steps):
            try:
                params = checkpointer.restore(ckpt_dir / str(s) / "params", target)
                break
            except Exception as e:
                if want is not None or i == len(steps) - 1:
                    newer = f" (nor the {i} newer)" if i else ""
                    raise CheckpointError(f"cannot restore step {s} of {ckpt_dir}{newer}: {_first_line(e)}; the "
                                          "checkpoint is damaged or belongs to another model") from e
                _LOG.warning("checkpoint step %d in %s is unreadable (%s); falling back to step %d",
                             s, ckpt_dir, e, steps[i + 1])
    if base is not None:
        from famjax.model import lora
        params = lora.combine(frozen, params)
    return nnx.merge(graphdef, params), cfg


def check_base_source(stored: dict, cfg, where: str) -> None:
    """Raises CheckpointError (a ValueError; one line naming both hashes) unless the pretrained source of cfg
    (train.init_from) has the content hash a checkpoint's base pointer `stored` recorded."""
    from famjax.convert.source import source_hash

    have = source_hash(init_from(cfg))
    if stored.get("sha256") != have:
        raise CheckpointError(f"{where}: the checkpoint was trained on base {stored.get('source')} "
                              f"({stored.get('sha256')}), but train.init_from {init_from(cfg)} has {have}")


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def _read_json_item(ckpt_dir: paths.Path, step: int, item: str) -> dict:
    return json.loads(paths.read_text(ckpt_dir / str(step) / item / "metadata"))


def _split_saved(full: dict, stored: dict) -> tuple[dict, dict]:
    """(frozen, saved): the parameters a frozen-base checkpoint leaves to its base, and those it holds (by its
    base pointer's trainable mode)."""
    from famjax.model import lora

    saved, frozen = lora.split(full, lora.trainable_mask(full, norms=stored.get("trainable") == "lora_norms"))
    return frozen, saved
