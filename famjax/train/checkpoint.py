"""The trainer's checkpoints (orbax CheckpointManager); famjax.restore reads them back for inference.

Layout of a workdir:
    <workdir>/config.json                      the resolved config of the run
    <workdir>/checkpoints/<step>/params/       parameters: the pure dict of nnx.to_pure_dict (orbax pytree)
    <workdir>/checkpoints/<step>/train/        step, optimizer, RNG, RSP saved FAM, carried stream state
    <workdir>/checkpoints/<step>/data/         data iterator state, process_<i>-of-<n>.json (grain handler)
    <workdir>/checkpoints/<step>/config/       the resolved config again, so a step directory stands alone
    <workdir>/checkpoints/<step>/base/         runs with train.trainable != "all" only: the frozen base's path,
                                               sha256 and the trainable mode; params/ then holds only the
                                               trainable leaves (LoRA adapters, fam_init, [norms])
A step directory appears only once complete (orbax writes a temporary directory and renames it: atomic); in a
gs:// workdir it is written in place and complete once orbax's commit_success.txt is in it.
"""
from __future__ import annotations

import json
import logging

import grain.checkpoint as gcp
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from famjax import paths
from famjax.errors import CheckpointError
from famjax.model.lora import combine
from famjax.restore import CHECKPOINT_DIR, CONFIG_FILE, load_config, restore_model, to_json
from famjax.train import pretrained
from famjax.train.state import TrainState, trainable_params

__all__ = ["CHECKPOINT_DIR", "CONFIG_FILE", "Checkpointer", "load_config", "restore_model"]

_LOG = logging.getLogger(__name__)


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
    With train.trainable != "all" only the trainable parameters are saved, with the base pointer
    (famjax.train.pretrained.base_info, its hash computed here once); restore checks it and needs the frozen
    leaves of that base.
    """

    def __init__(self, workdir: str, ckpt_cfg, config: ml_collections.ConfigDict):
        self.directory = paths.resolve(workdir) / CHECKPOINT_DIR  # an epath.Path (local or gs://)
        self._cfg = config
        self._config = json.loads(to_json(config))
        self.base = pretrained.base_info(config)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(ckpt_cfg.keep), enable_async_checkpointing=bool(ckpt_cfg.async_save), create=True)
        handlers = {"params": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
                    "data": gcp.CheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                    "base": ocp.JsonCheckpointHandler()}
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=tuple(handlers),
                                           item_handlers=handlers)

    def steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def save(self, ts: TrainState, data_state: dict | None) -> int:
        """Starts saving `ts` (and the data iterator state) at step ts.step; returns the step."""
        step = int(jax.device_get(ts.step))
        params = ts.params if self.base is None else trainable_params(self._cfg, ts.params)
        items = {"params": ocp.args.StandardSave(params), "train": ocp.args.StandardSave(_train_tree(ts)),
                 "config": ocp.args.JsonSave(self._config)}
        if self.base is not None:
            items["base"] = ocp.args.JsonSave(self.base)
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

    def stored_base(self, step: int) -> dict | None:
        """The base pointer saved with a step (None: a checkpoint of every parameter)."""
        if not (self.directory / str(step) / "base").is_dir():
            return None
        return self._mngr.restore(step, args=ocp.args.Composite(base=ocp.args.JsonRestore()))["base"]

    def check_base(self) -> None:
        """Raises ValueError (one line naming both hashes) if a checkpoint was trained on another base, or with
        another train.trainable, than this run's."""
        for s in sorted(self._mngr.all_steps(), reverse=True):
            pretrained.check_base(self.stored_base(s), self.base, f"checkpoint step {s} in {self.directory}")

    def restore(self, abstract: TrainState, *, with_data: bool = True, frozen: dict | None = None
                ) -> tuple[TrainState, dict | None, int] | None:
        """Returns (state, data iterator state or None, step) of the newest readable checkpoint, or None.

        `abstract` carries the target shardings (ShapeDtypeStructs). Newer checkpoints that fail to restore
        while an older one restores are moved aside to <checkpoints>/corrupt-<step> (never deleted; a warning
        names each), so the run goes on from the good one and saves past the bad steps. If none restores,
        this raises CheckpointError (one line, every step's error) and moves nothing.
        With train.trainable != "all": `frozen` is the base's frozen leaves (pure dict, placed), which the
        restored state's params get besides the saved trainable ones; a checkpoint of another base or
        trainable mode raises before anything is read.
        """
        self.check_base()
        if self.base is not None and frozen is None:
            raise ValueError("restoring a checkpoint of a frozen-base run needs the base's frozen parameters")
        params_target = abstract.params if self.base is None else trainable_params(self._cfg, abstract.params)
        steps = sorted(self._mngr.all_steps(), reverse=True)
        errors, bad = [], []
        for s in steps:
            try:
                items = {"params": ocp.args.StandardRestore(params_target),
                         "train": ocp.args.StandardRestore(_train_tree(abstract))}
                has_data = with_data and (self.directory / str(s) / "data").is_dir()
                target = _DataTarget()
                if has_data:
                    items["data"] = gcp.CheckpointRestore(target)
                ts = self._restore_step(s, items, abstract)
                if frozen is not None:
                    ts = ts.replace(params=combine(ts.params, frozen))
                if int(jax.device_get(ts.step)) != s:
                    raise ValueError(f"step directory {s} holds a state of step {int(ts.step)}")
            except Exception as e:  # noqa: BLE001
                errors.append(f"step {s}: {type(e).__name__}: {str(e)[:300]}")
                bad.append(s)
                _LOG.warning("checkpoint step %d in %s is unreadable (%s: %s); trying the previous one",
                             s, self.directory, type(e).__name__, str(e)[:300])
                continue
            if bad:
                self._move_aside(bad)
            return ts, target.state, s
        if errors:
            raise CheckpointError(f"no readable checkpoint in {self.directory} (moved nothing): " + "; ".join(
                " ".join(e.split()) for e in errors))
        return None

    def _move_aside(self, steps: list[int]) -> None:
        """Renames the step directories to corrupt-<step>[-k] (process 0; every process waits for it)."""
        if jax.process_index() == 0:
            for s in steps:
                dst = self.directory / f"corrupt-{s}"
                k = 1
                while dst.exists():
                    k += 1
                    dst = self.directory / f"corrupt-{s}-{k}"
                paths.rename(self.directory / str(s), dst)
                _LOG.warning("moved the unreadable checkpoint step %d aside to %s", s, dst)
                print(f"checkpoint step {s} is unreadable: moved aside to {dst}; resuming from an older one",
                      flush=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("famjax_checkpoint_move_aside")
        self._mngr.reload()

    def _restore_step(self, s: int, items: dict, abstract: TrainState) -> TrainState:
        """Restores step s. For document streams, a checkpoint without streams of this run's shape (saved by a
        packed-rows run, or by a stream run with another batch size, e.g. a fine-tune with a new batch) comes
        back with stream=None: everything else is restored and the caller starts the streams fresh. Which case
        it is comes from the stored metadata, so no restore is started only to fail (orbax would leave its other
        reads pending)."""
        stored = self._stored_without_streams(s, abstract)
        if stored is None:
            out = self._mngr.restore(s, args=ocp.args.Composite(**items))
            return _from_train_tree(out["train"], abstract, out["params"])
        # The stream leaves come last (TrainState's field order): whatever the checkpoint holds beyond the bare
        # keys is its streams, read as stored and dropped.
        bare = abstract.replace(stream=None, stream_offset=None)
        train = _train_tree(bare)
        extra = {k: jax.ShapeDtypeStruct(m.shape, m.dtype) for k, m in stored.items() if k not in train}
        out = self._mngr.restore(s, args=ocp.args.Composite(
            **{**items, "train": ocp.args.StandardRestore({**train, **extra})}))
        _LOG.warning("checkpoint step %d in %s holds no stream state of this run's shape (saved by a "
                     "packed-rows run or with another batch size); the document streams start fresh",
                     s, self.directory)
        return _from_train_tree(out["train"], bare, out["params"])  # reads only the bare keys

    def _stored_without_streams(self, s: int, abstract: TrainState) -> dict | None:
        """The stored metadata {key: (shape, dtype)} of step s's train tree when `abstract` wants document
        streams that the step lacks or holds in another shape; None otherwise, and when the metadata cannot be
        read (the restore then fails and says why)."""
        if abstract.stream is None:
            return None
        try:
            stored = dict(self._mngr.item_metadata(s)["train"])
        except Exception:  # noqa: BLE001  an unreadable step is the restore's to report
            return None
        bare = _train_tree(abstract.replace(stream=None, stream_offset=None))
        streams = {k: x for k, x in _train_tree(abstract).items() if k not in bare}
        same = all(k in stored and tuple(stored[k].shape) == x.shape for k, x in streams.items())
        return None if same else stored

    def close(self) -> None:
        self.wait()
        self._mngr.close()
