"""One call == chunked calls (any sizes, boundaries inside blocks) == token-by-token decode; resets."""
import numpy as np
import pytest
from model_utils import jit_apply, make_model, random_tokens, stream

MODES = {
    "fam": dict(attention="fam", block_size=4, memory_blocks=1, fam_len=3),
    "fam_m0_B_lt_F": dict(attention="fam", block_size=2, memory_blocks=0, fam_len=3),
    "bswa": dict(attention="bswa", block_size=4, memory_blocks=2),
    "full": dict(attention="full", max_len=64),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_one_call_equals_chunks_equals_decode(mode):
    model, cfg, _ = make_model(seed=5, **MODES[mode])
    tokens = random_tokens(2, 22, cfg.vocab_size, seed=9)
    whole, state = jit_apply(model, tokens)
    whole = np.asarray(whole)
    for sizes in ([3, 5, 1, 8, 5], [4, 4, 14], [1] * 22):
        got, chunked_state = stream(model, tokens, sizes)
        np.testing.assert_allclose(got, whole, atol=2e-5, rtol=2e-5, err_msg=str(sizes))
        np.testing.assert_allclose(np.asarray(chunked_state.layers.fam), np.asarray(state.layers.fam),
                                   atol=2e-5, rtol=2e-5)
        np.testing.assert_array_equal(np.asarray(chunked_state.pos), [22, 22])


def test_segment_start_resets_rows():
    model, cfg, _ = make_model(seed=6, **MODES["fam"])
    first = random_tokens(2, 13, cfg.vocab_size, seed=1)
    second = random_tokens(2, 9, cfg.vocab_size, seed=2)
    _, state = jit_apply(model, first)
    logits, _ = jit_apply(model, second, state, segment_start=np.array([True, False]))
    fresh, _ = jit_apply(model, second)
    np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(fresh[0]), atol=1e-5, rtol=1e-5)
    # The row that continues its document remembers it, so it differs from a fresh start.
    assert np.abs(np.asarray(logits[1]) - np.asarray(fresh[1])).max() > 1e-3


def test_state_shapes_constant_in_stream_length():
    model, cfg, _ = make_model(seed=7, **MODES["fam"])
    state = model.init_state(2)
    _, after_10 = stream(model, random_tokens(2, 10, cfg.vocab_size), [10], state)
    _, after_many = stream(model, random_tokens(2, 1000, cfg.vocab_size), [500, 499, 1], state)
    shapes = lambda s: [(x.shape, x.dtype) for x in __import__("jax").tree.leaves(s)]  # noqa: E731
    assert shapes(after_10) == shapes(after_many)
    assert after_10.nbytes() == after_many.nbytes()
