"""Logical axis names -> mesh PartitionSpecs, and activation sharding constraints.

The model names the axes of its parameters and of a few activations ("batch", "embed", "q_heads", ...); the
trainer's `mesh.rules` maps the names to mesh axes. Outside a mesh and rules context (`jax.set_mesh` plus
`flax.nnx.logical_axis_rules`, which the trainer enters) the constraints are no-ops, so the model runs
unchanged on one device, in tests and at inference.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

import jax
import numpy as np
from flax.core import spmd
from jax.sharding import PartitionSpec

_LOG = logging.getLogger(__name__)


def logical_to_spec(logical, rules, mesh_shape: Mapping[str, int], shape=None, *, warn: bool = True
                    ) -> PartitionSpec:
    """Returns the mesh PartitionSpec of a logical one (a sequence of names or None).

    rules: (name, mesh axis | tuple of axes | None) pairs; mesh_shape: mesh axis -> size. A dimension whose
    size the mesh axes do not divide is replicated, and a mesh axis is used at most once per array (the first
    dimension that asks for it gets it): activations can reuse the parameters' names.
    """
    table = {name: (tuple(axis) if isinstance(axis, (list, tuple)) else axis) for name, axis in rules}
    used: set[str] = set()
    out = []
    for i, name in enumerate(tuple(logical)):
        if name is not None and name not in table:
            raise ValueError(f"mesh.rules has no entry for logical axis {name!r}")
        axis = table.get(name) if name is not None else None
        axes = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
        axes = tuple(a for a in axes if a not in used and mesh_shape[a] > 1)
        size = int(np.prod([mesh_shape[a] for a in axes])) if axes else 1
        if shape is not None and axes and shape[i] % size:
            if warn:
                _LOG.warning("not sharding dim %d (%s, size %d) over %s: not divisible", i, name, shape[i], axes)
            axes = ()
        used.update(axes)
        out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
    return PartitionSpec(*out)


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """Returns x annotated with the logical axis names of its dimensions (a no-op without mesh and rules)."""
    rules = spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules, mesh.shape, x.shape, warn=False))


def per_shard(fn, args, names):
    """Returns fn(*args) computed on every device's shard (jax.shard_map) when a mesh and rules are active (a
    Pallas kernel cannot be partitioned by XLA), else fn(*args).

    args: arrays; names: per array, the logical names of its dimensions (as for constrain); fn returns one array
    laid out as args[0]. A dimension is split only if its size divides (logical_to_spec).
    """
    rules = spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return fn(*args)
    specs = tuple(logical_to_spec(n, rules, mesh.shape, a.shape, warn=False) for a, n in zip(args, names))
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=specs[0], check_vma=False)(*args)
