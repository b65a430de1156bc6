"""Generation: prefill the prompts, then decode with a fixed-size state, many tokens per jitted call.

`decode_step` is one jitted decode step (model call on one token per row + sampling). `decode_steps` fuses up
to `n` such steps into one jitted `lax.while_loop` (sampling, per-row stop tokens with a done mask, the step
limit and an early exit once every row is done all run on the device), so a tiny model no longer pays ~1 ms
of Python dispatch per token. `generate` calls it in blocks of `steps_per_call` steps and streams each
block's tokens to `on_token` (in bursts) before starting the next; `steps_per_call=1` is the original
one-step-per-call Python loop. Both paths compute the same tokens: step i samples with
fold_in(key(seed), i) in either, and every row runs the same model call, so greedy and seeded results are
identical (tested). The state passes through the calls (donated), so the memory held is the state's ring
buffer whatever the number of tokens. Before the first step the state is marked not block-aligned (always
correct, just the general path), so the state's structure (its static flags) never changes between steps:
the loop carry is stable and each program compiles once per batch size, sampling setting and block length.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import famjax
from famjax.infer.prefill import as_prompts, prefill
from famjax.infer.sampling import GREEDY, Sampling, sample
from famjax.model.state import FamState


@dataclasses.dataclass
class Generation:
    """What `generate` returns.

    tokens: per prompt, int32 [n_i] the continuation (a stop token that ended it is not included);
    finish_reason: per prompt, "stop" (a stop token was produced) or "length" (max_new_tokens reached);
    state: the streams after the prompts and every generated token but the last (not read yet);
    prefill_seconds, decode_seconds: wall time of the two phases (compilation included on first use);
    decode_steps: jitted decode steps run (the first new token comes from the prefill logits).
    """
    tokens: list[np.ndarray]
    finish_reason: list[str]
    state: FamState
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int


@functools.partial(jax.jit, static_argnames=("sampling",))
def _sample_first(logits, key, sampling: Sampling):
    """Returns int32 [b]: the first new token from the prompts' last logits [b, V] (step 0's key)."""
    return sample(logits, jax.random.fold_in(key, 0), sampling)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("state",))
def decode_step(graphdef, params, state: FamState, token, key, step, sampling: Sampling):
    """Returns (next token int32 [b], state): reads token int32 [b], samples with fold_in(key, step)."""
    logits, state = nnx.merge(graphdef, params)(token[:, None], state)
    return sample(logits[:, 0], jax.random.fold_in(key, step), sampling), state


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "n"), donate_argnames=("state",))
def decode_steps(graphdef, params, state: FamState, token, active, key, start, limit, stops,
                 sampling: Sampling, n: int):
    """Runs decode steps start, start + 1, ... inside one jitted while loop, at most n of them.

    token int32 [b]: the token sampled at step start - 1 (read first); active bool [b]: rows still emitting;
    key: the generation's PRNG key (step i samples with fold_in(key, i), as `decode_step`); start, limit:
    int32 scalars, steps i < limit run; stops int32 [s]: stop token ids. The loop ends after n steps, at
    limit, or as soon as no row is active. Rows that are done keep reading their tokens (rows never interact)
    but emit nothing. state must have read at least one token (not fresh); it is marked unaligned.

    Returns (tokens int32 [n, b], emitted bool [n, b], steps int32 (rows of tokens that ran), token int32 [b]
    (the last sampled), active bool [b], state). emitted[j, r] is False where row r had already stopped or
    stopped on tokens[j, r] (a stop token).
    """
    if state.fresh:
        raise ValueError("decode_steps needs a state that has read at least one token (prefill first)")
    state = state.replace(aligned=False)  # always correct; keeps the loop carry's structure fixed
    b = token.shape[0]

    def cond(carry):
        j, _, active, _, _, _ = carry
        return (j < n) & (start + j < limit) & jnp.any(active)

    def body(carry):
        j, token, active, state, toks, emits = carry
        logits, new_state = nnx.merge(graphdef, params)(token[:, None], state)
        # bswa/fam return an unaligned state already; full attention says aligned but never reads it.
        new_state = new_state.replace(aligned=False, fresh=False)
        token = sample(logits[:, 0], jax.random.fold_in(key, start + j), sampling)
        stopped = active & jnp.any(token[:, None] == stops[None, :], axis=1)
        emitted = active & ~stopped
        toks = jax.lax.dynamic_update_index_in_dim(toks, token, j, 0)
        emits = jax.lax.dynamic_update_index_in_dim(emits, emitted, j, 0)
        return j + 1, token, emitted, new_state, toks, emits

    init = (jnp.int32(0), token, active, state, jnp.zeros((n, b), jnp.int32), jnp.zeros((n, b), bool))
    j, token, active, state, toks, emits = jax.lax.while_loop(cond, body, init)
    return toks, emits, j, token, active, state


def _stop_set(stop_tokens, vocab_size: int) -> np.ndarray:
    if stop_tokens is None:
        return np.zeros((0,), np.int32)
    if isinstance(stop_tokens, (int, np.integer)):
        stop_tokens = [stop_tokens]
    ids = np.asarray(list(stop_tokens))
    if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"stop_tokens must be token ids in [0, vocab_size={vocab_size}), got {list(ids)}")
    return ids.astype(np.int32)


def generate(model: famjax.FamLM, prompts, *, max_new_tokens: int, sampling: Sampling = GREEDY,
             seed: int = 0, stop_tokens: Iterable[int] | int | None = None, chunk_size: int = 1024,
             max_len: int | None = None, steps_per_call: int = 64,
             on_token: Callable[[np.ndarray, np.ndarray], None] | None = None) -> Generation:
    """Returns the continuations of `prompts` (see Generation).

    prompts: int [b, P] or a sequence of int [P_i] of any lengths >= 1 (an empty prompt is a ValueError);
    max_new_tokens: >= 0 tokens per prompt at most; sampling: Sampling(temperature, top_k, top_p), greedy by
    default; seed: the PRNG seed (same seed, prompts and settings -> same tokens); stop_tokens: ids that end
    a row (e.g. the tokenizer's eos); chunk_size: prefill tokens per model call; max_len: KV-cache capacity
    for attention="full" (default: max(cfg.max_len, longest prompt + max_new_tokens));
    steps_per_call: decode steps fused into one jitted call (`decode_steps`; 1 = one jitted step per Python
    iteration, the lowest streaming latency, slowest for small models); the same tokens either way;
    on_token(tokens int32 [b], emitted bool [b]): called once per step, in order: for the first token right
    after the prefill, then for every step of a call as soon as the call returns (bursts of up to
    steps_per_call); emitted[i] is False for rows that had already stopped or that stopped on this (stop)
    token.
    """
    cfg = model.cfg
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(sampling, Sampling):
        raise TypeError(f"sampling must be a famjax.infer.Sampling, got {type(sampling).__name__}")
    sampling.check_vocab(cfg.vocab_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if isinstance(steps_per_call, bool) or not isinstance(steps_per_call, (int, np.integer)) \
            or steps_per_call < 1:
        raise ValueError(f"steps_per_call must be an integer >= 1, got {steps_per_call!r}")
    stops = _stop_set(stop_tokens, cfg.vocab_size)
    prompts = as_prompts(prompts, cfg.vocab_size)
    if cfg.attention == "full" and max_len is None:
        max_len = max(cfg.max_len, max(len(p) for p in prompts) + max_new_tokens)

    t0 = time.perf_counter()
    logits, state = prefill(model, prompts, chunk_size=chunk_size, max_len=max_len)
    b = state.batch_size
    if cfg.attention == "full":
        capacity = state.layers.mem_k.shape[3]
        need = int(jnp.max(state.pos)) + max(max_new_tokens - 1, 0)
        if need > capacity:
            raise ValueError(f"prompt + max_new_tokens needs {need} cache slots, max_len={capacity}")
    jax.block_until_ready(logits)
    t1 = time.perf_counter()

    key = jax.random.key(int(seed))
    graphdef, params = nnx.split(model)
    state = state.replace(aligned=False)  # one decode structure (see module doc); not fresh after a prompt
    out = [[] for _ in range(b)]
    reason = ["length"] * b
    active = np.ones(b, bool)
    steps = 0

    def emit(host, emitted_now, was_active):
        for r in np.flatnonzero(emitted_now):
            out[r].append(int(host[r]))
        for r in np.flatnonzero(was_active & ~emitted_now):
            reason[r] = "stop"
        if on_token is not None:
            on_token(host, emitted_now)

    token = _sample_first(logits, key, sampling) if max_new_tokens else None
    if max_new_tokens:  # step 0: the first new token, from the prompts' last logits
        host = np.asarray(token)
        emitted = active & ~np.isin(host, stops)
        emit(host, emitted, active)
        active = emitted
    if steps_per_call == 1:  # one jitted step per Python iteration
        for i in range(1, max_new_tokens):
            if not active.any():
                break
            token, state = decode_step(graphdef, params, state, token, key, jnp.int32(i), sampling)
            state = state.replace(aligned=False)  # full attention reports aligned: keep one structure
            steps += 1
            host = np.asarray(token)
            emitted = active & ~np.isin(host, stops)
            emit(host, emitted, active)
            active = emitted
    else:  # steps_per_call steps per jitted call; the step limit and stops are checked on the device
        stops_dev, limit = jnp.asarray(stops), jnp.int32(max_new_tokens)
        active_dev = jnp.asarray(active)
        while steps + 1 < max_new_tokens and active.any():
            toks, emits, ran, token, active_dev, state = decode_steps(
                graphdef, params, state, token, active_dev, key, jnp.int32(steps + 1), limit, stops_dev,
                sampling, int(steps_per_call))
            toks, emits, ran = np.asarray(toks), np.asarray(emits), int(ran)
            for j in range(ran):
                emit(toks[j], emits[j], active)
                active = emits[j]
            steps += ran
    t2 = time.perf_counter()
    return Generation(tokens=[np.asarray(t, np.int32) for t in out], finish_reason=reason, state=state,
                      prefill_seconds=t1 - t0, decode_seconds=t2 - t1, decode_steps=steps)
