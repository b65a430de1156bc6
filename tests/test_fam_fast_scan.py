"""The FAM scan's fast paths against the plain scan: deferred weight gradients (ops.deferred_scan) and unroll."""
import collections
import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from model_utils import make_model, random_tokens

from famjax import ops


def _toy_step(w, o, carry, x):
    """A recurrence with two tapped weights, an integer input, a bool carry and a second output."""
    h, first = carry
    inp, index = x
    a = (h * o["scale"]).reshape(-1, h.shape[-1])
    y = ops.tap(w["a"], a, a @ w["a"].reshape(a.shape[-1], -1)).reshape(*h.shape[:2], -1)
    z = jnp.tanh(y + inp).reshape(-1, y.shape[-1])
    out = ops.tap(w["b"], z, z @ w["b"]).reshape(h.shape)
    new = jnp.where(first[:, None, None], out, h + out) * (1.0 + 0.1 * index[:, None, None])
    return (new, first & False), (new.sum(-1), index)


def _toy_inputs():
    k = jax.random.split(jax.random.key(0), 5)
    w = {"a": jax.random.normal(k[0], (8, 2, 3)), "b": 0.3 * jax.random.normal(k[1], (6, 8))}
    o = {"scale": jax.random.normal(k[2], (8,))}
    h0 = jax.random.normal(k[3], (2, 4, 8))
    xs = (jax.random.normal(k[4], (5, 2, 4, 6)), jnp.arange(10, dtype=jnp.int32).reshape(5, 2) % 3)
    return w, o, h0, xs


def _toy_loss(scan, w, o, h0, xs):
    (h, _), (ys, idx) = scan(w, o, (h0, jnp.array([True, False])), xs)
    return (h ** 2).sum() + (ys * jnp.arange(4.0)).sum() + idx.sum()


@pytest.mark.parametrize("unroll", [1, 2])
def test_deferred_scan_matches_lax_scan_values_and_gradients(unroll):
    args = _toy_inputs()

    def plain(w, o, c, xs):
        return jax.lax.scan(lambda c, x: _toy_step(w, o, c, x), c, xs)

    def deferred(w, o, c, xs):
        return ops.deferred_scan(_toy_step, w, o, c, xs, dtype=jnp.float32, unroll=unroll)
    want = jax.value_and_grad(functools.partial(_toy_loss, plain), argnums=(0, 1, 2, 3), allow_int=True)(*args)
    got = jax.jit(jax.value_and_grad(functools.partial(_toy_loss, deferred), argnums=(0, 1, 2, 3),
                                     allow_int=True))(*args)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for g, r in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        if g.dtype == jax.dtypes.float0:
            continue
        assert np.abs(np.asarray(r)).max() > 0
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * np.abs(np.asarray(r)).max())
    # Without differentiation it is the plain scan.
    out = ops.deferred_scan(_toy_step, args[0], args[1], (args[2], jnp.array([True, False])), args[3],
                            dtype=jnp.float32)
    np.testing.assert_allclose(out[0][0], plain(args[0], args[1], (args[2], jnp.array([True, False])),
                                                args[3])[0][0], rtol=1e-6)


def test_deferred_scan_refuses_a_weight_tapped_twice_per_step():
    w, o, h0, xs = _toy_inputs()

    def twice(w, o, c, x):
        c, y = _toy_step(w, o, c, x)
        a = c[0].reshape(-1, c[0].shape[-1])
        ops.tap(w["a"], a, a @ w["a"].reshape(a.shape[-1], -1))
        return c, y
    with pytest.raises(ValueError, match="'a' is used twice"):
        jax.grad(lambda w: ops.deferred_scan(twice, w, o, (h0, jnp.array([True, False])), xs,
                                             dtype=jnp.float32)[0][0].sum())(w)


def _loss(model, tokens, segment_start=None, perturb=None, dropout_key=None):
    logits, _ = model(tokens[:, :-1], segment_start=segment_start, fam_perturb=perturb, dropout_key=dropout_key)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def _grads(overrides, *, packed=False, perturb=False, dropout=False):
    """Loss gradients of every parameter, per setting of fam_deferred_grads, in float32 (4 whole blocks)."""
    out = []
    for deferred in (False, True):
        model, cfg, _ = make_model(seed=3, fam_deferred_grads=deferred, **overrides)
        tokens_len = 4 * cfg.block_size + 1
        if cfg.lora_rank:  # fresh adapters add zeros: give B values so the adapters matter
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
                if path[-1].endswith("lora_b"):
                    var[...] = 0.1 * jax.random.normal(jax.random.key(len(path[-1])), var[...].shape)
        tokens = jnp.asarray(random_tokens(2, tokens_len, cfg.vocab_size, seed=1))
        nb = (tokens_len - 1) // cfg.block_size
        kw = {}
        if packed:
            start = np.zeros((2, tokens_len - 1), bool)
            start[0, 2 * cfg.block_size] = True
            kw["segment_start"] = jnp.asarray(start)
        if perturb:
            scale = 1.0 + 0.1 * np.arange(cfg.num_layers * 2 * nb, dtype=np.float32).reshape(cfg.num_layers, 2, nb)
            kw["perturb"] = ops.Perturbation(lambda f, c: f * c[:, None, None], jnp.asarray(scale))
        if dropout:
            kw["dropout_key"] = jax.random.key(7)
        with mock.patch.object(ops, "deferred_scan", wraps=ops.deferred_scan) as used:
            out.append(nnx.jit(nnx.grad(_loss))(model, tokens, **kw))
        assert used.call_count == (cfg.num_layers if not cfg.scan_layers else 1) * deferred
        if deferred:  # every projection kernel is a deferred weight (the rest is differentiated per block)
            kernels = {n.split("['")[-1].split("']")[0] for n in used.call_args.args[1]}
            gate = {"gate"} if cfg.mlp_activation != "gelu" else set()
            assert kernels == {"q", "k", "v", "o", "up", "down"} | gate
    return [nnx.to_flat_state(g) for g in out]


CASES = {  # few cases, each many switches: every case compiles two gradient programs
    "m 2, remat, unroll 2": dict(memory_blocks=2, fam_unroll=2, remat="full"),
    "F>B, m 0, MQA, layers unrolled, gemma-style": dict(
        block_size=3, memory_blocks=0, fam_len=5, num_kv_heads=1, scan_layers=False, fam_unroll=3, post_norms=True,
        qkv_bias=True, attn_softcap=5.0, norm="layer", mlp_activation="gelu"),
    "ablations": dict(fam_keep_norm=True, fam_positions="zero", fam_zero_residual=False, fam_stop_gradient=True),
}


def _assert_same(plain, deferred):
    for (path, a), (_, b) in zip(plain, deferred):
        a, b = np.asarray(a[...]), np.asarray(b[...])
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(a).max()), err_msg=str(path))


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_deferred_gradients_equal_the_plain_scan(overrides):
    _assert_same(*_grads(overrides))


@pytest.mark.parametrize("kw", [dict(packed=True, perturb=True), dict(dropout=True)],
                         ids=["packed and perturbed", "lora dropout"])
def test_deferred_gradients_with_training_inputs(kw):
    overrides = dict(lora_rank=2, lora_dropout=0.2) if kw.get("dropout") else {}
    _assert_same(*_grads(overrides, **kw))


def test_deferred_scan_splits_the_gradient_of_weights_tapped_together():
    """ops.tap((w1, w2), x, x @ [w1 | w2]): one product, each weight gets its own columns of X^T dY, formed as one
    product per weight in the weight's own shape (not one product over the group split afterwards, nor a 2-D
    product reshaped: on TPU each would copy the float32 gradient once more); tapping a member of a group again
    in the same step is refused."""
    w, o, h0, xs = _toy_inputs()
    w = {**w, "c": 0.5 * jax.random.normal(jax.random.key(9), (8, 5))}

    def step(w, o, c, x, tap_a_again=False):
        h, first = c
        a = h.reshape(-1, h.shape[-1])
        both = ops.tap((w["a"], w["c"]), a, a @ jnp.concatenate([w["a"].reshape(8, -1), w["c"]], axis=1))
        if tap_a_again:
            ops.tap(w["a"], a, a @ w["a"].reshape(8, -1))
        new = jnp.tanh(both[:, :6].reshape(*h.shape[:2], 6) + x[0]).reshape(-1, 6)
        out = ops.tap(w["b"], new, new @ w["b"]).reshape(h.shape) + both[:, 6:].sum(-1).reshape(*h.shape[:2], 1)
        return (h + out, first), (out.sum(-1), x[1])

    def loss(scan, w):
        (h, _), (ys, _) = scan(w, o, (h0, jnp.array([True, False])), xs)
        return (h ** 2).sum() + (ys * jnp.arange(4.0)).sum()

    def plain(w, o, c, xs):
        return jax.lax.scan(lambda c, x: step(w, o, c, x), c, xs)
    want = jax.grad(functools.partial(loss, plain))(w)
    got = jax.jit(jax.grad(functools.partial(loss, functools.partial(ops.deferred_scan, step,
                                                                      dtype=jnp.float32))))(w)
    for name in w:
        assert np.abs(np.asarray(want[name])).max() > 0, name
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    jaxpr = jax.make_jaxpr(jax.grad(functools.partial(loss, functools.partial(ops.deferred_scan, step,
                                                                               dtype=jnp.float32))))(w).jaxpr
    shapes = _dot_shapes(jaxpr)
    assert {w["a"].shape, w["c"].shape} <= shapes, shapes  # [8, 2, 3] and [8, 5], each a product of its own
    twice = functools.partial(step, tap_a_again=True)
    with pytest.raises(ValueError, match="'.*a.*' is used twice"):
        jax.grad(functools.partial(loss, functools.partial(ops.deferred_scan, twice, dtype=jnp.float32)))(w)


def _all_eqns(jaxpr):
    """Every equation of a jaxpr and of every jaxpr nested in it."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_eqns(inner)


def _primitives(jaxpr) -> collections.Counter:
    """The primitives of a jaxpr and of every jaxpr nested in it, counted."""
    return collections.Counter(eqn.primitive.name for eqn in _all_eqns(jaxpr))


def _dot_shapes(jaxpr) -> set:
    """The output shapes of every dot_general in a jaxpr and the jaxprs nested in it."""
    return {tuple(eqn.outvars[0].aval.shape) for eqn in _all_eqns(jaxpr) if eqn.primitive.name == "dot_general"}


def test_deferred_scan_differentiates_only_what_carries_a_gradient():
    """A weight that is not differentiated (a frozen base weight under LoRA) gets no X^T dY, and a float input
    that carries no gradient (angles computed from integers) no cotangent: the gradient's program has no product
    of the frozen weight's shape and no cos (the derivative of the step's sin of that input); the gradients of
    what is differentiated equal the plain scan's."""
    k = jax.random.split(jax.random.key(1), 4)
    frozen, trained = jax.random.normal(k[0], (8, 6)), 0.3 * jax.random.normal(k[1], (6, 8))
    h0 = jax.random.normal(k[2], (2, 5, 8))
    angles = jnp.arange(3 * 2 * 5 * 6, dtype=jnp.float32).reshape(3, 2, 5, 6) / 7.0

    def step(w, o, h, x):
        a = h.reshape(-1, 8)
        y = ops.tap(w["a"], a, a @ w["a"]).reshape(2, 5, 6)
        z = (jnp.tanh(y) * jnp.sin(x)).reshape(-1, 6)
        out = ops.tap(w["b"], z, z @ w["b"]).reshape(h.shape)
        return h + out, out.sum(-1)

    def loss(scan, trained, h0):
        h, ys = scan({"a": frozen, "b": trained}, {}, h0, jax.lax.stop_gradient(angles))
        return (h ** 2).sum() + (ys * jnp.arange(5.0)).sum()

    def plain(w, o, c, xs):
        return jax.lax.scan(lambda c, x: step(w, o, c, x), c, xs)
    deferred = functools.partial(ops.deferred_scan, step, dtype=jnp.float32)
    want = jax.grad(functools.partial(loss, plain), argnums=(0, 1))(trained, h0)
    got = jax.jit(jax.grad(functools.partial(loss, deferred), argnums=(0, 1)))(trained, h0)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * np.abs(np.asarray(r)).max())
    jaxpr = jax.make_jaxpr(jax.grad(functools.partial(loss, deferred), argnums=(0, 1)))(trained, h0).jaxpr
    shapes = _dot_shapes(jaxpr)
    assert trained.shape in shapes and frozen.shape not in shapes, shapes  # dW of "b" only
    assert _primitives(jaxpr)["sin"] and not _primitives(jaxpr)["cos"]


@pytest.mark.parametrize("overrides", [{}, dict(fam_deferred_grads=False), dict(fam_remat="keep")],
                         ids=["deferred", "plain scan", "keep"])
def test_the_fam_loops_compute_no_rope_angles(overrides):
    """The RoPE angles of every block's FAM are computed once for all blocks before the loop (ops.fam_scan's
    index_inputs): the gradient's loops over the blocks (forward, remat's rerun, backward) contain no sin or cos,
    which the program has outside them."""
    model, cfg, _ = make_model(seed=3, remat="full", **overrides)
    tokens = jnp.asarray(random_tokens(2, 4 * cfg.block_size + 1, cfg.vocab_size, seed=1))
    grad, state = _loss_grad(model, tokens)
    jaxpr = jax.make_jaxpr(grad)(state).jaxpr
    loops = _loops_over(jaxpr, 4)
    assert loops
    inside = sum((_primitives(eqn.params["jaxpr"].jaxpr) for eqn in loops), collections.Counter())
    assert _primitives(jaxpr)["sin"] and not inside["sin"] and not inside["cos"], inside


def test_carried_fam_queries_equal_queries_projected_per_block():
    """In training the scan carries each block's FAM queries, projected with the previous FAM's keys and values in
    one matmul; the logits and gradients equal those of projecting them at the block (ops.fam_scan without
    qkv_fn), with LoRA dropout (whose masks depend on the site and block index), packed rows and a position
    offset."""
    model, cfg, _ = make_model(seed=3, lora_rank=2, lora_dropout=0.3, qkv_bias=True)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1].endswith("lora_b"):
            var[...] = 0.1 * jax.random.normal(jax.random.key(len(path[-1])), var[...].shape)
    tokens = jnp.asarray(random_tokens(2, 4 * cfg.block_size + 1, cfg.vocab_size, seed=1))
    start = np.zeros((2, 4 * cfg.block_size), bool)
    start[0, 2 * cfg.block_size] = True

    def loss(model):
        logits, _ = model(tokens[:, :-1], segment_start=jnp.asarray(start), dropout_key=jax.random.key(7),
                          position_offset=jnp.array([0, 5]))
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean(), logits

    real = ops.fam_scan
    outs = []
    for carried in (True, False):
        scan = real if carried else functools.partial(real, qkv_fn=None)
        with mock.patch.object(ops, "fam_scan", scan):
            outs.append(nnx.jit(nnx.grad(loss, has_aux=True))(model))
    (g1, logits1), (g0, logits0) = outs
    np.testing.assert_allclose(logits1, logits0, rtol=1e-5, atol=1e-5)
    _assert_same(nnx.to_flat_state(g0), nnx.to_flat_state(g1))


def _loops_over(jaxpr, length):
    """The scans of `length` steps in a jaxpr and every jaxpr nested in it."""
    return [eqn for eqn in _all_eqns(jaxpr) if eqn.primitive.name == "scan" and eqn.params["length"] == length]


def _loss_grad(model, tokens):
    """(gradient function of the loss in the model's state, that state)."""
    graphdef, state = nnx.split(model)
    return jax.grad(lambda state: _loss(nnx.merge(graphdef, state), tokens)), state


def test_fam_remat_keep_reads_the_loops_residuals_instead_of_running_it_again():
    """Under remat, fam_remat="keep" saves what the FAM loop stacks for its backward pass, and "offload" moves it
    to host memory and back: the gradient's program has one loop over the blocks fewer (no rerun; with remat
    "full" and with "dots"), only "offload" has transfers to host memory, and the gradients are those of
    "rerun"."""
    grads, loops, to_host = [], {}, {}
    for remat, mode in [(r, m) for r in ("full", "dots") for m in ("rerun", "keep", "offload")]:
        model, cfg, _ = make_model(seed=3, remat=remat, fam_remat=mode)
        tokens = jnp.asarray(random_tokens(2, 4 * cfg.block_size + 1, cfg.vocab_size, seed=1))
        grad, state = _loss_grad(model, tokens)
        jaxpr = jax.make_jaxpr(grad)(state).jaxpr
        loops[remat, mode] = len(_loops_over(jaxpr, 4))
        to_host[remat, mode] = sum("Host" in str(eqn.params["devices"]) for eqn in _all_eqns(jaxpr)
                                 if eqn.primitive.name == "device_put")
        if remat == "full":
            grads.append(nnx.to_flat_state(jax.jit(grad)(state)))
    for remat in ("full", "dots"):
        assert loops[remat, "keep"] == loops[remat, "offload"] == loops[remat, "rerun"] - 1, loops
        assert to_host[remat, "offload"] and not to_host[remat, "keep"] and not to_host[remat, "rerun"], to_host
    _assert_same(grads[0], grads[1])
    _assert_same(grads[0], grads[2])


def _weight_products(jaxpr) -> collections.Counter:
    """The weight products x [rows, in] @ w [in, out] of a jaxpr (nested ones included), counted by (rows, w's
    shape)."""
    found = collections.Counter()
    for eqn in _all_eqns(jaxpr):
        if eqn.primitive.name != "dot_general":
            continue
        x, w = (v.aval for v in eqn.invars)
        (x_axes, w_axes), _ = eqn.params["dimension_numbers"]
        if x.ndim == 2 and w.ndim == 2 and tuple(x_axes) == (1,) and tuple(w_axes) == (0,):
            found[x.shape[0], w.shape] += 1
    return found


@pytest.mark.parametrize("fam_remat", ["rerun", "keep", "offload"])
def test_remat_keeps_the_initial_fams_products(fam_remat):
    """The initial FAM's pass through each layer (F rows, whatever the batch) is saved by the layer's remat
    policy: the gradient's program under remat "full" computes each of its weight products (those of F rows;
    the FAM loop's have b * F) as often as without remat, i.e. once."""
    counts = {}
    for remat in ("none", "full"):
        model, cfg, _ = make_model(seed=3, remat=remat, fam_remat=fam_remat)
        tokens = jnp.asarray(random_tokens(2, 4 * cfg.block_size + 1, cfg.vocab_size, seed=1))
        grad, state = _loss_grad(model, tokens)
        found = _weight_products(jax.make_jaxpr(grad)(state).jaxpr)
        counts[remat] = {key: n for key, n in found.items() if key[0] == cfg.fam_len}
    assert sum(counts["none"].values()) == 7, counts  # q, k, v, out, gate, up, down
    assert counts["full"] == counts["none"], counts


def test_rows_that_start_from_the_initial_fam_share_its_keys():
    """The initial FAM's keys and values are projected once per layer (F rows) and rotated to each row's
    positions: a fresh call and a packed call (rows restarting inside the chunk) have no key or value product of
    b * F rows outside the FAM loop (the loop projects them with the queries, as one product); a fresh state the
    caller made (whose rows may hold a FAM that carries context: start_from_fam) projects its rows' FAMs. The
    logits are the same either way."""
    model, cfg, _ = make_model(seed=3)
    b, t = 2, 4 * cfg.block_size
    tokens = jnp.asarray(random_tokens(b, t, cfg.vocab_size, seed=1))
    start = np.zeros((b, t), bool)
    start[0, 2 * cfg.block_size] = True
    calls = {"fresh": lambda m: m(tokens)[0], "given state": lambda m: m(tokens, m.init_state(b))[0],
             "packed": lambda m: m(tokens, segment_start=jnp.asarray(start))[0],
             "packed, given state": lambda m: m(tokens, m.init_state(b), segment_start=jnp.asarray(start))[0]}
    graphdef, params = nnx.split(model)
    kv_shape = (cfg.d_model, cfg.num_kv_heads * cfg.head_dim)
    per_row = {}
    for name, call in calls.items():
        products = _weight_products(jax.make_jaxpr(lambda p, call=call: call(nnx.merge(graphdef, p)))(params).jaxpr)
        per_row[name] = products[b * cfg.fam_len, kv_shape]
    assert per_row == {"fresh": 0, "given state": 2, "packed": 0, "packed, given state": 2}, per_row
    np.testing.assert_allclose(calls["fresh"](model), calls["given state"](model), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(calls["packed"](model), calls["packed, given state"](model), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("overrides,nb,reset_block", [
    (dict(remat="full"), 4, 3),
    (dict(remat="full", fam_remat="keep", fam_deferred_grads=True, lora_rank=2, lora_dropout=0.3), 4, None),
    (dict(fam_deferred_grads=False, fam_unroll=2), 4, 2),
    ({}, 1, None),
], ids=["remat, reset in the last block", "keep, lora dropout", "plain scan, unroll 2", "one block"])
def test_state_grad_false_moves_the_last_fam_update_out_of_the_differentiated_loop(overrides, nb, reset_block):
    """model(..., state_grad=False) returns the state under stop_gradient; the loss's value, logits, gradients and
    the state's values are those of state_grad=True, and the FAM loops of the gradient's program cover nb - 1
    blocks (none covers nb; as many cover nb - 1 as cover nb with True): the last update, whose only use is the
    returned state, has no backward pass."""
    model, cfg, _ = make_model(seed=3, **overrides)
    t = nb * cfg.block_size
    tokens = jnp.asarray(random_tokens(2, t + 1, cfg.vocab_size, seed=1))
    start = np.zeros((2, t), bool)
    if reset_block is not None:
        start[1, reset_block * cfg.block_size] = True
    graphdef, params = nnx.split(model)

    def loss(params, state_grad, state_weight=0.0):
        logits, state = nnx.merge(graphdef, params)(
            tokens[:, :-1], segment_start=jnp.asarray(start), state_grad=state_grad,
            dropout_key=jax.random.key(7) if cfg.lora_dropout else None)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return ce + state_weight * jnp.sum(state.layers.fam ** 2), (logits, state)

    outs = {sg: jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)(params, sg) for sg in (True, False)}
    (g1, (logits1, state1)), (g0, (logits0, state0)) = outs[True], outs[False]
    np.testing.assert_allclose(logits0, logits1, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(state1), jax.tree.leaves(state0)):
        np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), rtol=1e-5, atol=1e-5)
    _assert_same(nnx.to_flat_state(g1), nnx.to_flat_state(g0))
    if reset_block == nb - 1:  # the state carries no gradient: a loss term on it changes nothing with False
        weighted = {sg: jax.jit(jax.grad(lambda p, sg: loss(p, sg, 1.0)[0]), static_argnums=1)(params, sg)
                    for sg in (True, False)}
        _assert_same(nnx.to_flat_state(g0), nnx.to_flat_state(weighted[False]))
        assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(weighted[True])))
    if nb > 1:
        def jaxpr(sg):
            return jax.make_jaxpr(jax.grad(lambda p: loss(p, sg)[0]))(params).jaxpr
        jaxprs = {sg: jaxpr(sg) for sg in (True, False)}
        loops = {sg: len(_loops_over(jaxprs[sg], nb)) for sg in (True, False)}
        assert loops[True] and not loops[False], loops
        # As many loops over the other blocks as before (with fam_remat="keep": no rerun of the loop, whose final
        # carry the last block's tokens now read).
        assert len(_loops_over(jaxprs[False], nb - 1)) == loops[True]
