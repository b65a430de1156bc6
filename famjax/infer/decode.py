"""Generation: prefill the prompts, then decode token by token with one jitted step and a fixed-size state.

The decode step is a single jitted function (model call on one token per row + sampling). A Python loop
drives it so that tokens can be streamed to the caller and stop tokens end the loop early; the state passes
through the step (donated), so the memory held is the state's ring buffer whatever the number of tokens.
Before the first step the state is marked not block-aligned (always correct, just the general path), so the
step's input structure never changes: it compiles once per batch size and sampling setting.
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
             max_len: int | None = None,
             on_token: Callable[[np.ndarray, np.ndarray], None] | None = None) -> Generation:
    """Returns the continuations of `prompts` (see Generation).

    prompts: int [b, P] or a sequence of int [P_i] of any lengths >= 1 (an empty prompt is a ValueError);
    max_new_tokens: >= 0 tokens per prompt at most; sampling: Sampling(temperature, top_k, top_p), greedy by
    default; seed: the PRNG seed (same seed, prompts and settings -> same tokens); stop_tokens: ids that end
    a row (e.g. the tokenizer's eos); chunk_size: prefill tokens per model call; max_len: KV-cache capacity
    for attention="full" (default: max(cfg.max_len, longest prompt + max_new_tokens));
    on_token(tokens int32 [b], emitted bool [b]): called after every step, as soon as the tokens exist;
    emitted[i] is False for rows that had already stopped or that stopped on this (stop) token.
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
    state = state.replace(aligned=False)  # one decode structure (see module doc)
    out = [[] for _ in range(b)]
    reason = ["length"] * b
    active = np.ones(b, bool)
    steps = 0
    token = _sample_first(logits, key, sampling) if max_new_tokens else None
    for i in range(max_new_tokens):
        if i:
            token, state = decode_step(graphdef, params, state, token, key, jnp.int32(i), sampling)
            steps += 1
        host = np.asarray(token)
        stopped = active & np.isin(host, stops)
        emitted = active & ~stopped
        for r in np.flatnonzero(emitted):
            out[r].append(int(host[r]))
        for r in np.flatnonzero(stopped):
            reason[r] = "stop"
        active = emitted
        if on_token is not None:
            on_token(host, emitted)
        if not active.any():
            break
    t2 = time.perf_counter()
    return Generation(tokens=[np.asarray(t, np.int32) for t in out], finish_reason=reason, state=state,
                      prefill_seconds=t1 - t0, decode_seconds=t2 - t1, decode_steps=steps)
