"""Next-token choice from logits: greedy, temperature, top-k, top-p (nucleus), as one pure jittable function.

`Sampling` is a frozen (hashable) dataclass so it can be a static argument of the jitted decode step: each
setting compiles once, and no Python branch on a traced value is needed.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen.

    temperature: 0 means greedy (argmax; top_k/top_p are then ignored), > 0 divides the logits;
    top_k: keep the k most likely tokens (0: no limit); top_p: keep the smallest set of most likely tokens
    whose probability reaches top_p (1.0: no limit). Filters apply in the order temperature, top-k, top-p.
    """
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = no limit), got {k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be a number in (0, 1] (1 = no limit), got {p!r}")
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_p", float(p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check_vocab(self, vocab_size: int) -> None:
        """Raises ValueError if top_k exceeds the vocabulary (a silent clamp would hide a typo)."""
        if self.top_k > vocab_size:
            raise ValueError(f"top_k must be <= vocab_size {vocab_size}, got {self.top_k}")


GREEDY = Sampling()


def filter_logits(logits, sampling: Sampling):
    """Returns logits float32 [b, V] with tokens outside top-k / top-p set to -inf, after the temperature.

    logits: [b, V]. The most likely token always survives, so a row never becomes all -inf.
    """
    logits = logits.astype(jnp.float32) / sampling.temperature
    neg = jnp.asarray(-jnp.inf, jnp.float32)
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if sampling.top_p < 1.0:
        order = jnp.sort(logits, axis=-1)[:, ::-1]  # descending
        probs = jax.nn.softmax(order, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        # Keep a token while the mass above it is still short of top_p; the first token always stays.
        keep = before < sampling.top_p
        threshold = jnp.min(jnp.where(keep, order, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg, logits)
    return logits


def sample(logits, key, sampling: Sampling):
    """Returns int32 [b]: the next token of every row.

    logits: float [b, V]; key: a PRNG key (unused when greedy); sampling: static settings.
    """
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)
