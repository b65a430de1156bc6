"""The sublayers of a decoder layer: norms, attention projections, MLP (Flax NNX).

Parameters carry logical axis names ("embed", "q_heads", "kv_heads", "head_dim", "mlp", "vocab", "lora"; the
layer stack adds "layers"), which the trainer maps to mesh axes. Compute happens in `cfg.dtype`, parameters are
stored in `cfg.param_dtype`, and norms and softmax run in float32.
"""
import contextlib
import contextvars
import functools
import itertools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from famjax import ops
from famjax.model.config import LORA_TARGETS, ModelConfig
from famjax.ops import apply_rope


def param(rngs, init, shape, names, dtype):
    """Returns an nnx.Param with logical axis names (sharded later by the trainer, not eagerly)."""
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


def normal(stddev):
    return nnx.initializers.normal(stddev)


_PRODUCT_NAME = contextvars.ContextVar("famjax_product_name", default=None)


@contextlib.contextmanager
def named_products(name: str):
    """Within the block, every `dense` product is tagged `name` (jax.ad_checkpoint.checkpoint_name), so that a
    remat policy naming it keeps the product instead of recomputing it in the backward pass."""
    token = _PRODUCT_NAME.set(name)
    try:
        yield
    finally:
        _PRODUCT_NAME.reset(token)


def _named(y):
    name = _PRODUCT_NAME.get()
    return y if name is None else checkpoint_name(y, name)


def dense(x, kernel, dtype, in_axes: int = 1):
    """Returns x [..., n] @ kernel [*in, *out] as [..., *out], computed as one 2-D matmul (n = prod(in), the
    kernel's first in_axes axes).

    kernel may also be a tuple of kernels with the same input axes: their products side by side as one matmul
    over the concatenated kernels, returned flat, [..., sum of their output sizes].

    Flattening the leading axes first matters on CPU: with several contracting axes in the weight gradient,
    XLA materialises transposed [hidden, tokens] copies that cost more than the matmuls themselves. The product
    goes through ops.tap, so inside the FAM's deferred-gradient scan the kernel's gradient is formed after the
    loop (famjax.ops.deferred); inside `named_products` it is tagged with that name.
    """
    if isinstance(kernel, tuple):
        ws = tuple(k[...] for k in kernel)
        n = math.prod(ws[0].shape[:in_axes])
        x2 = x.reshape(-1, n).astype(dtype)
        y = _named(ops.tap(ws, x2, x2 @ jnp.concatenate([w.astype(dtype).reshape(n, -1) for w in ws], axis=1)))
        return y.reshape(*x.shape[:-1], -1)
    w = kernel[...]
    n = math.prod(w.shape[:in_axes])
    x2 = x.reshape(-1, n).astype(dtype)
    y = _named(ops.tap(w, x2, x2 @ w.astype(dtype).reshape(n, -1)))
    return y.reshape(*x.shape[:-1], *w.shape[in_axes:])


def fold(key, i):
    """Returns jax.random.fold_in(key, i) for a typed key [] or a batch of typed keys [b] (one per row)."""
    if key.ndim == 0:
        return jax.random.fold_in(key, i)
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, i)


def sub_key(key, *ids):
    """Returns the typed key folded with every static id in turn, or None when key is None (no dropout)."""
    if key is None:
        return None
    for i in ids:
        key = fold(key, i)
    return key


def row_keys(key, index):
    """Returns one key per row [b]: key folded with the row's index[r] (int [b]) and with r, or None."""
    if key is None:
        return None
    rows = jnp.arange(index.shape[0])
    return jax.vmap(lambda i, r: jax.random.fold_in(jax.random.fold_in(key, i), r))(index, rows)


def dropout(x, key, rate: float):
    """Inverted dropout of x [...] with a typed key [] (one mask), or keys [b] (a mask per row of x [b, ...])."""
    if key.ndim == 0:
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    else:
        keep = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - rate, x.shape[1:]))(key)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


class LoRA:
    """Mixin of the projection modules: rank-r adapters `<name>_lora_a` [*in, r] and `<name>_lora_b` [r, *out]
    beside kernel `<name>` [*in, *out], and their contribution scale * (dropout(x) A) B (famjax.model.lora).

    A ~ N(0, 1 / in), B = 0: a fresh adapter adds exact zeros. W + A B is never formed. Dropout acts on the
    adapter's input only, and only in a call given a key (training), with a mask per projection.
    """

    def _init_lora(self, cfg: ModelConfig, rngs: nnx.Rngs, kernels: dict) -> None:
        """kernels: {name: (input shape, output shape, input axis names, output axis names)} of the projections
        this module has; creates the adapters of those in cfg.lora_targets (after every base weight, so a
        fresh model draws the same base weights with or without LoRA)."""
        self.lora_names = tuple(n for n in kernels if cfg.lora_on(n))
        self.lora_scale, self.lora_dropout = cfg.lora_scale, cfg.lora_dropout
        r, pd = cfg.lora_rank, cfg.weight_dtype
        for name in self.lora_names:
            ins, outs, in_names, out_names = kernels[name]
            fan_in = 1
            for n in ins:
                fan_in *= n
            setattr(self, f"{name}_lora_a",
                    param(rngs, normal(fan_in ** -0.5), (*ins, r), (*in_names, "lora"), pd))
            setattr(self, f"{name}_lora_b", nnx.Param(jnp.zeros((r, *outs), pd), out_sharding=("lora", *out_names),
                                                      eager_sharding=False))

    def _project(self, name, x, key):
        """x [..., in] @ kernel `name` [in, *out] (+ its adapter, if any) in the module's compute dtype."""
        return self._lora(name, x, dense(x, getattr(self, name), self.dtype), key, self.dtype)

    def _lora(self, name, x, y, key, dtype):
        """Returns y [..., *out] plus the adapter of projection `name` applied to x [..., in] (flattened input),
        or y itself when the projection has none."""
        if name not in getattr(self, "lora_names", ()):
            return y
        a, b = getattr(self, f"{name}_lora_a")[...], getattr(self, f"{name}_lora_b")[...]
        x = x.astype(dtype)
        if key is not None and self.lora_dropout:
            x = dropout(x, fold(key, LORA_TARGETS.index(name)), self.lora_dropout)
        h = dense(x, a.reshape(-1, a.shape[-1]), dtype) * jnp.asarray(self.lora_scale, dtype)
        return y + dense(h, b, dtype).reshape(y.shape)


def _recomputed(fn):
    """fn, whose backward pass recomputes it from its inputs. For the elementwise parts of a layer (norms,
    activations): autodiff then keeps their inputs, not their intermediates (the normalised rows, tanh, its
    square, ...), which the FAM loop would otherwise stack per block as residuals for its backward loop."""
    return jax.checkpoint(fn, prevent_cse=False)


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
        bias = self.bias[...] if self.kind == "layer" else None
        return _recomputed(functools.partial(self._normalize, dtype=dtype))(x, self.scale[...], bias)

    def _normalize(self, x, scale, bias, dtype):
        x = x.astype(jnp.float32)
        if self.kind == "layer":
            x = x - x.mean(-1, keepdims=True)
        y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)
        scale = scale.astype(jnp.float32)
        y = y * (scale + self.offset if self.offset else scale)
        if self.kind == "layer":
            y = y + bias.astype(jnp.float32)
        return y.astype(dtype)


class AttentionProjections(nnx.Module, LoRA):
    """Query/key/value projections with RoPE, and the output projection (MHA, GQA, MQA).

    With cfg.qkv_bias the query/key/value projections have biases q_bias [H, hd], k_bias and v_bias [KV, hd]
    (zeros at init), added before RoPE. With cfg.lora_rank, the targeted projections get LoRA adapters
    (init_lora; `key` arguments: the call site's dropout key, None outside training).
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

    def init_lora(self, cfg: ModelConfig, rngs: nnx.Rngs) -> None:
        d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self._init_lora(cfg, rngs, {
            "q": ((d,), (h, hd), ("embed",), ("q_heads", "head_dim")),
            "k": ((d,), (kv, hd), ("embed",), ("kv_heads", "head_dim")),
            "v": ((d,), (kv, hd), ("embed",), ("kv_heads", "head_dim")),
            "o": ((h, hd), (d,), ("q_heads", "head_dim"), ("embed",))})

    def _bias(self, name, y):
        """y plus projection `name`'s bias, if the module has biases."""
        return y + getattr(self, f"{name}_bias")[...].astype(self.dtype) if self.use_bias else y

    def _project_bias(self, name, x, key):
        return self._bias(name, self._project(name, x, key))

    def query(self, x, positions, key=None):
        """x: [..., T, d] (normed), positions int [..., T] -> [..., T, H, hd] with RoPE."""
        return apply_rope(self._project_bias("q", x, key), positions, self.rope_base)

    def key_value(self, x, positions, key=None):
        """x: [..., T, d] (normed) -> keys (with RoPE) and values, each [..., T, KV, hd]."""
        k, v = self.unrotated_key_value(x, key)
        return self.rotate(k, positions), v

    def unrotated_key_value(self, x, key=None):
        """key_value's keys before RoPE (rotate them with `rotate`) and its values, each [..., T, KV, hd]."""
        return self._project_bias("k", x, key), self._project_bias("v", x, key)

    def rotate(self, x, positions):
        """x [..., T, heads, hd] rotated by RoPE at positions int [..., T] (or their ops.rope_rotation)."""
        return apply_rope(x, positions, self.rope_base)

    def query_key_value(self, x, positions, q_key=None, kv_key=None):
        """x: [..., T, d] (normed), positions int [..., T] -> query(x, positions, q_key) and key_value(x,
        positions, kv_key), with the three base projections computed as one matmul (adapters and biases apart)."""
        kernels = (self.q, self.k, self.v)
        y = dense(x, kernels, self.dtype)
        y = y.reshape(-1, y.shape[-1])  # splitting [rows, sum], not [..., sum]: one TPU kernel fewer per block
        shapes = [k[...].shape[1:] for k in kernels]  # [H, hd], [KV, hd], [KV, hd]
        out = {}
        parts = jnp.split(y, list(itertools.accumulate(math.prod(sh) for sh in shapes[:2])), axis=1)
        for name, shape, part, key in zip("qkv", shapes, parts, (q_key, kv_key, kv_key)):
            out[name] = self._bias(name, self._lora(name, x, part.reshape(*x.shape[:-1], *shape), key, self.dtype))
        return (apply_rope(out["q"], positions, self.rope_base), apply_rope(out["k"], positions, self.rope_base),
                out["v"])

    def out(self, heads, key=None):
        """heads: [..., H, hd] -> [..., d]."""
        flat = heads.reshape(*heads.shape[:-2], -1)
        return self._lora("o", flat, dense(flat, self.o, self.dtype, in_axes=2), key, self.dtype)


class MLP(nnx.Module, LoRA):
    """Gated (SwiGLU, GeGLU) or plain GELU feed-forward; GELU uses the tanh approximation. With cfg.lora_rank
    the targeted projections get LoRA adapters (init_lora; `key`: the dropout key, None outside training)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, pd = cfg.d_model, cfg.mlp_dim, cfg.weight_dtype
        self.activation, self.dtype = cfg.mlp_activation, cfg.compute_dtype
        if cfg.mlp_activation != "gelu":
            self.gate = param(rngs, normal(d ** -0.5), (d, f), ("embed", "mlp"), pd)
        self.up = param(rngs, normal(d ** -0.5), (d, f), ("embed", "mlp"), pd)
        self.down = param(rngs, normal(f ** -0.5), (f, d), ("mlp", "embed"), pd)

    def init_lora(self, cfg: ModelConfig, rngs: nnx.Rngs) -> None:
        d, f = cfg.d_model, cfg.mlp_dim
        kernels = {"up": ((d,), (f,), ("embed",), ("mlp",)), "down": ((f,), (d,), ("mlp",), ("embed",))}
        if cfg.mlp_activation != "gelu":
            kernels = {"gate": ((d,), (f,), ("embed",), ("mlp",)), **kernels}
        self._init_lora(cfg, rngs, kernels)

    def __call__(self, x, key=None):
        """x: [..., d] -> [..., d]."""
        up = self._project("up", x, key)
        if self.activation == "gelu":
            hidden = _recomputed(lambda u: jax.nn.gelu(u, approximate=True))(up)
        else:
            gate = self._project("gate", x, key)
            act = jax.nn.silu if self.activation == "swiglu" else lambda g: jax.nn.gelu(g, approximate=True)
            hidden = _recomputed(lambda g, u: act(g) * u)(gate, up)
        return self._project("down", hidden, key)
