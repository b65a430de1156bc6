"""The training loop and evaluation: `train`, `evaluate`, `train_and_eval` (what famjax.main calls).

Every process runs the same loop on its own rows; arrays are global (jax.make_array_from_process_local_data)
and jitted with explicit in/out shardings. Resume is automatic: the newest readable checkpoint in
<workdir>/checkpoints restores params, optimizer, step, RNG, RSP/stream state and the data iterator.
With train.init_from a new run starts from that pretrained checkpoint (+ LoRA adapters); with
train.trainable != "all" the frozen base is loaded again from it on resume, after its hash is checked.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

import famjax.data as fd
from famjax import paths
from famjax.errors import EXIT_PREEMPTED, CheckpointNotFoundError, ConfigError, NonFiniteLossError, WorkdirError
from famjax.model.lora import select
from famjax.restore import CHECKPOINT_DIR, checkpoint_steps
from famjax.train import mesh as meshlib
from famjax.train import metrics as mlib
from famjax.train import pretrained
from famjax.train.checkpoint import CONFIG_FILE, Checkpointer
from famjax.train.config import (
    check_model_fields,
    config_changes,
    from_json,
    model_config,
    resolve,
    to_json,
    validate,
)
from famjax.train.optim import make_optimizer
from famjax.train.state import (
    abstract_model,
    abstract_train_state,
    create_train_state,
    fresh_streams,
    init_stream_state,
)
from famjax.train.step import make_eval_step, make_train_step

TRAIN_KEYS = ("tokens", "targets", "loss_mask", "segment_start")
EVAL_KEYS = TRAIN_KEYS + ("answer_mask",)


@dataclasses.dataclass
class Result:
    """What train / evaluate return: the final step, the last train metrics, eval metrics, the TB log dir."""
    step: int
    train: dict
    eval: dict
    logdir: str
    preempted: bool = False  # stopped by SIGTERM / Ctrl-C before train.steps (saved; rerun to resume)


def prepare(cfg, workdir: str, *, write: bool = True):
    """Returns the resolved, validated config; with write (the training modes) process 0 then writes it to
    <workdir>/config.json. Nothing is written before every check has passed:

    - the workdir must be a folder this process can write (WorkdirError otherwise; eval needs it to exist);
    - a saved config.json with a model field this famjax does not know (a removed option) is refused;
    - when the workdir holds checkpoints, the new config may differ from the saved one only in fields that do not
      change what the checkpoints or the data stream mean (famjax.train.config.RESUME_MAY_CHANGE; each change is
      logged); any other difference is refused with one line listing the fields and both values.
    """
    cfg = resolve(cfg)
    validate(cfg, process_count=jax.process_count())
    _check_workdir(workdir, create=write)
    run = paths.Path(workdir)  # as given: messages name the path the user typed
    saved = run / CONFIG_FILE
    if saved.is_file():
        old = from_json(paths.read_text(saved))
        check_model_fields(old, str(saved))
        if checkpoint_steps(run / CHECKPOINT_DIR):
            refused, allowed = config_changes(old, cfg)
            if refused:
                raise ConfigError(f"{saved}: this run's checkpoints were trained with other values of "
                                  f"{'; '.join(refused)}: use a new workdir, or the run's values")
            if allowed:
                mlib.log("config changes since the run's saved config: " + "; ".join(allowed))
    if write and jax.process_index() == 0:
        paths.write_text(saved, to_json(cfg))  # never a half-written config.json
    return cfg


def _check_workdir(workdir: str, *, create: bool) -> None:
    """Raises WorkdirError (one line) unless workdir is (or, with create, can be made) a writable folder; a remote
    one (gs://...) must answer (famjax.paths.check_reachable), before any data or compile work."""
    remote = paths.is_remote(workdir)
    if remote:
        paths.check_reachable(workdir, write=create)  # with create: a probe object written and deleted
    run = paths.resolve(workdir)
    if run.exists() and not run.is_dir():
        raise WorkdirError(f"workdir {workdir} is a file, not a folder")
    if not create:
        if not run.is_dir():
            raise CheckpointNotFoundError(f"no such workdir: {workdir}")
        return
    if remote:
        return
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f"{paths.PROBE}_{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise WorkdirError(f"workdir {workdir} is not writable: {e.strerror or e}") from None


def _restore(cfg, ckpt: Checkpointer, tx, mesh, *, stream: bool, with_data: bool = True):
    """Returns (ckpt.restore's (state, data state, step) or None, shardings) of a run's newest checkpoint. A
    frozen-base run loads its base (train.init_from) after the checkpoint's base hash is checked."""
    abstract, shardings = abstract_train_state(cfg, tx, mesh, stream=stream)
    frozen = None
    if ckpt.base is not None:
        ckpt.check_base()  # before the base is loaded: a different base costs one line, not a load
        base = pretrained.load_base(cfg, mesh)
        mask = pretrained.trainable_mask(cfg, base)
        frozen = jax.device_put(select(base, mask, keep=False), select(shardings.params, mask, keep=False))
    return ckpt.restore(abstract, with_data=with_data, frozen=frozen), shardings


def _streaming(cfg, batching: str) -> bool:
    mode = cfg.train.stream_state
    return mode == "on" or (mode == "auto" and batching == "stream")


class _Interrupts:
    """SIGTERM and a first SIGINT (Ctrl-C) ask the loop to finish its step, save and stop (`signal` names the
    first one); a SIGINT after that aborts at once (KeyboardInterrupt). Installed from the main thread only."""

    def __init__(self):
        self.signal: str | None = None
        self._old: dict = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signal is not None:
            self.restore()
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        if jax.process_index() == 0:
            again = " (Ctrl-C again aborts at once)" if signum == signal.SIGINT else ""
            print(f"{self.signal}: finishing this step, then saving and stopping{again}", flush=True)

    @property
    def flag(self) -> bool:
        return self.signal is not None

    def check(self) -> bool:
        if jax.process_count() > 1:  # every process must stop at the same step
            return bool(multihost_utils.process_allgather(np.int32(self.flag)).max())
        return self.flag

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def _next_or_none(it):
    try:
        return next(it)
    except StopIteration:
        return None


@functools.lru_cache(maxsize=4)
def _eval_step(cfg_json: str, streaming: bool):
    """Returns (graphdef, jitted eval step) of a config, built once: the evaluations during training reuse
    the compiled step instead of tracing and compiling a fresh one every eval.every_steps."""
    cfg = from_json(cfg_json)
    graphdef, _, _ = abstract_model(cfg)
    return graphdef, jax.jit(make_eval_step(cfg, graphdef, streaming=streaming))


def evaluate_params(cfg, params, mesh, *, batches: int | None = None) -> dict:
    """Returns eval metrics (loss, accuracy, passkey_accuracy, passkey_examples) of `params` on
    data.eval_split: at most eval.batches global batches, every process reading its own rows."""
    mcfg = model_config(cfg)
    it = fd.make_iterator(cfg.data, block_size=mcfg.block_size, split=cfg.data.eval_split, num_epochs=1)
    streaming = it.batching == "stream"
    graphdef, step = _eval_step(to_json(cfg), streaming)
    rows = int(cfg.data.batch_size) // jax.process_count()
    stream = None
    if streaming:
        stream = jax.jit(lambda p: init_stream_state(_merge(graphdef, p), rows * jax.process_count()))(params)
    totals: dict = {}
    empty = None
    for _ in range(int(batches or cfg.eval.batches)):
        batch = _next_or_none(it)
        done = batch is None
        if jax.process_count() > 1:
            done = bool(multihost_utils.process_allgather(np.int32(done)).min())
        elif done:
            break
        if done:
            break
        if batch is None:  # this process ran out before the others: padding rows (mask 0) keep them in step
            batch = empty
        empty = {k: np.zeros_like(v) for k, v in batch.items()}
        gb = meshlib.global_batch({k: v for k, v in batch.items() if k in EVAL_KEYS}, cfg.mesh.rules, mesh)
        with meshlib.activation_rules(mesh, cfg.mesh.rules):
            sums, stream = step(params, gb, stream)
        for k, v in jax.device_get(sums).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    it.close()
    out = {"loss": totals.get("loss_sum", np.nan) / max(totals.get("weight", 0.0), 1e-9),
           "accuracy": totals.get("correct", 0.0) / max(totals.get("count", 0.0), 1.0)}
    if totals.get("passkey_total", 0) > 0:
        out["passkey_accuracy"] = totals["passkey_correct"] / totals["passkey_total"]
        out["passkey_examples"] = totals["passkey_total"]
        out["answer_token_accuracy"] = totals["answer_correct"] / max(totals["answer_tokens"], 1.0)
    return out


def _merge(graphdef, params):
    from flax import nnx
    return nnx.merge(graphdef, params)


def train(cfg, workdir: str, *, do_eval: bool = False, perturb=None) -> Result:
    """Trains (resuming from <workdir>/checkpoints if there are any) and returns the Result.

    perturb: None, or a FAM perturbation function used instead of fam.noise / fam.drift (research code's
    extension point; see famjax.train.perturb).
    """
    cfg = prepare(cfg, workdir)
    mcfg = model_config(cfg)
    mesh = meshlib.make_mesh(cfg.mesh)
    rules = cfg.mesh.rules
    train_it = fd.make_iterator(cfg.data, block_size=mcfg.block_size, split=cfg.data.train_split)
    streaming = _streaming(cfg, train_it.batching)
    tx = make_optimizer(cfg.train)
    ckpt = Checkpointer(workdir, cfg.checkpoint, cfg) if cfg.checkpoint.enabled else None
    writer = mlib.Writer(workdir)
    restored = None
    if ckpt is not None and ckpt.steps():
        restored, shardings = _restore(cfg, ckpt, tx, mesh, stream=streaming)
    if restored is not None:
        ts, data_state, start = restored
        if streaming and ts.stream is None:  # a packed-rows checkpoint continued as document streams
            ts = fresh_streams(cfg, ts, shardings)
        if data_state is not None:
            train_it.set_state(data_state)
        mlib.log(f"resumed from step {start} ({ckpt.directory})")
    else:
        params = None
        if pretrained.init_from(cfg):
            params = pretrained.load_base(cfg, mesh)
            mlib.log(f"initialised from {pretrained.init_from(cfg)} (train.trainable {pretrained.trainable_mode(cfg)})")
        ts, shardings = create_train_state(cfg, tx, mesh, stream=streaming, params=params)
        start = 0
    graphdef, _, _ = abstract_model(cfg)
    steps = int(cfg.train.steps)
    throughput = mlib.Throughput(mlib.flops_per_token(mcfg, int(cfg.data.seq_len)),
                                 mlib.job_peak_flops(cfg.train))
    step_fn = None
    preempt = _Interrupts()
    last_saved = start if restored is not None else None
    last_metrics: dict = {}
    eval_metrics: dict = {}
    step = start
    log_every, ck_every, ev_every = int(cfg.train.log_every), int(cfg.checkpoint.every_steps), \
        int(cfg.eval.every_steps)
    mlib.log(f"training {steps} steps from step {start}: {jax.device_count()} devices, mesh "
             f"{dict(mesh.shape)}, {'stream' if streaming else 'packed'} rows, workdir {workdir}")

    def save(ts, step):
        nonlocal last_saved
        loss = jax.device_get(last_loss)
        if not np.isfinite(loss):
            raise NonFiniteLossError(f"loss is {loss} at step {step}; not saving; the last good checkpoint "
                                     f"is step {last_saved} in {ckpt.directory}")
        ckpt.save(ts, train_it.get_state())
        last_saved = step

    last_loss = jnp.zeros(())
    delay = float(cfg.train.debug_step_delay_s)
    progress = mlib.Progress(start, steps)
    try:
        while step < steps:
            batch = _next_or_none(train_it)
            if batch is None:
                mlib.log(f"training data exhausted at step {step}")
                break
            gb = meshlib.global_batch({k: batch[k] for k in TRAIN_KEYS}, rules, mesh)
            if step_fn is None:
                batch_sh = {k: v.sharding for k, v in gb.items()}
                jitted = jax.jit(make_train_step(cfg, graphdef, tx, streaming=streaming, perturb=perturb),
                                 in_shardings=(shardings, batch_sh),
                                 out_shardings=(shardings, meshlib.replicated(mesh)), donate_argnums=0)
                mlib.log("compiling the train step")
                t0 = time.perf_counter()
                with meshlib.activation_rules(mesh, rules):  # the model's activation constraints apply
                    step_fn = jitted.lower(ts, gb).compile()
                mlib.log(f"compiled in {time.perf_counter() - t0:.1f} s")
                throughput.reset()
            ts, m = step_fn(ts, gb)
            step += 1
            progress.step(step)
            last_loss = m["loss"]
            throughput.add(int(np.prod(batch["tokens"].shape)) * jax.process_count())
            if step % log_every == 0 or step == steps:
                m = {k: float(v) for k, v in jax.device_get(m).items()}
                m.update(throughput.rates())
                if not mlib.finite({"loss": m["loss"], "grad_norm": m["grad_norm"]}):
                    where = f"step {last_saved} in {ckpt.directory}" if ckpt and last_saved is not None \
                        else "none"
                    raise NonFiniteLossError(f"non-finite loss {m['loss']} / grad norm {m['grad_norm']} at "
                                             f"step {step}; stopping; last good checkpoint: {where}")
                progress.report(step, m)
                writer.scalars(step, m, "train/")
                writer.jsonl(step, m)
                last_metrics = m
                throughput.reset()
            if delay:
                time.sleep(delay)
            stop = preempt.check()
            if ckpt is not None and (stop or (ck_every and step % ck_every == 0)):
                save(ts, step)
            if stop:
                saved = f"saved step {step}" if ckpt is not None else "nothing saved (checkpoint.enabled is off)"
                mlib.log(f"{preempt.signal or 'preempted'}: {saved}; stopping (exit code {EXIT_PREEMPTED}: "
                         "run the same command again to resume)")
                break
            if do_eval and ev_every and step % ev_every == 0 and step < steps:
                eval_metrics = _evaluate_and_report(cfg, ts.params, mesh, writer, step)
                throughput.reset()
        if ckpt is not None and last_saved != step and not preempt.flag:
            save(ts, step)
        if do_eval and not (preempt.flag and step < steps):
            eval_metrics = _evaluate_and_report(cfg, ts.params, mesh, writer, step)
    finally:
        progress.close()
        preempt.restore()
        if ckpt is not None:
            ckpt.close()
        writer.close()
        train_it.close()
    preempted = preempt.flag and step < steps
    if jax.process_index() == 0 and eval_metrics and not preempted:
        paths.write_text(paths.resolve(workdir) / "eval_metrics.json",
                         json.dumps({"step": step, **eval_metrics}, indent=2))
    return Result(step=step, train=last_metrics, eval={} if preempted else eval_metrics, logdir=writer.logdir,
                  preempted=preempted)


def train_and_eval(cfg, workdir: str, *, perturb=None) -> Result:
    """Trains with an evaluation every eval.every_steps and at the end."""
    return train(cfg, workdir, do_eval=True, perturb=perturb)


def evaluate(cfg, workdir: str) -> Result:
    """Evaluates the newest readable checkpoint of <workdir> (the config comes from the command line, checked
    against the run's; nothing but TensorBoard scalars is written)."""
    cfg = prepare(cfg, workdir, write=False)
    if not checkpoint_steps(paths.resolve(workdir) / CHECKPOINT_DIR):
        raise CheckpointNotFoundError(f"no checkpoint to evaluate in {os.path.join(workdir, CHECKPOINT_DIR)}: "
                                      "train first")
    mesh = meshlib.make_mesh(cfg.mesh)
    tx = make_optimizer(cfg.train)
    mcfg = model_config(cfg)
    probe = fd.make_iterator(cfg.data, block_size=mcfg.block_size)
    streaming = _streaming(cfg, probe.batching)  # the train state's layout depends on the train batching
    probe.close()
    ckpt = Checkpointer(workdir, cfg.checkpoint, cfg)
    try:
        restored, _ = _restore(cfg, ckpt, tx, mesh, stream=streaming, with_data=False)
    finally:
        ckpt.close()
    if restored is None:
        raise CheckpointNotFoundError(f"no checkpoint to evaluate in {ckpt.directory}: train first")
    ts, _, step = restored
    writer = mlib.Writer(workdir)
    out = _evaluate_and_report(cfg, ts.params, mesh, writer, step)
    writer.close()
    return Result(step=step, train={}, eval=out, logdir=writer.logdir)


def _evaluate_and_report(cfg, params, mesh, writer: mlib.Writer, step: int) -> dict:
    """Evaluates params, writes the metrics as eval/ scalars and logs one line; returns the metrics."""
    metrics = evaluate_params(cfg, params, mesh)
    writer.scalars(step, metrics, "eval/")
    mlib.log(f"eval at step {step}: " + _fmt(metrics))
    return metrics


def _fmt(m: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items())
