"""Pure jax.numpy building blocks of TransformerFAM (no Flax): RoPE, windowing, attention, FAM update."""
from famjax.ops.attention import CAUSAL, causal_mask, segment_attention
from famjax.ops.blocks import (
                               from_grid,
                               memory_visible,
                               memory_windows,
                               num_grid_blocks,
                               segment_begin_blocks,
                               split_blocks,
                               take_blocks,
                               to_grid,
)
from famjax.ops.deferred import deferred_scan, tap
from famjax.ops.fam import Perturbation, fam_positions, fam_scan, fam_update, norm_ratio
from famjax.ops.rope import apply_rope, rope_angles, rope_rotation

__all__ = [
    "CAUSAL", "Perturbation", "apply_rope", "causal_mask", "deferred_scan", "fam_positions", "fam_scan",
    "fam_update", "from_grid", "memory_visible", "memory_windows", "norm_ratio", "num_grid_blocks", "rope_angles",
    "rope_rotation", "segment_attention", "segment_begin_blocks", "split_blocks", "take_blocks", "tap", "to_grid",
]
