"""The FAM recurrence (spec sections 3-5), written against the layer's sublayers passed as functions.

Only the F feedback rows are sequential: `fam_scan` carries them over the blocks of a chunk, while the
block tokens' projections, attention and FFN stay fully parallel in the caller (spec section 8).
"""
import jax
import jax.numpy as jnp

from famjax.ops.attention import segment_attention


def fam_positions(block_index, block_size: int, fam_len: int):
    """Returns int [..., F]: positions of the FAM that compressed absolute block `block_index` [...].

    They are the positions of that block's last F tokens, counting down from its last token when B < F; the
    initial FAM is the FAM of the virtual block -1, hence -F..-1.
    """
    last = (block_index + 1) * block_size - fam_len
    return last[..., None] + jnp.arange(fam_len)


def fam_update(fam, is_initial, fam_k, fam_v, block_k, block_v, *, query_fn, out_fn, ffn_fn):
    """Returns S_t, float32 [b, F, d]: the FAM after reading one complete block.

    fam: S_{t-1} [b, F, d]; is_initial: bool [b] (S_{t-1} is the learned initial FAM: zero residual);
    fam_k, fam_v: keys/values of S_{t-1} [b, F, KV, hd]; block_k, block_v: the block's [b, B, KV, hd];
    query_fn: fam -> queries [b, F, H, hd] (Norm1, query projection, RoPE at S_{t-1}'s positions);
    out_fn: heads [b, F, H, hd] -> [b, F, d]; ffn_fn: a [b, F, d] -> FFN(Norm2(a)) [b, F, d].
    FAM queries see all of S_{t-1} and the whole block (no causal mask), never the memory blocks.
    """
    q = query_fn(fam)[:, None]
    heads = segment_attention(q, [(fam_k[:, None], fam_v[:, None], None),
                                  (block_k[:, None], block_v[:, None], None)])[:, 0]
    residual = jnp.where(is_initial[:, None, None], 0.0, fam)
    a = out_fn(heads).astype(jnp.float32) + residual
    return a + ffn_fn(a).astype(jnp.float32)


def fam_scan(carry, blocks_k, blocks_v, completes, block_index, *, update_fn, kv_fn, all_complete: bool):
    """Runs the FAM over the blocks of a chunk; returns (final carry, FAM keys/values each block read).

    carry: (fam [b, F, d] f32, is_initial bool [b], fam_k, fam_v [b, F, KV, hd]) before grid block 0;
    blocks_k, blocks_v: [b, nb, B, KV, hd]; completes: bool [b, nb] (the block's last token is in this chunk:
    only then is the FAM updated); block_index: int [b, nb] absolute block indices;
    update_fn(fam, is_initial, fam_k, fam_v, k, v, block_index) -> S_t (see fam_update);
    kv_fn(fam, block_index) -> keys/values of a FAM that compressed block `block_index`;
    all_complete: static promise that every block completes (training), which skips the per-block branch.
    Returns carry after the chunk and (fam_k, fam_v) [b, nb, F, KV, hd]: what the tokens of block j read.
    """
    def update(state, k, v, done, index):
        fam, is_initial, fk, fv = state
        new = update_fn(fam, is_initial, fk, fv, k, v, index)
        nk, nv = kv_fn(new, index)
        sel = done[:, None, None]
        sel4 = done[:, None, None, None]
        return (jnp.where(sel, new, fam), is_initial & ~done,
                jnp.where(sel4, nk, fk), jnp.where(sel4, nv, fv))

    def step(state, xs):
        k, v, done, index = xs
        read = state[2:]
        if all_complete:
            state = update(state, k, v, done, index)
        else:
            # Decode and small chunks rarely complete a block: skip the F-row layer unless one does.
            state = jax.lax.cond(jnp.any(done), update, lambda s, *_: s, state, k, v, done, index)
        return state, read

    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (blocks_k, blocks_v, completes, block_index))
    carry, (fk, fv) = jax.lax.scan(step, carry, xs)
    return carry, (jnp.moveaxis(fk, 0, 1), jnp.moveaxis(fv, 0, 1))
