"""The sublayers of a decoder layer: norms, attention projections, MLP (Flax NNX).

Parameters carry logical axis names ("embed", "q_heads", "kv_heads", "head_dim", "mlp", "vocab"; the layer
stack adds "layers"), which the trainer maps to mesh axes. Compute happens in `cfg.dtype`, parameters are
stored in `cfg.param_dtype`, and norms and softmax run in float32.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from famjax.model.config import ModelConfig
from famjax.ops import apply_rope


def param(rngs, init, shape, names, dtype):
    """Returns an nnx.Param with logical axis names (sharded later by the trainer, not eagerly)."""
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


def normal(stddev):
    return nnx.initializers.normal(stddev)


def dense(x, kernel, dtype):
    """Returns x [..., n] @ kernel [n, *out] as [..., *out], computed as one 2-D matmul.

    Flattening the leading axes first matters on CPU: with several contracting axes in the weight gradient,
    XLA materialises transposed [hidden, tokens] copies that cost more than the matmuls themselves.
    """
    lead, out = x.shape[:-1], kernel.shape[1:]
    y = x.reshape(-1, x.shape[-1]).astype(dtype) @ kernel[...].astype(dtype).reshape(kernel.shape[0], -1)
    return y.reshape(*lead, *out)


class Norm(nnx.Module):
    """RMSNorm (scale) or LayerNorm (scale and bias) over the last axis, computed in float32.

    The output is multiplied by (cfg.norm_offset + scale); scale starts at 1 - norm_offset, so a fresh norm
    multiplies by 1 whatever the offset (Gemma stores w and multiplies by 1 + w: norm_offset 1).
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.kind, self.eps, self.offset = cfg.norm, cfg.norm_eps, cfg.norm_offset
        init = nnx.initializers.ones if not self.offset else nnx.initializers.constant(1.0 - self.offset)
        self.scale = param(rngs, init, (cfg.d_model,), ("embed",), cfg.weight_dtype)
        if cfg.norm == "layer":
            self.bias = param(rngs, nnx.initializers.zeros, (cfg.d_model,), ("embed",), cfg.weight_dtype)

    def __call__(self, x, dtype):
        """x: [..., d] -> [..., d] in dtype."""
        x = x.astype(jnp.float32)
        if self.kind == "layer":
            x = x - x.mean(-1, keepdims=True)
        y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        y = y * (scale + self.offset if self.offset else scale)
        if self.kind == "layer":
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


class AttentionProjections(nnx.Module):
    """Query/key/value projections with RoPE, and the output projection (MHA, GQA, MQA).

    With cfg.qkv_bias the query/key/value projections have biases q_bias [H, hd], k_bias and v_bias [KV, hd]
    (zeros at init), added before RoPE.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, kv, hd, pd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.weight_dtype
        self.rope_base, self.dtype = cfg.rope_base, cfg.compute_dtype
        self.q = param(rngs, normal(d ** -0.5), (d, h, hd), ("embed", "q_heads", "head_dim"), pd)
        self.k = param(rngs, normal(d ** -0.5), (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.v = param(rngs, normal(d ** -0.5), (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.o = param(rngs, normal((h * hd) ** -0.5), (h, hd, d), ("q_heads", "head_dim", "embed"), pd)
        self.use_bias = cfg.qkv_bias
        if cfg.qkv_bias:  # zeros, drawing no key: the other weights of a fresh model are those without biases
            def zeros(shape, names):
                return nnx.Param(jnp.zeros(shape, pd), out_sharding=names, eager_sharding=False)
            self.q_bias = zeros((h, hd), ("q_heads", "head_dim"))
            self.k_bias = zeros((kv, hd), ("kv_heads", "head_dim"))
            self.v_bias = zeros((kv, hd), ("kv_heads", "head_dim"))

    def _project(self, kernel, x, bias=None):
        y = dense(x, kernel, self.dtype)
        return y if bias is None else y + bias[...].astype(self.dtype)

    def _bias(self, name):
        return getattr(self, name) if self.use_bias else None

    def query(self, x, positions):
        """x: [..., T, d] (normed), positions int [..., T] -> [..., T, H, hd] with RoPE."""
        return apply_rope(self._project(self.q, x, self._bias("q_bias")), positions, self.rope_base)

    def key_value(self, x, positions):
        """x: [..., T, d] (normed) -> keys (with RoPE) and values, each [..., T, KV, hd]."""
        k = apply_rope(self._project(self.k, x, self._bias("k_bias")), positions, self.rope_base)
        return k, self._project(self.v, x, self._bias("v_bias"))

    def out(self, heads):
        """heads: [..., H, hd] -> [..., d]."""
        o = self.o[...]
        return dense(heads.reshape(*heads.shape[:-2], -1), o.reshape(-1, o.shape[-1]), self.dtype)


class MLP(nnx.Module):
    """Gated (SwiGLU, GeGLU) or plain GELU feed-forward; GELU uses the tanh approximation."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, pd = cfg.d_model, cfg.mlp_dim, cfg.weight_dtype
        self.activation, self.dtype = cfg.mlp_activation, cfg.compute_dtype
        if cfg.mlp_activation != "gelu":
            self.gate = param(rngs, normal(d ** -0.5), (d, f), ("embed", "mlp"), pd)
        self.up = param(rngs, normal(d ** -0.5), (d, f), ("embed", "mlp"), pd)
        self.down = param(rngs, normal(f ** -0.5), (f, d), ("mlp", "embed"), pd)

    def __call__(self, x):
        """x: [..., d] -> [..., d]."""
        up = dense(x, self.up, self.dtype)
        if self.activation == "gelu":
            hidden = jax.nn.gelu(up, approximate=True)
        else:
            gate = dense(x, self.gate, self.dtype)
            act = jax.nn.silu if self.activation == "swiglu" else lambda g: jax.nn.gelu(g, approximate=True)
            hidden = act(gate) * up
        return dense(hidden, self.down, self.dtype)
