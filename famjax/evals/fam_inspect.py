"""FAM inspection: what the memory reads at each block, who reads it, and how its norms evolve.

`inspect_fam` streams a text through `FamLM.inspect` in chunks of whole blocks (so a long input needs only
one chunk of activations) and concatenates the per-block diagnostics; `save_fam_plots` writes the heatmaps.
"""
from __future__ import annotations

import functools
import os

import jax
import numpy as np
from flax import nnx

import famjax
from famjax.errors import ConfigError, DataError
from famjax.evals import plots
from famjax.infer.prefill import distinct_buffers

KEYS = ("fam_probs", "token_fam_mass", "fam_norm")  # each [L, b, nb, ...]: blocks on axis 2


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _inspect_chunk(graphdef, params, tokens, state):
    out = nnx.merge(graphdef, params).inspect(tokens, state)
    return {k: out[k] for k in KEYS}, out["state"]


def inspect_fam(model: famjax.FamLM, tokens, *, chunk_blocks: int = 16) -> dict[str, np.ndarray]:
    """Returns {'fam_probs' [L, b, nb, H, F, F + B], 'token_fam_mass' [L, b, nb, B, H],
    'fam_norm' [L, b, nb, F]} over all nb = T // B complete blocks of tokens.

    tokens: int [T] or [b, T]; a trailing partial block is dropped (it causes no FAM update);
    chunk_blocks: blocks per model call (memory grows with it, not with T).
    """
    cfg = model.cfg
    if cfg.attention != "fam" or not cfg.num_fam:
        raise ConfigError(f"FAM inspection needs a model with attention='fam' and fam_len > 0, got "
                          f"{cfg.attention!r}")
    tokens = np.asarray(tokens, np.int32)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    B = cfg.block_size
    nb = tokens.shape[1] // B
    if nb == 0:
        raise DataError(f"FAM inspection needs at least one whole block of {B} tokens, got {tokens.shape[1]}: "
                        "give a longer prompt")
    graphdef, params = nnx.split(model)
    state = distinct_buffers(model.init_state(tokens.shape[0]))
    parts = {k: [] for k in KEYS}
    for start in range(0, nb, chunk_blocks):
        stop = min(nb, start + chunk_blocks)
        out, state = _inspect_chunk(graphdef, params, tokens[:, start * B:stop * B], state)
        for k in KEYS:
            parts[k].append(np.asarray(out[k]))
    return {k: np.concatenate(v, axis=2) for k, v in parts.items()}


def save_fam_plots(inspection: dict, out_dir: str, *, row: int = 0, prefix: str = "",
                   detail_blocks: tuple[int, ...] = (), **size) -> list[str]:
    """Writes the FAM heatmaps and norm plot of one batch row as PNGs under out_dir; returns their paths.

    inspection: the dict of inspect_fam (or FamLM.inspect); detail_blocks: blocks to also draw per head,
    for every layer.
    """
    path = functools.partial(os.path.join, out_dir)
    written = [
        plots.save_png(plots.plot_fam_reads(inspection["fam_probs"], row=row, **size),
                       path(f"{prefix}fam_reads.png")),
        plots.save_png(plots.plot_fam_readers(inspection["token_fam_mass"], row=row, **size),
                       path(f"{prefix}fam_readers.png")),
        plots.save_png(plots.plot_fam_norms(inspection["fam_norm"], row=row, **size),
                       path(f"{prefix}fam_norms.png")),
    ]
    num_layers = np.shape(inspection["fam_probs"])[0]
    for block in detail_blocks:
        for layer in range(num_layers):
            fig = plots.plot_fam_block(inspection["fam_probs"], layer=layer, block=block, row=row, **size)
            written.append(plots.save_png(fig, path(f"{prefix}fam_block{block}_layer{layer}.png")))
    return written
