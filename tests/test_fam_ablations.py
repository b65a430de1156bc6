"""The FAM ablation switches (issue 6): each changes what it claims and nothing else.

Their exact semantics are checked against the loop reference in test_model_parity (fam_no_zero_residual,
fam_positions_zero); here: the switches matter, streaming still equals one call, and stop-gradient cuts
exactly the gradient path through the FAM between blocks; the one perturbation point of the FAM scan applies
its function to every new FAM and nothing else.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from model_utils import jit_apply, make_model, random_tokens, stream

from famjax import ops
from famjax.train.perturb import add_state_noise

BASE = dict(attention="fam", block_size=4, memory_blocks=0, fam_len=3)
SWITCHES = [dict(fam_zero_residual=False), dict(fam_positions="zero"), dict(fam_keep_norm=True),
            dict(fam_stop_gradient=True)]


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


@pytest.mark.parametrize("switch", SWITCHES[:3], ids=lambda s: next(iter(s)))
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
        loss, g = nnx.jit(nnx.value_and_grad(_last_block_loss))(model, jnp.asarray(tokens))
        grads[stop] = (float(loss), np.asarray(g.embed[...]))
    assert grads[False][0] == pytest.approx(grads[True][0], rel=1e-6)  # same forward
    assert np.abs(grads[False][1][1]).max() > 1e-6  # without: block 0 is trained by the last block's loss
    np.testing.assert_array_equal(grads[True][1][1], 0.0)  # with: no gradient crosses a block boundary
    assert np.abs(grads[True][1][2:]).max() > 0  # other tokens still get gradients


def _noise(eps):
    """The trainer's state noise as a model perturbation: eps [L, b, nb, F, d] x each row's RMS."""
    return ops.Perturbation(functools.partial(add_state_noise, keep_norm=False), jnp.asarray(eps))


def test_perturbation_is_applied_after_each_update_and_read_by_later_blocks():
    model, cfg, _ = make_model(seed=4, **BASE)
    tokens = random_tokens(2, 16, cfg.vocab_size, seed=6)  # 4 whole blocks
    shape = (cfg.num_layers, 2, 4, cfg.num_fam, cfg.d_model)
    clean, state = model(tokens)
    zero, state0 = model(tokens, fam_perturb=_noise(np.zeros(shape, np.float32)))
    np.testing.assert_array_equal(np.asarray(zero), np.asarray(clean))
    # Noise on the last block's update only: no token of this chunk reads that FAM (layer 1's block-3 input
    # read layer 0's FAM of block 2), so the logits stay and every final FAM moves by exactly noise x its RMS.
    eps = np.zeros(shape, np.float32)
    eps[:, :, 3] = np.random.default_rng(0).normal(size=eps[:, :, 3].shape)
    last, state1 = model(tokens, fam_perturb=_noise(0.1 * eps))
    np.testing.assert_allclose(np.asarray(last), np.asarray(clean), atol=1e-6)
    fam = np.asarray(state.layers.fam)
    rms = np.sqrt(np.mean(fam ** 2, axis=-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(state1.layers.fam), fam + 0.1 * eps[:, :, 3] * rms, rtol=1e-5, atol=1e-5)
    # Noise on block 1's update reaches the tokens of blocks 2 and 3 only.
    eps = np.zeros(shape, np.float32)
    eps[:, :, 1] = 0.1
    mid, _ = model(tokens, fam_perturb=_noise(eps))
    np.testing.assert_allclose(np.asarray(mid)[:, :8], np.asarray(clean)[:, :8], atol=1e-6)
    assert np.abs(np.asarray(mid)[:, 8:] - np.asarray(clean)[:, 8:]).max() > 1e-4
    # Any function: scaling layer 0's FAM after block 0 by 2 equals streaming with that FAM edited by hand.
    scale = np.ones((cfg.num_layers, 2, 4), np.float32)
    scale[0, :, 0] = 2.0
    scaled, _ = model(tokens, fam_perturb=ops.Perturbation(lambda f, c: f * c[:, None, None], jnp.asarray(scale)))
    _, st = model(tokens[:, :4])
    fam = st.layers.fam.at[0].multiply(2.0)
    st = st.replace(layers=st.layers.replace(fam=fam, fam_k=st.layers.fam_k.at[0].set(
        jnp.asarray(_layer_fam_kv(model, fam[0], 0)[0])), fam_v=st.layers.fam_v.at[0].set(
        jnp.asarray(_layer_fam_kv(model, fam[0], 0)[1]))))
    rest, _ = model(tokens[:, 4:], st)
    np.testing.assert_allclose(np.asarray(scaled)[:, 4:], np.asarray(rest), atol=2e-5, rtol=2e-5)
    for bad in (tokens[:, :15], tokens[:, :8]):  # not whole blocks / not the perturbation's blocks
        with pytest.raises(ValueError, match="fam_perturb"):
            model(bad, fam_perturb=_noise(np.zeros(shape, np.float32)))


def _layer_fam_kv(model, fam, layer):
    """Keys/values of layer `layer`'s FAM [b, F, d] that compressed block 0 (offset 0)."""
    from flax import nnx

    graphdef, params = nnx.split(model.layers)
    one = nnx.merge(graphdef, jax.tree.map(lambda a: a[layer], params))
    return one.fam_key_value(fam, jnp.zeros((fam.shape[0],), jnp.int32), jnp.zeros((fam.shape[0],), jnp.int32))


def test_state_noise_keeps_row_norms_under_keep_norm():
    """With fam.keep_norm a noised row is rescaled to its pre-noise norm: noise turns rows, never grows them."""
    model, cfg, _ = make_model(seed=4, **BASE, fam_keep_norm=True)
    tokens = random_tokens(2, 16, cfg.vocab_size, seed=6)  # 4 whole blocks
    shape = (cfg.num_layers, 2, 4, cfg.num_fam, cfg.d_model)
    clean, state = model(tokens)
    eps = 0.5 * np.random.default_rng(1).normal(size=shape).astype(np.float32)
    perturb = ops.Perturbation(functools.partial(add_state_noise, keep_norm=True), jnp.asarray(eps))
    noisy, state1 = model(tokens, fam_perturb=perturb)
    norms = np.linalg.norm(np.asarray(state.layers.fam), axis=-1)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(state1.layers.fam), axis=-1), norms, rtol=1e-5)
    assert np.abs(np.asarray(state1.layers.fam) - np.asarray(state.layers.fam)).max() > 1e-2  # yet it moved
    assert np.abs(np.asarray(noisy) - np.asarray(clean)).max() > 1e-4
