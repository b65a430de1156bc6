"""LoRA on the model (famjax.model.lora): a fresh adapter changes nothing, LoRA off adds nothing, merged ==
unmerged, dropout only with a key, the trainable mask, config validation, export of a LoRA model merges it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import famjax
from famjax.model import lora
from famjax.model.config import LORA_TARGETS

SMALL = dict(vocab_size=37, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48, attention="fam",
             block_size=4, memory_blocks=1, fam_len=3)
TOKENS = np.random.default_rng(0).integers(0, 37, (2, 14)).astype(np.int32)


def flat_params(model):
    return {"/".join(map(str, k)): np.asarray(v) for k, v in lora._flatten(lora._pure(model)).items()}


@jax.jit
def _apply(graphdef, params, tokens, key):
    return nnx.merge(graphdef, params)(tokens, dropout_key=key)[0]


def logits(model, tokens=TOKENS, key=None):
    graphdef, params = nnx.split(model)
    return np.asarray(_apply(graphdef, params, tokens, key))


def randomize_adapters(model, seed=1, std=0.05):
    """Returns the model with random B (and A) so the adapters change the output."""
    flat = lora._flatten(lora._pure(model))
    key = jax.random.PRNGKey(seed)
    for i, (path, v) in enumerate(sorted(flat.items())):
        if lora.is_adapter(path):
            flat[path] = (v + std * jax.random.normal(jax.random.fold_in(key, i), v.shape)).astype(v.dtype)
    return lora._build(model.cfg, flat)


@pytest.fixture(scope="module")
def base():
    return famjax.FamLM(famjax.ModelConfig(**SMALL), rngs=nnx.Rngs(0))


def test_lora_off_adds_nothing_and_fresh_lora_model_keeps_the_base_draws(base):
    names = set(flat_params(base))
    assert not any("lora" in n for n in names)
    scratch = famjax.FamLM(base.cfg.replace(lora_rank=4), rngs=nnx.Rngs(0))
    p = flat_params(scratch)
    assert {n for n in p if "lora" not in n} == names
    for n, v in flat_params(base).items():  # adapters are drawn after every base weight
        np.testing.assert_array_equal(p[n], v)
    assert len(p) - len(names) == 2 * len(LORA_TARGETS)


def test_add_lora_at_init_equals_base_bit_for_bit(base):
    model = lora.add_lora(base, rank=4, alpha=8.0, dropout=0.1)
    assert model.cfg.lora_rank == 4 and model.cfg.lora_scale == 2.0
    p = flat_params(model)
    assert p["layers/attn/q_lora_a"].shape == (2, 32, 4) and p["layers/attn/q_lora_b"].shape == (2, 4, 4, 8)
    assert p["layers/attn/o_lora_a"].shape == (2, 4, 8, 4) and p["layers/attn/o_lora_b"].shape == (2, 4, 32)
    assert p["layers/mlp/down_lora_a"].shape == (2, 48, 4) and p["layers/mlp/down_lora_b"].shape == (2, 4, 32)
    assert not p["layers/attn/q_lora_b"].any() and p["layers/attn/q_lora_a"].std() == pytest.approx(32 ** -0.5, 0.2)
    for n, v in flat_params(base).items():
        np.testing.assert_array_equal(p[n], v)
    np.testing.assert_array_equal(logits(model), logits(base))
    # dropout acts on the adapters' input only: with B = 0 even a training call is exact
    np.testing.assert_array_equal(logits(model, key=jax.random.PRNGKey(0)), logits(base))
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.add_lora(model, rank=2)


@pytest.mark.parametrize("overrides", [{}, dict(attention="full", mlp_activation="gelu", tie_embeddings=True),
                                       dict(attention="bswa", scan_layers=False, lora_targets=("q", "v"))])
def test_merged_equals_unmerged(overrides):
    targets = overrides.pop("lora_targets", LORA_TARGETS)
    model = famjax.FamLM(famjax.ModelConfig(**{**SMALL, **overrides}), rngs=nnx.Rngs(1))
    tuned = randomize_adapters(lora.add_lora(model, rank=3, targets=targets, seed=2))
    out = logits(tuned)
    assert np.abs(out - logits(model)).max() > 1e-2  # the adapters matter
    merged = lora.merge_lora(tuned)
    assert merged.cfg == model.cfg  # LoRA fields back at their defaults
    assert set(flat_params(merged)) == set(flat_params(model))
    np.testing.assert_allclose(logits(merged), out, atol=1e-5, rtol=1e-5)
    assert lora.merge_lora(model) is model


def test_dropout_only_with_a_key(base):
    tuned = randomize_adapters(lora.add_lora(base, rank=4, dropout=0.5))
    plain = lora._build(tuned.cfg.replace(lora_dropout=0.0), lora._flatten(lora._pure(tuned)))
    eval_out = logits(tuned)
    np.testing.assert_array_equal(eval_out, logits(plain))  # no key: no dropout
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    train1 = logits(tuned, key=k1)
    assert np.abs(train1 - eval_out).max() > 1e-3
    np.testing.assert_array_equal(train1, logits(tuned, key=k1))  # deterministic in the key
    assert np.abs(train1 - logits(tuned, key=k2)).max() > 1e-3
    np.testing.assert_array_equal(logits(plain, key=k1), eval_out)  # lora_dropout 0: the key changes nothing


def test_streaming_with_adapters_equals_one_call(base):
    """The adapters act on FAM rows too: chunked calls and one call agree."""
    tuned = randomize_adapters(lora.add_lora(base, rank=4))
    full = logits(tuned)
    graphdef, params = nnx.split(tuned)

    @jax.jit
    def chunks(params, tokens):
        model = nnx.merge(graphdef, params)
        a, state = model(tokens[:, :5])
        b, state = model(tokens[:, 5:], state)
        return jnp.concatenate([a, b], axis=1)
    np.testing.assert_allclose(np.asarray(chunks(params, TOKENS)), full, atol=2e-5, rtol=2e-5)


def test_trainable_mask_and_split(base):
    model = lora.add_lora(base, rank=2)
    params = lora._pure(model)
    mask = lora._flatten(lora.trainable_mask(model))
    on = sorted("/".join(k) for k, v in mask.items() if v)
    assert on == sorted(["fam_init"] + [f"layers/{m}/{t}_lora_{ab}" for t in LORA_TARGETS for ab in "ab"
                                        for m in (("attn",) if t in "qkvo" else ("mlp",))])
    with_norms = lora._flatten(lora.trainable_mask(params, norms=True))
    extra = sorted("/".join(k) for k, v in with_norms.items() if v and not mask[k])
    assert extra == ["final_norm/scale", "layers/norm1/scale", "layers/norm2/scale"]
    trainable, frozen = lora.split(params, lora.trainable_mask(params))
    assert "embed" in frozen and "embed" not in trainable and "fam_init" in trainable
    assert jax.tree.structure(lora.combine(trainable, frozen)) == jax.tree.structure(params)


def test_config_validation():
    cfg = famjax.ModelConfig(**SMALL, lora_rank=8, lora_targets=["q", "v"])
    assert cfg.lora_targets == ("q", "v") and hash(cfg)
    with pytest.raises(ValueError) as e:
        famjax.ModelConfig(**SMALL, lora_rank=-1, lora_alpha=0, lora_dropout=1.0, lora_targets=("q", "wq"))
    msg = str(e.value)
    for part in ("lora_rank must be", "lora_alpha must be", "lora_dropout must be", "unknown projection(s) ['wq']"):
        assert part in msg


def test_export_of_a_lora_model_is_merged(base, tmp_path):
    import famjax.convert as fc

    model = famjax.FamLM(famjax.ModelConfig(**{**SMALL, "attention": "full"}), rngs=nnx.Rngs(3))
    tuned = randomize_adapters(lora.add_lora(model, rank=2))
    fc.export_pretrained(tuned, str(tmp_path / "out"))
    back, _ = fc.load_pretrained(str(tmp_path / "out"))
    assert back.cfg.lora_rank == 0
    np.testing.assert_allclose(logits(back), logits(tuned), atol=1e-5, rtol=1e-5)
