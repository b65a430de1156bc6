"""The fast model equals the slow loop reference written from the spec (tests/reference.py)."""
import numpy as np
import pytest
from model_utils import jit_apply, make_model, random_tokens
from reference import reference_fam_states, reference_logits

CASES = [
    # (name, overrides, T)
    ("fam_gqa_rms_swiglu", dict(block_size=4, memory_blocks=1, fam_len=3), 19),
    ("fam_B_lt_F", dict(block_size=2, memory_blocks=2, fam_len=5), 11),
    ("fam_m0_mqa_layer_geglu", dict(block_size=5, memory_blocks=0, fam_len=2, num_kv_heads=1, norm="layer",
                                    mlp_activation="geglu"), 23),
    ("fam_m3_mha_gelu_tied", dict(block_size=3, memory_blocks=3, fam_len=4, num_kv_heads=4,
                                  mlp_activation="gelu", tie_embeddings=True, embed_scale=True), 17),
    ("fam_exact_blocks", dict(block_size=4, memory_blocks=2, fam_len=2, num_layers=3), 16),
    ("fam_one_partial_block", dict(block_size=8, memory_blocks=1, fam_len=3), 5),
    ("bswa", dict(attention="bswa", block_size=4, memory_blocks=2), 21),
    ("bswa_m0", dict(attention="bswa", block_size=3, memory_blocks=0, norm="layer"), 10),
    ("full", dict(attention="full"), 13),
    ("fam_unrolled_remat", dict(scan_layers=False, remat="full", block_size=4, fam_len=3), 14),
    # the paper's ablations (spec defaults switched off)
    ("fam_no_zero_residual", dict(block_size=4, memory_blocks=0, fam_len=3, fam_zero_residual=False), 15),
    ("fam_positions_zero", dict(block_size=4, memory_blocks=1, fam_len=3, fam_positions="zero"), 15),
    # not in the paper: the norm-keeping FAM (issue 6 experiment)
    ("fam_keep_norm", dict(block_size=4, memory_blocks=1, fam_len=3, fam_keep_norm=True), 15),
]


@pytest.mark.parametrize("name,overrides,T", CASES, ids=[c[0] for c in CASES])
def test_logits_match_reference(name, overrides, T):
    model, cfg, params = make_model(seed=len(name), **overrides)
    tokens = random_tokens(2, T, cfg.vocab_size, seed=T)
    offset = np.array([0, 7], np.int32)
    logits, _ = jit_apply(model, tokens, position_offset=offset)
    want = reference_logits(params, cfg, tokens, position_offset=offset)
    np.testing.assert_allclose(np.asarray(logits), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [8, 11, 3])
def test_final_fam_matches_reference(T):
    model, cfg, params = make_model(seed=3, block_size=4, memory_blocks=1, fam_len=3)
    tokens = random_tokens(2, T, cfg.vocab_size, seed=5)
    _, state = jit_apply(model, tokens)
    want = reference_fam_states(params, cfg, tokens)
    np.testing.assert_allclose(np.asarray(state.layers.fam), want, atol=1e-5, rtol=1e-5)
    assert np.asarray(state.is_initial).tolist() == [T < 4] * 2
