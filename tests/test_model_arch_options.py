"""The options of pretrained families (qkv_bias, norm_offset, post_norms, attn_softcap, final_softcap,
query_scale): the model equals the reference with all of them on, streams, and honours each of them."""
import numpy as np
import pytest
from flax import nnx
from model_utils import (
    assert_reference_and_streams,
    jit_apply,
    load_reference_params,
    make_model,
    random_tokens,
)
from reference import random_params

import famjax

# Every option on, at values where each one matters at these small shapes.
ALL = dict(qkv_bias=True, norm_offset=1.0, post_norms=True, attn_softcap=1.5, final_softcap=2.0, query_scale=0.6)
OFF = dict(qkv_bias=False, norm_offset=0.0, post_norms=False, attn_softcap=0.0, final_softcap=0.0, query_scale=None)
MODES = {  # fam: Gemma-like (RMS, GeGLU, tied, scaled embeddings); full: LayerNorm, MQA, untied
    "fam": dict(attention="fam", block_size=4, memory_blocks=1, fam_len=3, mlp_activation="geglu",
                tie_embeddings=True, embed_scale=True),
    "full": dict(attention="full", max_len=32, norm="layer", num_kv_heads=1),
}


def load_option_params(model, params):
    """Copies the options' extra reference weights (biases, post norms) into the model, as far as it has them."""
    layers = model.layers

    def put(variable, key, *sub):
        value = np.stack([lp[key] if not sub else lp[key][sub[0]] for lp in params["layers"]])
        assert variable[...].shape == value.shape, (key, variable[...].shape, value.shape)
        variable[...] = value.astype(variable[...].dtype)

    if model.cfg.qkv_bias:
        for name in ("q_bias", "k_bias", "v_bias"):
            put(getattr(layers.attn, name), name)
    if model.cfg.post_norms:
        for name in ("norm_post_attn", "norm_post_ffn"):
            put(getattr(layers, name).scale, name, "scale")
            if model.cfg.norm == "layer":
                put(getattr(layers, name).bias, name, "bias")


def options_model(mode, seed, params=None, **overrides):
    """Returns (model, cfg, params): the mode with every option on (unless overridden), reference weights
    (those of `params` when given, e.g. drawn for another config) loaded."""
    model, cfg, own = make_model(seed=seed, **MODES[mode], **{**ALL, **overrides})
    params = own if params is None else params
    load_reference_params(model, params)
    load_option_params(model, params)
    return model, cfg, params


@pytest.mark.parametrize("mode", list(MODES))
def test_all_options_match_reference_and_stream(mode):
    model, cfg, params = options_model(mode, seed=4)
    # One call == chunks with boundaries inside blocks == token by token (FAM updates and decode included).
    assert_reference_and_streams(model, cfg, params, ([5, 1, 8], [1] * 14))


def test_each_option_changes_the_logits():
    """Switching any one option off (same weights) changes the logits: none is silently ignored."""
    model, cfg, params = options_model("fam", seed=6)
    tokens = random_tokens(1, 10, cfg.vocab_size, seed=2)
    base = np.asarray(jit_apply(model, tokens)[0])
    for name, value in OFF.items():
        other, _, _ = options_model("fam", seed=6, params=params, **{name: value})
        got = np.asarray(jit_apply(other, tokens)[0])
        assert np.abs(got - base).max() > 1e-3, name


def test_fresh_model_unchanged_by_neutral_options():
    """Zero biases and an offset with its matching initial scale leave a fresh model bit-for-bit the same;
    the new parameters have the documented paths, shapes and logical axes."""
    base = dict(vocab_size=37, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, block_size=4, fam_len=3)
    tokens = random_tokens(1, 9, 37)
    plain = famjax.FamLM(famjax.ModelConfig(**base), rngs=nnx.Rngs(0))
    model = famjax.FamLM(famjax.ModelConfig(**base, qkv_bias=True, norm_offset=1.0, post_norms=False),
                         rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(model(tokens)[0]), np.asarray(plain(tokens)[0]))

    sandwich = famjax.FamLM(famjax.ModelConfig(**base, qkv_bias=True, post_norms=True), rngs=nnx.Rngs(0))
    flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(sandwich, nnx.Param))}
    want = {"layers/attn/q_bias": ((2, 4, 8), ("layers", "q_heads", "head_dim")),
            "layers/attn/k_bias": ((2, 2, 8), ("layers", "kv_heads", "head_dim")),
            "layers/attn/v_bias": ((2, 2, 8), ("layers", "kv_heads", "head_dim")),
            "layers/norm_post_attn/scale": ((2, 32), ("layers", "embed")),
            "layers/norm_post_ffn/scale": ((2, 32), ("layers", "embed"))}
    for path, (shape, axes) in want.items():
        assert flat[path][...].shape == shape, path
        assert tuple(flat[path].get_metadata()["out_sharding"]) == axes, path
    assert not np.asarray(flat["layers/attn/q_bias"][...]).any()
    np.testing.assert_array_equal(np.asarray(flat["layers/norm_post_ffn/scale"][...]), 1.0)


@pytest.mark.parametrize("field,value", [("attn_softcap", -1.0), ("final_softcap", float("inf")),
                                         ("query_scale", 0.0), ("norm_offset", float("nan")),
                                         ("qkv_bias", 1), ("post_norms", "yes"), ("attn_softcap", True)])
def test_invalid_options_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        famjax.ModelConfig(**{field: value})


def test_reference_params_scale_matches_offset():
    """random_params draws norm scales around 1 - norm_offset, so the norms multiply by about 1 either way."""
    cfg = famjax.ModelConfig(d_model=16, num_heads=2, norm_offset=1.0, post_norms=True)
    params = random_params(cfg, 0)
    assert abs(params["layers"][0]["norm1"]["scale"].mean()) < 0.1
    assert abs(params["layers"][0]["norm_post_ffn"]["scale"].mean()) < 0.1
