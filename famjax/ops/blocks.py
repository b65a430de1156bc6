"""Block windowing as pure functions: the block-aligned grid, memory blocks and their validity.

A chunk of T new tokens is laid on a grid of nb blocks of B slots. Row b's first new token goes to slot
`phase[b] = pos[b] % B`, so grid blocks coincide with the row's absolute blocks; slots before it hold the
already-seen tokens of the current block (their keys/values come from the state), slots after the last new
token are padding. The queries of those slots are dummies whose outputs are dropped.
"""
import jax
import jax.numpy as jnp


def num_grid_blocks(num_tokens: int, block_size: int, aligned: bool) -> int:
    """Returns the static number of grid blocks for a chunk (one more when the phase is unknown)."""
    slack = 0 if aligned else block_size - 1
    return max(1, -(-(num_tokens + slack) // block_size))


def to_grid(x, phase, num_blocks: int, block_size: int):
    """Returns x placed on the grid: [b, num_blocks * block_size, ...], zeros outside the chunk.

    x: [b, T, ...]; phase: int [b] (slot of x[:, 0]) or the Python int 0 (statically aligned).
    """
    size = num_blocks * block_size
    t = x.shape[1]
    if isinstance(phase, int) and phase == 0:
        pad = [(0, 0)] * x.ndim
        pad[1] = (0, size - t)
        return jnp.pad(x, pad)
    src = jnp.arange(size)[None, :] - phase[:, None]  # [b, size]
    valid = (src >= 0) & (src < t)
    idx = jnp.clip(src, 0, t - 1).reshape(src.shape + (1,) * (x.ndim - 2))
    out = jnp.take_along_axis(x, idx, axis=1)
    return jnp.where(valid.reshape(idx.shape), out, jnp.zeros((), x.dtype))


def from_grid(xg, phase, num_tokens: int):
    """Returns the chunk's slots back from the grid, [b, num_tokens, ...]; inverse of to_grid."""
    if isinstance(phase, int) and phase == 0:
        return xg[:, :num_tokens]
    idx = phase[:, None] + jnp.arange(num_tokens)[None, :]
    idx = idx.reshape(idx.shape + (1,) * (xg.ndim - 2))
    return jnp.take_along_axis(xg, idx, axis=1)


def split_blocks(x, block_size: int):
    """Returns [b, n * block_size, ...] reshaped to [b, n, block_size, ...]."""
    return x.reshape(x.shape[0], x.shape[1] // block_size, block_size, *x.shape[2:])


def memory_windows(ext, num_memory: int, num_blocks: int):
    """Returns the memory blocks of every grid block, oldest first: num_memory arrays [b, nb, B, ...].

    ext: [b, num_memory + nb, B, ...], the state's memory blocks followed by the grid blocks, so window i
    of grid block j is ext block j + i, i.e. absolute block (j - num_memory + i). Slices, no copies of keys.
    """
    return [ext[:, i:i + num_blocks] for i in range(num_memory)]


def memory_visible(first_block, segment_begin, num_memory: int):
    """Returns bool [b, nb, m]: memory block i of grid block j is visible to it.

    Memory block i of grid block j is absolute block (first_block + j - m + i); it is visible when it exists
    in the same segment, i.e. is not before segment_begin [b, nb] (the absolute block where grid block j's
    segment starts; 0 for a row without packed segments). first_block: int [b], absolute index of grid block 0.
    """
    nb = segment_begin.shape[1]
    j = jnp.arange(nb)[None, :, None]
    i = jnp.arange(num_memory)[None, None, :]
    return first_block[:, None, None] + j - num_memory + i >= segment_begin[:, :, None]


def segment_begin_blocks(first_block, resets):
    """Returns int [b, nb]: absolute block index where each grid block's segment begins (0 without resets).

    resets: bool [b, nb] a new segment starts at the grid block (block-aligned packed examples).
    """
    j = jnp.arange(resets.shape[1])[None, :]
    return jax.lax.cummax(jnp.where(resets, first_block[:, None] + j, 0), axis=1)


def take_blocks(ext, start, count: int):
    """Returns ext[b, start[b]:start[b] + count] for every row b: [b, count, ...]."""
    def one(row, s):
        return jax.lax.dynamic_slice_in_dim(row, s, count, axis=0)
    return jax.vmap(one)(ext, start)
