"""One call == chunked calls (any sizes, boundaries inside blocks) == token-by-token decode; resets."""
import jax.numpy as jnp
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
    # Chunks ending inside blocks and on a boundary (16) and spanning blocks, then token by token. Few distinct
    # sizes: each compiles once.
    for sizes in ([3, 6, 1, 6, 6], [1] * 22):
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
    _, after_many = stream(model, random_tokens(2, 1000, cfg.vocab_size), [495, 495, 10], state)
    shapes = lambda s: [(x.shape, x.dtype) for x in __import__("jax").tree.leaves(s)]  # noqa: E731
    assert shapes(after_10) == shapes(after_many)
    assert after_10.nbytes() == after_many.nbytes()


@pytest.mark.parametrize("mode", ["fam", "bswa"])
def test_packed_rows_equal_separate_examples(mode):
    """segment_start [b, T] at block boundaries: each packed example behaves as if it were alone."""
    model, cfg, _ = make_model(seed=8, **MODES[mode])  # block_size 4
    tokens = random_tokens(2, 20, cfg.vocab_size, seed=11)
    starts = np.zeros((2, 20), bool)
    starts[0, [0, 8]] = True        # row 0: examples of 8 and 12 tokens
    starts[1, [0, 4, 12]] = True    # row 1: 4, 8, 8 tokens
    logits, state = jit_apply(model, tokens, segment_start=starts)
    logits = np.asarray(logits)
    for row, bounds in ((0, [0, 8, 20]), (1, [0, 4, 12, 20])):
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            alone, alone_state = jit_apply(model, tokens[row:row + 1, lo:hi])
            np.testing.assert_allclose(logits[row, lo:hi], np.asarray(alone[0]), atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(np.asarray(state.layers.fam[:, row]), np.asarray(alone_state.layers.fam[:, 0]),
                                   atol=2e-5, rtol=2e-5)
        assert int(state.pos[row]) == 20 - bounds[-2]
    # Continuing the stream after the packed call equals continuing the last example alone.
    more = random_tokens(2, 6, cfg.vocab_size, seed=12)
    cont, _ = jit_apply(model, more, state)
    alone_cont, _ = jit_apply(model, more[1:], alone_state)
    np.testing.assert_allclose(np.asarray(cont[1]), np.asarray(alone_cont[0]), atol=2e-5, rtol=2e-5)


def test_packed_resets_must_be_block_aligned():
    model, cfg, _ = make_model(seed=8, **MODES["fam"])
    starts = np.zeros((1, 8), bool)
    starts[0, 3] = True
    with pytest.raises(ValueError, match="multiples of block_size"):
        model(random_tokens(1, 8, cfg.vocab_size), segment_start=starts)


def test_inspect_shapes_and_probabilities():
    model, cfg, _ = make_model(seed=9, **MODES["fam"])  # B 4, F 3, H 4, L 2
    out = model.inspect(random_tokens(2, 12, cfg.vocab_size))
    assert out["fam_probs"].shape == (2, 2, 3, 4, 3, 7)
    assert out["token_fam_mass"].shape == (2, 2, 3, 4, 4)
    assert out["fam_norm"].shape == (2, 2, 3, 3)
    np.testing.assert_allclose(np.asarray(out["fam_probs"]).sum(-1), 1.0, atol=1e-5)
    mass = np.asarray(out["token_fam_mass"])
    assert (mass > 0).all() and (mass < 1).all()
    np.testing.assert_allclose(np.asarray(out["logits"]), np.asarray(jit_apply(model, random_tokens(2, 12, 37))[0]),
                               atol=1e-5)


@pytest.mark.parametrize("mode", ["fam", "full"])
def test_bfloat16_compute_streams_and_tracks_float32(mode):
    model, cfg, _ = make_model(seed=1, attention=mode, dtype="bfloat16", remat="dots")
    reference, _, _ = make_model(seed=1, attention=mode)
    tokens = random_tokens(2, 13, cfg.vocab_size, seed=2)
    whole, state = jit_apply(model, tokens)
    assert whole.dtype == np.float32 and state.layers.fam.dtype == np.float32
    assert state.layers.mem_k.dtype == jnp.bfloat16
    chunked, _ = stream(model, tokens, [5, 1, 7])
    np.testing.assert_allclose(chunked, np.asarray(whole), atol=1e-2)
    want = np.asarray(jit_apply(reference, tokens)[0])
    assert np.abs(np.asarray(whole) - want).max() < 0.05 * np.abs(want).max()
