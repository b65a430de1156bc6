"""The FAM ablation switches (issue 6): each changes what it claims and nothing else.

Their exact semantics are checked against the loop reference in test_model_parity (fam_no_zero_residual,
fam_positions_zero); here: the switches matter, streaming still equals one call, and stop-gradient cuts
exactly the gradient path through the FAM between blocks.
"""
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from model_utils import jit_apply, make_model, random_tokens, stream

BASE = dict(attention="fam", block_size=4, memory_blocks=0, fam_len=3)
SWITCHES = [dict(fam_zero_residual=False), dict(fam_positions="zero"), dict(fam_keep_norm=True),
            dict(fam_null_slot=True), dict(fam_stop_gradient=True)]


@pytest.mark.parametrize("switch", SWITCHES, ids=lambda s: next(iter(s)))
def test_switch_streams_like_one_call(switch):
    model, cfg, _ = make_model(seed=4, **BASE, **switch)
    tokens = random_tokens(2, 19, cfg.vocab_size, seed=2)
    offset = np.array([0, 5], np.int32)
    whole, _ = jit_apply(model, tokens, position_offset=offset)
    model_no_offset = jit_apply(model, tokens)[0]
    chunked, _ = stream(model, tokens, [3, 6, 1, 9])
    np.testing.assert_allclose(chunked, np.asarray(model_no_offset), atol=1e-5, rtol=1e-5)
    if switch.get("fam_positions") == "zero":
        # FAM rows have no position, so an offset shifts tokens only: the logits change with it.
        assert np.abs(np.asarray(whole)[1] - np.asarray(model_no_offset)[1]).max() > 1e-4


@pytest.mark.parametrize("switch", SWITCHES[:4], ids=lambda s: next(iter(s)))
def test_switch_changes_the_forward(switch):
    tokens = random_tokens(2, 16, 37, seed=3)
    default = np.asarray(jit_apply(make_model(seed=4, **BASE)[0], tokens)[0])
    switched = np.asarray(jit_apply(make_model(seed=4, **BASE, **switch)[0], tokens)[0])
    if "fam_zero_residual" in switch:  # block 0 reads the initial FAM, which the first update's residual
        np.testing.assert_array_equal(switched[:, :4], default[:, :4])  # does not touch
    assert np.abs(switched[:, 4:] - default[:, 4:]).max() > 1e-3


def test_keep_norm_holds_every_fam_row_at_its_initial_norm():
    model, cfg, _ = make_model(seed=4, **BASE, fam_keep_norm=True)
    tokens = random_tokens(2, 17, cfg.vocab_size, seed=5)
    _, state = jit_apply(model, tokens)  # 4 complete blocks: 4 updates of every layer's FAM
    fresh = model.init_state(2)  # the initial FAM of every layer
    np.testing.assert_allclose(np.linalg.norm(np.asarray(state.layers.fam), axis=-1),
                               np.linalg.norm(np.asarray(fresh.layers.fam), axis=-1), rtol=1e-5)
    assert np.abs(np.asarray(state.layers.fam) - np.asarray(fresh.layers.fam)).max() > 1e-3  # it still moves


def _last_block_loss(model, tokens):
    logits, _ = model(tokens[:, :-1])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return losses[:, -4:].mean()


def test_stop_gradient_cuts_the_fam_path_only():
    # m = 0: the last block sees block 0 only through the FAM. Token id 1 appears only in block 0, so the
    # gradient of the last block's loss reaches its embedding only through the FAM recurrence.
    rng = np.random.default_rng(0)
    tokens = np.concatenate([np.ones((1, 4)), rng.integers(2, 37, (1, 13))], axis=1).astype(np.int32)
    grads = {}
    for stop in (False, True):
        model, _, _ = make_model(seed=5, **BASE, fam_stop_gradient=stop)
        loss, g = nnx.value_and_grad(_last_block_loss)(model, jnp.asarray(tokens))
        grads[stop] = (float(loss), np.asarray(g.embed[...]))
    assert grads[False][0] == pytest.approx(grads[True][0], rel=1e-6)  # same forward
    assert np.abs(grads[False][1][1]).max() > 1e-6  # without: block 0 is trained by the last block's loss
    np.testing.assert_array_equal(grads[True][1][1], 0.0)  # with: no gradient crosses a block boundary
    assert np.abs(grads[True][1][2:]).max() > 0  # other tokens still get gradients


def test_fam_noise_is_added_after_each_update_relative_to_the_row():
    model, cfg, _ = make_model(seed=4, **BASE)
    tokens = random_tokens(2, 16, cfg.vocab_size, seed=6)  # 4 whole blocks
    shape = (cfg.num_layers, 2, 4, cfg.num_fam, cfg.d_model)
    clean, state = model(tokens)
    zero, state0 = model(tokens, fam_noise=jnp.zeros(shape))
    np.testing.assert_array_equal(np.asarray(zero), np.asarray(clean))
    # Noise on the last block's update only: no token of this chunk reads that FAM (layer 1's block-3 input
    # read layer 0's FAM of block 2), so the logits stay and every final FAM moves by exactly noise x its RMS.
    eps = np.zeros(shape, np.float32)
    eps[:, :, 3] = np.random.default_rng(0).normal(size=eps[:, :, 3].shape)
    last, state1 = model(tokens, fam_noise=jnp.asarray(0.1 * eps))
    np.testing.assert_allclose(np.asarray(last), np.asarray(clean), atol=1e-6)
    fam = np.asarray(state.layers.fam)
    rms = np.sqrt(np.mean(fam ** 2, axis=-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(state1.layers.fam), fam + 0.1 * eps[:, :, 3] * rms, rtol=1e-5, atol=1e-5)
    # Noise on block 1's update reaches the tokens of blocks 2 and 3 only.
    eps = np.zeros(shape, np.float32)
    eps[:, :, 1] = 0.1
    mid, _ = model(tokens, fam_noise=jnp.asarray(eps))
    np.testing.assert_allclose(np.asarray(mid)[:, :8], np.asarray(clean)[:, :8], atol=1e-6)
    assert np.abs(np.asarray(mid)[:, 8:] - np.asarray(clean)[:, 8:]).max() > 1e-4
    with pytest.raises(ValueError, match="fam_noise"):
        model(tokens[:, :15], fam_noise=jnp.zeros(shape))


@pytest.mark.parametrize("field", ["stretch", "age", "inflate"])
def test_fam_stretch_and_age_change_every_update_but_the_first(field):
    """FamNoise.stretch c: a non-initial update S_{t-1} + u becomes S_{t-1} + (1 + c) u; FamNoise.age a: it
    becomes S_{t-1} + u + a x (u averaged over the rows); FamNoise.inflate c: (1 + c) x (S_{t-1} + u). The first
    update (the write from the initial FAM) is never changed."""
    from famjax import ops
    model, cfg, _ = make_model(seed=4, **BASE)
    tokens = random_tokens(3, 16, cfg.vocab_size, seed=7)  # 4 whole blocks, 3 rows
    shape = (cfg.num_layers, 3, 4)

    def run(factor):
        return model(tokens, fam_noise=ops.FamNoise(**{field: jnp.asarray(factor, jnp.float32)}))

    clean, state = model(tokens)
    zero, _ = run(np.zeros(shape))
    np.testing.assert_array_equal(np.asarray(zero), np.asarray(clean))
    first = np.zeros(shape)
    first[:, :, 0] = 5.0  # block 0's update starts from the initial FAM: untouched
    np.testing.assert_allclose(np.asarray(run(first)[0]), np.asarray(clean), atol=1e-6)
    # The last block's update changed by c (per row): no token reads that FAM, the final FAM moves exactly.
    c = np.array([2.0, 0.0, 0.5], np.float32)
    last = np.zeros(shape)
    last[:, :, 3] = c[None, :]
    out, changed = run(last)
    np.testing.assert_allclose(np.asarray(out), np.asarray(clean), atol=1e-6)
    _, state_2 = model(tokens[:, :12])  # S_2: the FAM before block 3 (chunked == one call)
    before, after = np.asarray(state_2.layers.fam), np.asarray(state.layers.fam)
    u = after - before
    extra = {"stretch": u, "age": u.mean(axis=1, keepdims=True), "inflate": after}[field]  # age: mean over rows
    want = after + c[None, :, None, None] * extra
    np.testing.assert_allclose(np.asarray(changed.layers.fam), want, rtol=1e-4, atol=1e-4)
    # A change of block 1's update reaches the tokens of blocks 2 and 3 only.
    mid = np.zeros(shape)
    mid[:, :, 1] = 1.0
    got = np.asarray(run(mid)[0])
    np.testing.assert_allclose(got[:, :8], np.asarray(clean)[:, :8], atol=1e-6)
    assert np.abs(got[:, 8:] - np.asarray(clean)[:, 8:]).max() > 1e-4
    with pytest.raises(ValueError, match=f"fam_noise {field}"):
        run(np.zeros(shape[:2] + (3,)))


@pytest.mark.parametrize("field", ["read_age", "read_stretch"])
def test_fam_read_age_and_stretch_move_only_what_the_next_block_reads(field):
    """FamNoise.read_age a: the tokens of block t + 1 read S_t + a x (S_t - S_{t-1} averaged over the rows)
    instead of S_t; read_stretch a: S_t + a x (S_t - S_{t-1}) of the row itself. The recurrence is untouched.
    Checked exactly on ops.fam_scan with a toy update (one row restarts mid-chunk, as packed rows do), then on
    the model: the layer-0 FAM never moves."""
    from famjax import ops
    rng = np.random.default_rng(3)
    b, nb, bs, f, d = 3, 4, 2, 2, 3
    blocks_k = jnp.asarray(rng.normal(size=(b, nb, bs, 1, d)), jnp.float32)
    scale = jnp.asarray([[1.0], [2.0]])

    def kv_fn(fam, index):
        return fam[:, :, None, :], 2.0 * fam[:, :, None, :]

    def update_fn(fam, is_initial, fk, fv, k, v, index):
        return jnp.where(is_initial[:, None, None], 0.0, fam) + scale * k.mean(1)[:, None, 0, :] + 0.5

    fam0 = jnp.asarray(rng.normal(size=(b, f, d)), jnp.float32)
    initial = (fam0, *kv_fn(fam0, None))
    carry = (fam0, jnp.ones((b,), bool), *kv_fn(fam0, None))
    resets = np.zeros((b, nb), bool)
    resets[2, 2] = True  # row 2 starts a new example at block 2
    a = np.array([1.5, 0.0, 3.0], np.float32)
    kw = dict(update_fn=update_fn, kv_fn=kv_fn, all_complete=True, resets=jnp.asarray(resets), initial=initial)
    args = (carry, blocks_k, blocks_k, jnp.ones((b, nb), bool), jnp.zeros((b, nb), jnp.int32))
    out0, read0, _ = ops.fam_scan(*args, **kw)
    out, read, _ = ops.fam_scan(*args, noise=ops.FamNoise(**{field: jnp.broadcast_to(a[:, None], (b, nb))}), **kw)
    for x, y in zip(out, out0):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # the recurrence is untouched
    # the reference: S_t per row in numpy, the same toy update
    fams, state, init = [], np.asarray(fam0), np.ones(b, bool)
    for j in range(nb):
        state, init = np.where(resets[:, j, None, None], np.asarray(fam0), state), init | resets[:, j]
        prev = state
        state = np.where(init[:, None, None], 0.0, state) + np.asarray(scale) * np.asarray(blocks_k[:, j]).mean(1)[
            :, None, 0, :] + 0.5
        moved = np.where(init[:, None, None], 0.0, state - prev)
        extra = moved.sum(0) / max((~init).sum(), 1) if field == "read_age" else moved  # shared or own
        fams.append((state, np.where(init, 0.0, a)[:, None, None] * extra))
        init = np.zeros(b, bool)
    for j in range(1, nb):
        base, shift = fams[j - 1]
        want = np.where(resets[:, j, None, None], np.asarray(fam0), base + shift)
        np.testing.assert_allclose(np.asarray(read[0])[:, j, :, 0], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(read0[0])[:, j, :, 0],
                                   np.where(resets[:, j, None, None], np.asarray(fam0), base), rtol=1e-5, atol=1e-5)
    assert np.abs(fams[1][1]).max() > 1e-3  # the shift is not trivially zero

    model, cfg, _ = make_model(seed=4, **BASE)
    tokens = random_tokens(3, 16, cfg.vocab_size, seed=7)  # 4 whole blocks, 3 rows
    shape = (cfg.num_layers, 3, 4)
    clean, state = model(tokens)
    at = np.zeros(shape, np.float32)
    at[:, :, 1] = a[None, :]  # block 1's update (S_2): read by block 2's tokens only
    got, moved_state = model(tokens, fam_noise=ops.FamNoise(**{field: jnp.asarray(at)}))
    got = np.asarray(got)
    np.testing.assert_allclose(got[:, :8], np.asarray(clean)[:, :8], atol=1e-6)
    assert np.abs(got[0, 8:] - np.asarray(clean)[0, 8:]).max() > 1e-4
    np.testing.assert_allclose(got[1], np.asarray(clean)[1], atol=1e-6)  # a = 0 for row 1
    np.testing.assert_allclose(np.asarray(moved_state.layers.fam)[0], np.asarray(state.layers.fam)[0], atol=1e-6)
    first = np.zeros(shape, np.float32)
    first[:, :, 0] = 5.0  # the write from the initial FAM is never moved
    np.testing.assert_allclose(np.asarray(model(tokens, fam_noise=ops.FamNoise(**{field: jnp.asarray(first)}))[0]),
                               np.asarray(clean), atol=1e-6)
    with pytest.raises(ValueError, match=f"fam_noise {field}"):
        model(tokens, fam_noise=ops.FamNoise(**{field: jnp.zeros(shape[:2] + (3,))}))


def test_fam_noise_keeps_row_norms_under_keep_norm():
    """With fam.keep_norm a noised row is rescaled to its pre-noise norm: noise turns rows, never grows them."""
    model, cfg, _ = make_model(seed=4, **BASE, fam_keep_norm=True)
    tokens = random_tokens(2, 16, cfg.vocab_size, seed=6)  # 4 whole blocks
    shape = (cfg.num_layers, 2, 4, cfg.num_fam, cfg.d_model)
    clean, state = model(tokens)
    eps = 0.5 * np.random.default_rng(1).normal(size=shape).astype(np.float32)
    noisy, state1 = model(tokens, fam_noise=jnp.asarray(eps))
    norms = np.linalg.norm(np.asarray(state.layers.fam), axis=-1)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(state1.layers.fam), axis=-1), norms, rtol=1e-5)
    assert np.abs(np.asarray(state1.layers.fam) - np.asarray(state.layers.fam)).max() > 1e-2  # yet it moved
    assert np.abs(np.asarray(noisy) - np.asarray(clean)).max() > 1e-4


def test_fam_change_is_each_updates_relative_change():
    """fam_change [L, b, nb] is |S_t - S_{t-1}|^2 / |S_{t-1}|^2 per update, averaged over the F rows, with 0 for
    the write from the initial FAM; the FAMs come from streaming the same tokens one block per call."""
    model, cfg, _ = make_model(seed=4, **BASE)
    tokens = random_tokens(2, 16, cfg.vocab_size, seed=7)  # 4 whole blocks
    logits, state, change = model(tokens, fam_change=True)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(model(tokens)[0]))  # same forward
    fams, st = [], None
    for j in range(4):
        _, st = model(tokens[:, 4 * j:4 * j + 4], st)
        fams.append(np.asarray(st.layers.fam))  # [L, b, F, d] after block j
    expect = np.zeros((cfg.num_layers, 2, 4), np.float32)
    for j in range(1, 4):
        rel = np.sum((fams[j] - fams[j - 1]) ** 2, -1) / (np.sum(fams[j - 1] ** 2, -1) + 1e-6)
        expect[:, :, j] = rel.mean(-1)
    assert np.asarray(change).shape == expect.shape and np.all(expect[:, :, 1:] > 1e-4)
    np.testing.assert_allclose(np.asarray(change), expect, rtol=2e-4, atol=1e-7)
    with pytest.raises(ValueError, match="fam_change needs a chunk of whole blocks"):
        model(tokens[:, :6], fam_change=True)
    with pytest.raises(ValueError, match="fam_change needs attention='fam'"):
        make_model(seed=4, **dict(BASE, attention="bswa", fam_len=0))[0](tokens, fam_change=True)
