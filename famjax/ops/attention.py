"""One attention kernel for every mode: queries against several key segments under one softmax.

Each mode only chooses the segments: BSWA gives [m memory blocks, own block causal], FAM adds the previous
FAM between them, the FAM update uses [previous FAM, whole block], full attention [KV cache, chunk causal].
Scores are computed per segment and normalised together, so no concatenated key tensor is materialised and
the (m + 1)-fold copy of keys that a naive BSWA builds never exists.
"""
import functools

import jax
import jax.numpy as jnp

MASKED = float(jnp.finfo(jnp.float32).min)  # the score of a masked key (before the softmax)


class _Causal:
    def __repr__(self):
        return "ops.CAUSAL"


CAUSAL = _Causal()
"""Segment mask marker: query i sees key j <= i (Tq == S). A fused kernel evaluates it without a mask array."""


def causal_mask(size: int):
    """Returns bool [size, size]: query i may see key j iff j <= i."""
    return jnp.tril(jnp.ones((size, size), dtype=bool))


def segment_attention(q, segments, *, scale: float | None = None, softcap: float = 0.0,
                      return_probs: bool = False):
    """Returns softmax attention of q over the union of key segments, [b, n, Tq, H, hd] in q's dtype.

    q: [b, n, Tq, H, hd] (n: independent groups, e.g. blocks);
    segments: sequence of (k, v, mask); k, v: [b, n, S, KV, hd] with KV dividing H (GQA: query head h reads
        kv head h // (H // KV)); mask: None (all visible), CAUSAL (key j visible to query i iff j <= i) or bool
        broadcastable to [b, n, Tq, S].
    Every query must see at least one key (in every mode it sees itself or a FAM row).
    scale: score scale, None = hd ** -0.5; softcap: c > 0 caps every scaled score s to c tanh(s / c) (in
        float32, before the mask and softmax; Gemma 2), 0 = off.
    return_probs: also return the attention weights, float32 [b, n, H, Tq, sum of S] (for inspection).
    """
    b, n, tq, h, hd = q.shape
    kv_heads = segments[0][0].shape[3]
    qg = q.reshape(b, n, tq, kv_heads, h // kv_heads, hd)
    scale = hd ** -0.5 if scale is None else scale
    scores = []
    for k, _, mask in segments:
        if mask is CAUSAL:
            mask = causal_mask(k.shape[2])[None, None]
        s = jnp.einsum("bnqkgd,bnskd->bnkgqs", qg, k, preferred_element_type=jnp.float32) * scale
        if softcap:
            s = softcap * jnp.tanh(s / softcap)
        if mask is not None:
            s = jnp.where(mask[:, :, None, None], s, MASKED)
        scores.append(s)
    # One softmax over all segments without concatenating them (the concat/split costs more than the
    # matmuls in the backward pass on CPU): shared max, per-segment exponentials, one normaliser applied
    # to the output. The max is a constant of the softmax, so stopping its gradient is exact.
    top = jax.lax.stop_gradient(functools.reduce(jnp.maximum, [s.max(-1, keepdims=True) for s in scores]))
    parts = [_exp_sum_and_values(s - top, v) for s, (_, v, _) in zip(scores, segments)]
    norm = functools.reduce(jnp.add, [p[0] for p in parts])[..., None]  # [b, n, KV, G, Tq, 1]
    out = functools.reduce(jnp.add, [p[1] for p in parts]) / norm
    out = jnp.moveaxis(out, 4, 2).reshape(b, n, tq, h, hd).astype(q.dtype)
    if return_probs:
        exps = [jnp.exp(s - top).astype(v.dtype).astype(jnp.float32) for s, (_, v, _) in zip(scores, segments)]
        probs = jnp.concatenate(exps, axis=-1) / norm
        return out, probs.reshape(b, n, h, tq, probs.shape[-1])
    return out


@jax.custom_vjp
def _exp_sum_and_values(s, v):
    """One segment's softmax numerator: (sum of e, e @ v), float32 [b, n, KV, G, Tq] and [b, n, KV, G, Tq, hd], for
    e = exp(s) rounded to v's dtype (the matmul's input), s [b, n, KV, G, Tq, S] float32 (max-shifted scores) and
    v [b, n, S, KV, hd]. The backward pass keeps only e in v's dtype, where autodiff of the plain expression would
    keep exp(s) in float32 as well, the attention's largest array (docs/design.md, "The attention's
    probabilities, kept once")."""
    return _exp_sum_and_values_fwd(s, v)[0]


def _exp_sum_and_values_fwd(s, v):
    e = jnp.exp(s).astype(v.dtype)
    out = (e.astype(jnp.float32).sum(-1),
           jnp.einsum("bnkgqs,bnskd->bnkgqd", e, v, preferred_element_type=jnp.float32))
    return out, (e, v)


def _exp_sum_and_values_bwd(res, cts):
    e, v = res
    d_norm, d_out = cts
    d_out = d_out.astype(v.dtype)
    d_e = jnp.einsum("bnkgqd,bnskd->bnkgqs", d_out, v, preferred_element_type=jnp.float32) + d_norm[..., None]
    d_v = jnp.einsum("bnkgqs,bnkgqd->bnskd", e, d_out, preferred_element_type=jnp.float32).astype(v.dtype)
    return d_e * e.astype(jnp.float32), d_v


_exp_sum_and_values.defvjp(_exp_sum_and_values_fwd, _exp_sum_and_values_bwd)
