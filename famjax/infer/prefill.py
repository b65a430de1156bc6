"""Prefill: stream prompts of any length through the model in fixed-size chunks, with constant memory.

A prompt of P tokens is read as floor(P / chunk_size) chunks of chunk_size, then the remainder split into
powers of two (largest first). Every chunk length is therefore chunk_size or a power of two below it, so the
number of compiled programs is bounded by ~3 log2(chunk_size) (x the static state flags `fresh`/`aligned`)
whatever the prompt lengths, while activations stay O(chunk_size) and the state keeps its fixed shapes.

Prompts of different lengths cannot share a chunk: the model has no per-token validity mask, and a padding
token would be read into the row's FAM and memory blocks. Rows of equal length are therefore prefilled
together as one batch, groups one after the other, and the resulting states are stacked row-wise (rows of a
state never interact, so this is exact). A batch of equal-length prompts is a single group.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import famjax
from famjax.model.state import FamState


def chunk_plan(length: int, chunk_size: int) -> list[int]:
    """Returns the chunk lengths that cover `length` tokens: chunk_size repeated, then powers of two."""
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    full, rest = divmod(int(length), chunk_size)
    sizes = [chunk_size] * full
    while rest:
        piece = 1 << (rest.bit_length() - 1)
        sizes.append(piece)
        rest -= piece
    return sizes


def as_prompts(prompts, vocab_size: int) -> list[np.ndarray]:
    """Returns prompts as a list of int32 [P_i] arrays; raises ValueError on an empty or invalid prompt.

    prompts: int [b, P] (equal lengths) or a sequence of int [P_i] (any lengths).
    """
    if isinstance(prompts, (np.ndarray, jax.Array)) and np.ndim(prompts) == 2:
        rows = list(np.asarray(prompts))
    elif isinstance(prompts, Sequence) and not isinstance(prompts, (str, bytes)):
        rows = [np.asarray(p) for p in prompts]
    else:
        raise ValueError("prompts must be int [batch, P] or a sequence of int [P] token arrays, "
                         f"got {type(prompts).__name__}")
    if not rows:
        raise ValueError("prompts is empty: pass at least one prompt")
    out = []
    for i, row in enumerate(rows):
        if row.ndim != 1 or not (np.issubdtype(row.dtype, np.integer) or row.size == 0):
            raise ValueError(f"prompt {i} must be a 1-D integer token array, got {row.dtype} {row.shape}")
        if row.size == 0:
            # No token means no logits to sample the first new token from: refuse rather than invent one
            # (prepend the tokenizer's bos to generate from nothing).
            raise ValueError(f"prompt {i} is empty: a prompt needs at least one token (e.g. the bos token)")
        if row.min() < 0 or row.max() >= vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, vocab_size={vocab_size}): "
                             f"min {row.min()}, max {row.max()}")
        out.append(row.astype(np.int32))
    return out


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("state",))
def _read_chunk(graphdef, params, tokens, state):
    """Returns (logits float32 [b, V] of the chunk's last token, state after the chunk); tokens: [b, T]."""
    logits, state = nnx.merge(graphdef, params)(tokens, state)
    return logits[:, -1], state


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("state",))
def _score_chunk(graphdef, params, tokens, targets, state):
    """Returns (nll float32 [b, T] of targets [b, T] given tokens [b, T] and the state, state after)."""
    logits, state = nnx.merge(graphdef, params)(tokens, state)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], state


def _capacity(model: famjax.FamLM, max_len: int | None) -> int | None:
    """Returns the KV-cache capacity to allocate (full attention only; None for bswa/fam)."""
    if model.cfg.attention != "full":
        return None
    return model.cfg.max_len if max_len is None else max_len


def distinct_buffers(state: FamState) -> FamState:
    """Returns state with no array shared between two leaves (donating one buffer twice is an error).

    init_state may return one zeros array for several fields; only such repeats are copied.
    """
    seen = set()

    def own(x):
        if id(x) in seen:
            return jnp.array(x, copy=True)
        seen.add(id(x))
        return x
    return jax.tree.map(own, state)


def read(model: famjax.FamLM, tokens, state: FamState, chunk_size: int, *, split=None):
    """Returns (logits float32 [b, V] after the last token, state): tokens int [b, T] read in chunks.

    state: the rows' state before the tokens (consumed: its buffers may be donated).
    split: (graphdef, params) of the model if the caller already has them.
    """
    graphdef, params = split or nnx.split(model)
    tokens = jnp.asarray(tokens, jnp.int32)
    state = distinct_buffers(state)
    logits, start = None, 0
    for size in chunk_plan(tokens.shape[1], chunk_size):
        logits, state = _read_chunk(graphdef, params, tokens[:, start:start + size], state)
        start += size
    return logits, state


def prefill(model: famjax.FamLM, prompts, *, chunk_size: int = 1024, max_len: int | None = None):
    """Returns (logits float32 [b, V] of every prompt's last token, state after the prompts).

    prompts: int [b, P] or a sequence of int [P_i] of any lengths >= 1 (see the module doc for how mixed
    lengths are handled); chunk_size: tokens per model call (a multiple of block_size keeps chunks aligned,
    which is cheapest); max_len: KV-cache capacity for attention="full" (default cfg.max_len).
    """
    cfg = model.cfg
    rows = as_prompts(prompts, cfg.vocab_size)
    capacity = _capacity(model, max_len)
    longest = max(len(r) for r in rows)
    if capacity is not None and longest > capacity:
        raise ValueError(f"prompt of {longest} tokens exceeds the full-attention cache max_len={capacity}")
    split = nnx.split(model)
    groups: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(len(row), []).append(i)
    logits, states, order = [], [], []
    for idx in groups.values():
        tokens = np.stack([rows[i] for i in idx])
        state = model.init_state(len(idx), max_len=capacity)
        lg, state = read(model, tokens, state, chunk_size, split=split)
        logits.append(lg)
        states.append(state)
        order.extend(idx)
    if len(states) == 1:
        return logits[0], states[0]
    inverse = np.argsort(np.asarray(order))  # stacked row j holds prompt order[j]
    return jnp.concatenate(logits)[inverse], stack_rows(states, inverse)


def stack_rows(states: list[FamState], take=None) -> FamState:
    """Returns one state holding the rows of `states` in order (then reordered by `take` [b], if given).

    The static flags become the conservative ones: aligned only if every part is aligned.
    """
    def cat(axis):
        def f(*xs):
            x = jnp.concatenate(xs, axis=axis)
            return x if take is None else jnp.take(x, jnp.asarray(take), axis=axis)
        return f
    layers = jax.tree.map(cat(1), *[s.layers for s in states])  # LayerCache leaves are [L, b, ...]
    return FamState(layers=layers, pos=cat(0)(*[s.pos for s in states]),
                    is_initial=cat(0)(*[s.is_initial for s in states]),
                    aligned=all(s.aligned for s in states), fresh=all(s.fresh for s in states))


def token_nll(model: famjax.FamLM, tokens, *, chunk_size: int = 1024, max_len: int | None = None):
    """Returns float32 [b, T - 1]: the loss of predicting tokens[:, i + 1] after reading tokens[:, :i + 1].

    tokens: int [b, T] with T >= 2, streamed in chunks of chunk_size (constant memory for bswa/fam), so a
    document far longer than one call fits is scored exactly as one call would score it.
    """
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be int [batch, T] with T >= 2, got {tokens.shape}")
    as_prompts(tokens, model.cfg.vocab_size)  # validates ids
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    capacity = _capacity(model, max_len)
    if capacity is not None and inputs.shape[1] > capacity:
        raise ValueError(f"{inputs.shape[1]} tokens exceed the full-attention cache max_len={capacity}")
    graphdef, params = nnx.split(model)
    state = distinct_buffers(model.init_state(tokens.shape[0], max_len=capacity))
    out, start = [], 0
    for size in chunk_plan(inputs.shape[1], chunk_size):
        nll, state = _score_chunk(graphdef, params, inputs[:, start:start + size],
                                  targets[:, start:start + size], state)
        out.append(np.asarray(nll))
        start += size
    return np.concatenate(out, axis=1)
