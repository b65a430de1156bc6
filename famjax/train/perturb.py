"""Training-time FAM perturbations: state noise and drift (fam.noise, fam.drift), and the trainer's hook for more.

Not in the paper. After every block update, each FAM row gets eps x its own RMS added (stop-gradient), eps
fresh N(0, noise^2) per block plus, with drift, one N(0, drift^2) direction per layer, row and FAM row that is
the same after every block, so it accumulates like the slow drift of an old FAM. It asks the memory to store
what it keeps robustly; on PassKey it was the one perturbation that measurably helped (benchmarks/RESULTS.md).

A perturbation function has the signature `perturb_fn(key, shape) -> ops.Perturbation | None`, where
shape = (layers, rows, blocks, F, d) of one (micro-)batch and key is the step's key; its data leaves must have
[layers, rows, blocks] in front (the rows are split with the batch under gradient accumulation). Pass your own
to `famjax.train.train(..., perturb=fn)` (see experiments/).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from famjax import ops

# Salts of the step key (fold_in(fold_in(rng, step), salt)); the trainer's own draws use 1 (RPO) and 2 (RSP).
NOISE_SALT, DRIFT_SALT = 3, 5


def draw_state_noise(key, shape, *, noise: float, drift: float):
    """Returns eps float32 [L, rows, blocks, F, d] (relative to each row's RMS), or None if both are 0."""
    if not (noise or drift):
        return None
    eps = noise * jax.random.normal(jax.random.fold_in(key, NOISE_SALT), shape, jnp.float32) if noise else None
    if drift:
        one = shape[:2] + (1,) + shape[3:]
        d = drift * jax.random.normal(jax.random.fold_in(key, DRIFT_SALT), one, jnp.float32)
        eps = jnp.broadcast_to(d, shape) if eps is None else eps + d
    return eps


def add_state_noise(fam, eps, *, keep_norm: bool):
    """Returns fam [b, F, d] + eps [b, F, d] x each row's RMS (stop-gradient); with keep_norm the noised row is
    rescaled to its norm before the noise, so noise turns rows and never grows them."""
    rms = jax.lax.stop_gradient(jnp.sqrt(jnp.mean(jnp.square(fam), axis=-1, keepdims=True)))
    noised = fam + eps.astype(fam.dtype) * rms
    if keep_norm:
        noised = noised * jax.lax.stop_gradient(ops.norm_ratio(fam, noised))
    return noised


def state_noise(*, noise: float, drift: float, keep_norm: bool = False):
    """Returns the perturbation function of fam.noise / fam.drift (None when both are 0)."""
    if not (noise or drift):
        return None
    apply = functools.partial(add_state_noise, keep_norm=keep_norm)

    def perturb_fn(key, shape):
        return ops.Perturbation(apply, draw_state_noise(key, shape, noise=noise, drift=drift))
    return perturb_fn


def from_config(cfg):
    """Returns the perturbation function a run config asks for (fam.noise, fam.drift), or None."""
    if cfg.model.attention != "fam" or not int(cfg.fam.fam_len):
        return None
    return state_noise(noise=float(cfg.fam.noise), drift=float(cfg.fam.drift), keep_norm=bool(cfg.fam.keep_norm))
