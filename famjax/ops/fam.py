"""The FAM recurrence (docs/fam.md), written against the layer's sublayers passed as functions.

Only the F feedback rows are sequential: `fam_scan` carries them over the blocks of a chunk, while the
block tokens' projections, attention and FFN stay fully parallel in the caller.
"""
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from famjax.ops.attention import segment_attention


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Perturbation:
    """A training-time change of every new FAM, applied right after its update (not part of the model).

    fn(fam, data_j) -> fam: static; fam float32 [b, F, d] is S_t, data_j the slice of `data` for block j;
    data: a pytree whose leaves have the blocks on axis 1, [b, nb, ...] (the model's call takes them with
    the layers in front, [L, b, nb, ...]).
    """
    fn: Callable = dataclasses.field(metadata=dict(static=True))
    data: Any


def fam_positions(block_index, block_size: int, fam_len: int):
    """Returns int [..., F]: positions of the FAM that compressed absolute block `block_index` [...].

    They are the positions of that block's last F tokens, counting down from its last token when B < F; the
    initial FAM is the FAM of the virtual block -1, hence -F..-1.
    """
    last = (block_index + 1) * block_size - fam_len
    return last[..., None] + jnp.arange(fam_len)


def norm_ratio(target, x):
    """[..., 1]: the factor that gives every row of x (rows on the last axis) the L2 norm of target's row."""
    return (jnp.linalg.norm(target, axis=-1, keepdims=True) /
            jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6))


def _residual_factor(is_initial):
    """float32 [..., 1, 1] from bool [...]: the factor of the update's residual, 0 where the FAM read is the
    initial one (the paper's zero residual), else 1."""
    return jnp.where(is_initial, 0.0, 1.0)[..., None, None]


def fam_update(fam, is_initial, fam_k, fam_v, block_k, block_v, *, query_fn, out_fn, ffn_fn,
               return_probs: bool = False, zero_residual: bool = True, keep_norm: bool = False,
               scale: float | None = None, softcap: float = 0.0, attend: Callable | None = None, queries=None):
    """Returns S_t, float32 [b, F, d]: the FAM after reading one complete block.

    fam: S_{t-1} [b, F, d]; is_initial: bool [b] (S_{t-1} is the learned initial FAM: zero residual), or the
        residual's factor computed already, float32 [b, 1, 1] (0 where S_{t-1} is initial, else 1);
    fam_k, fam_v: keys/values of S_{t-1} [b, F, KV, hd]; block_k, block_v: the block's, in the attention's
        layout [b, 1, B, KV, hd] (as fam_scan passes them, see there);
    query_fn: fam -> queries [b, F, H, hd] (Norm1, query projection, RoPE at S_{t-1}'s positions);
    out_fn: heads [b, F, H, hd] -> [b, F, d]; ffn_fn: a [b, F, d] -> FFN(Norm2(a)) [b, F, d].
    FAM queries see all of S_{t-1} and the whole block (no causal mask), never the memory blocks.
    return_probs: also return the FAM queries' attention over [S_{t-1}, block], [b, H, F, F + B];
    zero_residual: False gives the first update the normal residual too (an ablation of the paper's choice);
    keep_norm: rescale every row of S_t to the L2 norm of the same row of S_{t-1}, so the FAM keeps the norm of
    the initial FAM forever (not in the paper: a parameter-free bound on the recurrence, docs/design.md);
    scale, softcap: the attention's score scale and softcap (segment_attention);
    attend: None, or a function (q, segments) -> heads computing segment_attention with that scale and softcap
    (e.g. a fused kernel); not used when return_probs;
    queries: None, or query_fn(fam) computed already [b, F, H, hd] (query_fn is then not called).
    """
    q = (query_fn(fam) if queries is None else queries)[:, None]
    segments = [(fam_k[:, None], fam_v[:, None], None), (block_k, block_v, None)]
    if return_probs or attend is None:
        heads, probs = segment_attention(q, segments, scale=scale, softcap=softcap, return_probs=True)
    else:
        heads, probs = attend(q, segments), None
    # A [b, 1, 1] factor rather than a select: the backward then keeps b numbers per block, not a [b, F, d] mask.
    factor = is_initial if jnp.issubdtype(is_initial.dtype, jnp.floating) else _residual_factor(is_initial)
    residual = fam * factor if zero_residual else fam
    a = out_fn(heads[:, 0]).astype(jnp.float32) + residual
    new = a + ffn_fn(a).astype(jnp.float32)
    if keep_norm:
        new = new * norm_ratio(fam, new)
    return (new, probs[:, 0]) if return_probs else new


def fam_scan(carry, blocks_k, blocks_v, completes, block_index, *, update_fn, kv_fn, all_complete: bool,
             params=None, resets=None, initial=None, collect: bool = False, stop_gradient: bool = False,
             perturb: Perturbation | None = None, unroll: int = 1, scan=None, query_fn=None, qkv_fn=None,
             final_grad: bool = True, index_inputs: Callable | None = None):
    """Runs the FAM over the blocks of a chunk; returns (final carry, what each block's tokens read, aux).

    carry: (fam [b, F, d] f32, is_initial bool [b], fam_k, fam_v [b, F, KV, hd]) before grid block 0;
    blocks_k, blocks_v: [b, nb, B, KV, hd]; completes: bool [b, nb] (the block's last token is in this chunk:
    only then is the FAM updated); block_index: int [b, nb] block indices counted from the segment start;
    update_fn(params, fam, is_initial, fam_k, fam_v, k, v, block_index, queries=None) -> S_t, or (S_t, probs)
    when collecting (k, v: the block's keys/values as the attention reads them, [b, 1, B, KV, hd]); is_initial:
    bool [b], or with all_complete the zero residual's factors float32 [b, 1, 1] (fam_update's is_initial);
    queries: the FAM queries of the block when the scan has them already (see qkv_fn);
    kv_fn(params, fam, block_index) -> keys/values of a FAM that compressed block `block_index`;
    query_fn, qkv_fn: None, or (with all_complete) query_fn(params, fam, block_index) -> the queries [b, F, H, hd]
    the FAM gives when block `block_index` reads it, and qkv_fn(params, fam, block_index) -> (the queries of
    the FAM that compressed block `block_index` for the next block, its keys, its values): then the carry also
    holds the next block's queries, so each block projects Q, K and V of one normed FAM together;
    params: the weights update_fn and kv_fn read, passed to them explicitly (a pytree, e.g. the layer's state),
    so that `scan` may treat them specially;
    all_complete: static promise that every block completes (training), which skips the per-block branch;
    resets: None or bool [b, nb], a new segment starts at the block: the carry restarts from `initial`,
    (fam, fam_k, fam_v) of the initial FAM, before the block is read (packed rows);
    collect: also return per-block diagnostics (requires all_complete): aux["fam_probs"], FAM attention
    [b, nb, H, F, F + B], and aux["fam_norm"], the norm of every FAM row after the block [b, nb, F];
    stop_gradient: the FAM passed on to the next block carries no gradient back (the paper's ablation: the
    memory then learns nothing beyond one block);
    perturb: None or a Perturbation (requires all_complete): each S_t becomes perturb.fn(S_t, data_j) before
    it is passed on (training only);
    unroll: blocks per iteration of the loop (jax.lax.scan's unroll);
    scan: None (jax.lax.scan) or a function scan(step, params, carry, xs) -> (carry, ys) computing
    jax.lax.scan(lambda c, x: step(params, c, x), carry, xs), e.g. famjax.ops.deferred_scan with params split
    into weights and the rest (step closes over nothing that is differentiated: params holds `initial` too).
    final_grad: False (with all_complete) promises that nothing differentiates the carry after the chunk (it is
    returned under stop_gradient): the last block's update, whose only use is that carry, then runs after the
    loop without gradients, so the loop and its backward pass cover nb - 1 blocks (training: the loss reads
    the blocks' tokens, never the state after them).
    index_inputs: None, or a function from int block indices [...] to what update_fn, kv_fn, query_fn and qkv_fn
    read of them (a pytree of arrays [..., ...], e.g. the index and its RoPE angles), which those functions then
    receive in place of the index. It is applied to all blocks' indices at once before the loop, so the loop
    computes nothing from integers alone (under remat such work becomes a loop of its own).
    Returns the carry after the chunk, (fam_k, fam_v) [b, nb, F, KV, hd]: what the tokens of block j read,
    and aux: what collect asked for ({} otherwise).
    """
    if (collect or perturb is not None) and not all_complete:
        raise ValueError("FAM diagnostics and FAM perturbations need a chunk of whole blocks from an aligned "
                         "state")
    carry_queries = all_complete and qkv_fn is not None

    def update(params, state, k, v, done, index, data=None, factor=None):
        fam, is_initial, fk, fv = state[:4]
        is_initial = is_initial if factor is None else factor
        new = update_fn(params, fam, is_initial, fk, fv, k, v, index, queries=state[4] if carry_queries else None)
        new, probs = new if collect else (new, None)
        if perturb is not None:
            new = perturb.fn(new, data)
        if stop_gradient:
            new = jax.lax.stop_gradient(new)
        nq, nk, nv = qkv_fn(params, new, index) if carry_queries else (None, *kv_fn(params, new, index))
        if all_complete:  # every row's block completes: no per-row select (nor its mask kept for the backward)
            return (new, None, nk, nv, *([nq] if carry_queries else [])), probs
        sel, sel4 = done[:, None, None], done[:, None, None, None]
        state = (jnp.where(sel, new, fam), is_initial & ~done, jnp.where(sel4, nk, fk), jnp.where(sel4, nv, fv))
        return state, probs

    def restart(initial, state, reset):
        if reset is None:
            return state
        fam0, k0, v0 = initial[:3]
        r3, r4 = reset[:, None, None], reset[:, None, None, None]
        return (jnp.where(r3, fam0, state[0]), None if state[1] is None else state[1] | reset,
                jnp.where(r4, k0, state[2]), jnp.where(r4, v0, state[3]),
                *([jnp.where(r4, initial[3], state[4])] if carry_queries else []))

    def step(both, state, xs):
        params, initial = both
        k, v, done, index, reset, data, factor = xs
        state = restart(initial, state, reset)
        read = state[2:4]
        if all_complete:
            state, probs = update(params, state, k, v, done, index, data, factor)
        else:
            # Decode and small chunks rarely complete a block: skip the F-row layer unless one does.
            state = jax.lax.cond(jnp.any(done), lambda *a: update(params, *a)[0], lambda s, *_: s,
                                 state, k, v, done, index)
        aux = dict(fam_probs=probs, fam_norm=jnp.linalg.norm(state[0], axis=-1)) if collect else {}
        return state, (read, aux)

    data = None if perturb is None else perturb.data
    carry = tuple(carry)
    factor = None
    if all_complete:
        # Which blocks read an initial FAM (the chunk's first, if the state is initial; every reset block) as the
        # zero residual's factors [b, nb, 1, 1], before the loop: the loop then computes nothing from integers
        # (under remat that would be a loop of its own) and carries no is_initial (it is all False after a block).
        initial_now = carry[1][:, None] & (jnp.arange(blocks_k.shape[1]) == 0)
        initial_now = initial_now if resets is None else initial_now | resets
        factor = _residual_factor(initial_now)
        carry = (carry[0], None, *carry[2:])
    expand = (lambda index: index) if index_inputs is None else index_inputs
    at = expand(block_index)
    if carry_queries:  # the first block's queries; a reset block (block index 0) reads the initial FAM's
        carry += (query_fn(params, carry[0], jax.tree.map(lambda a: a[:, 0], at)),)
        if initial is not None:
            initial = (*initial, query_fn(params, initial[0], expand(jnp.zeros_like(block_index[:, 0]))))
    # Blocks in front for the scan; each block's keys/values already [b, 1, B, KV, hd], the layout the attention
    # reads, so that what autodiff keeps of them for the backward is the scan's own input slice (which lax.scan
    # forwards) instead of a per-block reshaped copy stacked into a residual array of the blocks' size.
    def blocks_first(blocks: slice):
        return (*(jnp.moveaxis(a[:, blocks], 1, 0)[:, :, None] for a in (blocks_k, blocks_v)),
                *jax.tree.map(lambda a: jnp.moveaxis(a[:, blocks], 1, 0), (completes, at, resets, data, factor)))
    nb = blocks_k.shape[1]
    if all_complete and not final_grad:  # the last block's update leaves the loop (see final_grad)
        xs, last = blocks_first(slice(0, nb - 1)), jax.tree.map(lambda a: a[0], blocks_first(slice(nb - 1, nb)))
    else:
        xs, last = blocks_first(slice(None)), None
    ys = None
    if last is None or nb > 1:
        if scan is None:
            carry, ys = jax.lax.scan(functools.partial(step, (params, initial)), carry, xs, unroll=unroll)
        else:
            carry, ys = scan(step, (params, initial), carry, xs)
    if last is not None:
        k, v, done, index, reset, data, factor = last
        carry = restart(initial, carry, reset)  # the last block's tokens read this carry, with its gradient
        new, (_, aux) = step(*_stop_gradient(((params, initial), carry, (k, v, done, index, None, data, factor))))
        tail = jax.tree.map(lambda a: a[None], ((carry[2], carry[3]), aux))
        ys = tail if ys is None else jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys, tail)
        carry = new
    (fk, fv), aux = ys
    read = (jnp.moveaxis(fk, 0, 1), jnp.moveaxis(fv, 0, 1))
    if carry[1] is None:  # all_complete: no block leaves its row's FAM initial
        carry = (carry[0], jnp.zeros(blocks_k.shape[:1], bool), *carry[2:])
    return carry[:4], read, jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), aux)


def _stop_gradient(tree):
    """jax.lax.stop_gradient on the floating-point leaves of tree (PRNG keys and integers pass unchanged)."""
    return jax.tree.map(lambda a: jax.lax.stop_gradient(a) if jnp.issubdtype(a.dtype, jnp.inexact) else a, tree)
