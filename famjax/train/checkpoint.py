"""Checkpoints (orbax CheckpointManager) and `restore_model(path) -> (model, config)` for inference tools.

Layout of a workdir:
    <workdir>/config.json                      the resolved config of the run
    <workdir>/checkpoints/<step>/params/       parameters: the pure dict of nnx.to_pure_dict (orbax pytree)
    <workdir>/checkpoints/<step>/train/        step, optimizer, RNG, RSP saved FAM, carried stream state
    <workdir>/checkpoints/<step>/data/         data iterator state, process_<i>-of-<n>.json (grain handler)
    <workdir>/checkpoints/<step>/config/       the resolved config again, so a step directory stands alone
A step directory appears only once complete (orbax writes a temporary directory and renames it: atomic).
"""
from __future__ import annotations

import json
import logging
import os

import grain.checkpoint as gcp
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import SingleDeviceSharding

from famjax.model import FamLM
from famjax.train.config import from_json, model_config, to_json
from famjax.train.state import TrainState, abstract_model

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"

_LOG = logging.getLogger(__name__)


# ---------------------------------------------------------------- restore_model (stable API)
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


def load_config(path: str) -> ml_collections.ConfigDict:
    """Returns the resolved config of a workdir, checkpoints dir or step dir (config.json or config item)."""
    ckpt_dir, step, cfg_file = find_checkpoint(path)
    if cfg_file is not None:
        with open(cfg_file) as f:
            return from_json(f.read())
    steps = [step] if step is not None else sorted(_steps(ckpt_dir), reverse=True)
    for s in steps:
        item = os.path.join(ckpt_dir, str(s), "config", "metadata")
        if os.path.exists(item):
            with open(item) as f:
                return from_json(f.read())
    raise FileNotFoundError(f"no {CONFIG_FILE} and no config item found for {path}")


def restore_model(path: str, step: int | None = None) -> tuple[FamLM, ml_collections.ConfigDict]:
    """Returns (FamLM with the restored parameters, the run's resolved config).

    path: a workdir, its checkpoints/ directory, or a step directory; step: which step (default: the one in
    the path, else the newest readable one; a corrupt newest falls back to the previous with a warning).
    Parameters land on the default device, in the dtype they were saved in (param_dtype).
    """
    ckpt_dir, path_step, _ = find_checkpoint(path)
    cfg = load_config(path)
    graphdef, abstract, _ = abstract_model(cfg)
    device = SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    want = step if step is not None else path_step
    steps = [want] if want is not None else sorted(_steps(ckpt_dir), reverse=True)
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {ckpt_dir}")
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
    model = nnx.merge(graphdef, out["params"])
    if model_config(cfg) != model.cfg:  # the graphdef was built from this config; a cheap sanity check
        raise RuntimeError("restored model config differs from the saved config")
    return model, cfg


def _steps(ckpt_dir: str) -> list[int]:
    if not os.path.isdir(ckpt_dir):
        return []
    return [int(d) for d in os.listdir(ckpt_dir) if d.isdigit() and os.path.isdir(os.path.join(ckpt_dir, d))]


# ---------------------------------------------------------------- the trainer's checkpoints
class _DataSnapshot:
    """The data iterator's state captured when save() is called (async saves must not read it later)."""

    def __init__(self, state: dict):
        self._bytes = json.dumps(state).encode()

    def get_state(self) -> bytes:
        return self._bytes


class _DataTarget:
    """Receives the saved iterator state on restore (grain's handler calls set_state + start_prefetch)."""

    def __init__(self):
        self.state = None

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:
        pass


def _train_tree(ts: TrainState) -> dict:
    """Returns the non-parameter part of a TrainState as a flat dict {'0000': leaf, ...} (orbax-friendly).

    Zero-size leaves (the FAM of a BSWA model, the current block of full attention) are left out: orbax
    refuses to save them, and their shape alone, known from the abstract state, restores them.
    """
    leaves = jax.tree.leaves(ts.replace(params={}))
    return {f"{i:04d}": x for i, x in enumerate(leaves) if x.size}


def _from_train_tree(flat: dict, like: TrainState, params) -> TrainState:
    """Inverse of _train_tree; `like` (concrete or abstract) supplies the structure and zero-size leaves."""
    like = like.replace(params={})
    leaves = [flat[f"{i:04d}"] if x.size else jnp.zeros(x.shape, x.dtype)
              for i, x in enumerate(jax.tree.leaves(like))]
    return jax.tree.unflatten(jax.tree.structure(like), leaves).replace(params=params)


class Checkpointer:
    """Async, keep-N orbax checkpoints of the train state + data iterator state, with fallback on restore.

    Save errors (including those of a background save) raise from `save` or `wait`; they are never dropped.
    """

    def __init__(self, workdir: str, ckpt_cfg, config: ml_collections.ConfigDict):
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        self._config = json.loads(to_json(config))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(ckpt_cfg.keep), enable_async_checkpointing=bool(ckpt_cfg.async_save), create=True)
        handlers = {"params": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
                    "data": gcp.CheckpointHandler(), "config": ocp.JsonCheckpointHandler()}
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=tuple(handlers),
                                           item_handlers=handlers)

    def steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def save(self, ts: TrainState, data_state: dict | None) -> int:
        """Starts saving `ts` (and the data iterator state) at step ts.step; returns the step."""
        step = int(jax.device_get(ts.step))
        items = {"params": ocp.args.StandardSave(ts.params), "train": ocp.args.StandardSave(_train_tree(ts)),
                 "config": ocp.args.JsonSave(self._config)}
        if data_state is not None:
            items["data"] = gcp.CheckpointSave(_DataSnapshot(data_state))
        saved = self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
        if not saved and step not in self._mngr.all_steps():
            raise RuntimeError(f"checkpoint at step {step} was not saved")
        return step

    def wait(self) -> None:
        """Blocks until background saves are committed; raises if one failed."""
        self._mngr.wait_until_finished()
        self._mngr.check_for_errors()

    def restore(self, abstract: TrainState, *, with_data: bool = True) -> tuple[TrainState, dict | None, int] | None:
        """Returns (state, data iterator state or None, step) of the newest readable checkpoint, or None.

        `abstract` carries the target shardings (ShapeDtypeStructs). An unreadable newest checkpoint logs a
        warning and the previous one is tried; if every checkpoint is unreadable this raises.
        """
        steps = sorted(self._mngr.all_steps(), reverse=True)
        errors = []
        for s in steps:
            try:
                items = {"params": ocp.args.StandardRestore(abstract.params),
                         "train": ocp.args.StandardRestore(_train_tree(abstract))}
                has_data = with_data and os.path.isdir(os.path.join(self.directory, str(s), "data"))
                target = _DataTarget()
                if has_data:
                    items["data"] = gcp.CheckpointRestore(target)
                ts = self._restore_step(s, items, abstract)
                if int(jax.device_get(ts.step)) != s:
                    raise ValueError(f"step directory {s} holds a state of step {int(ts.step)}")
                return ts, target.state, s
            except Exception as e:  # noqa: BLE001
                errors.append(f"step {s}: {type(e).__name__}: {e}")
                _LOG.warning("checkpoint step %d in %s is unreadable (%s: %s); trying the previous one",
                                s, self.directory, type(e).__name__, str(e)[:300])
        if errors:
            raise RuntimeError(f"no readable checkpoint in {self.directory}:\n" + "\n".join(errors))
        return None

    def _restore_step(self, s: int, items: dict, abstract: TrainState) -> TrainState:
        """Restores step s. For document streams, a checkpoint without streams of this run's shape (saved by a
        packed-rows run, or by a stream run with another batch size, e.g. a fine-tune with a new batch) comes
        back with stream=None: everything else is restored and the caller starts the streams fresh."""
        try:
            out = self._mngr.restore(s, args=ocp.args.Composite(**items))
            return _from_train_tree(out["train"], abstract, out["params"])
        except Exception as first:
            if abstract.stream is None:
                raise
            bare = abstract.replace(stream=None, stream_offset=None)
            train = _train_tree(bare)
            try:
                # The stream leaves come last (TrainState's field order): whatever the checkpoint holds beyond
                # the bare keys is its streams, read as stored and dropped.
                stored = self._mngr.item_metadata(s)["train"]
                extra = {k: jax.ShapeDtypeStruct(m.shape, m.dtype) for k, m in stored.items() if k not in train}
                out = self._mngr.restore(s, args=ocp.args.Composite(
                    **{**items, "train": ocp.args.StandardRestore({**train, **extra})}))
            except Exception:
                raise first from None
            _LOG.warning("checkpoint step %d in %s holds no stream state of this run's shape (saved by a "
                         "packed-rows run or with another batch size); the document streams start fresh",
                         s, self.directory)
            return _from_train_tree(out["train"], bare, out["params"])  # reads only the bare keys

    def close(self) -> None:
        self.wait()
        self._mngr.close()
