"""Loss, train step (gradient accumulation, RSP, RPO, carried stream state) and eval step; pure functions.

Batches (see famjax.data.DataIterator): tokens, targets int32 [b, T]; loss_mask float32 [b, T];
segment_start bool [b, T] (packed rows: an example starts there) or bool [b] (document streams: the row's
document starts with this chunk); answer_mask bool [b, T] (PassKey answer targets), optional.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from famjax.model import FamState
from famjax.model.lora import combine, split
from famjax.train import perturb as perturblib
from famjax.train.config import model_config, rope_offset_range
from famjax.train.optim import schedule
from famjax.train.pretrained import trainable_mask
from famjax.train.state import TrainState

# Random streams per step: fold_in(fold_in(rng, step), purpose); famjax.train.perturb uses 3 and 5.
_RPO, _RSP, _DROPOUT = 1, 2, 4


def cross_entropy(logits, targets, mask, z_loss: float = 0.0):
    """Returns (sum of masked CE, sum of masked z-loss, sum of mask, correct-token count, token count).

    logits float32 [b, T, V]; targets int [b, T]; mask float [b, T] (loss weights).
    """
    logz = jax.nn.logsumexp(logits, axis=-1)
    gold = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce = logz - gold
    counted = mask > 0
    correct = (jnp.argmax(logits, -1) == targets) & counted
    return (jnp.sum(ce * mask), z_loss * jnp.sum(jnp.square(logz) * mask), jnp.sum(mask),
            jnp.sum(correct), jnp.sum(counted))


def position_offsets(key, rows: int, cfg) -> jax.Array:
    """Returns int32 [rows]: the random position offset (RPO, docs/fam.md), uniform in [0, 2 pi rope_base),
    0 with probability fam.rpo_zero_prob."""
    k1, k2 = jax.random.split(key)
    off = jax.random.randint(k1, (rows,), 0, rope_offset_range(cfg), jnp.int32)
    keep = jax.random.uniform(k2, (rows,)) >= float(cfg.fam.rpo_zero_prob)
    return jnp.where(keep, off, 0)


def passkey_exact(pred, targets, answer_mask, segment_start, block_size: int):
    """Returns (exactly right answers, answers) of packed rows: an example counts when every answer target
    it has is predicted (argmax == target; teacher-forced argmax equals greedy decoding on those tokens).

    pred, targets int [b, T]; answer_mask bool [b, T]; segment_start bool [b, T].
    """
    b, t = targets.shape
    seg = jnp.cumsum(segment_start.astype(jnp.int32), axis=1)  # example index within the row (0 = none)
    slots = t // block_size + 2
    ids = (jnp.arange(b)[:, None] * slots + jnp.minimum(seg, slots - 1)).reshape(-1)
    wrong = (answer_mask & (pred != targets)).reshape(-1)
    has = answer_mask.reshape(-1)
    n = b * slots
    any_wrong = jax.ops.segment_max(wrong.astype(jnp.int32), ids, num_segments=n) > 0
    any_answer = jax.ops.segment_max(has.astype(jnp.int32), ids, num_segments=n) > 0
    return jnp.sum(any_answer & ~any_wrong), jnp.sum(any_answer)


def _forward(graphdef, params, batch, state: FamState, offset, perturb, *, streaming: bool, dropout_key=None):
    """Returns (logits, state after) of one chunk of rows; perturb: the model call's fam_perturb (or None);
    dropout_key: the LoRA dropout key (training) or None."""
    model = nnx.merge(graphdef, params)
    ss = batch["segment_start"]
    if not streaming:
        # The row's first example starts from `state` (fresh, or the RSP FAM); later ones restart there.
        ss = ss.at[:, 0].set(False) if ss.ndim == 2 else None
    # The loss never differentiates the state after the chunk (the trainer keeps it under stop_gradient).
    return model(batch["tokens"], state, segment_start=ss, position_offset=offset, fam_perturb=perturb,
                 dropout_key=dropout_key, state_grad=False)


def _rows(tree, k: int, axis_of):
    """Returns tree with its row axis split as [k, rows / k] and k moved first: micro-batch i = rows i::k."""
    def split(x, axis):
        x = x.reshape(x.shape[:axis] + (x.shape[axis] // k, k) + x.shape[axis + 1:])
        return jnp.moveaxis(x, axis + 1, 0)
    return jax.tree.map(lambda x: split(x, axis_of(x)), tree)


def _unrows(tree, axis_of):
    """Inverse of _rows (axis_of sees the merged layout, i.e. the leaf without its leading k axis)."""
    def merge(x, axis):
        x = jnp.moveaxis(x, 0, axis + 1)
        return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])
    return jax.tree.map(lambda x: merge(x, axis_of(x[0])), tree)


def _state_row_axis(stream: FamState):
    """Row axis of every leaf of a FamState: 1 in the layer caches, 0 for pos / is_initial."""
    return stream.replace(layers=jax.tree.map(lambda _: 1, stream.layers), pos=0, is_initial=0)


def _split_state(stream: FamState, k: int) -> FamState:
    axes = _state_row_axis(stream)
    return jax.tree.map(lambda x, a: _rows(x, k, lambda _: a), stream, axes)


def _merge_state(stacked: FamState) -> FamState:
    axes = _state_row_axis(stacked)
    return jax.tree.map(lambda x, a: _unrows(x, lambda _: a), stacked, axes)


def _seed_rows(state: FamState, fam, use) -> FamState:
    """Returns state with the rows where use [b] is True starting from fam [L, b, F, d] (a FAM that carries
    context: the normal residual on its first update) instead of their own."""
    fam = jnp.where(use[None, :, None, None], fam, state.layers.fam)
    return state.replace(layers=state.layers.replace(fam=fam), is_initial=state.is_initial & ~use)


def make_train_step(cfg, graphdef, tx: optax.GradientTransformation, *, streaming: bool, perturb=None):
    """Returns train_step(state, batch) -> (state, metrics); jit it with shardings and donation.

    Per step: the rows start from the carried stream state (streaming) or from fresh states, of which all
    start from the saved final FAM with probability fam.rsp_prob (random state passing; stop-gradient);
    every row gets its random position offset (fam.rpo); the micro-batches' gradients of the loss
    sum(CE * mask) / sum(mask) over the whole batch are summed, so accumulation changes nothing but memory.
    perturb: None (the config's fam.noise / fam.drift, if any) or a perturbation function
    (key, (L, rows, blocks, F, d)) -> ops.Perturbation | None applied to every new FAM instead (FAM models
    only; the config's noise and drift must then be 0; see famjax.train.perturb).
    With train.trainable "lora" / "lora_norms" the gradient is taken of the trainable leaves only (the frozen
    base is a constant of the loss: no gradient is computed for it) and ts.opt_state covers only them. With
    model.lora_dropout > 0 the model gets a dropout key per step (and micro-batch).
    """
    mcfg = model_config(cfg)
    k = int(cfg.train.grad_accum_steps)
    z_loss = float(cfg.train.z_loss)
    rsp_p = float(cfg.fam.rsp_prob) if mcfg.num_fam else 0.0
    rpo = bool(cfg.fam.rpo)
    perturb_fn = perturblib.from_config(cfg)
    if perturb is not None:
        if perturb_fn is not None:
            raise ValueError("a perturb function replaces fam.noise / fam.drift: set them to 0 or pass none")
        perturb_fn = perturb
    if perturb_fn is not None and not mcfg.num_fam:
        raise ValueError(f"a FAM perturbation needs a FAM model, got attention {mcfg.attention!r} with "
                         f"fam_len {mcfg.fam_len}")
    lr_fn = schedule(cfg.train)

    dropout = bool(mcfg.lora_rank and mcfg.lora_dropout)

    def micro_loss(trained, frozen, batch, state0, offset, fam_perturb, denom, dropout_key):
        params = trained if frozen is None else combine(trained, frozen)
        logits, state = _forward(graphdef, params, batch, state0, offset, fam_perturb, streaming=streaming,
                                 dropout_key=dropout_key)
        ce, zl, _, correct, count = cross_entropy(logits, batch["targets"], batch["loss_mask"], z_loss)
        return (ce + zl) / denom, (ce, zl, correct, count, state)

    grad_fn = jax.grad(micro_loss, has_aux=True)  # of the trained leaves only

    def train_step(ts: TrainState, batch: dict):
        rows = batch["tokens"].shape[0]
        key = jax.random.fold_in(jax.random.wrap_key_data(ts.rng), ts.step)
        mask = trainable_mask(cfg, ts.params)
        trained, frozen = (ts.params, None) if mask is None else split(ts.params, mask)
        dropout_key = jax.random.fold_in(key, _DROPOUT) if dropout else None
        if streaming:
            starts = batch["segment_start"]
            fresh_off = position_offsets(jax.random.fold_in(key, _RPO), rows, cfg) if rpo else \
                jnp.zeros((rows,), jnp.int32)
            offset = jnp.where(starts, fresh_off, ts.stream_offset)  # a stream keeps its offset
            state0 = jax.tree.map(jax.lax.stop_gradient, ts.stream)
            use_rsp = jnp.zeros((), bool)
        else:
            offset = position_offsets(jax.random.fold_in(key, _RPO), rows, cfg) if rpo else None
            # Without RSP the model makes the fresh state itself, and so knows that every row starts from the
            # initial FAM (it then projects the initial FAM's keys once, not per row).
            state0 = None
            use_rsp = ts.rsp_valid & (jax.random.uniform(jax.random.fold_in(key, _RSP)) < rsp_p)
            if rsp_p > 0:
                state0 = nnx.merge(graphdef, ts.params).init_state(rows, initial_fam=False)  # the call installs it
                saved = jax.lax.stop_gradient(ts.rsp_fam)[:, None]
                state0 = _seed_rows(state0, jnp.broadcast_to(saved, state0.layers.fam.shape),
                                    jnp.broadcast_to(use_rsp, (rows,)))
        denom = jnp.maximum(jnp.sum(batch["loss_mask"]), 1e-9)
        micro_batch = {key_: v for key_, v in batch.items() if key_ in
                       ("tokens", "targets", "loss_mask", "segment_start")}
        if offset is None:
            offset = jnp.zeros((rows,), jnp.int32)
        fam_perturb = None
        if perturb_fn is not None:
            shape = (mcfg.num_layers, rows, batch["tokens"].shape[1] // mcfg.block_size, mcfg.num_fam,
                     mcfg.d_model)
            fam_perturb = perturb_fn(key, shape)

        if k == 1:
            grads, (ce, zl, correct, count, state) = grad_fn(trained, frozen, micro_batch, state0, offset,
                                                             fam_perturb, denom, dropout_key)
        else:
            micro_keys = None if dropout_key is None else jax.vmap(
                lambda i: jax.random.fold_in(dropout_key, i))(jnp.arange(k))
            xs = (_rows(micro_batch, k, lambda _: 0), None if state0 is None else _split_state(state0, k),
                  _rows(offset, k, lambda _: 0),
                  _rows(fam_perturb, k, lambda _: 1), micro_keys)

            def body(acc, x):
                mb, st, off, fp, dk = x
                g, aux = grad_fn(trained, frozen, mb, st, off, fp, denom, dk)
                return jax.tree.map(jnp.add, acc, g), aux

            zero = jax.tree.map(jnp.zeros_like, trained)
            grads, (ce, zl, correct, count, states) = jax.lax.scan(body, zero, xs)
            ce, zl, correct, count = (a.sum() for a in (ce, zl, correct, count))
            state = _merge_state(states)

        updates, opt_state = tx.update(grads, ts.opt_state, trained)
        params = optax.apply_updates(trained, updates)
        if frozen is not None:
            params = combine(params, frozen)
        final_fam = jax.lax.stop_gradient(state.layers.fam[:, 0])  # [L, F, d], row 0
        new = ts.replace(step=ts.step + 1, params=params, opt_state=opt_state,
                         rsp_fam=final_fam, rsp_valid=jnp.ones((), bool) if mcfg.num_fam else ts.rsp_valid)
        if streaming:
            new = new.replace(stream=jax.lax.stop_gradient(state), stream_offset=offset)
        metrics = {
            "loss": ce / denom, "z_loss": zl / denom,
            "accuracy": correct / jnp.maximum(count, 1),
            "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params),
            "lr": lr_fn(ts.step), "rsp_used": use_rsp.astype(jnp.float32),
            "fam_norm": (jnp.mean(jnp.linalg.norm(final_fam, axis=-1)) if mcfg.num_fam else jnp.zeros(())),
            "tokens": jnp.sum(batch["loss_mask"] > 0).astype(jnp.float32),
        }
        return new, metrics

    return train_step


def make_eval_step(cfg, graphdef, *, streaming: bool):
    """Returns eval_step(params, batch, stream) -> (sums, stream): loss/accuracy/PassKey sums of a batch.

    No RPO, no RSP. In streaming mode `stream` is the rows' carried state (reset by segment_start); in packed
    mode pass None. PassKey exact match is counted for packed rows with an answer_mask.
    """
    block = model_config(cfg).block_size

    def eval_step(params, batch, stream):
        logits, state = _forward(graphdef, params, batch, stream if streaming else None, None, None,
                                 streaming=streaming)
        ce, _, w, correct, count = cross_entropy(logits, batch["targets"], batch["loss_mask"])
        sums = {"loss_sum": ce, "weight": w, "correct": correct, "count": count.astype(jnp.float32)}
        if "answer_mask" in batch and not streaming:
            ok, n = passkey_exact(jnp.argmax(logits, -1), batch["targets"], batch["answer_mask"],
                                  batch["segment_start"], block)
            answer = batch["answer_mask"]
            digit_ok = jnp.sum(answer & (jnp.argmax(logits, -1) == batch["targets"]))
            sums.update(passkey_correct=ok.astype(jnp.float32), passkey_total=n.astype(jnp.float32),
                        answer_correct=digit_ok.astype(jnp.float32),
                        answer_tokens=jnp.sum(answer).astype(jnp.float32))
        return sums, (state if streaming else None)

    return eval_step
