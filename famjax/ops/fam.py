"""The FAM recurrence (spec sections 3-5), written against the layer's sublayers passed as functions.

Only the F feedback rows are sequential: `fam_scan` carries them over the blocks of a chunk, while the
block tokens' projections, attention and FFN stay fully parallel in the caller (spec section 8).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from famjax.ops.attention import segment_attention


class FamNoise(NamedTuple):
    """Training-time perturbations of the FAM after each block update (not in the paper; docs/design.md).

    eps: None or float [..., b, nb, F, d]: every FAM row gets eps x its RMS added (state noise, fam.noise);
    stretch: None or float [..., b, nb] >= 0: a non-initial update S_t = S_{t-1} + u becomes
        S_{t-1} + (1 + stretch) u (the extra part stop-gradient), so a few blocks give a FAM the growth of many
        (age augmentation, fam.stretch);
    age: None or float [..., b, nb] >= 0: a non-initial update S_t = S_{t-1} + u becomes S_{t-1} + u + age x
        mean(u) (stop-gradient), the mean over the rows not written from the initial FAM: every row moves on along
        the part of the update all rows share, the drift an old FAM shows, while its own content is kept
        (shared-drift extrapolation, fam.age);
    read_age: None or float [..., b, nb] >= 0: the recurrence is left alone, but the tokens of the next block
        read S_t + read_age x mean(u) (u and the mean as for age) instead of S_t: only the reader meets FAMs
        moved on along the shared drift, so nothing of it feeds back into later updates (read-side
        extrapolation, fam.read_age);
    read_stretch: None or float [..., b, nb] >= 0: likewise read-only, along the row's own update: the next
        block's tokens read S_t + read_stretch x u (stop-gradient), S_t extrapolated as if the row went on
        changing as it just did (fam.read_stretch);
    inflate: None or float [..., b, nb] >= 0: after a non-initial update the row becomes (1 + inflate) x S_t (the
        extra part stop-gradient): the FAM gets the size of an older one while its direction, all that a
        pre-norm reader sees, is unchanged, so the next writes meet the small relative weight they have in an
        old FAM (fam.inflate). Leading axes [...] are the caller's (the layer stack's).
    """
    eps: jax.Array | None = None
    stretch: jax.Array | None = None
    age: jax.Array | None = None
    read_age: jax.Array | None = None
    read_stretch: jax.Array | None = None
    inflate: jax.Array | None = None


def _shared_update(new, fam, is_initial):
    """float32 [F, d]: the update S_t - S_{t-1} (stop-gradient) averaged over the rows [b] whose S_{t-1} is not
    the initial FAM (0 when there are none): the part of the update every row shares."""
    moved = jnp.where(is_initial[:, None, None], 0.0, jax.lax.stop_gradient(new - fam))
    return jnp.sum(moved, 0) / jnp.maximum(jnp.sum(~is_initial), 1)


def fam_positions(block_index, block_size: int, fam_len: int):
    """Returns int [..., F]: positions of the FAM that compressed absolute block `block_index` [...].

    They are the positions of that block's last F tokens, counting down from its last token when B < F; the
    initial FAM is the FAM of the virtual block -1, hence -F..-1.
    """
    last = (block_index + 1) * block_size - fam_len
    return last[..., None] + jnp.arange(fam_len)


def fam_update(fam, is_initial, fam_k, fam_v, block_k, block_v, *, query_fn, out_fn, ffn_fn,
               return_probs: bool = False, zero_residual: bool = True, keep_norm: bool = False,
               null_slot: bool = False):
    """Returns S_t, float32 [b, F, d]: the FAM after reading one complete block.

    fam: S_{t-1} [b, F, d]; is_initial: bool [b] (S_{t-1} is the learned initial FAM: zero residual);
    fam_k, fam_v: keys/values of S_{t-1} [b, F, KV, hd]; block_k, block_v: the block's [b, B, KV, hd];
    query_fn: fam -> queries [b, F, H, hd] (Norm1, query projection, RoPE at S_{t-1}'s positions);
    out_fn: heads [b, F, H, hd] -> [b, F, d]; ffn_fn: a [b, F, d] -> FFN(Norm2(a)) [b, F, d].
    FAM queries see all of S_{t-1} and the whole block (no causal mask), never the memory blocks.
    return_probs: also return the FAM queries' attention over [S_{t-1}, block], [b, H, F, F + B];
    zero_residual: False gives the first update the normal residual too (an ablation of the spec's choice);
    keep_norm: rescale every row of S_t to the L2 norm of the same row of S_{t-1}, so the FAM keeps the norm of
    the initial FAM forever (not in the paper: a parameter-free bound on the recurrence, see docs/design.md);
    null_slot: one more key/value, both zero (logit 0, reads nothing), after the block, so a FAM query can leave
    its row almost unchanged by a block (not in the paper; probs then have F + B + 1 columns).
    """
    q = query_fn(fam)[:, None]
    segments = [(fam_k[:, None], fam_v[:, None], None), (block_k[:, None], block_v[:, None], None)]
    if null_slot:
        zero = jnp.zeros(fam_k.shape[:1] + (1, 1) + fam_k.shape[2:], fam_k.dtype)
        segments.append((zero, zero, None))
    heads, probs = segment_attention(q, segments, return_probs=True)
    residual = jnp.where(is_initial[:, None, None], 0.0, fam) if zero_residual else fam
    a = out_fn(heads[:, 0]).astype(jnp.float32) + residual
    new = a + ffn_fn(a).astype(jnp.float32)
    if keep_norm:
        new = new * _norm_ratio(fam, new)
    return (new, probs[:, 0]) if return_probs else new


def _norm_ratio(target, x):
    """[..., 1]: the factor that gives every row of x (rows on the last axis) the L2 norm of target's row."""
    return (jnp.linalg.norm(target, axis=-1, keepdims=True) /
            jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6))


def fam_scan(carry, blocks_k, blocks_v, completes, block_index, *, update_fn, kv_fn, all_complete: bool,
             resets=None, initial=None, collect: bool = False, stop_gradient: bool = False, noise=None,
             keep_norm: bool = False, measure_change: bool = False):
    """Runs the FAM over the blocks of a chunk; returns (final carry, what each block's tokens read, aux).

    carry: (fam [b, F, d] f32, is_initial bool [b], fam_k, fam_v [b, F, KV, hd]) before grid block 0;
    blocks_k, blocks_v: [b, nb, B, KV, hd]; completes: bool [b, nb] (the block's last token is in this chunk:
    only then is the FAM updated); block_index: int [b, nb] block indices counted from the segment start;
    update_fn(fam, is_initial, fam_k, fam_v, k, v, block_index) -> S_t, or (S_t, probs) when collecting;
    kv_fn(fam, block_index) -> keys/values of a FAM that compressed block `block_index`;
    all_complete: static promise that every block completes (training), which skips the per-block branch;
    resets: None or bool [b, nb], a new segment starts at the block: the carry restarts from `initial`,
    (fam, fam_k, fam_v) of the initial FAM, before the block is read (packed rows);
    collect: return per-block diagnostics (requires all_complete): aux["fam_probs"], FAM attention
    [b, nb, H, F, F + B] (one more column with a null slot), and aux["fam_norm"], the norm of every FAM row
    after the block [b, nb, F];
    measure_change: return aux["fam_change"] float32 [b, nb] (requires all_complete): the relative squared
    change |S_t - S_{t-1}|^2 / |S_{t-1}|^2 of each block's update, averaged over the F rows (the denominator
    stop-gradient; before stretch and noise), 0 for the write from the initial FAM (fam.change_penalty);
    stop_gradient: the FAM passed on to the next block carries no gradient back (the paper's ablation: the
    memory then learns nothing beyond one block);
    noise: None, float [b, nb, F, d] (= FamNoise(eps=noise)) or a FamNoise with eps [b, nb, F, d], stretch,
    age, read_age, read_stretch and inflate [b, nb] (requires all_complete): after block j's update it is
    first stretched, aged and inflated (FamNoise), then every FAM row gets eps[:, j] x its RMS (stop-gradient)
    added, before it is passed on; with read_age / read_stretch the next block's tokens read that FAM moved on
    along the shared / the row's own update (training-time perturbations);
    keep_norm: the FAM update keeps row norms (fam_update's keep_norm): a noised row is rescaled to the norm it
    had before the noise, so noise turns rows and never grows them (stretch, age and inflate need keep_norm off).
    Returns carry after the chunk, (fam_k, fam_v) [b, nb, F, KV, hd]: what the tokens of block j read, and aux:
    the dict of what collect / measure_change asked for ({} when neither).
    """
    if (collect or measure_change or noise is not None) and not all_complete:
        raise ValueError("FAM diagnostics, FAM change and FAM noise need a chunk of whole blocks from an aligned "
                         "state")
    noise = noise if isinstance(noise, FamNoise) or noise is None else FamNoise(eps=noise)
    if noise is not None and any(x is not None for x in (noise.stretch, noise.age, noise.inflate)) and keep_norm:
        raise ValueError("a FAM stretch, age or inflate needs keep_norm off (keep_norm would undo it)")
    # With read_age / read_stretch the scan also carries what the next block's tokens read (the moved fam_k, fam_v).
    split_read = noise is not None and (noise.read_age is not None or noise.read_stretch is not None)

    def update(state, k, v, done, index, eps=None, stretch=None, age=None, read_age=None, read_stretch=None,
               inflate=None):
        fam, is_initial, fk, fv = state[:4]
        new = update_fn(fam, is_initial, fk, fv, k, v, index)
        new, probs = new if collect else (new, None)

        def per_row(factor):  # [b] -> [b, 1, 1], 0 for rows written from the initial FAM (never moved)
            return jnp.where(is_initial, 0.0, factor.astype(jnp.float32))[:, None, None]

        change = None
        if measure_change:
            rel = jnp.sum(jnp.square(new - fam), -1) / jax.lax.stop_gradient(jnp.sum(jnp.square(fam), -1) + 1e-6)
            change = jnp.where(is_initial, 0.0, jnp.mean(rel, -1))
        if stretch is not None:  # the first update (from the initial FAM) is the write: never stretched
            new = new + per_row(stretch) * jax.lax.stop_gradient(new - fam)
        # the rows' shared update (after the stretch), over the rows not written from the initial FAM
        shared = _shared_update(new, fam, is_initial) if (age is not None or read_age is not None) else None
        if age is not None:
            new = new + per_row(age) * shared
        if inflate is not None:
            new = new + per_row(inflate) * jax.lax.stop_gradient(new)
        if eps is not None:
            rms = jax.lax.stop_gradient(jnp.sqrt(jnp.mean(jnp.square(new), axis=-1, keepdims=True)))
            noised = new + eps.astype(new.dtype) * rms
            if keep_norm:
                noised = noised * jax.lax.stop_gradient(_norm_ratio(new, noised))
            new = noised
        if stop_gradient:
            new = jax.lax.stop_gradient(new)
        nk, nv = kv_fn(new, index)
        sel = done[:, None, None]
        sel4 = done[:, None, None, None]
        state = (jnp.where(sel, new, fam), is_initial & ~done, jnp.where(sel4, nk, fk), jnp.where(sel4, nv, fv))
        if split_read:  # all_complete: every row's block completes
            moved = new
            if read_age is not None:
                moved = moved + per_row(read_age) * shared
            if read_stretch is not None:
                moved = moved + per_row(read_stretch) * jax.lax.stop_gradient(new - fam)
            state = state + kv_fn(moved, index)
        return state, (probs, change)

    def step(state, xs):
        k, v, done, index, reset, *perturb = xs
        if reset is not None:
            fam0, k0, v0 = initial
            r3, r4 = reset[:, None, None], reset[:, None, None, None]
            state = (jnp.where(r3, fam0, state[0]), state[1] | reset,
                     *(jnp.where(r4, kv0, kv) for kv0, kv in zip((k0, v0) * 2, state[2:])))
        read = state[4:] if split_read else state[2:]
        probs = change = None
        if all_complete:
            state, (probs, change) = update(state, k, v, done, index, *perturb)
        else:
            # Decode and small chunks rarely complete a block: skip the F-row layer unless one does.
            state = jax.lax.cond(jnp.any(done), lambda *a: update(*a)[0], lambda s, *_: s,
                                 state, k, v, done, index)
        aux = {}
        if collect:
            aux.update(fam_probs=probs, fam_norm=jnp.linalg.norm(state[0], axis=-1))
        if measure_change:
            aux["fam_change"] = change
        return state, (read, aux)

    xs = tuple(None if a is None else jnp.moveaxis(a, 1, 0)
               for a in (blocks_k, blocks_v, completes, block_index, resets, *(noise or FamNoise())))
    carry = tuple(carry) + tuple(carry[2:]) if split_read else carry
    carry, ((fk, fv), aux) = jax.lax.scan(step, carry, xs)
    read = (jnp.moveaxis(fk, 0, 1), jnp.moveaxis(fv, 0, 1))
    return carry[:4], read, jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), aux)
