"""famjax.ops.segment_attention, the XLA path every kernel is tested against: values and gradients against a
plain softmax over the concatenated keys (autodiff of jax.nn.softmax), and what its backward pass keeps."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from famjax import ops

B, N, T, H, HD = 2, 3, 5, 4, 8


def _inputs(kv_heads, dtype, seed=0):
    """q [B, N, T, H, HD] and three segments: a memory block with per-block visibility, a FAM of 3 rows, the own
    block under the causal mask."""
    keys = jax.random.split(jax.random.key(seed), 8)
    q = jax.random.normal(keys[0], (B, N, T, H, HD), dtype)
    sizes = (T, 3, T)
    kvs = [(jax.random.normal(keys[1 + 2 * i], (B, N, s, kv_heads, HD), dtype),
            jax.random.normal(keys[2 + 2 * i], (B, N, s, kv_heads, HD), dtype)) for i, s in enumerate(sizes)]
    visible = jnp.asarray([[True, False, True], [False, True, True]])[:, :, None, None]
    return q, kvs, [visible, None, ops.CAUSAL]


def _plain(q, kvs, masks, softcap):
    """Softmax attention over the concatenated segments, float32, key/value heads repeated for GQA."""
    group = q.shape[3] // kvs[0][0].shape[3]
    k = jnp.repeat(jnp.concatenate([k for k, _ in kvs], axis=2), group, axis=3).astype(jnp.float32)
    v = jnp.repeat(jnp.concatenate([v for _, v in kvs], axis=2), group, axis=3).astype(jnp.float32)
    s = jnp.einsum("bnqhd,bnshd->bnhqs", q.astype(jnp.float32), k) * HD ** -0.5
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    full = []
    for (seg_k, _), mask in zip(kvs, masks):
        size = seg_k.shape[2]
        m = (ops.causal_mask(size)[None, None] if mask is ops.CAUSAL else
             jnp.ones((1, 1, T, size), bool) if mask is None else jnp.broadcast_to(mask, (B, N, T, size)))
        full.append(jnp.broadcast_to(m, (B, N, T, size)))
    s = jnp.where(jnp.concatenate(full, axis=-1)[:, :, None], s, -jnp.inf)
    return jnp.einsum("bnhqs,bnshd->bnqhd", jax.nn.softmax(s, axis=-1), v)


def _value_and_grads(fn, q, kvs, masks, softcap):
    weights = jax.random.normal(jax.random.key(9), (B, N, T, H, HD))

    def loss(q, kvs):
        return (fn(q, kvs, masks, softcap).astype(jnp.float32) * weights).sum()
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(q, kvs)


def _segment(q, kvs, masks, softcap):
    return ops.segment_attention(q, [(k, v, m) for (k, v), m in zip(kvs, masks)], softcap=softcap)


@pytest.mark.parametrize("kv_heads,softcap", [(4, 0.0), (2, 0.0), (1, 5.0)])
def test_values_and_gradients_match_a_plain_softmax(kv_heads, softcap):
    q, kvs, masks = _inputs(kv_heads, jnp.float32)
    (out, grads), (ref, ref_grads) = (_value_and_grads(fn, q, kvs, masks, softcap) for fn in (_segment, _plain))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_gradients_track_float32_at_bfloat16_precision():
    """bf16 operands: the probabilities enter the value product (and the backward pass) rounded to bf16, as a
    fused kernel rounds them; the gradients stay within bf16 error of the float32 ones."""
    q, kvs, masks = _inputs(2, jnp.bfloat16)
    _, grads = _value_and_grads(_segment, q, kvs, masks, 0.0)
    f32 = jax.tree.map(lambda a: a.astype(jnp.float32), (q, kvs))
    _, ref_grads = _value_and_grads(_plain, *f32, masks, 0.0)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        got = np.asarray(got, np.float32)
        assert np.abs(got - want).max() <= 0.05 * np.abs(want).max(), np.abs(got - want).max()


def test_backward_keeps_the_probabilities_once_in_the_operands_dtype():
    """Autodiff of exp followed by the bf16 value product would keep exp's float32 output and its bf16 copy:
    the attention's largest arrays, [.., Tq, S] per segment. The backward pass keeps only the bf16 copy."""
    q, kvs, masks = _inputs(2, jnp.bfloat16)
    segments = [(k, v, m) for (k, v), m in zip(kvs, masks)]
    _, vjp = jax.vjp(lambda q: ops.segment_attention(q, segments), q)
    kept = {id(a): a for a in jax.tree.leaves(vjp) if isinstance(a, jax.Array)}.values()
    # Score-shaped floats that vary (eager autodiff also keeps the masks and the zeros `where` selects from).
    score_shaped = [a for a in kept if a.ndim == 6 and a.shape[-1] in (T, 3) and a.shape[-2] == T
                    and a.dtype != bool and jnp.ptp(a.astype(jnp.float32)) > 0]
    assert score_shaped and all(a.dtype == jnp.bfloat16 for a in score_shaped), \
        [(a.shape, a.dtype) for a in score_shaped]
    assert len(score_shaped) == len(segments), [(a.shape, a.dtype) for a in score_shaped]
