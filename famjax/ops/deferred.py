"""A scan whose weight gradients are one matmul after the loop instead of a sum carried through it.

The FAM recurrence runs a whole layer (projections, FFN) on F rows per block, so each weight W is used once per
block on a few rows. Plain autodiff of that scan adds every block's x_t^T dy_t into a float32 copy of W carried
through the backward loop: per block and weight, W's size is read and written twice (plus the per-block
[in, out] product itself), although the block contributes only F rows. `deferred_scan` records each block's
x_t [rows, in] and dy_t [rows, out] instead and forms dW = X^T dY over all blocks at once, one matmul with a
float32 accumulator. It also casts the weights to the compute dtype once, outside the loop.

How dy_t is obtained: the forward runs the scan under jax.vjp with a zero "tap" array per step and weight, and
every product with a tracked weight goes through `tap`, which adds the tap to x @ W; the cotangent of the tap
is dy_t. The weights are constants of that scan, so lax.scan's partial evaluation keeps them out of the stacked
per-step residuals, and the backward (the vjp's reverse loop) reads each weight once per step, for dx. A step
function only has to compute its weight products with `tap` (famjax.model.modules.dense does).
"""
import contextlib
import contextvars
import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

_ACTIVE = contextvars.ContextVar("famjax_deferred_taps", default=None)


@dataclasses.dataclass
class _Recorder:
    """The weights tracked while tracing one step: id(weight array) -> name; frozen: the names of those that get
    no gradient (not differentiated); taps: name -> zero [rows, out] (None: only record the shapes); inputs: what
    each tracked product read, name -> x [rows, in]."""
    names: dict
    frozen: set
    taps: dict | None
    inputs: dict = dataclasses.field(default_factory=dict)
    shapes: dict = dataclasses.field(default_factory=dict)


def tap(weight, x, y):
    """Returns y = x @ weight (x [rows, in], y [rows, out], already computed), plus the weight's tap when traced
    inside deferred_scan's differentiated loop, where `weight` (the array given to the step, after the scan's
    one cast) is tracked. Outside that, y unchanged.

    weight may also be a tuple of tracked weights whose [in, out_i] matrices the product concatenated along the
    output axis (several projections of one input as one matmul); each gets its columns of the gradient."""
    group = weight if isinstance(weight, tuple) else (weight,)
    rec = _ACTIVE.get()
    names = [None if rec is None else rec.names.get(id(w)) for w in group]
    if all(n is None for n in names):
        return y
    if None in names:
        raise ValueError("deferred_scan: a product mixes tracked and untracked weights")
    if rec.frozen.issuperset(names):  # nothing to differentiate: no tap, nothing recorded
        return y
    for n in names:
        if any(n in key.split(_GROUP) for key in rec.shapes):
            raise ValueError(f"deferred_scan: weight {n!r} is used twice in one step (tap it once per step)")
    name = _GROUP.join(names)
    rec.shapes[name] = jax.ShapeDtypeStruct(y.shape, y.dtype)
    rec.inputs[name] = x
    return y if rec.taps is None else y + rec.taps[name].astype(y.dtype)


_GROUP = "+"  # joins the names of weights tapped together


@contextlib.contextmanager
def _recording(weights: dict, frozen: set, taps):
    rec = _Recorder({id(w): name for name, w in weights.items()}, frozen, taps)
    token = _ACTIVE.set(rec)
    try:
        yield rec
    finally:
        _ACTIVE.reset(token)


def _inexact(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.inexact)


def _is_primal(x) -> bool:
    return isinstance(x, CustomVJPPrimal)


def _floats(leaves, mask):
    """The leaves where mask is True (the differentiable ones)."""
    return [a for a, m in zip(leaves, mask) if m]


def _merge(floats, leaves, mask):
    """leaves with the differentiable ones (mask True) replaced by `floats`, in order."""
    it = iter(floats)
    return [next(it) if m else a for a, m in zip(leaves, mask)]


def _cast(weights: dict, dtype) -> dict:
    return {n: w.astype(dtype) for n, w in weights.items()}


def _named(tree, name, steps, keep):
    """tree with checkpoint_name(leaf, name) on every array made by the loop: a leaf stacked over the steps
    (leading axis `steps`) that is not one of `keep` (the scan's own inputs, forwarded as they are)."""
    kept = {id(a) for a in keep}

    def tag(a):
        stacked = getattr(a, "ndim", 0) > 0 and a.shape[0] == steps and id(a) not in kept
        return checkpoint_name(a, name) if stacked else a
    return jax.tree.map(tag, tree)


def _weight_gradient(x, dy, weight):
    """X^T dY in the weight's own shape and dtype: x [rows, in], dy [rows, out], weight [*in axes, *out axes].

    One product per weight, written in the weight's shape: a product over the concatenated outputs of several
    weights (tap's tuple) followed by a split, or a [in, out] product reshaped to [in, heads, head_dim], would
    each make the compiler copy the float32 gradient once more (on TPU, a relayout of every such gradient)."""
    sizes = list(weight.shape)
    split = next(i for i in range(len(sizes) + 1) if math.prod(sizes[:i]) == x.shape[-1])
    dw = jnp.tensordot(x.reshape(-1, *sizes[:split]), dy.reshape(-1, *sizes[split:]), axes=(0, 0),
                       preferred_element_type=jnp.float32)
    return dw.astype(weight.dtype)


def deferred_scan(step, weights: dict, others, carry, xs, *, dtype, unroll: int = 1, save_name: str | None = None):
    """Returns jax.lax.scan(lambda c, x: step(weights, others, c, x), carry, xs), with deferred weight gradients.

    step(weights, others, carry, x) -> (carry, y): one iteration; it must compute each product with a weight of
        `weights` once per step, through `tap(weight, x2d, x2d @ weight')`, where `weight` is the very array it
        received (weight' may be a cast or reshape of it);
    weights: dict name -> weight array [in, ...] (its gradient is X^T dY summed over all steps and rows);
    others: any pytree of further inputs of every step (norm scales, adapters, positions, PRNG keys);
    carry, xs: as for lax.scan (xs with the steps on axis 0);
    what is not differentiated gets a zero gradient and costs nothing in the backward loop: integer, bool and key
        leaves, and float inputs that carry no gradient (a frozen weight gets no X^T dY and no tap; per-step values
        computed from integers, such as RoPE angles, get no cotangent);
    dtype: the compute dtype the weights are cast to, once, before the loop;
    unroll: lax.scan's unroll (steps per loop iteration);
    save_name: None, or a name (jax.ad_checkpoint.checkpoint_name) given to the scan's outputs (the final carry
        and the per-step outputs) and to the per-step residuals its loop stacks for the backward pass (not the
        inputs it passes through, nor the weights): under jax.checkpoint with a policy that saves the name, the
        backward pass then reads them instead of running the loop again.
    The step must not close over traced values (jax.custom_vjp would not differentiate them): pass them in
    `others`, `carry` or `xs`.
    """
    @jax.custom_vjp
    def scan(weights, others, carry, xs):
        cast = _cast(weights, dtype)
        return jax.lax.scan(lambda c, x: step(cast, others, c, x), carry, xs, unroll=unroll)

    def forward(weights, others, carry, xs):
        # symbolic_zeros: every input leaf arrives as (value, perturbed); only perturbed leaves are differentiated
        # (frozen weights, angles or masks computed from integers, stop_gradient inputs are constants of the vjp).
        frozen = {n for n, w in weights.items() if not w.perturbed}
        masks = tuple([p.perturbed and _inexact(p.value) for p in jax.tree.leaves(t, is_leaf=_is_primal)]
                      for t in (carry, xs, others))
        weights, others, carry, xs = (jax.tree.map(lambda p: p.value, t, is_leaf=_is_primal)
                                      for t in (weights, others, carry, xs))
        cast = _cast(weights, dtype)
        first = jax.tree.map(lambda a: a[0], xs)
        with _recording(cast, frozen, None) as probe:  # the tap shapes of one step
            jax.eval_shape(lambda c, x: step(cast, others, c, x), carry, first)
        steps = jax.tree.leaves(xs)[0].shape[0]
        zero_taps = {n: jnp.zeros((steps, *s.shape), s.dtype) for n, s in probe.shapes.items()}
        c_leaves, c_def = jax.tree.flatten(carry)
        x_leaves, x_def = jax.tree.flatten(xs)
        o_leaves, o_def = jax.tree.flatten(others)
        c_float, x_float, o_float = masks

        def tapped(of, cf, xf, taps):
            """The scan as a function of the differentiable inputs and the per-step taps; the weights are
            constants here (loop-invariant residuals, which lax.scan's partial evaluation keeps unstacked)."""
            o = jax.tree.unflatten(o_def, _merge(of, o_leaves, o_float))
            c0 = jax.tree.unflatten(c_def, _merge(cf, c_leaves, c_float))
            x_all = jax.tree.unflatten(x_def, _merge(xf, x_leaves, x_float))

            def body(c, inp):
                x, t = inp
                with _recording(cast, frozen, t) as rec:
                    new, y = step(cast, o, c, x)
                return new, (y, rec.inputs)
            final, (ys, inputs) = jax.lax.scan(body, c0, (x_all, taps), unroll=unroll)
            return (final, ys), inputs
        out, vjp, inputs = jax.vjp(tapped, _floats(o_leaves, o_float), _floats(c_leaves, c_float),
                                   _floats(x_leaves, x_float), zero_taps, has_aux=True)
        if save_name is not None:
            final, ys = out
            vjp, inputs, ys = _named((vjp, inputs, ys), save_name, steps,
                                     keep=[*c_leaves, *x_leaves, *o_leaves, *cast.values()])
            out = (jax.tree.map(lambda a: checkpoint_name(a, save_name), final), ys)
        # The masks travel as the residuals' structure (an empty tuple: differentiated, None: not).
        marks = (*([() if m else None for m in mask] for mask in masks), {n: None if n in frozen else () for n in cast})
        return out, (weights, vjp, inputs, others, carry, xs, marks)

    def backward(res, cts):
        weights, vjp, inputs, others, carry, xs, marks = res
        masks = tuple([m is not None for m in mark] for mark in marks[:3])
        frozen = {n for n, m in marks[3].items() if m is None}
        cts = jax.tree.map(lambda c: jnp.zeros(c.shape, c.dtype) if isinstance(c, SymbolicZero) else c, cts,
                           is_leaf=lambda c: isinstance(c, SymbolicZero))
        d_of, d_cf, d_xf, d_taps = vjp(cts)
        c_float, x_float, o_float = masks
        d_carry, d_xs, d_others = (jax.tree.unflatten(treedef, _merge(d, [None] * len(leaves), mask))
                                   for d, (leaves, treedef), mask in
                                   ((d_cf, jax.tree.flatten(carry), c_float), (d_xf, jax.tree.flatten(xs), x_float),
                                    (d_of, jax.tree.flatten(others), o_float)))
        d_weights = dict.fromkeys(weights)  # None: a zero gradient (a frozen weight, or one the step does not use)
        for key, x in inputs.items():
            names = key.split(_GROUP)
            x = x.reshape(-1, x.shape[-1])
            dy = d_taps[key].reshape(-1, d_taps[key].shape[-1])
            sizes = [weights[n].size // x.shape[-1] for n in names]
            for name, part in zip(names, jnp.split(dy, list(itertools.accumulate(sizes))[:-1], axis=1)):
                if name not in frozen:  # a frozen weight tapped together with others: its columns go unused
                    d_weights[name] = _weight_gradient(x, part, weights[name])
        return d_weights, d_others, d_carry, d_xs

    scan.defvjp(forward, backward, symbolic_zeros=True)
    return scan(weights, others, carry, xs)
