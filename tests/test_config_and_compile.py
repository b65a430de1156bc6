"""Bad configs fail with errors naming the field; compiled size does not grow with the number of blocks."""
import jax
import numpy as np
import pytest
from flax import nnx

import famjax

GOOD = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, block_size=8,
            memory_blocks=1, fam_len=4)


@pytest.mark.parametrize("bad,field", [
    (dict(fam_len=-3), "fam_len"), (dict(block_size=0), "block_size"), (dict(block_size=-2), "block_size"),
    (dict(memory_blocks=-1), "memory_blocks"), (dict(d_model=30), "num_heads"),
    (dict(num_kv_heads=3), "num_kv_heads"), (dict(attention="sparse"), "attention"), (dict(norm="batch"), "norm"),
    (dict(mlp_activation="relu"), "mlp_activation"), (dict(dtype="int8"), "dtype"), (dict(remat="some"), "remat"),
    (dict(vocab_size=0), "vocab_size"), (dict(head_dim=5, d_model=20), "head_dim"),
    (dict(fam_remat="save"), "fam_remat"), (dict(fam_remat="keep", fam_deferred_grads=False), "fam_remat"),
    (dict(fam_remat="offload", fam_deferred_grads=False), "fam_remat"),
])
def test_bad_config_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        famjax.ModelConfig(**{**GOOD, **bad})


def test_defaults_resolve():
    cfg = famjax.ModelConfig(**{**GOOD, "num_kv_heads": None, "mlp_dim": None})
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim) == (4, 8, 128)
    assert famjax.ModelConfig(**GOOD, attention="bswa").num_fam == 0


def test_bad_call_arguments_are_clear():
    model = famjax.FamLM(famjax.ModelConfig(**GOOD), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tokens must be int"):
        model(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="batch"):
        model(np.zeros((3, 4), np.int32), model.init_state(2))
    full = famjax.FamLM(famjax.ModelConfig(**GOOD, attention="full", max_len=8), rngs=nnx.Rngs(0))
    _, state = full(np.zeros((1, 6), np.int32), full.init_state(1))
    with pytest.raises(ValueError, match="max_len"):
        full(np.zeros((1, 4), np.int32), state)


@pytest.mark.parametrize("attention", ["fam", "bswa"])
def test_program_size_independent_of_number_of_blocks(attention):
    """No Python loop over blocks: 8 and 64 blocks trace to the same number of equations."""
    model = famjax.FamLM(famjax.ModelConfig(**GOOD, attention=attention), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def count(num_blocks):
        tokens = jax.ShapeDtypeStruct((1, num_blocks * 8), np.int32)
        jaxpr = jax.make_jaxpr(lambda p, t: nnx.merge(graphdef, p)(t)[0])(params, tokens)
        return sum(1 for _ in _all_eqns(jaxpr.jaxpr))
    assert count(8) == count(64)


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else _params_jaxprs(eqn):
            yield from _all_eqns(sub)


def _params_jaxprs(eqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
                yield v.jaxpr
            elif hasattr(v, "eqns"):
                yield v
