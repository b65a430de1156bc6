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
    """RMSNorm (scale) or LayerNorm (scale and bias) over the last axis, computed in float32."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        self.scale = param(rngs, nnx.initializers.ones, (cfg.d_model,), ("embed",), cfg.weight_dtype)
        if cfg.norm == "layer":
            self.bias = param(rngs, nnx.initializers.zeros, (cfg.d_model,), ("embed",), cfg.weight_dtype)

    def __call__(self, x, dtype):
        """x: [..., d] -> [..., d] in dtype."""
        x = x.astype(jnp.float32)
        if self.kind == "layer":
            x = x - x.mean(-1, keepdims=True)
        y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)
        y = y * self.scale[...].astype(jnp.float32)
        if self.kind == "layer":
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


class AttentionProjections(nnx.Module):
    """Query/key/value projections with RoPE, and the output projection (MHA, GQA, MQA)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, kv, hd, pd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.weight_dtype
        self.rope_base, self.dtype = cfg.rope_base, cfg.compute_dtype
        self.q = param(rngs, normal(d ** -0.5), (d, h, hd), ("embed", "q_heads", "head_dim"), pd)
        self.k = param(rngs, normal(d ** -0.5), (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.v = param(rngs, normal(d ** -0.5), (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.o = param(rngs, normal((h * hd) ** -0.5), (h, hd, d), ("q_heads", "head_dim", "embed"), pd)

    def _project(self, kernel, x):
        return dense(x, kernel, self.dtype)

    def query(self, x, positions):
        """x: [..., T, d] (normed), positions int [..., T] -> [..., T, H, hd] with RoPE."""
        return apply_rope(self._project(self.q, x), positions, self.rope_base)

    def key_value(self, x, positions):
        """x: [..., T, d] (normed) -> keys (with RoPE) and values, each [..., T, KV, hd]."""
        return apply_rope(self._project(self.k, x), positions, self.rope_base), self._project(self.v, x)

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
