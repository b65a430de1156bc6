"""What autodiff keeps for the backward pass of the FAM loop: each array it stacks per block is written in the
loop and read back in the backward loop, so a needless one is memory traffic on every block of every layer."""
import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import famjax
from famjax import ops
from famjax.model.modules import MLP, Norm


def _residuals(fn, *args):
    """The distinct arrays jax.vjp keeps to differentiate fn at args."""
    _, vjp = jax.vjp(fn, *args)
    seen = {}
    for leaf in jax.tree.leaves(vjp):
        if isinstance(leaf, jax.Array):
            seen[id(leaf)] = leaf
    return list(seen.values())


def test_the_fam_loop_keeps_the_blocks_keys_and_values_once():
    """The F rows attend to every block's keys and values. The backward pass needs them, and lax.scan hands it
    its own input (no copy) only when the attention reads that input slice as it is; a reshaped slice would be
    stacked again, one more array of all the blocks' keys (and one of values)."""
    b, nb, blk, f, kv, hd, d = 2, 5, 8, 3, 2, 4, 16
    keys = jax.random.split(jax.random.key(0), 6)
    blocks_k, blocks_v = (jax.random.normal(k, (b, nb, blk, kv, hd)) for k in keys[:2])
    wq, wo = (0.3 * jax.random.normal(k, s) for k, s in zip(keys[2:4], [(d, 2 * kv * hd), (2 * kv * hd, d)]))
    fam0 = jax.random.normal(keys[4], (b, f, d))

    def update_fn(params, fam, is_initial, fam_k, fam_v, k, v, index, queries=None):
        wq, wo = params
        return ops.fam_update(fam, is_initial, fam_k, fam_v, k, v,
                              query_fn=lambda x: (x @ wq).reshape(b, f, 2 * kv, hd),
                              out_fn=lambda h: h.reshape(b, f, -1) @ wo, ffn_fn=jnp.tanh)

    def kv_fn(params, fam, index):
        return fam[..., :kv * hd].reshape(b, f, kv, hd), fam[..., kv * hd:2 * kv * hd].reshape(b, f, kv, hd)

    def loss(blocks_k, blocks_v, wq, wo):
        carry = (fam0, jnp.ones((b,), bool), *kv_fn(None, fam0, None))
        (fam, *_), (fk, fv), _ = ops.fam_scan(
            carry, blocks_k, blocks_v, jnp.ones((b, nb), bool), jnp.broadcast_to(jnp.arange(nb), (b, nb)),
            update_fn=update_fn, kv_fn=kv_fn, params=(wq, wo), all_complete=True)
        return (fam ** 2).sum() + (fk * fv).sum()

    grad = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(blocks_k, blocks_v, wq, wo)
    forward = next(e for e in grad.eqns if e.primitive.name == "scan")  # what it stacks goes to the backward
    stacked = [(v.aval.shape, v.aval.dtype) for v in forward.outvars]
    assert not [s for s, _ in stacked if math.prod(s) == blocks_k.size], stacked
    # nor a [b, F, d] mask per block for the first update's zero residual (a factor per row does)
    assert ((nb, b, f, d), jnp.dtype(bool)) not in stacked, stacked


@pytest.mark.parametrize("activation", ["geglu", "swiglu", "gelu"])
def test_the_ffn_keeps_its_projections_not_the_activations_intermediates(activation):
    """The backward pass of the FFN recomputes its activation from the projections going in; what it keeps of
    width mlp_dim is those projections (up, and the gate of a gated FFN), plus the activation's output that the
    down projection's weight gradient reads."""
    cfg = famjax.ModelConfig(vocab_size=11, d_model=8, num_layers=1, num_heads=2, mlp_dim=24,
                             mlp_activation=activation)
    graphdef, state = nnx.split(MLP(cfg, nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (3, 5, cfg.d_model))
    rows = x.size // cfg.d_model
    wide = [r for r in _residuals(lambda s, x: nnx.merge(graphdef, s)(x), state, x) if r.size == rows * cfg.mlp_dim]
    assert len(wide) == (2 if activation == "gelu" else 3), [r.shape for r in wide]


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_a_norm_keeps_its_input_only(norm):
    """A norm's backward pass recomputes the normalised rows from its input: of the input's size it keeps the
    input alone, not also the normalised rows or their float32 copy."""
    cfg = famjax.ModelConfig(vocab_size=11, d_model=8, num_layers=1, num_heads=2, norm=norm)
    graphdef, state = nnx.split(Norm(cfg, nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (3, 5, cfg.d_model))
    rows = [r for r in _residuals(lambda s, x: nnx.merge(graphdef, s)(x, jnp.float32), state, x)
            if r.size == x.size]
    assert len(rows) == 1, [r.shape for r in rows]
