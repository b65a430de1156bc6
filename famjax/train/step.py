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

from famjax import ops
from famjax.model import FamState
from famjax.train.config import model_config, rope_offset_range
from famjax.train.optim import schedule
from famjax.train.state import TrainState

# Random streams per step: fold_in(fold_in(rng, step), purpose).
_RPO, _RSP, _NOISE, _STRETCH, _DRIFT, _AGE, _READ_AGE, _READ_STRETCH, _PRE_AGE, _INFLATE = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10


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
    """Returns int32 [rows]: the spec's random position offset, uniform in [0, 2 pi rope_base), 0 w.p. p0."""
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


def _forward(graphdef, params, batch, state: FamState, offset, noise, *, streaming: bool, change: bool = False):
    """Returns (logits, state after[, FAM change [L, b, nb]]) of one chunk of rows; noise: fam_noise of the
    model call (or None); change: also return the model's fam_change."""
    model = nnx.merge(graphdef, params)
    ss = batch["segment_start"]
    if not streaming:
        # The row's first example starts from `state` (fresh, or the RSP FAM); later ones restart there.
        ss = ss.at[:, 0].set(False) if ss.ndim == 2 else None
    return model(batch["tokens"], state, segment_start=ss, position_offset=offset, fam_noise=noise,
                 fam_change=change)


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


def draw_fam_noise(key, shape, *, noise: float, stretch: float, drift: float, age: float = 0.0,
                   read_age: float = 0.0, read_stretch: float = 0.0, inflate: float = 0.0) -> ops.FamNoise | None:
    """The training-time FAM perturbations of one step (fam.noise / .stretch / .drift / .age / .read_age /
    .read_stretch / .inflate), or None if all 0.

    shape: (L, rows, blocks, F, d). eps [L, rows, blocks, F, d] (relative to each FAM row's RMS) is fresh
    N(0, noise^2) noise per block plus, with drift, one N(0, drift^2) direction per layer, row and FAM row that
    is the same after every block; stretch [L, rows, blocks] is one U(0, stretch) factor per row, for all its
    layers and blocks (the row ages that much faster); age [L, rows, blocks] likewise one U(0, age) factor per
    row (the row moves that much further along the batch's shared update); read_age and read_stretch likewise,
    for what the row's tokens read only; inflate likewise (the row's FAM grows by that factor after every
    update).
    """
    if not (noise or stretch or drift or age or read_age or read_stretch or inflate):
        return None
    eps = noise * jax.random.normal(jax.random.fold_in(key, _NOISE), shape, jnp.float32) if noise else None
    if drift:
        one = shape[:2] + (1,) + shape[3:]
        d = drift * jax.random.normal(jax.random.fold_in(key, _DRIFT), one, jnp.float32)
        eps = jnp.broadcast_to(d, shape) if eps is None else eps + d

    def per_row(scale, salt):
        if not scale:
            return None
        row = scale * jax.random.uniform(jax.random.fold_in(key, salt), (shape[1],))
        return jnp.broadcast_to(row[None, :, None], shape[:3])

    return ops.FamNoise(eps=eps, stretch=per_row(stretch, _STRETCH), age=per_row(age, _AGE),
                        read_age=per_row(read_age, _READ_AGE), read_stretch=per_row(read_stretch, _READ_STRETCH),
                        inflate=per_row(inflate, _INFLATE))


def pre_aged_fam(model, filler, ages, block_size: int):
    """Returns the FAM [L, A, F, d] of rows that read ages [A] blocks of filler from the initial FAM.

    filler: int [A, T] (T a multiple of block_size); row a reads its last ages[a] blocks (a new segment starts
    there). Rows with age 0 read all T tokens: callers keep the initial FAM for them.
    """
    a, t = filler.shape
    start = t - ages * block_size
    _, state = model(filler, model.init_state(a), segment_start=jnp.arange(t)[None, :] == start[:, None])
    return state.layers.fam


def _seed_rows(state: FamState, fam, use) -> FamState:
    """Returns state with the rows where use [b] is True starting from fam [L, b, F, d] (a FAM that carries
    context: the normal residual on its first update) instead of their own."""
    fam = jnp.where(use[None, :, None, None], fam, state.layers.fam)
    return state.replace(layers=state.layers.replace(fam=fam), is_initial=state.is_initial & ~use)


def _pre_age_filler(cfg, blocks: int):
    """Returns int32 [blocks x B] of PassKey filler in the run's tokenizer (fam.pre_age), or None."""
    if not blocks:
        return None
    from famjax.data import make_tokenizer, passkey
    return jnp.asarray(passkey.filler_ids(make_tokenizer(cfg.data), blocks * model_config(cfg).block_size))


def make_train_step(cfg, graphdef, tx: optax.GradientTransformation, *, streaming: bool):
    """Returns train_step(state, batch) -> (state, metrics); jit it with shardings and donation.

    Per step: the rows start from the carried stream state (streaming) or from fresh states, of which all
    start from the saved final FAM with probability fam.rsp_prob (random state passing; stop-gradient) and,
    with fam.pre_age, from FAMs aged on key-free filler (stop-gradient);
    every row gets its random position offset (fam.rpo); the micro-batches' gradients of the loss
    sum(CE * mask) / sum(mask) over the whole batch are summed, so accumulation changes nothing but memory.
    """
    mcfg = model_config(cfg)
    k = int(cfg.train.grad_accum_steps)
    z_loss = float(cfg.train.z_loss)
    rsp_p = float(cfg.fam.rsp_prob) if mcfg.num_fam else 0.0
    rpo = bool(cfg.fam.rpo)
    norm_penalty = float(cfg.fam.get("norm_penalty", 0.0)) if mcfg.num_fam else 0.0
    fam_on = mcfg.num_fam and mcfg.attention == "fam"
    # draw_fam_noise's switches (fam.noise, .stretch, ...), 0 = off
    perturb = {name: float(cfg.fam.get(name, 0.0)) if fam_on else 0.0
               for name in ("noise", "stretch", "drift", "age", "read_age", "read_stretch", "inflate")}
    change_penalty = float(cfg.fam.get("change_penalty", 0.0)) if fam_on else 0.0
    pre_age = int(cfg.fam.get("pre_age", 0)) if fam_on else 0
    age_rows = int(cfg.fam.get("pre_age_rows", 8))
    age_filler = _pre_age_filler(cfg, pre_age)
    lr_fn = schedule(cfg.train)

    def micro_loss(params, batch, state0, offset, noise, denom, rows):
        out = _forward(graphdef, params, batch, state0, offset, noise, streaming=streaming,
                       change=bool(change_penalty))
        logits, state = out[:2]
        ce, zl, _, correct, count = cross_entropy(logits, batch["targets"], batch["loss_mask"], z_loss)
        # fam.norm_penalty: mean(FAM^2) of each row's final FAM [L, b, F, d], averaged over the whole batch.
        pen = (norm_penalty * jnp.sum(jnp.mean(jnp.square(state.layers.fam), axis=(0, 2, 3))) / rows
               if norm_penalty else jnp.zeros(()))
        # fam.change_penalty: each row's mean relative change of its FAM updates [L, b, nb] (writes from the
        # initial FAM count 0), averaged over the whole batch.
        change = jnp.sum(jnp.mean(out[2], axis=(0, 2))) / rows if change_penalty else jnp.zeros(())
        pen = pen + change_penalty * change
        return (ce + zl) / denom + pen, (ce, zl, pen, change, correct, count, state)

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def train_step(ts: TrainState, batch: dict):
        rows = batch["tokens"].shape[0]
        key = jax.random.fold_in(jax.random.wrap_key_data(ts.rng), ts.step)
        model = nnx.merge(graphdef, ts.params)
        if streaming:
            starts = batch["segment_start"]
            fresh_off = position_offsets(jax.random.fold_in(key, _RPO), rows, cfg) if rpo else \
                jnp.zeros((rows,), jnp.int32)
            offset = jnp.where(starts, fresh_off, ts.stream_offset)  # a stream keeps its offset
            state0 = jax.tree.map(jax.lax.stop_gradient, ts.stream)
            use_rsp = jnp.zeros((), bool)
        else:
            offset = position_offsets(jax.random.fold_in(key, _RPO), rows, cfg) if rpo else None
            state0 = model.init_state(rows)
            use_rsp = ts.rsp_valid & (jax.random.uniform(jax.random.fold_in(key, _RSP)) < rsp_p)
            if rsp_p > 0:
                saved = jax.lax.stop_gradient(ts.rsp_fam)[:, None]
                state0 = _seed_rows(state0, jnp.broadcast_to(saved, state0.layers.fam.shape),
                                    jnp.broadcast_to(use_rsp, (rows,)))
            if pre_age:  # fam.pre_age: start row r from filler row r % age_rows, aged U{0..pre_age} blocks
                ages = jax.random.randint(jax.random.fold_in(key, _PRE_AGE), (age_rows,), 0, pre_age + 1)
                frozen = nnx.merge(graphdef, jax.lax.stop_gradient(ts.params))
                aged = pre_aged_fam(frozen, jnp.broadcast_to(age_filler, (age_rows, age_filler.size)), ages,
                                    mcfg.block_size)
                pick = jnp.arange(rows) % age_rows
                state0 = _seed_rows(state0, aged[:, pick], (ages > 0)[pick])
        denom = jnp.maximum(jnp.sum(batch["loss_mask"]), 1e-9)
        micro_batch = {key_: v for key_, v in batch.items() if key_ in
                       ("tokens", "targets", "loss_mask", "segment_start")}
        if offset is None:
            offset = jnp.zeros((rows,), jnp.int32)
        shape = (mcfg.num_layers, rows, batch["tokens"].shape[1] // mcfg.block_size, mcfg.num_fam, mcfg.d_model)
        noise = draw_fam_noise(key, shape, **perturb)

        if k == 1:
            grads, (ce, zl, pen, change, correct, count, state) = grad_fn(ts.params, micro_batch, state0, offset,
                                                                           noise, denom, rows)
        else:
            xs = (_rows(micro_batch, k, lambda _: 0), _split_state(state0, k), _rows(offset, k, lambda _: 0),
                  _rows(noise, k, lambda _: 1))

            def body(acc, x):
                mb, st, off, nz = x
                g, aux = grad_fn(ts.params, mb, st, off, nz, denom, rows)
                return jax.tree.map(jnp.add, acc, g), aux

            zero = jax.tree.map(jnp.zeros_like, ts.params)
            grads, (ce, zl, pen, change, correct, count, states) = jax.lax.scan(body, zero, xs)
            ce, zl, pen, change, correct, count = (a.sum() for a in (ce, zl, pen, change, correct, count))
            state = _merge_state(states)

        updates, opt_state = tx.update(grads, ts.opt_state, ts.params)
        params = optax.apply_updates(ts.params, updates)
        final_fam = jax.lax.stop_gradient(state.layers.fam[:, 0])  # [L, F, d], row 0
        new = ts.replace(step=ts.step + 1, params=params, opt_state=opt_state,
                         rsp_fam=final_fam, rsp_valid=jnp.ones((), bool) if mcfg.num_fam else ts.rsp_valid)
        if streaming:
            new = new.replace(stream=jax.lax.stop_gradient(state), stream_offset=offset)
        metrics = {
            "loss": ce / denom, "z_loss": zl / denom, "fam_penalty": pen, "fam_change": change,
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
        rows = batch["tokens"].shape[0]
        model = nnx.merge(graphdef, params)
        state0 = stream if streaming else model.init_state(rows)
        logits, state = _forward(graphdef, params, batch, state0, None, None, streaming=streaming)
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
