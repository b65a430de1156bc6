"""One attention kernel for every mode: queries against several key segments under one softmax.

Each mode only chooses the segments: BSWA gives [m memory blocks, own block causal], FAM adds the previous
FAM between them, the FAM update uses [previous FAM, whole block], full attention [KV cache, chunk causal].
Scores are computed per segment and softmaxed together, so no concatenated key tensor is materialised and
the (m + 1)-fold copy of keys that a naive BSWA builds never exists.
"""
import jax
import jax.numpy as jnp

_MASKED = float(jnp.finfo(jnp.float32).min)


def causal_mask(size: int):
    """Returns bool [size, size]: query i may see key j iff j <= i."""
    return jnp.tril(jnp.ones((size, size), dtype=bool))


def segment_attention(q, segments, *, scale: float | None = None, return_probs: bool = False):
    """Returns softmax attention of q over the union of key segments, [b, n, Tq, H, hd] in q's dtype.

    q: [b, n, Tq, H, hd] (n: independent groups, e.g. blocks);
    segments: sequence of (k, v, mask); k, v: [b, n, S, KV, hd] with KV dividing H (GQA: query head h reads
        kv head h // (H // KV)); mask: None (all visible) or bool broadcastable to [b, n, Tq, S].
    Every query must see at least one key (in every mode it sees itself or a FAM row).
    return_probs: also return the attention weights, float32 [b, n, H, Tq, sum of S] (for inspection).
    """
    b, n, tq, h, hd = q.shape
    kv_heads = segments[0][0].shape[3]
    qg = q.reshape(b, n, tq, kv_heads, h // kv_heads, hd)
    scale = hd ** -0.5 if scale is None else scale
    scores = []
    for k, _, mask in segments:
        s = jnp.einsum("bnqkgd,bnskd->bnkgqs", qg, k, preferred_element_type=jnp.float32) * scale
        if mask is not None:
            s = jnp.where(mask[:, :, None, None], s, _MASKED)
        scores.append(s)
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
    out = 0.0
    start = 0
    for k, v, _ in segments:
        p = probs[..., start:start + k.shape[2]].astype(v.dtype)
        out = out + jnp.einsum("bnkgqs,bnskd->bnqkgd", p, v, preferred_element_type=jnp.float32)
        start += k.shape[2]
    out = out.reshape(b, n, tq, h, hd).astype(q.dtype)
    if return_probs:
        return out, probs.reshape(b, n, h, tq, probs.shape[-1])
    return out
