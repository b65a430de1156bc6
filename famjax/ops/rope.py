"""Rotary position embeddings with float32 angles at arbitrary integer positions."""
import jax.numpy as jnp


def rope_angles(positions, head_dim: int, base: float):
    """Returns (sin, cos), each float32 [..., head_dim // 2], for integer positions [...].

    Positions may be negative (the initial FAM sits at -F..-1) or offset by up to ~2*pi*base (the random
    position offset), so angles are always computed in float32 whatever the activation dtype.
    """
    half = head_dim // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.sin(angles), jnp.cos(angles)


def rope_rotation(positions, head_dim: int, base: float):
    """Returns rope_angles's (sin, cos) with a heads axis, each float32 [..., 1, head_dim // 2]: what apply_rope
    multiplies a [..., heads, head_dim] array with."""
    return tuple(a[..., None, :] for a in rope_angles(positions, head_dim, base))


def apply_rope(x, positions, base: float):
    """Returns x rotated by its positions, same shape and dtype.

    x: [..., T, heads, head_dim]; positions: int [..., T] (broadcastable over the leading axes), or their
    rope_rotation(positions, head_dim, base) computed already (then base is not used).
    "Rotate half" layout (Llama / Gemma / Hugging Face): the two halves of a head form the complex pairs.
    """
    sin, cos = positions if isinstance(positions, tuple) else rope_rotation(positions, x.shape[-1], base)
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
