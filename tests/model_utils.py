"""Shared helpers for model tests: loading reference (numpy) parameters into a FamLM, configs."""
import jax.numpy as jnp
import numpy as np
from flax import nnx

import famjax


def load_reference_params(model: famjax.FamLM, params: dict) -> None:
    """Copies a tests/reference.py parameter dict into the model's stacked parameters, in place."""
    cfg = model.cfg
    dtype = cfg.weight_dtype

    def put(variable, value):
        value = jnp.asarray(np.asarray(value), dtype)
        assert variable[...].shape == value.shape, (variable[...].shape, value.shape)
        variable[...] = value

    def stacked(*keys):
        out = []
        for layer in params["layers"]:
            for k in keys:
                layer = layer[k]
            out.append(layer)
        return np.stack(out)

    put(model.embed, params["embed"])
    if cfg.num_fam:
        put(model.fam_init, params["fam_init"])
    layers = model.layers
    for norm in ("norm1", "norm2"):
        put(getattr(layers, norm).scale, stacked(norm, "scale"))
        if cfg.norm == "layer":
            put(getattr(layers, norm).bias, stacked(norm, "bias"))
    for name in ("q", "k", "v", "o"):
        put(getattr(layers.attn, name), stacked(name))
    for name in (("up", "down") if cfg.mlp_activation == "gelu" else ("gate", "up", "down")):
        put(getattr(layers.mlp, name), stacked("mlp", name))
    put(model.final_norm.scale, params["final_norm"]["scale"])
    if cfg.norm == "layer":
        put(model.final_norm.bias, params["final_norm"]["bias"])
    if not cfg.tie_embeddings:
        put(model.lm_head, params["lm_head"])


def make_model(seed=0, **overrides):
    """Returns (model, cfg) for a small config with overrides, reference-style random parameters loaded."""
    from reference import random_params
    base = dict(vocab_size=37, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48,
                attention="fam", block_size=4, memory_blocks=1, fam_len=3)
    base.update(overrides)
    cfg = famjax.ModelConfig(**base)
    model = famjax.FamLM(cfg, rngs=nnx.Rngs(seed))
    params = random_params(cfg, seed)
    load_reference_params(model, params)
    return model, cfg, params


def random_tokens(batch, length, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length)).astype(np.int32)


@nnx.jit
def jit_apply(model, tokens, state=None, segment_start=None, position_offset=None):
    """model(tokens, state, ...) compiled; same results as the eager call."""
    return model(tokens, state, segment_start=segment_start, position_offset=position_offset)


def stream(model, tokens, sizes, state=None):
    """Feeds tokens [b, T] in consecutive chunks of the given sizes; returns (logits [b, T, V], state)."""
    out, start = [], 0
    for size in sizes:
        logits, state = jit_apply(model, tokens[:, start:start + size], state)
        out.append(np.asarray(logits))
        start += size
    assert start == tokens.shape[1]
    return np.concatenate(out, axis=1), state


def assert_reference_and_streams(model, cfg, params, chunkings, length=14, tol=1e-5):
    """Asserts the model's logits equal the loop reference (rows at position offsets 0 and 5; within tol) and
    that feeding the same tokens in chunks of each size list in `chunkings` gives the one call's logits and final
    FAM."""
    from reference import reference_logits
    tokens = random_tokens(2, length, cfg.vocab_size, seed=3)
    offset = np.array([0, 5], np.int32)
    logits, _ = jit_apply(model, tokens, position_offset=offset)
    want = reference_logits(params, cfg, tokens, position_offset=offset)
    np.testing.assert_allclose(np.asarray(logits), want, atol=tol, rtol=tol)
    whole, state = jit_apply(model, tokens)
    for sizes in chunkings:
        got, chunked = stream(model, tokens, sizes)
        np.testing.assert_allclose(got, np.asarray(whole), atol=2e-5, rtol=2e-5, err_msg=str(sizes))
        np.testing.assert_allclose(np.asarray(chunked.layers.fam), np.asarray(state.layers.fam), atol=2e-5,
                                   rtol=2e-5)
