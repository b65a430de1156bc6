"""The explicit recurrent state of a famjax model: fixed shapes, constant memory in the stream length.

meliad-style protocol, kept small: `model.init_state(batch)` starts a stream, `model(tokens, state)` reads a
chunk and returns the state after it, `segment_start` restarts rows. Users can inspect, save, reset, pass it.
"""
import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class LayerCache:
    """What every layer keeps between calls; each field has a leading [num_layers] axis.

    mem_k, mem_v: [L, b, M, S, KV, hd] keys (RoPE applied) and values of previous context: bswa/fam keep the
        last M = m complete blocks (S = B), oldest first; full attention keeps one linear cache (M = 1,
        S = max_len, slot p holds position p).
    cur_k, cur_v: [L, b, B, KV, hd] the current incomplete block, slot p % B (size 0 for full attention).
    fam: float32 [L, b, F, d] the FAM after the last complete block (or the initial FAM).
    fam_k, fam_v: [L, b, F, KV, hd] its keys/values, cached so decoding one token does not re-project F rows.
    """
    mem_k: jax.Array
    mem_v: jax.Array
    cur_k: jax.Array
    cur_v: jax.Array
    fam: jax.Array
    fam_k: jax.Array
    fam_v: jax.Array


@flax.struct.dataclass
class FamState:
    """Model state between calls.

    layers: LayerCache; pos: int32 [b] tokens seen since the row's segment start (the next absolute position);
    is_initial: bool [b] the row's FAM is still the learned initial FAM (no block completed yet).
    Static fields (part of the tree structure, so jit specialises on them):
    aligned: every row is known to sit at a block boundary (pos % B == 0), which saves the extra grid block
        an unknown phase needs; fresh: nothing has been read yet (lets full attention skip its empty cache).
    """
    layers: LayerCache
    pos: jax.Array
    is_initial: jax.Array
    aligned: bool = flax.struct.field(pytree_node=False, default=True)
    fresh: bool = flax.struct.field(pytree_node=False, default=True)

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    def nbytes(self) -> int:
        """Returns the bytes held by the state's arrays."""
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))


def reset_rows(state: FamState, segment_start) -> FamState:
    """Returns state with rows where segment_start [b] is True restarted (position 0, initial FAM flag).

    Cached keys of those rows become invisible because visibility is derived from `pos`; the caller
    re-installs the initial FAM for rows flagged initial.
    """
    segment_start = jnp.asarray(segment_start, bool)
    return state.replace(pos=jnp.where(segment_start, 0, state.pos),
                         is_initial=state.is_initial | segment_start)
