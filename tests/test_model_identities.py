"""The spec's identities: F=0 is BSWA, BSWA with a wide window is full attention, full attention is
jax.nn.dot_product_attention with a causal mask."""
import operator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from model_utils import jit_apply, make_model, random_tokens

import famjax


def test_fam_with_zero_rows_equals_bswa():
    tokens = random_tokens(2, 18, 37, seed=1)
    fam, _, _ = make_model(seed=2, attention="fam", fam_len=0, block_size=4, memory_blocks=1)
    bswa, _, _ = make_model(seed=2, attention="bswa", fam_len=5, block_size=4, memory_blocks=1)
    np.testing.assert_array_equal(np.asarray(jit_apply(fam, tokens)[0]), np.asarray(jit_apply(bswa, tokens)[0]))


def test_bswa_with_window_covering_sequence_equals_full():
    tokens = random_tokens(2, 19, 37, seed=3)
    bswa, _, _ = make_model(seed=4, attention="bswa", block_size=4, memory_blocks=5)
    full, _, _ = make_model(seed=4, attention="full")
    np.testing.assert_allclose(np.asarray(jit_apply(bswa, tokens)[0]), np.asarray(jit_apply(full, tokens)[0]),
                               atol=1e-5, rtol=1e-5)
    # A window that does not cover the sequence differs (the identity is not vacuous).
    narrow, _, _ = make_model(seed=4, attention="bswa", block_size=4, memory_blocks=1)
    assert np.abs(np.asarray(jit_apply(narrow, tokens)[0]) - np.asarray(jit_apply(full, tokens)[0])).max() > 1e-3


@nnx.jit  # compiled: eager op-by-op execution is far slower on CPU
def _dot_product_forward(model, tokens):
    """A full-attention forward built on jax.nn.dot_product_attention and the model's own sublayers."""
    cfg = model.cfg
    graphdef, params = nnx.split(model.layers)
    x = jnp.take(model.embed[...], tokens, axis=0)
    positions = jnp.arange(tokens.shape[1])[None]
    for i in range(cfg.num_layers):
        layer = nnx.merge(graphdef, jax.tree.map(operator.itemgetter(i), params))
        h = layer.norm1(x, jnp.float32)
        q = layer.attn.query(h, positions)
        k, v = layer.attn.key_value(h, positions)
        heads = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
        a = x + layer.attn.out(heads)
        x = a + layer.ffn(a)
    return model.final_norm(x, jnp.float32) @ model.lm_head[...]


def test_full_attention_equals_dot_product_attention():
    cfg = famjax.ModelConfig(vocab_size=50, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                             attention="full")
    model = famjax.FamLM(cfg, rngs=nnx.Rngs(0))
    tokens = random_tokens(2, 21, 50, seed=0)
    np.testing.assert_allclose(np.asarray(jit_apply(model, tokens)[0]),
                               np.asarray(_dot_product_forward(model, jnp.asarray(tokens))), atol=1e-5, rtol=1e-5)
